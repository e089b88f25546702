"""The paper's layer-importance probe, per residual block and tower.

For every block of the vision and the text tower of a PyTorch artifact, on a dataset split (text-to-image R@1):

- **C1**: the R@1 drop when the block is removed (the residual stream skips it), normalised by the largest drop of
  the same tower (1 = the most important block of that tower; drops below zero count as 0). ``drop`` keeps the raw
  points.
- **C2**: the smallest interpolation factor ``a`` in [0, 1] such that the block with weights
  ``init + a * (trained - init)`` keeps the R@1 drop within ``threshold`` points (0 = the block can be reset to its
  initial weights, 1 = it cannot move at all). Found by bisection (``c2_steps`` halvings, assuming the drop shrinks
  as ``a`` grows). "Initial weights" are a freshly initialised block built with the artifact's build seed (the
  ``seed`` of its resolved recipe, so a model trained from scratch gets back its true initialisation), or the same
  block of a ``parent`` artifact (e.g. the pre-trained CLIP a teacher was fine-tuned from).

Only the probed tower is re-embedded for each measurement (the other tower's embeddings are cached), and the split's
images are decoded once. Outputs: ``probe.json`` (the table), ``probe.md`` and ``probe.png`` (bar chart).
:func:`layer_ranking` turns a table into the per-tower scores depth pruning uses.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import ArtifactError, ConfigError, UserError
from ..models.meta import meta_of

log = logging.getLogger(__name__)

TOWERS = ("vision", "text")
PROBE_JSON = "probe.json"
PROBE_MD = "probe.md"
PROBE_PNG = "probe.png"


class _Skip(nn.Module):
    """A residual block removed: the stream passes unchanged."""

    def __init__(self, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self._dtype = dtype

    def get_weight_dtype(self) -> torch.dtype:  # open_clip's Transformer.get_cast_dtype asks block 0
        return self._dtype

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return x


@contextlib.contextmanager
def skipped_block(model: nn.Module, tower: str, index: int) -> Iterator[None]:
    """Temporarily replace block ``index`` of ``tower`` by the identity."""
    from ..models.factory import tower_blocks

    blocks = tower_blocks(model, tower)
    saved = blocks[index]
    blocks[index] = _Skip(next(saved.parameters()).dtype)
    try:
        yield
    finally:
        blocks[index] = saved


@contextlib.contextmanager
def interpolated_block(block: nn.Module, init: dict[str, torch.Tensor], alpha: float) -> Iterator[None]:
    """Temporarily set ``block``'s floating-point tensors to ``init + alpha * (trained - init)``."""
    trained = {k: v.detach().clone() for k, v in block.state_dict().items()}
    mixed = {k: (init[k].to(v) + alpha * (v - init[k].to(v))) if v.is_floating_point() else v
             for k, v in trained.items()}
    block.load_state_dict(mixed)
    try:
        yield
    finally:
        block.load_state_dict(trained)


class RetrievalProbe:
    """Text-to-image R@1 of a model on fixed inputs, re-embedding only the tower that changed.

    ``images``: uint8 (N, 3, H, W) resized images (or an ``ImageStore``); ``tokens``: (Q, L) caption tokens;
    ``image_pids`` / ``text_pids``: identity labels. Base embeddings are computed once at construction, through a
    :class:`~tbps_compress.retrieval.encoders.TorchEncoder` of the model (the evaluation transform).
    """

    def __init__(self, model: nn.Module, images: Any, tokens: torch.Tensor, image_pids: torch.Tensor,
                 text_pids: torch.Tensor, *, batch_size: int = 128, device: str | torch.device = "cpu") -> None:
        from ..retrieval.encoders import TorchEncoder

        self.model = model
        self.images = images
        self.tokens = tokens
        self.image_pids = image_pids
        self.text_pids = text_pids
        self.batch_size = batch_size
        self.device = torch.device(device)
        model.eval()  # measured in eval mode, and left there
        self.encoder = TorchEncoder(model, device=self.device, batch_size=batch_size)
        self.base_image = self.embed_images()
        self.base_text = self.embed_texts()
        self.base_r1 = self.r1_with(self.base_image, self.base_text)

    def embed_images(self) -> torch.Tensor:
        return self.encoder.embed_pixels(self.images)

    def embed_texts(self) -> torch.Tensor:
        return self.encoder.embed_tokens(self.tokens)

    def r1_with(self, image: torch.Tensor, text: torch.Tensor) -> float:
        from ..retrieval.metrics import metrics_from_embeddings

        return float(metrics_from_embeddings(text, image, self.text_pids, self.image_pids, ks=(1,))["R1"])

    def r1(self, tower: str) -> float:
        """R@1 with the current weights of ``tower`` (the other tower's base embeddings reused)."""
        if tower == "vision":
            return self.r1_with(self.embed_images(), self.base_text)
        return self.r1_with(self.base_image, self.embed_texts())


