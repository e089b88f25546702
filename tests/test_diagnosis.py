"""Ground-truth diagnosis: the attribute oracle, per-attribute AUCs (hand-computed), artifact diagnosis with fake
embeddings, the ``oracle`` / ``diagnose`` commands and the benchmark driver. No model is trained."""

from __future__ import annotations

import copy
import hashlib
import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tbps_compress.data.records import Record
from tbps_compress.data.synthpedes import load_truth
from tbps_compress.data.synthpedes.captions import COARSE_FAMILIES, TRUTH_FAMILIES
from tbps_compress.errors import DataError, UserError
from tbps_compress.retrieval import diagnosis
from tbps_compress.retrieval.diagnosis import (
    ALPHA,
    attribute_diagnosis,
    check_alignment,
    diagnose_artifact,
    oracle_scores,
    oracle_table,
    truth_splits,
)

FAMILIES = list(TRUTH_FAMILIES)  # the real sidecar's families (load_truth checks them); the tests state 5 of them


# ----------------------------------------------------------------------------------------------- fixtures
def _vis(gender: str, upper: str | None, lower: str, hat: str = "none", hat_color: str | None = None) -> dict:
    """Visible values of every family: the five the tests use, null for the rest."""
    return {**dict.fromkeys(FAMILIES), "gender": gender, "upper_color": upper, "lower_color": lower, "hat": hat,
            "hat_color": hat_color}


def _entry(pid: int, k: int, split: str, visible: dict, stated: list[dict]) -> dict[str, Any]:
    return {"file_path": f"imgs/{split}/{pid:04d}/{pid:04d}_{k:02d}.jpg", "id": pid, "split": split,
            "visible": visible, "stated": stated}


def _truthful(v: dict, families: tuple[str, ...] = ("gender", "upper_color", "lower_color")) -> dict:
    return {f: v[f] for f in families if v[f] is not None}


def make_truth() -> dict[str, Any]:
    """Train: 4 identities x 1 image x 2 captions (one wrong word, one vague word). Test: 3 identities x 2 images x
    2 truthful captions stating gender and both colours (each identity's combination is unique)."""
    train = [
        _entry(10, 0, "train", _vis("male", "red", "blue"),
               [{"gender": "male", "upper_color": "red", "lower_color": "blue"}, {"upper_color": "red"}]),
        _entry(11, 0, "train", _vis("female", "blue", "black", "cap", "red"),
               [{"gender": "female", "upper_color": "blue", "hat_color": "red"},
                {"upper_color": "blue", "lower_color": "black"}]),
        _entry(12, 0, "train", _vis("male", "green", "black"),
               [{"gender": "male", "upper_color": "green"}, {"lower_color": "dark"}]),
        _entry(13, 0, "train", _vis("female", "red", "blue", "cap", "black"),
               [{"upper_color": "red", "lower_color": "blue"}, {"gender": "female", "upper_color": "pink"}]),
    ]
    people = {1: _vis("male", "red", "blue"), 2: _vis("female", "blue", "black", "cap", "red"),
              3: _vis("male", "green", "black")}
    test = [_entry(pid, k, "test", v, [_truthful(v), _truthful(v)]) for pid, v in people.items() for k in range(2)]
    return {"format": "synthpedes-truth", "version": 1, "annotation_sha256": "", "families": list(FAMILIES),
            "coarse": list(COARSE_FAMILIES), "entries": train + test}


def write_dataset(root: Path, truth: dict[str, Any], images: bool = True) -> Path:
    """``reid_raw.json`` (+ tiny images) and ``synth_truth.json`` consistent with it (sha256, order)."""
    root.mkdir(parents=True, exist_ok=True)
    ann = []
    for e in truth["entries"]:
        caps = [" ".join(f"{k} {v}" for k, v in s.items()) or "a person" for s in e["stated"]]
        ann.append({"split": e["split"], "captions": caps, "file_path": e["file_path"], "id": e["id"],
                    "processed_tokens": [c.split() for c in caps], "captions_bt": caps})
        if images:
            from PIL import Image

            path = root / e["file_path"]
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (8, 16), (e["id"] * 20 % 255, 90, 90)).save(path)
    raw = json.dumps(ann).encode("utf-8")
    (root / "reid_raw.json").write_bytes(raw)
    truth = {**truth, "annotation_sha256": hashlib.sha256(raw).hexdigest()}
    (root / diagnosis.TRUTH_FILE).write_text(json.dumps(truth), encoding="utf-8")
    return root


@pytest.fixture
def dataset(tmp_path: Path) -> Path:
    root = write_dataset(tmp_path / "synth", make_truth())
    assert load_truth(root)["entries"][0]["id"] == 10  # the real loader accepts the hand-written sidecar
    return root


