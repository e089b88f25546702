"""Ground-truth diagnosis of text-to-image retrieval on SynthPedes: an attribute oracle and per-attribute AUCs.

SynthPedes knows what every image shows and what every caption states (the ``synth_truth.json`` sidecar, read by
:func:`tbps_compress.data.synthpedes.load_truth`). Two questions follow from that:

- **How far can retrieval go from the attributes alone?** :func:`oracle_scores` is a naive-Bayes scorer over the
  attribute families: score(caption q, image g) = sum over the families f that q states of
  ``log P(stated_f = q_f | visible_f = g_f)``, the probabilities estimated on the train split's (stated, visible)
  pairs (each caption against its own image). :func:`oracle_table` reports its R@K / mAP for a few family presets,
  so a model's numbers can be read against the ceiling of what the captions make identifiable.
- **Which attributes does a model get wrong?** :func:`attribute_diagnosis` measures, for each family, how often a
  similarity matrix ranks an image that shows the stated value above one that shows a different value (an AUC);
  :func:`diagnose_artifact` does this for an artifact next to the oracle's own AUCs.

Conventions
-----------
- Queries are all captions of the split's truth entries in order, the gallery is the split's images in the
  annotation's order; ids are the entries' ``id``.
- Probabilities are add-:data:`ALPHA` smoothed over the stated values seen in training. A stated word never seen
  in training (the "other" row) contributes 0 to every image: it says nothing. A visible ``null`` (the colour of an
  absent hat) is a value of its own, so "red hat" scores low against a hatless image.
- :func:`oracle_scores` returns exact scores (ties are real: captions that state few families tie many images).
  :func:`oracle_table` breaks ties for R@K with a deterministic jitter below :data:`TIE_JITTER` (a fixed random
  order of the gallery), so no ceiling is inflated by ties resolved in gallery (identity) order.
- AUCs count ties as 0.5 and are computed by ranks, never by (positive, negative) loops.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import DataError, UserError

log = logging.getLogger(__name__)

#: Add-alpha smoothing of ``P(stated | visible)``: small, so the estimate follows the data where it has any.
ALPHA = 0.1
#: Upper bound of the tie-breaking jitter :func:`oracle_table` adds to the oracle scores (far below any real gap
#: between two sums of log-probabilities, far above float64 resolution at their magnitude).
TIE_JITTER = 1e-9
#: Family presets of :func:`oracle_table`; ``coarse`` comes from the truth file's own ``coarse`` list.
PRESETS: dict[str, tuple[str, ...] | None] = {
    "all": None, "coarse": None, "colours": ("upper_color", "lower_color"), "upper_color": ("upper_color",),
}
TRUTH_FILE = "synth_truth.json"
_ROWS_PER_CHUNK = 1024


# ----------------------------------------------------------------------------------------------- truth access
def truth_splits(truth: dict[str, Any]) -> list[str]:
    """The splits the truth's entries belong to, in first-appearance order."""
    seen: dict[str, None] = {}
    for e in _all_entries(truth):
        seen.setdefault(str(e.get("split")), None)
    return list(seen)


def _all_entries(truth: dict[str, Any]) -> list[dict[str, Any]]:
    entries = truth.get("entries") if isinstance(truth, dict) else None
    if not isinstance(entries, list) or not entries:
        raise DataError(f"{TRUTH_FILE}: 'entries' is missing or empty; regenerate the dataset with "
                        "`tbps-compress synth` to write the ground truth")
    for i, e in enumerate(entries):
        if not isinstance(e, dict) or not isinstance(e.get("visible"), dict) or not isinstance(e.get("stated"), list):
            raise DataError(f"{TRUTH_FILE}: entry {i} needs a 'visible' object and a 'stated' list; regenerate the "
                            "dataset with `tbps-compress synth`")
    return entries


def _split_entries(truth: dict[str, Any], split: str) -> list[dict[str, Any]]:
    entries = [e for e in _all_entries(truth) if e.get("split") == split]
    if not entries:
        raise DataError(f"{TRUTH_FILE}: no entries in split {split!r} (splits present: "
                        f"{', '.join(truth_splits(truth))}); choose one of those splits")
    return entries


