#!/usr/bin/env bash
# Issue 14: the certified-accuracy table at the paper's n = 10,000 (n0 = 100, alpha = 0.001) for the shipped default,
# on the served runtime (encoder.onnx under onnxruntime). sigma 0.25 first (Cohen et al.'s column), then 0.12 and 0.5;
# 100 images for all three (a complete small table), then 500 (the issue's protocol). Each finished image is a line
# in this folder's JSON-lines cache, so a rerun continues where the last session stopped (~10 s per image on a
# 2-core AVX2 VM; 1,500 image-sigma pairs in all). From the repository root after `make install-dev data`; then
# `satml certify artifacts/default --sigma 0.12 0.25 0.5 --n 10000 --n-images 500 --runtime onnxruntime
# --cache-dir checkpoints/certify_default --out benchmarks/results --name certify_default_n10k` writes the table
# from the cache alone.
set -euo pipefail
cd "$(dirname "$0")/../.."
[ -x .venv/bin/satml ] && export PATH="$PWD/.venv/bin:$PATH"
for n_img in 100 500; do
  for sigma in 0.25 0.12 0.5; do
    satml certify artifacts/default --sigma "$sigma" --n 10000 --n0 100 --alpha 0.001 --n-images "$n_img" \
      --threads 2 --runtime onnxruntime --cache-dir checkpoints/certify_default --out runs/cert/out_$n_img \
      --name "certify_default_n10k_sigma$sigma"
  done
done