def removal_drops(rp: RetrievalProbe, towers: Sequence[str] = TOWERS) -> dict[str, list[float]]:
    """Per tower, the R@1 drop (points) when each block is removed."""
    from ..models.factory import tower_blocks

    out: dict[str, list[float]] = {}
    for tower in towers:
        drops = []
        for i in range(len(tower_blocks(rp.model, tower))):
            with skipped_block(rp.model, tower, i):
                drops.append(rp.base_r1 - rp.r1(tower))
        out[tower] = drops
    return out


def interpolation_factor(rp: RetrievalProbe, tower: str, index: int, init: dict[str, torch.Tensor],
                         threshold: float, steps: int = 5) -> float:
    """C2 of one block: the smallest factor toward the trained weights keeping the drop within ``threshold``."""
    from ..models.factory import tower_blocks

    block = tower_blocks(rp.model, tower)[index]

    def ok(alpha: float) -> bool:
        with interpolated_block(block, init, alpha):
            return rp.base_r1 - rp.r1(tower) <= threshold

    if ok(0.0):
        return 0.0
    lo, hi = 0.0, 1.0
    for _ in range(steps):
        mid = 0.5 * (lo + hi)
        if ok(mid):
            hi = mid
        else:
            lo = mid
    return hi


def _normalised(drops: list[float]) -> list[float]:
    top = max((max(d, 0.0) for d in drops), default=0.0)
    return [max(d, 0.0) / top if top > 0 else 0.0 for d in drops]


def split_records(data_root: Path, split: str, fmt: str | None = None, *, val_fraction: float = 0.1, seed: int = 0):
    """(dataset, records) of a split; a missing ``val`` split is carved from train as the trainer does."""
    from ..data.readers import carve_val, load_dataset

    ds = load_dataset(Path(data_root), fmt)
    if split not in ds.splits() and split == "val":
        ds = carve_val(ds, fraction=val_fraction, seed=seed)
        log.info("%s has no val split: carved %.0f%% of the train identities (seed %d), as the trainer does",
                 ds.annotation, 100 * val_fraction, seed)
    recs = ds.split(split)
    if not recs:
        raise UserError(f"{ds.annotation}: no records in split '{split}' (splits present: {', '.join(ds.splits())})")
    return ds, recs


def make_retrieval_probe(model: nn.Module, ds: Any, records: Sequence[Any], *, batch_size: int = 128,
                         device: str | torch.device = "cpu") -> RetrievalProbe:
    """A :class:`RetrievalProbe` over ``records`` (images decoded once, captions cleaned and tokenised)."""
    from ..data.loader import ImageStore
    from ..models.config import image_size_hw
    from ..models.tokenizer import get_tokenizer
    from ..runtime.tokenizer import clean_caption

    cfg = meta_of(model).config
    store = ImageStore([ds.image_path(r) for r in records], image_size_hw(cfg), cache=True)
    tok = get_tokenizer(cfg, meta_of(model).vocab_map, meta_of(model).unk_id)
    captions = [clean_caption(c) for r in records for c in r.captions]
    tokens = torch.cat([tok(captions[s:s + 512]) for s in range(0, len(captions), 512)])
    image_pids = torch.tensor([r.pid for r in records])
    text_pids = torch.tensor([r.pid for r in records for _ in r.captions])
    return RetrievalProbe(model, store, tokens, image_pids, text_pids, batch_size=batch_size, device=device)


