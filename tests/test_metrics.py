"""Retrieval metrics: hand-computed cases, ties, chunking, numpy/torch/CUDA inputs, i2t, exclusions, scale."""

from __future__ import annotations

import importlib
import json
import logging
import os
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from tbps_compress.errors import DataError
from tbps_compress.retrieval.metrics import metrics, metrics_from_embeddings

# the module object itself (robust even if the package re-exports the function ``metrics`` under the same name)
metrics_mod = importlib.import_module("tbps_compress.retrieval.metrics")


def reference(sim: np.ndarray, qids, gids, ks=(1, 5, 10)) -> dict[str, float]:
    """Plain-Python metrics: rank by descending score, ties by ascending gallery index."""
    hits = dict.fromkeys(ks, 0)
    ap_sum = inp_sum = 0.0
    n = 0
    for i in range(sim.shape[0]):
        order = sorted(range(sim.shape[1]), key=lambda j: (-float(sim[i, j]), j))
        ranks = [r + 1 for r, j in enumerate(order) if gids[j] == qids[i]]
        if not ranks:
            continue
        n += 1
        for k in ks:
            hits[k] += ranks[0] <= k
        ap_sum += sum((c + 1) / r for c, r in enumerate(ranks)) / len(ranks)
        inp_sum += len(ranks) / ranks[-1]
    out = {f"R{k}": 100.0 * hits[k] / n for k in ks}
    out["mAP"] = 100.0 * ap_sum / n
    out["mINP"] = 100.0 * inp_sum / n
    return out


def assert_close(a: dict[str, float], b: dict[str, float], tol: float = 1e-9) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert a[key] == pytest.approx(b[key], abs=tol), key


def random_case(q: int = 23, g: int = 17, n_ids: int = 6, seed: int = 0):
    rng = np.random.default_rng(seed)
    sim = rng.standard_normal((q, g)).astype(np.float32)
    sim[:, ::4] = np.round(sim[:, ::4], 1)  # some ties
    gids = rng.integers(0, n_ids, g)
    qids = rng.integers(0, n_ids, q)
    return sim, qids, gids


def test_hand_computed_several_positives() -> None:
    # gallery ids: [1, 2, 1, 2, 1]; query id 1; ranking by score: g0, g1, g3, g2, g4 -> positives at ranks 1, 4, 5
    sim = torch.tensor([[0.9, 0.8, 0.6, 0.7, 0.1]])
    out = metrics(sim, [1], [1, 2, 1, 2, 1], ks=(1, 2, 4))
    ap = (1 / 1 + 2 / 4 + 3 / 5) / 3
    assert out == pytest.approx({"R1": 100.0, "R2": 100.0, "R4": 100.0, "mAP": 100 * ap, "mINP": 100 * 3 / 5})
    # query id 2: positives g1, g3 at ranks 2 and 3
    out = metrics(sim, [2], [1, 2, 1, 2, 1], ks=(1, 2, 4))
    assert out == pytest.approx({"R1": 0.0, "R2": 100.0, "R4": 100.0, "mAP": 100 * (1 / 2 + 2 / 3) / 2,
                                 "mINP": 100 * 2 / 3})


def test_two_queries_averaged() -> None:
    sim = np.array([[0.9, 0.8, 0.7, 0.6], [0.1, 0.5, 0.5, 0.2]])
    out = metrics(sim, [1, 2], [1, 2, 1, 2], ks=(1,))
    # both queries: positives at ranks 1 and 3 (second one by the tie rule): AP = (1 + 2/3) / 2, INP = 2/3
    assert out == pytest.approx({"R1": 100.0, "mAP": 100 * (1 + 2 / 3) / 2, "mINP": 100 * 2 / 3})


def test_ties_broken_by_ascending_gallery_index() -> None:
    gids = [5, 7, 7, 5]
    sim = torch.zeros(1, 4)  # all tied: order is g0, g1, g2, g3
    out = metrics(sim, [7], gids, ks=(1, 2))
    assert out == pytest.approx({"R1": 0.0, "R2": 100.0, "mAP": 100 * (1 / 2 + 2 / 3) / 2, "mINP": 100 * 2 / 3})
    out = metrics(sim, [5], gids, ks=(1, 2))
    assert out == pytest.approx({"R1": 100.0, "R2": 100.0, "mAP": 100 * (1 + 2 / 4) / 2, "mINP": 100 * 2 / 4})
    # a partial tie: g2 and g1 tie on top, g1 (lower index) wins
    sim = torch.tensor([[0.1, 0.9, 0.9, 0.3]])
    assert metrics(sim, [7], [5, 5, 7, 5], ks=(1, 2))["R1"] == 0.0
    assert metrics(sim, [7], [5, 7, 5, 5], ks=(1, 2))["R1"] == 100.0


