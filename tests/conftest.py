"""Shared fixtures: a tiny CUHK-PEDES-format dataset, a briefly trained ``test-tiny`` teacher artifact, recipe
builders and CLI runners (in-process and through the real console script).

Torch runs single-threaded in tests (``TBPS_TEST_THREADS`` overrides): on a small shared CPU, intra-op threads
slow the tiny models down by an order of magnitude.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest

TEST_THREADS = os.environ.get("TBPS_TEST_THREADS", "1")
os.environ.setdefault("OMP_NUM_THREADS", TEST_THREADS)

TINY_IDENTITIES = 16
TINY_IMAGES_PER_ID = 3
TINY_CAPTIONS_PER_IMAGE = 2
TINY_SIZE = (64, 32)  # (height, width): test-tiny's input size, so no resize happens

CONSOLE_SCRIPT = Path(sys.executable).parent / "tbps-compress"


def pytest_configure(config: pytest.Config) -> None:
    import torch

    torch.set_num_threads(int(TEST_THREADS))


# ----------------------------------------------------------------------------------------------- dataset
_COLOURS = {
    "red": (200, 30, 30), "blue": (30, 60, 200), "green": (30, 160, 60), "black": (20, 20, 20),
    "white": (235, 235, 235), "yellow": (220, 200, 40), "grey": (128, 128, 128), "purple": (120, 40, 150),
}


def _fallback_dataset(out: Path, identities: int, images_per_id: int, captions_per_image: int,
                      size: tuple[int, int], seed: int) -> None:
    """A minimal CUHK-PEDES-format dataset (used only when SynthPedes is unavailable): each identity has an
    upper and a lower colour drawn as two blocks on a noisy background, captions name the colours."""
    import random

    from PIL import Image, ImageDraw

    rng = random.Random(seed)
    names = list(_COLOURS)
    h, w = size
    entries = []
    n_test = max(2, identities // 8)
    n_val = max(2, identities // 8)
    for pid in range(1, identities + 1):
        split = "test" if pid <= n_test else "val" if pid <= n_test + n_val else "train"
        upper, lower = rng.sample(names, 2)
        for k in range(images_per_id):
            img = Image.new("RGB", (w, h), tuple(rng.randrange(60, 200) for _ in range(3)))
            d = ImageDraw.Draw(img)
            dx = rng.randrange(-2, 3)
            d.rectangle([w // 4 + dx, h // 8, 3 * w // 4 + dx, h // 2], fill=_COLOURS[upper])
            d.rectangle([w // 4 + dx, h // 2, 3 * w // 4 + dx, 7 * h // 8], fill=_COLOURS[lower])
            rel = f"imgs/{split}/{pid:04d}_{k}.jpg"
            (out / rel).parent.mkdir(parents=True, exist_ok=True)
            img.save(out / rel, quality=95)
            caps = [f"a person wearing a {upper} top and {lower} trousers, view {k} caption {c}."
                    for c in range(captions_per_image)]
            entries.append({"split": split, "captions": caps, "file_path": rel,
                            "processed_tokens": [c.split() for c in caps], "id": pid})
    (out / "reid_raw.json").write_text(json.dumps(entries), encoding="utf-8")


def make_dataset(out: Path, identities: int = TINY_IDENTITIES, images_per_id: int = TINY_IMAGES_PER_ID,
                 captions_per_image: int = TINY_CAPTIONS_PER_IMAGE, size: tuple[int, int] = TINY_SIZE,
                 seed: int = 0) -> Path:
    """Write a tiny CUHK-PEDES-format dataset with train/val/test splits (SynthPedes when available)."""
    try:
        from tbps_compress.data.synthpedes import generate
    except ImportError:
        generate = None
    if generate is not None:
        generate(out, identities=identities, images_per_id=images_per_id, captions_per_image=captions_per_image,
                 size=size, seed=seed, workers=1)
    else:
        out.mkdir(parents=True)
        _fallback_dataset(out, identities, images_per_id, captions_per_image, size, seed)
    return out


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny CUHK-PEDES-format dataset: 16 identities x 3 images x 2 captions at 64x32, train/val/test."""
    return make_dataset(tmp_path_factory.mktemp("data") / "tiny")


# ----------------------------------------------------------------------------------------------- recipes
def train_recipe_dict(dataset: Path, output: Path, **sections: Any) -> dict[str, Any]:
    """A fast test-tiny train recipe as a dict; ``sections`` update the top-level sections (dicts are merged)."""
    data: dict[str, Any] = {
        "output": str(output),
        "seed": 0,
        "device": "cpu",
        "data": {"root": str(dataset)},
        "model": {"config": "test-tiny"},
        "optim": {"epochs": 1, "batch_size": 16, "lr": 1e-3, "min_lr": 1e-5, "warmup_epochs": 0.5},
        "eval": {"batch_size": 64},
    }
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(data.get(key), dict):
            data[key] = {**data[key], **value}
        else:
            data[key] = value
    return data