def _families(truth: dict[str, Any], families: Sequence[str] | None) -> list[str]:
    known = truth.get("families") if isinstance(truth, dict) else None
    if not isinstance(known, list) or not known:
        raise DataError(f"{TRUTH_FILE}: 'families' is missing or empty; regenerate the dataset with "
                        "`tbps-compress synth`")
    if families is None:
        return [str(f) for f in known]
    unknown = [f for f in families if f not in known]
    if unknown:
        raise UserError(f"families: unknown attribute famil{'y' if len(unknown) == 1 else 'ies'} "
                        f"{', '.join(map(repr, unknown))}; use some of {', '.join(known)}")
    if not families:
        raise UserError("families: empty list; give at least one attribute family or None for all")
    return list(dict.fromkeys(families))


def _captions(entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The stated dicts of every caption of the entries, in order."""
    return [s if isinstance(s, dict) else {} for e in entries for s in e["stated"]]


def _stated(caption: dict[str, Any], family: str) -> str | None:
    v = caption.get(family)
    return None if v is None else str(v)


def _visible(entry: dict[str, Any], family: str) -> str | None:
    v = entry["visible"].get(family)
    return None if v is None else str(v)


def _ids(entries: list[dict[str, Any]]) -> tuple[np.ndarray, np.ndarray]:
    image_pids = np.array([int(e["id"]) for e in entries], dtype=np.int64)
    text_pids = np.repeat(image_pids, [len(e["stated"]) for e in entries])
    return text_pids, image_pids


# ----------------------------------------------------------------------------------------------- oracle
def _log_table(family: str, train: list[dict[str, Any]],
               visible_vocab: dict[str | None, int]) -> tuple[np.ndarray, dict[str, int]]:
    """``(table, stated_vocab)``: ``table[s, v] = log P(stated = s | visible = v)`` from the train pairs, one extra
    all-zero row (index ``len(stated_vocab)``) for stated words never seen in training."""
    pairs = [(s, _visible(e, family)) for e in train for c in e["stated"]
             if isinstance(c, dict) and (s := _stated(c, family)) is not None]
    stated_vocab = {s: i for i, s in enumerate(sorted({s for s, _ in pairs}))}
    m, n = len(stated_vocab), len(visible_vocab)
    counts = np.zeros((m, n), dtype=np.float64)
    if pairs:
        rows = np.array([stated_vocab[s] for s, _ in pairs])
        cols = np.array([visible_vocab[v] for _, v in pairs])
        np.add.at(counts, (rows, cols), 1.0)
    table = np.zeros((m + 1, n), dtype=np.float64)
    if m:
        table[:m] = np.log((counts + ALPHA) / (counts.sum(axis=0, keepdims=True) + ALPHA * m))
    return table, stated_vocab


def oracle_scores(truth: dict[str, Any], split: str, families: Sequence[str] | None = None,
                  train_split: str = "train") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(S, text_pids, image_pids)``: the naive-Bayes attribute oracle's (Q, G) float64 scores for the split's
    captions (rows) against its images (columns), using only ``families`` (default: all of the truth's).

    ``P(stated | visible)`` is estimated on ``train_split`` (see the module notes for smoothing and unseen words).
    Raises :class:`DataError` when a split has no entries or the train split states nothing.
    """
    fams = _families(truth, families)
    entries = _split_entries(truth, split)
    try:
        train = _split_entries(truth, train_split)
    except DataError:
        raise DataError(f"{TRUTH_FILE}: no entries in train split {train_split!r} to estimate P(stated | visible) "
                        f"(splits present: {', '.join(truth_splits(truth))}); pass a train split that exists") from None
    captions = _captions(entries)
    text_pids, image_pids = _ids(entries)
    S = np.zeros((len(captions), len(entries)), dtype=np.float64)
    everything = _all_entries(truth)
    stated_any = False
    for f in fams:
        values = sorted({v for e in everything if (v := _visible(e, f)) is not None})
        visible_vocab: dict[str | None, int] = {v: i for i, v in enumerate(values)}
        visible_vocab[None] = len(values)
        table, stated_vocab = _log_table(f, train, visible_vocab)
        stated_any = stated_any or bool(stated_vocab)
        other = len(stated_vocab)
        q = np.array([-1 if (s := _stated(c, f)) is None else stated_vocab.get(s, other) for c in captions])
        g = np.array([visible_vocab[_visible(e, f)] for e in entries])
        mask = q >= 0
        if mask.any():
            S[mask] += table[:, g][q[mask]]
    if not stated_any:
        raise DataError(f"{TRUTH_FILE}: no caption of train split {train_split!r} states any of the families "
                        f"{', '.join(fams)}; the oracle has nothing to learn from")
    log.debug("oracle: %d queries x %d images, families %s", S.shape[0], S.shape[1], ", ".join(fams))
    return S, text_pids, image_pids


def _tie_break(S: np.ndarray, seed: int = 0) -> np.ndarray:
    """``S`` plus a jitter in ``[0, TIE_JITTER)`` per gallery column from a fixed random order of the columns."""
    n = S.shape[1]
    order = np.random.default_rng(seed).permutation(n).astype(np.float64)
    return S + TIE_JITTER * order[None, :] / max(n, 1)


def _retrieval(S: np.ndarray, text_pids: np.ndarray, image_pids: np.ndarray) -> dict[str, float]:
    from .metrics import metrics

    m = metrics(_tie_break(S), text_pids, image_pids)
    p = m["R1"] / 100.0
    m["R1_se"] = 100.0 * math.sqrt(max(p * (1.0 - p), 0.0) / len(text_pids))
    return m


def oracle_table(truth: dict[str, Any], split: str) -> dict[str, Any]:
    """The oracle's retrieval on a split for each preset of :data:`PRESETS`.

    Returns ``{"split", "queries", "images", "identities", "alpha", "presets": {name: {"families": [...],
    "R1", "R5", "R10", "mAP", "mINP", "R1_se"}}, "attributes": attribute_diagnosis of the all-families oracle}``;
    metrics in percent, ``R1_se`` the R@1 standard error ``sqrt(p (1 - p) / queries)`` in points. A preset naming
    a family the truth lacks is left out (with a warning).
    """
    known = _families(truth, None)
    entries = _split_entries(truth, split)
    presets: dict[str, Any] = {}
    attributes: dict[str, dict[str, Any]] = {}
    for name, fams in PRESETS.items():
        if name == "all":
            chosen = list(known)
        elif name == "coarse":
            chosen = [str(f) for f in truth.get("coarse") or []]
        else:
            chosen = list(fams or ())
        missing = [f for f in chosen if f not in known]
        if not chosen or missing:
            log.warning("oracle: preset %r skipped: families %s not in the ground truth", name,
                        ", ".join(missing) or "(none listed)")
            continue
        S, tp, ip = oracle_scores(truth, split, chosen)
        presets[name] = {"families": chosen, **_retrieval(S, tp, ip)}
        if name == "all":
            attributes = attribute_diagnosis(S, truth, split)
    text_pids, image_pids = _ids(entries)
    return {"split": split, "queries": int(len(text_pids)), "images": int(len(image_pids)),
            "identities": int(len(np.unique(image_pids))), "alpha": ALPHA, "presets": presets,
            "attributes": attributes}


# ----------------------------------------------------------------------------------------------- AUC
def _midranks(x: np.ndarray) -> np.ndarray:
    """Per row, 1-based ranks of ``x`` (R, n) with ties given their average rank."""
    n = x.shape[1]
    order = np.argsort(x, axis=1, kind="stable")
    xs = np.take_along_axis(x, order, axis=1)
    idx = np.broadcast_to(np.arange(n), xs.shape)
    starts = np.ones(xs.shape, dtype=bool)
    starts[:, 1:] = xs[:, 1:] != xs[:, :-1]
    ends = np.ones(xs.shape, dtype=bool)
    ends[:, :-1] = starts[:, 1:]
    first = np.maximum.accumulate(np.where(starts, idx, 0), axis=1)
    last = np.minimum.accumulate(np.where(ends, idx, n - 1)[:, ::-1], axis=1)[:, ::-1]
    ranks = np.empty(xs.shape, dtype=np.float64)
    np.put_along_axis(ranks, order, (first + last) / 2.0 + 1.0, axis=1)
    return ranks


def _row_aucs(S: np.ndarray, rows: np.ndarray, pos: np.ndarray, neg: np.ndarray) -> np.ndarray:
    """AUC of each row of ``S[rows]``: positives ``pos`` against negatives ``neg`` (column masks), ties 0.5."""
    cols = np.flatnonzero(pos | neg)
    is_pos = pos[cols]
    n_pos, n_neg = float(is_pos.sum()), float((~is_pos).sum())
    out = np.empty(len(rows), dtype=np.float64)
    for start in range(0, len(rows), _ROWS_PER_CHUNK):
        block = S[np.ix_(rows[start:start + _ROWS_PER_CHUNK], cols)]
        ranks = _midranks(block)
        u = ranks[:, is_pos].sum(axis=1) - n_pos * (n_pos + 1.0) / 2.0  # Mann-Whitney U of the positives
        out[start:start + len(block)] = u / (n_pos * n_neg)
    return out


def attribute_diagnosis(S: np.ndarray, truth: dict[str, Any], split: str,
                        families: Sequence[str] | None = None) -> dict[str, dict[str, Any]]:
    """Per attribute family: how often ``S`` ranks an image showing the stated value above one that contradicts it.

    For each caption stating value v for family f, positives are the split's images whose visible f is v and
    negatives those whose visible f is another non-null value; the caption's AUC is the fraction of (positive,
    negative) pairs with the positive scored higher (ties 0.5). Stated words that no image shows ("dark") and
    captions without a positive or a negative are skipped. Returns ``{family: {"auc", "queries", "pairs"}}`` in
    family order (``auc``: the mean over the family's queries, each weighted equally; None when it has none) plus
    ``"overall"``: the mean of the family AUCs, and the totals of queries and pairs.

    The AUC is not conditioned on the other attributes: a positive of another identity that differs in everything
    else may rightly score below a negative that matches everything else, so even the all-families oracle stays
    well below 1 (about 0.75 overall on the 500-identity demo). Read a model's AUC against the oracle's, not 1.
    """
    fams = _families(truth, families)
    entries = _split_entries(truth, split)
    captions = _captions(entries)
    S = np.asarray(S)
    if S.shape != (len(captions), len(entries)):
        raise DataError(f"{TRUTH_FILE}: similarity has shape {tuple(S.shape)} but split {split!r} has "
                        f"{len(captions)} captions x {len(entries)} images; score the same split's records in order")
    if S.dtype.kind != "f":
        S = S.astype(np.float64)
    elif S.dtype.itemsize < 4:
        S = S.astype(np.float32)
    if np.isnan(S).any():
        raise DataError("similarity contains NaN; check the embeddings (NaN features give NaN scores)")
    out: dict[str, dict[str, Any]] = {}
    for f in fams:
        gallery = np.array([_visible(e, f) or "" for e in entries], dtype=object)
        shown = gallery != ""
        stated = np.array([_stated(c, f) or "" for c in captions], dtype=object)
        aucs, pairs = [], 0
        for value in sorted(set(stated[stated != ""]) & set(gallery[shown])):
            pos = gallery == value
            neg = shown & ~pos
            if not neg.any():
                continue
            rows = np.flatnonzero(stated == value)
            aucs.append(_row_aucs(S, rows, pos, neg))
            pairs += len(rows) * int(pos.sum()) * int(neg.sum())
        n = sum(len(a) for a in aucs)
        out[f] = {"auc": float(np.concatenate(aucs).mean()) if n else None, "queries": n, "pairs": pairs}
    scored = [r["auc"] for r in out.values() if r["auc"] is not None]
    out["overall"] = {"auc": float(np.mean(scored)) if scored else None,
                      "queries": sum(r["queries"] for r in out.values()),
                      "pairs": sum(r["pairs"] for r in out.values())}
    return out


# ----------------------------------------------------------------------------------------------- artifacts
def _norm_path(path: str) -> str:
    """POSIX form without empty / ``.`` parts and without a leading ``imgs/`` (generator versions differ)."""
    parts = [p for p in str(path).replace("\\", "/").split("/") if p not in ("", ".")]
    if parts and parts[0] == "imgs":
        parts = parts[1:]
    return "/".join(parts)


def check_alignment(records: Sequence[Any], entries: list[dict[str, Any]], source: str | Path = TRUTH_FILE) -> None:
    """Raise :class:`DataError` naming ``source`` unless the records (``image``, ``pid``, ``captions``) and the
    truth entries describe the same images, ids and caption counts in the same order."""
    if len(records) != len(entries):
        raise DataError(f"{source}: {len(entries)} ground-truth entries but the annotation has {len(records)} "
                        "images in this split; regenerate the dataset so that the sidecar matches reid_raw.json")
    for i, (r, e) in enumerate(zip(records, entries, strict=True)):
        if _norm_path(r.image) != _norm_path(e.get("file_path", "")):
            raise DataError(f"{source}: entry {i} is {e.get('file_path')!r} but the annotation's image {i} of the "
                            f"split is {r.image!r}; regenerate the dataset so that the sidecar matches reid_raw.json")
        if int(e.get("id", -1)) != int(r.pid) or len(e["stated"]) != len(r.captions):
            raise DataError(f"{source}: entry {i} ({r.image!r}) has id {e.get('id')} and {len(e['stated'])} stated "
                            f"captions, the annotation id {r.pid} and {len(r.captions)} captions; regenerate the "
                            "dataset so that the sidecar matches reid_raw.json")


def diagnose_artifact(artifact: Path, data_root: Path, split: str = "test", device: str = "auto") -> dict[str, Any]:
    """Retrieval metrics and per-attribute AUCs of an artifact on a SynthPedes split, with the oracle's for reference.

    Returns ``{"split", "metrics", "attributes", "oracle_metrics", "oracle_attributes"}``: the model's R@K / mAP /
    mINP, :func:`attribute_diagnosis` of its cosine similarities, and the all-families oracle's of both.
    """
    from ..data.readers import load_dataset
    from ..data.synthpedes import load_truth
    from ..evaluation import embed_with_artifact
    from .metrics import metrics_from_embeddings

    data_root = Path(data_root)
    truth = load_truth(data_root)
    source = data_root / TRUTH_FILE
    if split not in truth_splits(truth):
        raise DataError(f"{source}: no entries in split {split!r} (splits present: {', '.join(truth_splits(truth))}); "
                        "pass --split with one of them")
    entries = _split_entries(truth, split)
    ds = load_dataset(data_root)
    records = ds.split(split)
    check_alignment(records, entries, source)
    txt, tp, img, ip = embed_with_artifact(Path(artifact), ds, records, device=device)
    txt = np.asarray(txt, dtype=np.float32)
    img = np.asarray(img, dtype=np.float32)
    txt = txt / np.maximum(np.linalg.norm(txt, axis=1, keepdims=True), 1e-12)
    img = img / np.maximum(np.linalg.norm(img, axis=1, keepdims=True), 1e-12)
    S = txt @ img.T
    oracle, otp, oip = oracle_scores(truth, split)
    return {"split": split, "metrics": metrics_from_embeddings(txt, img, tp, ip),
            "attributes": attribute_diagnosis(S, truth, split),
            "oracle_metrics": _retrieval(oracle, otp, oip),
            "oracle_attributes": attribute_diagnosis(oracle, truth, split)}