def _recipe_value(folder: Path, dotted: str, default: Any) -> Any:
    import yaml

    f = folder / "recipe.resolved.yaml"
    if not f.is_file():
        return default
    try:
        node: Any = yaml.safe_load(f.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        return default
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return default
        node = node[part]
    return node


def initial_blocks(artifact: Path, model: nn.Module, *, parent: Path | None = None,
                   seed: int | None = None) -> tuple[dict[str, list[dict[str, torch.Tensor]]], str]:
    """Per tower, the state dict of each block's initial weights, and a description of where they come from."""
    from ..models.factory import build_model, tower_blocks
    from ..models.io import load_model

    if parent is not None:
        ref = load_model(Path(parent))
        source = f"parent:{Path(parent)}"
    else:
        seed = int(_recipe_value(Path(artifact), "seed", 0)) if seed is None else int(seed)
        torch.manual_seed(seed)
        ref = build_model(meta_of(model).config)
        source = f"seed:{seed}"
    out: dict[str, list[dict[str, torch.Tensor]]] = {}
    for tower in TOWERS:
        mine, theirs = tower_blocks(model, tower), tower_blocks(ref, tower)
        if len(mine) != len(theirs):
            raise ArtifactError(f"{parent}: {len(theirs)} {tower} blocks, the probed artifact has {len(mine)}; "
                                "the parent must have the same architecture (or omit it to use the build seed)")
        states = []
        for i, (a, b) in enumerate(zip(mine, theirs, strict=True)):
            sa, sb = a.state_dict(), b.state_dict()
            bad = [k for k in sa if k not in sb or sb[k].shape != sa[k].shape]
            if bad:
                raise ArtifactError(f"{parent}: {tower} block {i} differs in shape from the probed artifact "
                                    f"({bad[0]}); use a parent of the same architecture or the build seed")
            states.append({k: v.detach().clone() for k, v in sb.items()})
        out[tower] = states
    return out, source


def probe(
    artifact: Path,
    data_root: Path,
    split: str = "val",
    threshold: float = 3.0,
    out_dir: Path | None = None,
    *,
    parent: Path | None = None,
    seed: int | None = None,
    format: str | None = None,
    device: str = "auto",
    batch_size: int = 128,
    c2_steps: int = 5,
    towers: Sequence[str] = TOWERS,
    force: bool = False,
) -> dict[str, Any]:
    """Measure C1 and C2 for every block of ``artifact`` on ``split`` of ``data_root``; write the table.

    Args:
        artifact: a PyTorch artifact folder.
        data_root: dataset root (any supported format).
        split: split to measure on ("val" is carved from train when the dataset has none).
        threshold: R@1 points the C2 interpolation may lose.
        out_dir: where ``probe.json``, ``probe.md`` and ``probe.png`` go (default: ``<artifact>-probe`` beside it).
        parent: artifact whose blocks are the "initial weights" for C2 (default: fresh blocks with the build seed).
        seed: build seed override (default: the artifact recipe's ``seed``, else 0).
        c2_steps: bisection steps of the C2 search (resolution 2**-c2_steps).
        towers: which towers to probe.
        force: replace existing output files.

    Returns:
        The table written to ``probe.json``: ``base_R1``, ``threshold``, ``init`` and ``layers``, one row per block
        and tower with ``tower``, ``layer``, ``r1_removed``, ``drop``, ``c1``, ``c2``.
    """
    from ..artifacts import open_artifact
    from ..devices import resolve_device
    from ..models.config import model_family
    from ..models.factory import tower_blocks
    from ..models.io import load_model

    if not threshold >= 0 or math.isinf(threshold):
        raise ConfigError(f"--threshold: expected a non-negative number of R@1 points, got {threshold!r}")
    if c2_steps < 1:
        raise ConfigError(f"c2_steps: expected a positive integer, got {c2_steps!r}")
    bad = [t for t in towers if t not in TOWERS]
    if bad or not towers:
        raise ConfigError(f"towers: expected some of {', '.join(TOWERS)}, got {list(towers)!r}")
    artifact = Path(artifact)
    out_dir = Path(out_dir) if out_dir is not None else artifact.parent / f"{artifact.name}-probe"
    if not force and any((out_dir / f).exists() for f in (PROBE_JSON, PROBE_MD, PROBE_PNG)):
        raise UserError(f"{out_dir}: a probe table exists already; choose another --out or pass --force")
    art = open_artifact(artifact)
    family = model_family(art.model_config or {})
    if family != "clip":
        raise ConfigError(f"{artifact}: the module-importance probe measures transformer blocks, and this model is of "
                          f"family '{family}', which has none; probe an open_clip (ViT) artifact")
    dev = resolve_device(device)
    model = load_model(art, device=dev, verify=False).eval()
    inits, init_source = initial_blocks(artifact, model, parent=parent, seed=seed)
    ds, recs = split_records(data_root, split, format,
                             val_fraction=float(_recipe_value(artifact, "data.val_fraction", 0.1)),
                             seed=int(_recipe_value(artifact, "seed", 0)))
    rp = make_retrieval_probe(model, ds, recs, batch_size=batch_size, device=dev)
    log.info("probe %s on %s/%s: base R@1 %.2f", artifact, data_root, split, rp.base_r1)
    drops = removal_drops(rp, towers)
    rows = []
    for tower in towers:
        c1 = _normalised(drops[tower])
        for i in range(len(tower_blocks(model, tower))):
            c2 = interpolation_factor(rp, tower, i, inits[tower][i], threshold, c2_steps)
            rows.append({"tower": tower, "layer": i, "r1_removed": round(rp.base_r1 - drops[tower][i], 4),
                         "drop": round(drops[tower][i], 4), "c1": round(c1[i], 4), "c2": round(c2, 4)})
            log.info("%s block %d: drop %.2f C1 %.3f C2 %.3f", tower, i, drops[tower][i], c1[i], c2)
    table = {
        "artifact": str(artifact), "data": str(data_root), "split": split, "threshold": threshold,
        "base_R1": round(rp.base_r1, 4), "init": init_source, "c2_steps": c2_steps,
        "queries": int(rp.tokens.shape[0]), "gallery": len(rp.images),
        "normalisation": "C1 = drop / largest drop of the same tower (negative drops count as 0)",
        "layers": rows,
    }
    write_probe(table, out_dir)
    return table


def write_probe(table: dict[str, Any], out_dir: Path) -> None:
    """Write ``probe.json``, ``probe.md`` and ``probe.png`` for a probe table."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / PROBE_JSON).write_text(json.dumps(table, indent=2) + "\n", encoding="utf-8")
    (out_dir / PROBE_MD).write_text(probe_markdown(table), encoding="utf-8")
    plot_probe(table, out_dir / PROBE_PNG)


def probe_markdown(table: dict[str, Any]) -> str:
    lines = [
        f"# Layer importance probe: {table['artifact']}",
        "",
        f"Split `{table['split']}` of `{table['data']}` ({table['queries']} queries, {table['gallery']} images); "
        f"base R@1 {table['base_R1']:.2f}; C2 threshold {table['threshold']} points; initial weights: "
        f"{table['init']}.",
        "",
        "C1: R@1 drop when the block is removed, normalised per tower. C2: smallest interpolation factor toward the "
        "trained weights that keeps the drop within the threshold (0: the block can be reset).",
        "",
        "| tower | layer | R@1 without | drop | C1 | C2 |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in table["layers"]:
        lines.append(f"| {r['tower']} | {r['layer']} | {r['r1_removed']:.2f} | {r['drop']:.2f} | {r['c1']:.3f} | "
                     f"{r['c2']:.3f} |")
    return "\n".join(lines) + "\n"


def plot_probe(table: dict[str, Any], path: Path) -> None:
    """Bar chart: C1 and C2 per block, one panel per tower."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    towers = [t for t in TOWERS if any(r["tower"] == t for r in table["layers"])]
    fig, axes = plt.subplots(1, len(towers), figsize=(5 * len(towers), 3.2), squeeze=False)
    for ax, tower in zip(axes[0], towers, strict=True):
        rows = [r for r in table["layers"] if r["tower"] == tower]
        x = [r["layer"] for r in rows]
        ax.bar([i - 0.2 for i in x], [r["c1"] for r in rows], width=0.4, label="C1 (removal)")
        ax.bar([i + 0.2 for i in x], [r["c2"] for r in rows], width=0.4, label="C2 (re-init factor)")
        ax.set_title(f"{tower} tower")
        ax.set_xlabel("block")
        ax.set_xticks(x)
        ax.set_ylim(0, 1.05)
        ax.legend(fontsize=7)
    fig.suptitle(f"base R@1 {table['base_R1']:.1f}, C2 threshold {table['threshold']} pts", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def read_probe(path: Path) -> dict[str, Any]:
    """A probe table from ``probe.json`` or a folder holding it."""
    path = Path(path)
    f = path / PROBE_JSON if path.is_dir() else path
    try:
        table = json.loads(f.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise ConfigError(f"prune.probe: {f} not found; run `tbps-compress probe` first") from exc
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"prune.probe: {f} is not a readable probe table ({exc})") from exc
    if not isinstance(table, dict) or not isinstance(table.get("layers"), list):
        raise ConfigError(f"prune.probe: {f} is not a probe table (no 'layers' list)")
    return table


def layer_ranking(table: dict[str, Any]) -> dict[str, list[float]]:
    """Per tower, one importance score per block (C1, ties broken by C2): the lowest are dropped first."""
    out: dict[str, dict[int, float]] = {}
    for r in table["layers"]:
        out.setdefault(r["tower"], {})[int(r["layer"])] = float(r["c1"]) + 1e-3 * float(r.get("c2", 0.0))
    return {t: [v[i] for i in sorted(v)] for t, v in out.items()}