@pytest.fixture
def train_recipe_data(tiny_dataset: Path) -> Callable[..., dict[str, Any]]:
    """``train_recipe_data(output, **sections) -> dict``: a fast test-tiny train recipe on the tiny dataset."""

    def make(output: Path, **sections: Any) -> dict[str, Any]:
        return train_recipe_dict(tiny_dataset, output, **sections)

    return make


@pytest.fixture
def make_train_recipe(tiny_dataset: Path) -> Callable[..., Any]:
    """``make_train_recipe(output, **sections) -> TrainRecipe`` on the tiny dataset."""
    from tbps_compress.recipes import TrainRecipe

    def make(output: Path, **sections: Any) -> TrainRecipe:
        return TrainRecipe.model_validate(train_recipe_dict(tiny_dataset, output, **sections))

    return make


@pytest.fixture(scope="session")
def tiny_teacher_artifact(tiny_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A ``test-tiny`` teacher trained for one short epoch (4 steps) by :class:`Trainer`."""
    from tbps_compress.engine.train import Trainer
    from tbps_compress.recipes import TrainRecipe

    out = tmp_path_factory.mktemp("teacher") / "a0"
    recipe = TrainRecipe.model_validate(train_recipe_dict(tiny_dataset, out))
    return Trainer(recipe).run()


# ----------------------------------------------------------------------------------------------- CLI
CliResult = tuple[int, str, str]


@pytest.fixture(scope="session")
def benchmark_script() -> Callable[[str], Any]:
    """``benchmark_script(NAME)``: the driver ``benchmarks/NAME.py`` as a module of the ``benchmarks`` package."""
    import importlib

    return lambda name: importlib.import_module(f"benchmarks.{name}")


@pytest.fixture
def run_cli(capsys: pytest.CaptureFixture[str]) -> Callable[[Sequence[Any]], CliResult]:
    """Run ``tbps_compress.cli.main(args)`` in-process: ``(exit_code, stdout, stderr)``. Logging set up by the
    command is undone afterwards."""
    from tbps_compress.cli import main

    def run(args: Sequence[Any]) -> CliResult:
        root = logging.getLogger()
        handlers, level = list(root.handlers), root.level
        capsys.readouterr()
        try:
            code = main([str(a) for a in args])
        finally:
            root.handlers[:] = handlers
            root.setLevel(level)
        out, err = capsys.readouterr()
        return code, out, err

    return run


def run_console_script(args: Sequence[Any], timeout: float = 120, **kwargs: Any) -> subprocess.CompletedProcess:
    """Run the installed ``tbps-compress`` console script in a fresh process (text output captured)."""
    env = {**os.environ, "OMP_NUM_THREADS": TEST_THREADS, "COLUMNS": "120"}
    return subprocess.run([str(CONSOLE_SCRIPT), *map(str, args)], capture_output=True, text=True, timeout=timeout,
                          env=env, check=False, **kwargs)


@pytest.fixture
def run_cli_subprocess() -> Callable[..., CliResult]:
    """Like ``run_cli`` but through the real console script in a subprocess."""

    def run(args: Sequence[Any], timeout: float = 120) -> CliResult:
        proc = run_console_script(args, timeout=timeout)
        return proc.returncode, proc.stdout, proc.stderr

    return run


@pytest.fixture(scope="session")
def sg_teacher(tiny_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny stripe-gru teacher trained by the trainer of `tbps-compress train` (one short epoch)."""
    from tbps_compress.engine.train import Trainer
    from tbps_compress.recipes import TrainRecipe

    tmp = tmp_path_factory.mktemp("sg")
    recipe = {
        "output": str(tmp / "teacher"), "seed": 0, "device": "cpu", "data": {"root": str(tiny_dataset)},
        "model": {"config": "test-tiny-stripe-gru", "vocab_prune": True},
        "augment": {"image": {"pool": ["hflip"], "num_ops": 1, "hflip_swaps_left_right": True}},
        "tricks": {"text_attn_dropout": 0.0, "freeze_patch_embed": False},
        "losses": {"n_itc": {"weight": 1.0}},
        "optim": {"epochs": 1, "batch_size": 16, "lr": 1e-3, "min_lr": 1e-5, "warmup_epochs": 0.5},
        "eval": {"batch_size": 64},
    }
    return Trainer(TrainRecipe.model_validate(recipe)).run()
