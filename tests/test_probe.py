"""The paper's layer-importance probe (C1: removal drop, C2: re-initialisation factor) on a tiny model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tbps_compress.compress import probe as probe_mod
from tbps_compress.errors import ConfigError, UserError
from tbps_compress.models.factory import build_model, tower_blocks


@pytest.fixture(scope="module")
def setup(tiny_dataset: Path, tiny_teacher_artifact: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The shared tiny dataset and briefly trained test-tiny teacher (conftest), and a scratch folder."""
    return {"data": tiny_dataset, "artifact": tiny_teacher_artifact, "root": tmp_path_factory.mktemp("probe")}


def test_probe_writes_table(setup: dict[str, Path]) -> None:
    out = setup["root"] / "probe-out"
    table = probe_mod.probe(setup["artifact"], setup["data"], split="test", threshold=3.0, out_dir=out,
                            device="cpu", c2_steps=2)
    for name in ("probe.json", "probe.md", "probe.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0
    assert (out / "probe.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = table["layers"]
    assert [(r["tower"], r["layer"]) for r in rows] == [("vision", 0), ("vision", 1), ("text", 0), ("text", 1)]
    for r in rows:
        assert 0.0 <= r["c1"] <= 1.0 and 0.0 <= r["c2"] <= 1.0
        assert r["drop"] == pytest.approx(table["base_R1"] - r["r1_removed"], abs=1e-3)
    for tower in ("vision", "text"):
        c1 = [r["c1"] for r in rows if r["tower"] == tower]
        assert max(c1) in (0.0, 1.0)  # normalised by the largest drop of the tower
    assert json.loads((out / "probe.json").read_text()) == table
    md = (out / "probe.md").read_text()
    assert md.count("| vision |") == 2 and md.count("| text |") == 2
    assert table["init"] == "seed:0"
    ranking = probe_mod.layer_ranking(probe_mod.read_probe(out))
    assert set(ranking) == {"vision", "text"} and len(ranking["text"]) == 2
    with pytest.raises(UserError, match="exists"):
        probe_mod.probe(setup["artifact"], setup["data"], split="test", out_dir=out, device="cpu")


def test_probe_leaves_model_unchanged() -> None:
    torch.manual_seed(0)
    model = build_model("test-tiny").eval()
    x = torch.randn(2, 3, 64, 32)
    ref = model.encode_image(x)
    init = {k: torch.zeros_like(v) for k, v in tower_blocks(model, "vision")[0].state_dict().items()}
    with probe_mod.skipped_block(model, "vision", 0):
        assert not torch.equal(model.encode_image(x), ref)
    with probe_mod.interpolated_block(tower_blocks(model, "vision")[0], init, 0.5):
        assert not torch.equal(model.encode_image(x), ref)
    assert torch.equal(model.encode_image(x), ref)


def test_probe_bad_threshold(setup: dict[str, Path]) -> None:
    with pytest.raises(ConfigError, match="threshold"):
        probe_mod.probe(setup["artifact"], setup["data"], threshold=-1.0, out_dir=setup["root"] / "x")


def test_read_probe_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="prune.probe"):
        probe_mod.read_probe(tmp_path / "missing.json")
    bad = tmp_path / "probe.json"
    bad.write_text("{}")
    with pytest.raises(ConfigError, match="layers"):
        probe_mod.read_probe(tmp_path)
