"""The stage registry: the CLI and the pipeline dispatch through it; a new stage is one registered function."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import Field

from tbps_compress import stages
from tbps_compress.config import Strict
from tbps_compress.errors import ConfigError
from tbps_compress.pipeline import Pipeline, load_pipeline


class EchoCfg(Strict):
    """A stand-in stage's settings."""

    times: int = Field(1, ge=1)
    word: str = "hello"


@pytest.fixture
def echo_stage() -> Iterator[list[dict[str, Any]]]:
    """Register a stage ``echo`` (config :class:`EchoCfg`, one ``source`` input) for the test; it records its calls
    and writes ``echo.txt``."""
    calls: list[dict[str, Any]] = []

    @stages.register_stage("echo", f"{__name__}:EchoCfg", inputs=("source",), help="test stand-in")
    def _echo(cfg: EchoCfg, *, out: Path, inputs: dict[str, Any], data: Path | None, force: bool, resume: bool,
              progress: Any) -> Path:
        calls.append({"cfg": cfg, "inputs": inputs, "data": data, "out": out})
        out.mkdir(parents=True, exist_ok=True)
        (out / "echo.txt").write_text(" ".join([cfg.word] * cfg.times))
        return out

    yield calls
    del stages._REGISTRY["echo"]


def test_the_registry_holds_every_stage_with_its_config() -> None:
    from tbps_compress.bench.runner import BenchCfg
    from tbps_compress.compress.distill import DistillRecipe
    from tbps_compress.compress.prune import PruneRecipe
    from tbps_compress.export.onnx_export import ExportCfg
    from tbps_compress.export.quantize import QuantizeCfg
    from tbps_compress.recipes import TrainRecipe

    expected = {"train": TrainRecipe, "distill": DistillRecipe, "prune": PruneRecipe, "export": ExportCfg,
                "quantize": QuantizeCfg, "bench": BenchCfg}
    assert set(expected) <= set(stages.stage_kinds())
    for kind, model in expected.items():
        assert stages.get_stage(kind).config is model
    assert [k for k in expected if stages.get_stage(k).recipe] == ["train", "distill", "prune"]
    with pytest.raises(ConfigError, match="unknown stage kind 'nope'; registered: train"):
        stages.get_stage("nope")
    with pytest.raises(ValueError, match="already registered"):
        stages.register_stage("train", "tbps_compress.recipes:TrainRecipe")(lambda *a, **k: None)


def test_stage_configs_check_values_with_the_stages_own_rules() -> None:
    cfg = stages.stage_config("bench", {"runtimes": "ort", "batches": "1,32,32"}, "bench")
    assert cfg.runtimes == ["onnxruntime"] and cfg.batches == [1, 32]
    assert stages.stage_config("quantize", {"towers": "text,image"}, "q").towers == ("image", "text")
    with pytest.raises(ConfigError, match=r"^bench: --batch: expected comma-separated positive integers"):
        stages.stage_config("bench", {"batches": "1,x"}, "bench", {"batches": "--batch"})
    with pytest.raises(ConfigError, match=r"^export: --opset: Input should be greater than or equal to 18 \(got 7\)"):
        stages.stage_config("export", {"opset": 7}, "export", {"opset": "--opset"})
    with pytest.raises(ConfigError, match=r"^q: key 'mode': Value error, got 'int3'; choose one of dynamic"):
        stages.stage_config("quantize", {"mode": "int3"}, "q")
    with pytest.raises(TypeError, match="takes a ExportCfg"):
        stages.run_stage("export", stages.stage_config("bench", {}, "b"), inputs={"source": "x"})
    with pytest.raises(TypeError, match="takes inputs"):
        stages.run_stage("export", stages.stage_config("export", {}, "e"), inputs={"teacher": "x"})


def test_a_registered_stage_runs_in_a_pipeline(echo_stage: list[dict[str, Any]], tmp_path: Path,
                                               tiny_dataset: Path) -> None:
    pipe = tmp_path / "p.yaml"
    doc: dict[str, Any] = {"run_dir": str(tmp_path / "run"), "data": str(tiny_dataset), "synth": None,
                           "stages": [{"name": "first", "kind": "echo"}]}
    pipe.write_text(yaml.safe_dump(doc))
    with pytest.raises(ConfigError, match=r"stage 'first' \(echo\) needs a source stage"):
        load_pipeline(pipe)

    doc["stages"] = [{"name": "x", "kind": "echoo"}]
    pipe.write_text(yaml.safe_dump(doc))
    with pytest.raises(ConfigError, match="unknown stage kind 'echoo'; choose one of .*echo"):
        load_pipeline(pipe)

    doc["stages"] = [{"name": "empty", "kind": "bench", "artifacts": [], "options": {"runtimes": "torch"}},
                     {"name": "say", "kind": "echo", "source": "empty", "options": {"times": 2}}]
    pipe.write_text(yaml.safe_dump(doc))
    Pipeline(load_pipeline(pipe), pipe).run(only="say")
    assert (tmp_path / "run" / "say" / "echo.txt").read_text() == "hello hello"
    call = echo_stage[-1]
    assert call["inputs"] == {"source": tmp_path / "run" / "empty"} and call["data"] == tiny_dataset
    assert call["out"] == tmp_path / "run" / "say"


def test_pipeline_options_of_a_new_stage_are_validated_and_passed(echo_stage: list[dict[str, Any]],
                                                                  tmp_path: Path, tiny_dataset: Path) -> None:
    src = tmp_path / "run" / "src"

    def pipeline(options: dict[str, Any]) -> Pipeline:
        doc = {"run_dir": str(tmp_path / "run"), "data": str(tiny_dataset), "synth": None,
               "stages": [{"name": "src", "kind": "bench", "artifacts": []},
                          {"name": "echo", "kind": "echo", "source": "src", "options": options}]}
        path = tmp_path / "p.yaml"
        path.write_text(yaml.safe_dump(doc))
        return Pipeline(load_pipeline(path), path)

    with pytest.raises(ConfigError, match=r"stage 'echo' \(echo\): unknown option 'tims' \(did you mean "
                                          r"'times'\?\); valid options: times, word"):
        pipeline({"tims": 2}).validate_stages()
    with pytest.raises(ConfigError, match=r"stage 'echo' \(echo\): option 'times': Input should be greater than "
                                          r"or equal to 1 \(got 0\)"):
        pipeline({"times": 0}).validate_stages()
    p = pipeline({"times": 3, "word": "hi"})
    p.validate_stages()
    cfg = p._configs["echo"]
    assert isinstance(cfg, EchoCfg) and cfg.times == 3
    out = stages.run_stage("echo", cfg, out=tmp_path / "direct", inputs={"source": src}, data=tiny_dataset)
    assert (out / "echo.txt").read_text() == "hi hi hi"
    assert echo_stage[-1]["inputs"] == {"source": src} and echo_stage[-1]["data"] == tiny_dataset