# ----------------------------------------------------------------------------------------------- AUC
def _auc_truth() -> dict[str, Any]:
    """4 test images, 4 captions: q0 states upper red + hat red + gender male, q1 upper blue, q2 upper 'dark' (a
    vague word) + hat black, q3 nothing."""
    vis = [
        {"gender": "male", "upper_color": "red", "hat_color": None},
        {"gender": "male", "upper_color": "red", "hat_color": "black"},
        {"gender": "male", "upper_color": "blue", "hat_color": "red"},
        {"gender": "male", "upper_color": None, "hat_color": "red"},
    ]
    stated = [{"upper_color": "red", "hat_color": "red", "gender": "male"}, {"upper_color": "blue"},
              {"upper_color": "dark", "hat_color": "black"}, {}]
    entries = [{"file_path": f"test/{i}.jpg", "id": [1, 1, 2, 3][i], "split": "test", "visible": v,
                "stated": [stated[i]]} for i, v in enumerate(vis)]
    return {"format": "synthpedes-truth", "version": 1, "families": ["gender", "upper_color", "hat_color"],
            "coarse": ["upper_color"], "entries": entries}


AUC_S = np.array([
    [0.9, 0.1, 0.5, 0.99],
    [0.3, 0.1, 0.3, 0.0],
    [0.2, 0.5, 0.4, 0.6],
    [0.7, 0.7, 0.7, 0.7],
])


def test_attribute_auc_matches_hand_computation() -> None:
    out = attribute_diagnosis(AUC_S, _auc_truth(), "test")
    assert list(out) == ["gender", "upper_color", "hat_color", "overall"]
    # upper red (q0): pos {0, 1}, neg {2} (image 3 shows no upper colour): 0.9 > 0.5, 0.1 < 0.5 -> 1/2
    # upper blue (q1): pos {2}, neg {0, 1}: 0.3 = 0.3 (a tie, 0.5), 0.3 > 0.1 -> 3/4; q2's "dark" is skipped
    assert out["upper_color"] == {"auc": pytest.approx((0.5 + 0.75) / 2), "queries": 2, "pairs": 4}
    # hat red (q0): pos {2, 3}, neg {1}: both above 0.1 -> 1; hat black (q2): pos {1}, neg {2, 3}: 0.5 > 0.4,
    # 0.5 < 0.6 -> 1/2; image 0 (no hat) is neither
    assert out["hat_color"] == {"auc": pytest.approx(0.75), "queries": 2, "pairs": 4}
    # every image is male: q0's gender has positives but no negative
    assert out["gender"] == {"auc": None, "queries": 0, "pairs": 0}
    assert out["overall"] == {"auc": pytest.approx((0.625 + 0.75) / 2), "queries": 4, "pairs": 8}


def test_attribute_auc_ties_count_half_and_families_restrict() -> None:
    flat = np.full_like(AUC_S, 0.25)
    out = attribute_diagnosis(flat, _auc_truth(), "test", families=["upper_color"])
    assert list(out) == ["upper_color", "overall"]
    assert out["upper_color"]["auc"] == pytest.approx(0.5)
    assert out["overall"]["auc"] == pytest.approx(0.5)


def test_attribute_auc_equals_pairwise_reference_with_ties() -> None:
    truth = make_truth()
    entries = [e for e in truth["entries"] if e["split"] == "test"]
    rng = np.random.default_rng(3)
    S = rng.integers(0, 3, size=(sum(len(e["stated"]) for e in entries), len(entries))).astype(np.float32)
    out = attribute_diagnosis(S, truth, "test")
    captions = [s for e in entries for s in e["stated"]]
    for fam in FAMILIES:
        shown = [e["visible"][fam] for e in entries]
        aucs = []
        for q, cap in enumerate(captions):
            v = cap.get(fam)
            pos = [g for g, s in enumerate(shown) if s == v]
            neg = [g for g, s in enumerate(shown) if s is not None and s != v]
            if v is None or not pos or not neg:
                continue
            wins = sum(1.0 if S[q, p] > S[q, n] else 0.5 if S[q, p] == S[q, n] else 0.0 for p in pos for n in neg)
            aucs.append(wins / (len(pos) * len(neg)))
        assert out[fam]["queries"] == len(aucs), fam
        if aucs:
            assert out[fam]["auc"] == pytest.approx(float(np.mean(aucs))), fam
        else:
            assert out[fam]["auc"] is None, fam


def test_attribute_diagnosis_rejects_wrong_shape() -> None:
    with pytest.raises(DataError, match=r"shape \(3, 4\).*4 captions x 4 images"):
        attribute_diagnosis(AUC_S[:3], _auc_truth(), "test")


