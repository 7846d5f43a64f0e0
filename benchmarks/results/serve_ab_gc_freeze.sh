cd /work/main; source .venv/bin/activate
B=$(cat /tmp/prof/boundary)
for v in base head cur2 base cur2; do
  PORT=8790
  SATML_ARTIFACTS_DIR=/tmp/prof/arts SATML_HOST=127.0.0.1 SATML_PORT=$PORT SATML_LOG_LEVEL=warning \
    python -c "import sys; sys.path.insert(0,'/tmp/ab/$v'); import app; assert app.__file__.startswith('/tmp/ab/$v'), app.__file__; from app.serve import main; main()" > /tmp/ab/$v.log 2>&1 &
  SP=$!
  for i in $(seq 120); do curl -sf http://127.0.0.1:$PORT/health/ready >/dev/null && break; sleep 0.25; done
  wrk -t1 -c8 -d2s -s benchmarks/wrk/multipart.lua http://127.0.0.1:$PORT/classify -- /tmp/prof/body1.bin $B >/dev/null
  for pt in "1 1" "1 32" "8 32"; do set -- $pt
    out=$(wrk -t1 -c$2 -d8s --timeout 30s -s benchmarks/wrk/multipart.lua http://127.0.0.1:$PORT/classify -- /tmp/prof/body$1.bin $B | grep SERVE_BENCH_JSON)
    echo "$v ${1}x$2 $out"
  done
  kill $SP; wait $SP 2>/dev/null
done