def test_only_correct_item_ranked_last() -> None:
    g = 20
    sim = torch.linspace(1.0, 0.0, g)[None, :]
    gids = list(range(g))
    out = metrics(sim, [g - 1], gids)
    assert out == pytest.approx({"R1": 0.0, "R5": 0.0, "R10": 0.0, "mAP": 100 / g, "mINP": 100 / g})
    assert metrics(sim, [g - 1], gids, ks=(20, 50))["R20"] == 100.0  # K >= G: always a hit


def test_query_without_positives_is_excluded(caplog: pytest.LogCaptureFixture) -> None:
    sim = torch.tensor([[0.9, 0.1], [0.9, 0.1], [0.5, 0.6]])
    with caplog.at_level(logging.WARNING, logger="tbps_compress.retrieval.metrics"):
        out = metrics(sim, [1, 2, 99], [1, 2], ks=(1,))
    # query 0 hits at rank 1, query 1 at rank 2, query 2 (id 99) is excluded
    assert out == pytest.approx({"R1": 50.0, "mAP": 75.0, "mINP": 75.0})
    assert "1 of 3 queries have no correct gallery item" in caplog.text


def test_no_query_with_positives_raises() -> None:
    with pytest.raises(DataError, match="none of the 2 queries"):
        metrics(torch.rand(2, 3), [8, 9], [1, 2, 3])


@pytest.mark.parametrize("chunk_size", [1, 3, 7, 10_000])
def test_chunked_matches_reference(chunk_size: int) -> None:
    sim, qids, gids = random_case()
    expected = reference(sim, qids, gids)
    assert_close(metrics(torch.from_numpy(sim), torch.from_numpy(qids), torch.from_numpy(gids),
                         chunk_size=chunk_size), expected)


def test_chunk_is_capped_by_max_elements(monkeypatch: pytest.MonkeyPatch) -> None:
    sim, qids, gids = random_case(q=10, g=5)
    calls: list[tuple[int, int]] = []

    def provider(start: int, stop: int) -> np.ndarray:
        calls.append((start, stop))
        return sim[start:stop]

    monkeypatch.setattr(metrics_mod, "MAX_CHUNK_ELEMENTS", 10)
    out = metrics(provider, qids, gids, chunk_size=1024)
    assert calls == [(0, 2), (2, 4), (4, 6), (6, 8), (8, 10)]
    assert_close(out, reference(sim, qids, gids))


def test_numpy_torch_and_list_inputs_agree() -> None:
    sim, qids, gids = random_case(seed=3)
    expected = reference(sim, qids, gids)
    assert_close(metrics(sim, qids, gids), expected)
    assert_close(metrics(torch.from_numpy(sim), torch.from_numpy(qids), torch.from_numpy(gids)), expected)
    assert_close(metrics(sim.astype(np.float64), qids.tolist(), gids.tolist()), expected)
    half = sim.astype(np.float16)
    assert_close(metrics(half, qids, gids), reference(half.astype(np.float32), qids, gids))


def test_image_to_text_by_transposing() -> None:
    sim, qids, gids = random_case(q=9, g=14, n_ids=4, seed=5)
    expected = reference(np.ascontiguousarray(sim.T), gids, qids)
    assert_close(metrics(sim.T, gids, qids, chunk_size=4), expected)
    assert_close(metrics(torch.from_numpy(sim).T, gids, qids, chunk_size=4), expected)
    # hand case: 2 images (ids 1, 2), 3 captions (ids 1, 1, 2)
    t2i = torch.tensor([[0.9, 0.2], [0.1, 0.3], [0.4, 0.8]])
    out = metrics(t2i.T, [1, 2], [1, 1, 2], ks=(1,))
    # image 1 scores captions .9, .1, .4 -> order c0, c2, c1: positives (c0, c1) at ranks 1 and 3
    # image 2 ranks .2, .3, .8 -> c2 first: positive at 1
    assert out == pytest.approx({"R1": 100.0, "mAP": 100 * ((1 + 2 / 3) / 2 + 1) / 2, "mINP": 100 * (2 / 3 + 1) / 2})


def test_callable_provider() -> None:
    sim, qids, gids = random_case(seed=7)
    assert_close(metrics(lambda a, b: torch.from_numpy(sim[a:b]), qids, gids, chunk_size=5),
                 reference(sim, qids, gids))