# ----------------------------------------------------------------------------------------------- oracle
def test_oracle_ranks_the_described_identity_first() -> None:
    truth = make_truth()
    S, text_pids, image_pids = oracle_scores(truth, "test")
    assert S.shape == (12, 6) and S.dtype == np.float64
    assert text_pids.tolist() == [1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3]
    assert image_pids.tolist() == [1, 1, 2, 2, 3, 3]
    best = image_pids[S.argmax(axis=1)]
    assert (best == text_pids).all()
    table = oracle_table(truth, "test")
    assert table["queries"] == 12 and table["images"] == 6 and table["identities"] == 3
    assert list(table["presets"]) == ["all", "coarse", "colours", "upper_color"]
    assert table["presets"]["all"]["R1"] == pytest.approx(100.0)
    assert table["presets"]["all"]["R1_se"] == pytest.approx(0.0)
    assert table["presets"]["coarse"]["families"] == list(COARSE_FAMILIES)
    assert table["presets"]["colours"]["families"] == ["upper_color", "lower_color"]
    assert table["attributes"]["upper_color"]["auc"] == pytest.approx(1.0)


def test_oracle_scores_are_smoothed_log_probabilities() -> None:
    truth = make_truth()
    S, _, _ = oracle_scores(truth, "test", families=["upper_color"])
    # train upper_color: stated {blue, green, pink, red}; visible red: 3x "red", 1x "pink"; blue: 2x "blue";
    # green: 1x "green"
    m = 4
    red_row = S[0]  # a caption of identity 1 stating "red", against images red, red, blue, blue, green, green
    assert red_row[0] == pytest.approx(math.log((3 + ALPHA) / (4 + ALPHA * m)))
    assert red_row[2] == pytest.approx(math.log(ALPHA / (2 + ALPHA * m)))
    assert red_row[4] == pytest.approx(math.log(ALPHA / (1 + ALPHA * m)))
    blue_row = S[4]
    assert blue_row[2] == pytest.approx(math.log((2 + ALPHA) / (2 + ALPHA * m)))


def test_oracle_families_restriction_and_unseen_words() -> None:
    truth = make_truth()
    S, _, _ = oracle_scores(truth, "test", families=["gender"])
    # gender alone: every male image ties for a male caption
    assert S[0, 0] == S[0, 1] == S[0, 4] == S[0, 5] and S[0, 0] > S[0, 2]
    full, _, _ = oracle_scores(truth, "test")
    assert not np.allclose(S, full)
    odd = copy.deepcopy(truth)
    for e in odd["entries"]:
        if e["split"] == "test":
            e["stated"] = [{"upper_color": "crimson"} for _ in e["stated"]]
    S2, _, _ = oracle_scores(odd, "test", families=["upper_color"])
    assert (S2 == 0.0).all()  # a word never seen in training says nothing
    table = oracle_table(odd, "test")
    assert table["presets"]["upper_color"]["R1"] < 100.0  # ties broken by the jitter, not by gallery order


def test_oracle_errors_name_split_and_family() -> None:
    truth = make_truth()
    assert truth_splits(truth) == ["train", "test"]
    with pytest.raises(DataError, match=r"split 'val' \(splits present: train, test\)"):
        oracle_table(truth, "val")
    with pytest.raises(DataError, match=r"train split 'nope'"):
        oracle_scores(truth, "test", train_split="nope")
    with pytest.raises(UserError, match=r"'shoe_size'.*use some of gender"):
        oracle_scores(truth, "test", families=["shoe_size"])


# ----------------------------------------------------------------------------------------------- artifacts
def test_check_alignment_strips_imgs_and_names_the_file() -> None:
    entries = [e for e in make_truth()["entries"] if e["split"] == "test"]
    records = [Record(e["file_path"].removeprefix("imgs/"), e["id"], ("a", "b"), "test") for e in entries]
    check_alignment(records, entries, "root/synth_truth.json")
    swapped = records[:]
    swapped[0], swapped[2] = swapped[2], swapped[0]
    with pytest.raises(DataError, match=r"^root/synth_truth.json: entry 0 .* regenerate"):
        check_alignment(swapped, entries, "root/synth_truth.json")
    with pytest.raises(DataError, match=r"6 ground-truth entries .* 5 images"):
        check_alignment(records[:5], entries, "root/synth_truth.json")
    short = [Record(r.image, r.pid, ("a",), "test") for r in records]
    with pytest.raises(DataError, match=r"2 stated captions.*1 captions"):
        check_alignment(short, entries, "root/synth_truth.json")


def _fake_embed(noise: float = 0.0) -> Callable[..., tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]]:
    """A stand-in for embed_with_artifact: one-hot identity embeddings (a perfect model), plus noise."""

    def embed(artifact: Path, ds: Any, records: list[Record], device: str = "auto", **_: Any):
        ids = sorted({r.pid for r in records})
        img = np.eye(len(ids), dtype=np.float32)[[ids.index(r.pid) for r in records]]
        text_pids = np.array([r.pid for r in records for _ in r.captions])
        txt = np.eye(len(ids), dtype=np.float32)[[ids.index(p) for p in text_pids]]
        txt += noise * np.random.default_rng(0).standard_normal(txt.shape).astype(np.float32)
        return txt, text_pids, img + 0.01 * np.arange(len(records), dtype=np.float32)[:, None], np.array(
            [r.pid for r in records])

    return embed


