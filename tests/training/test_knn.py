"""k-NN: torch search and vote equal a brute-force loop, faiss equals torch, soft-kNN is the smooth limit."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from training import knn
from training.models import Encoder

C = 5  # classes in the synthetic banks


def _bank(n: int = 120, d: int = 8, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(query [20, d], bank [n, d], labels [n]); continuous random values, so no distance ties."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(20, d, generator=g), torch.randn(n, d, generator=g), torch.randint(0, C, (n,), generator=g)


def brute_neighbours(query: np.ndarray, bank: np.ndarray, k: int, metric: str) -> list[list[int]]:
    out = []
    for q in query:
        if metric == "l2":
            dist = [float(np.linalg.norm(q - b)) for b in bank]
        else:
            dist = [1 - float(q @ b / np.linalg.norm(q) / np.linalg.norm(b)) for b in bank]
        out.append(sorted(range(len(bank)), key=lambda i: dist[i])[:k])
    return out


def brute_vote(neighbour_labels: list[int]) -> int:
    """Majority; a tie goes to the tied class met first in nearest-first order (the documented rule)."""
    counts = Counter(neighbour_labels)
    best = max(counts.values())
    return next(lab for lab in neighbour_labels if counts[lab] == best)


@pytest.mark.parametrize("metric", ["l2", "cosine"])
@pytest.mark.parametrize("k", [1, 4, 15])
def test_search_and_predict_equal_brute_force(metric: str, k: int) -> None:
    q, bank, labels = _bank(seed=k)
    expected = brute_neighbours(q.double().numpy(), bank.double().numpy(), k, metric)
    assert knn.knn_search(q, bank, k, metric).tolist() == expected
    assert knn.knn_search(q, bank, k, metric, chunk=3).tolist() == expected  # chunking changes nothing
    pred, counts = knn.knn_predict(q, bank, labels, C, k=k, metric=metric)
    lab = labels.tolist()
    assert pred.tolist() == [brute_vote([lab[i] for i in row]) for row in expected]
    assert counts.tolist() == [[[lab[i] for i in row].count(c) for c in range(C)] for row in expected]
    assert (counts.sum(1) == k).all()


@pytest.mark.parametrize("d", [8, knn.WIDE_BANK + 16])
@pytest.mark.parametrize("chunk", [1, 2, 3, knn.SMALL_BATCH, 20])
def test_every_product_layout_finds_the_brute_force_neighbours(d: int, chunk: int) -> None:
    """knn_search picks its matmul layout by batch size and width (one query, 2-16 of a wide bank, the rest):
    each of them, with and without the cached norms and transpose, returns the exact neighbours."""
    q, bank, _ = _bank(n=200, d=d, seed=d + chunk)
    expected = brute_neighbours(q.double().numpy(), bank.double().numpy(), 9, "l2")
    assert knn.knn_search(q, bank, 9, chunk=chunk).tolist() == expected
    cached = knn.knn_search(q, bank, 9, chunk=chunk, bank_sq=bank.pow(2).sum(1), bank_t=bank.t().contiguous())
    assert cached.tolist() == expected


@pytest.mark.parametrize(
    ("row", "pred"),
    [
        ([3, 1, 1], 1),  # plain majority beats the nearest neighbour
        ([2, 1, 1, 2], 2),  # 2-2 tie: the nearest neighbour's class
        ([1, 2, 2, 1], 1),
        ([4, 0, 3, 0, 3], 0),  # 0 and 3 tied, 4 (nearest) is not tied: first tied neighbour is a 0
        ([0, 1, 2, 3, 4], 0),  # all tied: 1-NN
    ],
)
def test_vote_tie_break_is_the_nearest_tied_neighbour(row: list[int], pred: int) -> None:
    p, counts = knn.vote(torch.tensor([row]), C)
    assert p.item() == pred
    assert counts[0].tolist() == [row.count(c) for c in range(C)]


@settings(max_examples=60, deadline=None)
@given(st.lists(st.lists(st.integers(0, C - 1), min_size=6, max_size=6), min_size=1, max_size=8))
def test_vote_equals_reference_on_any_labels(rows: list[list[int]]) -> None:
    pred, _ = knn.vote(torch.tensor(rows), C)
    assert pred.tolist() == [brute_vote(r) for r in rows]


def test_k_out_of_range_raises() -> None:
    q, bank, _ = _bank(n=10)
    for k in (0, 11):
        with pytest.raises(ValueError, match="k must be"):
            knn.knn_search(q, bank, k)


@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_faiss_equals_torch(metric: str) -> None:
    pytest.importorskip("faiss")
    q, bank, labels = _bank(n=300, d=16, seed=7)
    index = knn.FaissKnn(bank, labels, C, k=9, metric=metric)
    assert not index.on_gpu
    assert index.search(q).tolist() == knn.knn_search(q, bank, 9, metric).tolist()
    f_pred, f_counts = index.predict(q)
    t_pred, t_counts = knn.knn_predict(q, bank, labels, C, k=9, metric=metric)
    assert f_pred.tolist() == t_pred.tolist() and f_counts.tolist() == t_counts.tolist()
    # numpy inputs (what the app may hold) give the same answer
    assert index.predict(q.numpy())[0].tolist() == t_pred.tolist()
    with pytest.raises(ValueError, match="k must be"):
        knn.FaissKnn(bank[:5], labels[:5], C, k=6, metric=metric)


def test_soft_knn_approaches_hard_1nn_at_small_temperature() -> None:
    q, bank, labels = _bank(seed=3)
    q, bank = q.double(), bank.double()
    nn1 = labels[knn.knn_search(q, bank, 1)[:, 0]]
    for k in (None, 10):
        logits = knn.soft_knn_logits(q, bank, labels, C, temperature=1e-3, k=k)
        assert logits.shape == (20, C)
        assert logits.argmax(1).tolist() == nn1.tolist()
        # nearly all the probability mass is on the 1-NN class
        assert logits.exp().gather(1, nn1[:, None]).min() > 0.99
        torch.testing.assert_close(logits.exp().sum(1), torch.ones(20, dtype=torch.float64))


def test_soft_knn_at_large_temperature_tends_to_class_frequencies() -> None:
    q, bank, labels = _bank(seed=4)
    logits = knn.soft_knn_logits(q.double(), bank.double(), labels, C, temperature=1e6)
    freq = torch.bincount(labels, minlength=C).double() / len(labels)
    torch.testing.assert_close(logits.exp(), freq.expand(20, -1), atol=1e-4, rtol=0)


def test_soft_knn_is_differentiable() -> None:
    q, bank, labels = _bank(seed=5)
    for k in (None, 10):
        qq = q.clone().requires_grad_(True)
        logits = knn.soft_knn_logits(qq, bank, labels, C, temperature=0.5, k=k)
        (g,) = torch.autograd.grad(logits[:, 0].sum(), qq)
        assert torch.isfinite(g).all() and g.abs().sum() > 0
    for bad in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="temperature"):
            knn.soft_knn_logits(q, bank, labels, C, temperature=bad)


def test_soft_knn_classifier_wraps_encoder_and_bank(tiny_encoder: Encoder) -> None:
    x = torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    bank = knn.embed(tiny_encoder, torch.rand(12, 3, 16, 16, generator=torch.Generator().manual_seed(1)))
    labels = torch.arange(12) % 3
    clf = knn.SoftKnnClassifier(tiny_encoder, bank, labels, 3, temperature=0.2)
    with torch.no_grad():
        torch.testing.assert_close(clf(x), knn.soft_knn_logits(tiny_encoder(x), bank, labels, 3, 0.2))


def test_other_class_guides_are_the_nearest_other_class_rows() -> None:
    q, bank, labels = _bank(seed=6)
    y = torch.arange(20) % C
    guides = knn.other_class_guides(q, y, bank, labels, m=4)
    assert guides.shape == (20, 4, bank.shape[1])
    for i in range(20):
        others = [j for j in range(len(bank)) if labels[j] != y[i]]
        near = sorted(others, key=lambda j: float((q[i] - bank[j]).norm()))[:4]
        torch.testing.assert_close(guides[i], bank[near])


def test_embed_takes_uint8_nhwc_or_float_nchw_and_restores_mode(tiny_encoder: Encoder) -> None:
    u8 = np.random.default_rng(0).integers(0, 256, (7, 16, 16, 3), dtype=np.uint8)
    as_float = torch.from_numpy(u8).permute(0, 3, 1, 2).float() / 255
    torch.testing.assert_close(knn.to_float_images(u8), as_float)
    tiny_encoder.train()
    a = knn.embed(tiny_encoder, u8, batch_size=3)
    assert tiny_encoder.training  # caller's mode restored
    b = knn.embed(tiny_encoder, as_float, batch_size=100)
    assert a.shape == (7, tiny_encoder.cfg.embed_dim) and a.dtype == torch.float32
    torch.testing.assert_close(a, b)  # eval mode inside: batching does not change the result


# --- the capped vote (issue 15: a few examples of a new class can win) -------------------------------------


def capped(row: torch.Tensor, num_classes: int, bank_labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    rule = knn.vote_rule("capped", bank_labels, num_classes, row.shape[1])
    return knn.vote(row, num_classes, rule.cap, rule.weights)


def prior(row: torch.Tensor, num_classes: int, bank_labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    rule = knn.vote_rule("prior", bank_labels, num_classes, row.shape[1])
    return knn.vote(row, num_classes, rule.cap, rule.weights)


def test_capped_vote_lets_a_small_class_win_where_the_majority_cannot() -> None:
    # 10 neighbours of the new class 2 (the nearest ones), 65 spread over old classes 0 and 1
    row = torch.tensor([[2] * 10 + [0] * 40 + [1] * 25])
    bank_labels = torch.tensor([0] * 4500 + [1] * 4500 + [2] * 10)
    assert knn.vote(row, 3)[0].item() == 0  # majority: 40 votes beat 10
    pred, counts = capped(row, 3, bank_labels)
    assert knn.class_cap(bank_labels, 3, 75) == 10
    assert counts.tolist() == [[10, 10, 10]]  # each class counts at most 10 ...
    assert pred.item() == 2  # ... and the tie goes to the nearest neighbour's class


def test_capped_vote_keeps_the_old_classes_when_the_small_class_is_far() -> None:
    row = torch.tensor([[0] * 40 + [1] * 33 + [2] * 2])  # the new class only among the farthest
    bank_labels = torch.tensor([0] * 100 + [1] * 100 + [2] * 10)
    pred, counts = capped(row, 3, bank_labels)
    assert pred.item() == 0 and counts.tolist() == [[10, 10, 2]]


@settings(max_examples=50, deadline=None)
@given(st.lists(st.lists(st.integers(0, 3), min_size=9, max_size=9), min_size=1, max_size=8),
       st.integers(9, 40))
def test_capped_and_prior_votes_are_the_majority_vote_on_a_balanced_bank(rows: list[list[int]], size: int) -> None:
    labels = torch.tensor(rows)
    bank_labels = torch.arange(4).repeat_interleave(size)
    assert knn.class_cap(bank_labels, 4, 9) == 9 and knn.prior_weights(bank_labels, 4) is None
    for kind in ("capped", "prior"):
        assert knn.vote_rule(kind, bank_labels, 4, 9).majority
    for vote in (capped, prior):
        for a, b in zip(vote(labels, 4, bank_labels), knn.vote(labels, 4), strict=True):
            assert torch.equal(a, b)


def test_class_cap_ignores_empty_classes_and_vote_rule_names() -> None:
    bank_labels = torch.tensor([0] * 50 + [2] * 3)
    assert knn.class_cap(bank_labels, 4, 75) == 3  # classes 1 and 3 have no example: not the smallest
    assert knn.vote_rule("majority", bank_labels, 4, 75).majority
    assert knn.vote_rule("capped", bank_labels, 4, 75).cap == 3
    with pytest.raises(ValueError, match="vote must be one of"):
        knn.vote_rule("weighted", bank_labels, 4, 75)
    with pytest.raises(ValueError, match="cap must be >= 1"):
        knn.vote(torch.tensor([[0, 1]]), 2, cap=0)


def test_torch_knn_under_a_rule_equals_that_vote_over_its_neighbours() -> None:
    g = torch.Generator().manual_seed(0)
    bank, labels = torch.randn(60, 8, generator=g), torch.tensor([0] * 30 + [1] * 25 + [2] * 5)
    q = torch.randn(7, 8, generator=g)
    for kind, vote in (("capped", capped), ("prior", prior)):
        index = knn.TorchKnn(bank, labels, 3, 20, rule=knn.vote_rule(kind, labels, 3, 20))
        want = vote(labels[index.search(q)], 3, labels)
        for a, b in zip(index.predict(q), want, strict=True):
            assert torch.equal(a, b)


def test_prior_weights_scale_votes_by_class_size_to_the_power() -> None:
    bank_labels = torch.tensor([0] * 4500 + [1] * 4500 + [2] * 10)
    w = knn.prior_weights(bank_labels, 4, 0.75)
    assert w is not None and torch.allclose(w[:3], torch.tensor([1.0, 1.0, 225 ** 0.75], dtype=torch.float64))
    # each vote of the 10-example class counts (4,500 / (2 x 10)) ** 0.75 = 58 votes of a 4,500-example class:
    # at k = 75 a single such neighbour (the farthest one here) outweighs 57 others; the counts stay raw
    vote_075 = knn.vote(torch.tensor([[0] * 50 + [1] * 24 + [2]]), 3, weights=w[:3])
    assert vote_075[0].item() == 2 and vote_075[1].tolist() == [[50, 24, 1]]
    assert knn.vote(torch.tensor([[0] * 70 + [1] * 4 + [2]]), 3, weights=w[:3])[0].item() == 0
    assert prior(torch.tensor([[0] * 74 + [2]]), 3, bank_labels)[0].item() == 2  # the served power 1: 225 > 74
    # classes at least half the largest count as equals: no weights, exactly the majority vote
    assert knn.prior_weights(torch.tensor([0] * 4507 + [1] * 4468 + [2] * 2300), 3) is None
    assert prior(torch.tensor([[0] * 75]), 3, bank_labels)[0].item() == 0
    balanced = knn.prior_weights(bank_labels, 3, 1.0)
    assert balanced is not None and knn.vote(torch.tensor([[0] * 40 + [1] * 33 + [2] * 2]), 3,
                                             weights=balanced)[0].item() == 2  # power 1: 2 of 10 beat 40 of 4,500
    assert knn.vote(torch.tensor([[0] * 40 + [1] * 33 + [2] * 2]), 3,
                    weights=knn.prior_weights(bank_labels, 3, 0.0))[0].item() == 0  # power 0: the majority


# ---------------------------------------------------------------- faiss index types (issue 16)

def _clustered_bank(n: int = 3000, d: int = 16, classes: int = 5, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    centres = torch.randn(classes, d, generator=torch.Generator().manual_seed(1234)) * 3  # the same for every seed
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % classes
    return centres[labels] + torch.randn(n, d, generator=g), labels


@pytest.mark.parametrize("kind", knn.INDEX_TYPES)
@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_every_index_type_votes_like_the_exact_search(kind: str, metric: str) -> None:
    pytest.importorskip("faiss")
    bank, labels = _clustered_bank()
    queries, truth = _clustered_bank(200, seed=1)
    exact = knn.TorchKnn(bank, labels, 5, k=25, metric=metric)
    spec = knn.IndexSpec(kind, nlist=16, nprobe=4, pq_m=8, hnsw_m=16, ef_search=64)
    approx = knn.FaissKnn(bank, labels, 5, k=25, metric=metric, spec=spec)
    ref_pred, _ = exact.predict(queries)
    pred, counts = approx.predict(queries)
    assert (pred == ref_pred).float().mean() >= 0.97, "the vote survives an approximate search"
    assert (pred == truth).float().mean() >= 0.9 and counts.shape == (200, 5)
    found = approx.search(queries)
    recall = np.mean([len(set(a.tolist()) & set(b.tolist())) / 25 for a, b in zip(found, exact.search(queries),
                                                                                   strict=True)])
    assert recall >= (0.999 if kind == "flat" else 0.5), recall


def test_ivf_searching_every_cell_is_exact() -> None:
    pytest.importorskip("faiss")
    bank, labels = _clustered_bank()
    queries, _ = _clustered_bank(50, seed=2)
    ivf = knn.FaissKnn(bank, labels, 5, k=10, spec=knn.IndexSpec("ivf_flat", nlist=16, nprobe=16))
    assert torch.equal(ivf.search(queries), knn.TorchKnn(bank, labels, 5, k=10).search(queries))


def test_missing_neighbours_cast_no_vote() -> None:
    """An approximate index may return -1 for neighbours it did not find: they count for no class."""
    pred, counts = knn.vote(torch.tensor([[2, -1, -1], [-1, 1, 1], [-1, -1, -1]]), 3)
    assert pred.tolist() == [2, 1, 0]
    assert counts.tolist() == [[0, 0, 1], [0, 2, 0], [0, 0, 0]]
    pytest.importorskip("faiss")
    bank, labels = _clustered_bank(400)
    sparse = knn.FaissKnn(bank, labels, 5, k=300, spec=knn.IndexSpec("ivf_flat", nlist=8, nprobe=1))
    idx = sparse.search(bank[:20])
    assert (idx == -1).any(), "one cell of ~50 vectors cannot hold 300 neighbours"
    pred, counts = sparse.predict(bank[:20])
    assert (counts.sum(1) == (idx >= 0).sum(1)).all() and (pred == labels[:20]).all()


def test_auto_index_spec_by_bank_size() -> None:
    assert knn.auto_index_spec(45_000, 48).type == "flat"
    assert knn.auto_index_spec(knn.FLAT_MAX, 128).type == "flat"
    big = knn.auto_index_spec(knn.FLAT_MAX + 1, 128)
    assert big.type == "ivf_flat" and big.nlist == knn.auto_nlist(knn.FLAT_MAX + 1) and big.nprobe == big.nlist // 32
    assert knn.auto_index_spec(knn.PQ_MIN, 128).type == "ivf_pq"
    assert knn.auto_index_spec(knn.PQ_MIN, 72).type == "ivf_flat"  # 16-byte codes need 16 | dim
    assert knn.auto_index_spec(10, 8, index_type="hnsw").type == "hnsw"  # an explicit type is kept
    assert knn.auto_index_spec(10**6, 128, nlist=100, nprobe=7).nlist == 100
    assert [knn.auto_nlist(n) for n in (1, 45_000, 10**6, 10**7)] == [16, 1024, 4096, 16384]


def test_index_spec_rejects_bad_parameters() -> None:
    with pytest.raises(ValueError, match="index type"):
        knn.IndexSpec("annoy")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="positive"):
        knn.IndexSpec("ivf_flat", nprobe=0)
    pytest.importorskip("faiss")
    with pytest.raises(ValueError, match="divide"):
        knn.FaissKnn(*_clustered_bank(200), 5, k=5, spec=knn.IndexSpec("ivf_pq", nlist=4, pq_m=5))
