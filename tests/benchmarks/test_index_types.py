"""benchmarks/index_types.py: the synthetic bank and the side-by-side measurement on a tiny bank."""

from __future__ import annotations

import numpy as np
import torch  # noqa: F401 - before faiss

from tests.benchmarks.conftest import load_script

index_types = load_script("index_types")


def test_synthetic_bank_is_unit_vectors_of_its_classes_drawn_in_chunks() -> None:
    x, labels = index_types.synthetic_bank(2_500, dim=16, classes=4)
    assert x.shape == (2_500, 16) and x.dtype == np.float32 and labels.shape == (2_500,)
    np.testing.assert_allclose(np.linalg.norm(x, axis=1), 1.0, atol=1e-5)
    assert set(labels.tolist()) == {0, 1, 2, 3}
    # each class leans toward its own centre: the class means are far apart relative to their spread
    means = np.stack([x[labels == c].mean(0) for c in range(4)])
    assert np.linalg.norm(means[0] - means[1]) > 0.1
    again, _ = index_types.synthetic_bank(2_500, dim=16, classes=4)
    assert np.array_equal(x, again)  # seeded


def test_measure_puts_exact_flat_first_and_sizes_indexes_from_their_files() -> None:
    bank, labels = index_types.synthetic_bank(3_000)
    queries, _ = index_types.synthetic_bank(40, seed=5)
    rows = index_types.measure(bank, labels, queries, ["ivf_flat", "ivf_pq"], nlist=16)
    assert [r["index"] for r in rows] == ["flat", "ivf_flat", "ivf_pq"]
    flat, ivf, pq = rows
    assert flat["recall_at_75"] == 1.0 and flat["vote_agreement"] == 1.0
    assert 512 <= flat["bytes_per_vector"] < 520  # 128 float32 and a small header
    assert ivf["params"]["nlist"] == 16 and ivf["params"]["nprobe"] == 1
    assert 0 < ivf["recall_at_75"] < 1  # one cell of 16 searched: some true neighbours missed
    assert pq["bytes_per_vector"] < 0.25 * flat["bytes_per_vector"]  # 16-byte codes + ids