def test_diagnose_artifact_with_fake_embeddings(dataset: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import tbps_compress.evaluation as evaluation

    monkeypatch.setattr(evaluation, "embed_with_artifact", _fake_embed())
    result = diagnose_artifact(dataset / "no-artifact", dataset, split="test", device="cpu")
    assert set(result) >= {"metrics", "attributes", "oracle_attributes"}
    assert result["metrics"]["R1"] == pytest.approx(100.0)
    assert list(result["attributes"]) == [*FAMILIES, "overall"]
    # the perfect identity model ranks the right colour first wherever the identity shows it
    assert result["attributes"]["upper_color"]["auc"] == pytest.approx(1.0)
    assert result["oracle_attributes"]["upper_color"]["queries"] == result["attributes"]["upper_color"]["queries"]
    with pytest.raises(DataError, match=r"synth_truth.json: no entries in split 'val' \(splits present: train, test"):
        diagnose_artifact(dataset / "no-artifact", dataset, split="val")


# ----------------------------------------------------------------------------------------------- CLI
def test_cli_oracle_table_and_json(dataset: Path) -> None:
    from typer.testing import CliRunner

    from tbps_compress.cli import app

    runner = CliRunner()
    res = runner.invoke(app, ["oracle", str(dataset)], env={"COLUMNS": "160"})
    assert res.exit_code == 0, res.output
    for needle in ("all", "coarse", "colours", "upper_color", "R@1", "100.00", "AUC", "lower_color"):
        assert needle in res.output, needle
    res = runner.invoke(app, ["oracle", str(dataset), "--json"])
    assert res.exit_code == 0, res.output
    data = json.loads(res.output)
    assert data["presets"]["all"]["R1"] == pytest.approx(100.0)


def _one_error_line(code: int, err: str, *needles: str) -> None:
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


def test_cli_oracle_without_ground_truth(run_cli, tmp_path: Path) -> None:
    root = tmp_path / "plain"
    write_dataset(root, make_truth(), images=False)
    (root / diagnosis.TRUTH_FILE).unlink()
    code, _, err = run_cli(["oracle", root])
    _one_error_line(code, err, "synth_truth.json")


def test_cli_oracle_unknown_split(run_cli, dataset: Path) -> None:
    code, _, err = run_cli(["oracle", dataset, "--split", "val"])
    _one_error_line(code, err, str(dataset / "synth_truth.json"), "'val'", "train, test")


def test_cli_diagnose_out_checks_come_first(run_cli, dataset: Path, tmp_path: Path) -> None:
    existing = tmp_path / "d.json"
    existing.write_text("{}")
    code, _, err = run_cli(["diagnose", tmp_path / "no-artifact", "--data", dataset, "--out", existing])
    _one_error_line(code, err, str(existing), "--force")
    code, _, err = run_cli(["diagnose", tmp_path / "no-artifact", "--data", dataset, "--out",
                            tmp_path / "missing" / "d.json"])
    _one_error_line(code, err, str(tmp_path / "missing"), "does not exist")


def test_cli_diagnose_writes_json(run_cli, dataset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import tbps_compress.evaluation as evaluation

    monkeypatch.setattr(evaluation, "embed_with_artifact", _fake_embed(noise=0.5))
    out = tmp_path / "d.json"
    out.write_text("old")
    code, stdout, err = run_cli(["diagnose", tmp_path / "art", "--data", dataset, "--out", out, "--force",
                                 "--device", "cpu"])
    assert code == 0, err
    assert "upper_color" in stdout and "AUC oracle" in stdout
    data = json.loads(out.read_text())
    assert list(data["attributes"]) == [*FAMILIES, "overall"]
    assert not list(tmp_path.glob(".d.json.tmp-*"))


# ----------------------------------------------------------------------------------------------- benchmark
def test_benchmark_driver_writes_and_refuses_overwrite(benchmark_script, dataset: Path, tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    mod = benchmark_script("oracle")
    out = tmp_path / "results" / "oracle.md"
    assert mod.main([str(dataset), "--out", str(out)]) == 0
    text = out.read_text()
    assert f"| all | {len(FAMILIES)} | 100.00" in text and "| upper_color |" in text
    assert str(dataset) in json.loads(out.with_suffix(".json").read_text())
    assert mod.main([str(dataset), "--out", str(out)]) == 2
    assert "--force" in capsys.readouterr().err
    assert mod.main([str(dataset), "--out", str(out), "--force"]) == 0
