"""Batch sampling: uniform epochs, hard (nearest-caption) batches, exact resume."""

from __future__ import annotations

import re

import numpy as np

from tbps_compress.data.loader import CaptionNeighbours, EpochBatchSampler

COLOURS = ["red", "blue", "green", "black", "white", "yellow"]
GARMENTS = ["coat", "shirt", "dress", "jacket"]


def _captions(n: int, seed: int = 0) -> tuple[list[str], list[int]]:
    rng = np.random.default_rng(seed)
    texts, pids = [], []
    for i in range(n):
        c, g, c2 = rng.choice(COLOURS), rng.choice(GARMENTS), rng.choice(COLOURS)
        texts.append(f"a person in a {c} {g} and {c2} trousers")
        pids.append(i // 2)
    return texts, pids


def test_uniform_batches_are_a_seeded_permutation():
    s = EpochBatchSampler(100, 8, seed=3)
    batches = list(s)
    assert len(batches) == len(s) == 12
    flat = [i for b in batches for i in b]
    assert len(set(flat)) == 96
    assert batches == list(EpochBatchSampler(100, 8, seed=3))
    s.set_epoch(1)
    assert list(s) != batches


def test_caption_neighbours_are_nearest_other_identities():
    texts, pids = _captions(200)
    nn = CaptionNeighbours(texts, pids)
    out = nn([0, 5, 17], k=4)
    assert out.shape == (3, 4)
    words = [set(re.findall(r"[a-z]+", t)) for t in texts]
    for seed, row in zip([0, 5, 17], out, strict=True):
        assert all(pids[j] != pids[seed] for j in row)
        shared = [len(words[seed] & words[j]) for j in row]
        others = [len(words[seed] & words[j]) for j in range(200) if pids[j] != pids[seed]]
        assert min(shared) >= np.percentile(others, 90)  # nearer than nine in ten of the rest
        assert shared == sorted(shared, reverse=True)


def test_hard_batches_group_alike_captions_and_resume_exactly():
    texts, pids = _captions(400)
    nn = CaptionNeighbours(texts, pids)
    s = EpochBatchSampler(400, 16, seed=1, neighbours=nn, hard_fraction=0.5, group=4)
    batches = s.global_batches()
    assert len(batches) == 25 and all(len(b) == 16 and len(set(b)) == 16 for b in batches)
    words = [set(re.findall(r"[a-z]+", t)) for t in texts]

    def within_groups(b: list[int]) -> float:
        return float(np.mean([len(words[b[g]] & words[b[g + j]]) for g in range(0, 16, 4) for j in (1, 2, 3)]))

    scores = sorted(within_groups(b) for b in batches)
    assert scores[-12] > scores[11] + 0.5  # the hard half is visibly more alike than the uniform half
    s2 = EpochBatchSampler(400, 16, seed=1, neighbours=nn, hard_fraction=0.5, group=4)
    s2.set_epoch(0, start=7)
    assert list(s2) == batches[7:]
    off = EpochBatchSampler(400, 16, seed=1, neighbours=nn, hard_fraction=0.0)
    assert off.global_batches() == EpochBatchSampler(400, 16, seed=1).global_batches()


def test_ranks_split_each_global_batch():
    texts, pids = _captions(256)
    nn = CaptionNeighbours(texts, pids)
    ranks = [EpochBatchSampler(256, 8, seed=0, rank=r, world=2, neighbours=nn, hard_fraction=1.0, group=4)
             for r in (0, 1)]
    whole = ranks[0].global_batches()
    for (a, b), g in zip(zip(ranks[0], ranks[1], strict=True), whole, strict=True):
        assert a + b == g