@pytest.mark.parametrize("chunk_size", [2, 1024])
def test_from_embeddings_matches_full_similarity(chunk_size: int) -> None:
    rng = np.random.default_rng(11)
    q, g = rng.standard_normal((31, 8)).astype(np.float32), rng.standard_normal((13, 8)).astype(np.float32)
    qids, gids = rng.integers(0, 5, 31), rng.integers(0, 5, 13)
    qn = q / np.linalg.norm(q, axis=1, keepdims=True)
    gn = g / np.linalg.norm(g, axis=1, keepdims=True)
    expected = reference(qn @ gn.T, qids, gids)
    assert_close(metrics_from_embeddings(q, g, qids, gids, chunk_size=chunk_size), expected, tol=1e-6)
    assert_close(metrics_from_embeddings(torch.from_numpy(q), torch.from_numpy(g), qids, gids,
                                         chunk_size=chunk_size), expected, tol=1e-6)
    raw = metrics_from_embeddings(q, g, qids, gids, chunk_size=chunk_size, normalize=False)
    assert_close(raw, reference(q @ g.T, qids, gids), tol=1e-6)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"similarity": np.zeros((2, 3)), "query_ids": [1], "gallery_ids": [1, 2, 3]}, ValueError, "shape"),
        ({"similarity": np.zeros((1, 1)), "query_ids": [1], "gallery_ids": [1], "ks": (0,)}, ValueError, "ks"),
        ({"similarity": np.zeros((1, 1)), "query_ids": [1.5], "gallery_ids": [1]}, ValueError, "integer"),
        ({"similarity": np.full((1, 2), np.nan), "query_ids": [1], "gallery_ids": [1, 2]}, ValueError, "NaN"),
        ({"similarity": np.zeros((1, 1)), "query_ids": [1], "gallery_ids": [1], "chunk_size": 0}, ValueError,
         "chunk_size"),
    ],
)
def test_bad_inputs(kwargs: dict, error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        metrics(**kwargs)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu() -> None:
    sim, qids, gids = random_case(q=200, g=300, n_ids=40, seed=13)
    expected = reference(sim, qids, gids)
    cuda = metrics(torch.from_numpy(sim).cuda(), torch.from_numpy(qids).cuda(), gids, chunk_size=64)
    assert_close(cuda, expected)
    q, g = torch.randn(50, 16), torch.randn(70, 16)
    qi, gi = torch.randint(0, 9, (50,)), torch.randint(0, 9, (70,))
    assert_close(metrics_from_embeddings(q.cuda(), g.cuda(), qi, gi), metrics_from_embeddings(q, g, qi, gi), 1e-4)


_SCALE_SCRIPT = """
import json, resource, sys, time
import torch
from tbps_compress.retrieval.metrics import metrics_from_embeddings
torch.manual_seed(0)
q, g, d = int(sys.argv[1]), int(sys.argv[2]), 64
gids = torch.arange(g) // 5  # 5 images per identity
qids = torch.randint(0, g // 5, (q,))
gemb = torch.randn(g, d)
qemb = gemb[qids * 5] + 1.0 * torch.randn(q, d)  # a query resembles the first image of its identity
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t0 = time.perf_counter()
out = metrics_from_embeddings(qemb, gemb, qids, gids)
out["seconds"] = time.perf_counter() - t0
out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
out["rss_before_mb"] = base / 1024
print(json.dumps(out))
"""


def _slow_selected(config: pytest.Config) -> bool:
    expr = config.getoption("markexpr") or ""
    return os.environ.get("TBPS_RUN_SLOW") == "1" or ("slow" in expr and "not slow" not in expr)


@pytest.mark.slow
def test_scale_memory_bounded(request: pytest.FixtureRequest) -> None:
    """20,000 queries x 100,000 gallery, dim 64: peak RSS of the whole process stays under 2 GB.

    Runs only with ``-m slow`` or TBPS_RUN_SLOW=1 (a full Q x G float32 matrix alone would be 8 GB).
    """
    if not _slow_selected(request.config):
        pytest.skip("slow: run with -m slow or TBPS_RUN_SLOW=1")
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", _SCALE_SCRIPT, "20000", "100000"], capture_output=True, text=True,
                          check=True)
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    logging.getLogger(__name__).warning("scale test: %s (wall %.1f s)", out, time.perf_counter() - t0)
    assert out["peak_rss_mb"] < 2048
    assert 0.0 < out["mAP"] <= 100.0 and out["R1"] <= out["R5"] <= out["R10"]


def test_a_gallery_of_too_few_identities_is_flagged(caplog) -> None:
    """One identity in the gallery: every model scores R@1 100, so the number is flagged as meaningless."""
    from tbps_compress.retrieval.metrics import MIN_MEASURABLE_IDENTITIES

    q, g = torch.randn(3, 4), torch.randn(2, 4)
    with caplog.at_level("WARNING", logger="tbps_compress.retrieval.metrics"):
        m = metrics_from_embeddings(q, g, [7, 7, 7], [7, 7])
    assert m["R1"] == 100.0
    assert "holds 1 identity" in caplog.text and "measure nothing" in caplog.text
    caplog.clear()
    ids = list(range(MIN_MEASURABLE_IDENTITIES))
    with caplog.at_level("WARNING", logger="tbps_compress.retrieval.metrics"):
        metrics_from_embeddings(torch.randn(len(ids), 4), torch.randn(len(ids), 4), ids, ids)
    assert caplog.text == ""
