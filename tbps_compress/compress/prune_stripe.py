"""Structured pruning of the ``stripe-gru`` family's image tower (:mod:`tbps_compress.models.stripe_gru`).

What is pruned, image tower (``prune.vision``):

- ``width_ratio``: the channels of the stem and of every stage. A stage's channels form one torch-pruning group
  (every block's second convolution and BN, the first block's shortcut, the residual additions and the next
  stage's first convolution and shortcut); the last stage's channels also remove their rows of the stripe
  projection ``visual.proj``.
- ``mlp_ratio``: each residual block's inner channels (between its two convolutions), the analogue of a
  transformer block's MLP width.

Text tower (``prune.text``):

- ``width_ratio``: the token embedding's width (the GRU's input features).
- ``mlp_ratio``: the GRU's hidden units. ``nn.GRU`` has one hidden size for every layer and direction, so each
  layer and direction loses the same number of units, each its own least important ones; a unit takes its three
  gate rows of the input and recurrent weights and biases, its recurrent column, and the columns (next layer) or
  rows (``text_projection``) that read it.

Heads, depth (``drop_layers``) and ``global_pruning`` do not apply to this family and are refused.

Mechanics: torch-pruning's ``BasePruner`` traces the trunk (stem and stages, up to the stride-16 feature map) with
an example image; ratios are given per convolution (``pruning_ratio_dict``), computed so that every group keeps
exactly the channel count the schedule asks for. The stripe pooling and projection are outside the traced graph:
pooling concatenates, for each channel ``c``, its whole-image mean and its ``stripes`` band means, so channel ``c``
owns rows ``c * (stripes + 1) ... c * (stripes + 1) + stripes`` of ``visual.proj``, and those rows follow the last
stage's pruned channels by hand (torch-pruning cannot map channels through that band layout). The criteria score
a group by its convolution and BN weights (the projection rows are not part of the score).

torch-pruning has no GRU pruner, so the text tower is pruned by hand here: the same criteria by name (magnitude /
l2 / lamp, and bn_scale, which has no BatchNorm to read there: squared weights; l1: absolute weights; taylor:
``|w * dL/dw|``; random), summed over every weight a unit owns or is read by. Within one layer LAMP ranks as
magnitude does, so with per-layer fractions they keep the same units (as torch-pruning's LAMP does for the image
tower's per-group fractions).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..errors import ConfigError


class _Trunk(nn.Module):
    """The image tower up to its feature map (stem and stages), sharing the modules, for graph tracing."""

    def __init__(self, visual: nn.Module) -> None:
        super().__init__()
        self.conv1, self.bn1, self.stages = visual.conv1, visual.bn1, visual.stages

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.stages(torch.relu(self.bn1(self.conv1(x))))


def sizes(model: nn.Module, tower: str) -> dict[str, Any]:
    """Stage widths (stem first) and per-block inner widths of the image tower; the GRU's sizes for the text."""
    if tower == "text":
        return {"width": int(model.token_embedding.embedding_dim), "hidden": int(model.gru.hidden_size),
                "layers": int(model.gru.num_layers)}
    v = model.visual
    return {"channels": [int(v.conv1.out_channels)] + [int(s[0].conv2.out_channels) for s in v.stages],
            "inner": [[int(b.conv1.out_channels) for b in s] for s in v.stages]}


def check(cfg: Any, model: nn.Module) -> None:
    """Refuse what this family cannot prune, and ratios that leave no channels, in one line naming the key."""
    from .prune import _keep

    if cfg.text.head_ratio > 0:
        raise ConfigError("prune.text.head_ratio: the stripe-gru family's text tower is a GRU without attention "
                          "heads; set it to 0 (prune.text.mlp_ratio prunes its hidden units)")
    for tower in ("vision", "text"):
        if getattr(cfg, tower).drop_count():
            raise ConfigError(f"prune.{tower}.drop_layers: the stripe-gru family has no transformer blocks to drop; "
                              "set it to 0")
    if cfg.vision.head_ratio > 0:
        raise ConfigError("prune.vision.head_ratio: the stripe-gru family's image tower is a CNN without attention "
                          "heads; set it to 0")
    if cfg.global_pruning:
        raise ConfigError("prune.global_pruning: the stripe-gru family is pruned by the same fraction in every "
                          "stage and block; set it to false")
    s, t = sizes(model, "vision"), sizes(model, "text")
    rt = cfg.round_to
    for tower, key, widths in (("vision", "width_ratio", s["channels"]),
                               ("vision", "mlp_ratio", [w for st in s["inner"] for w in st]),
                               ("text", "width_ratio", [t["width"]]), ("text", "mlp_ratio", [t["hidden"]])):
        ratio = getattr(getattr(cfg, tower), key)
        if ratio > 0:
            for w in widths:
                if _keep(w, ratio, rt) < max(1, rt or 1):
                    raise ConfigError(f"prune.{tower}.{key}: {ratio} of {w} channels leaves none"
                                      + (f" once rounded to round_to={rt}" if rt else "") + "; use a smaller ratio")


def prune_tower(model: nn.Module, tower: str, cfg: Any, example: torch.Tensor, reference: dict[str, Any],
                step: int = 1, steps: int = 1, importance: Any = None) -> dict[str, Any]:
    """One round of pruning ``tower`` toward ``step``/``steps`` of the final targets (relative to ``reference``,
    the sizes before the first round): stage and inner widths of the image tower, or embedding width and GRU
    hidden units of the text tower."""
    from .prune import _keep, _partial, make_importance

    rt = cfg.round_to

    def size(ref: int, frac: float) -> int:
        return _partial(ref, _keep(ref, frac, rt), step, steps, rt)

    if tower == "text":
        t = cfg.text
        return prune_text_to(model, size(reference["width"], t.width_ratio), size(reference["hidden"], t.mlp_ratio),
                             cfg.criterion)
    v = cfg.vision
    target = {"channels": [size(c, v.width_ratio) for c in reference["channels"]],
              "inner": [[size(w, v.mlp_ratio) for w in st] for st in reference["inner"]]}
    return prune_vision_to(model, target, example,
                           importance if importance is not None else make_importance(cfg.criterion), rt)


def prune_vision_to(model: nn.Module, target: dict[str, Any], example: torch.Tensor, importance: Any,
                    round_to: int | None = None) -> dict[str, Any]:
    """Prune the image tower to ``target`` sizes (``channels``: stem and stages; ``inner``: per block), each group
    keeping its most important channels by ``importance`` (a torch-pruning importance); returns the new sizes."""
    import torch_pruning as tp

    from .prune import _check_group_ignoring_output, _rel_ratio

    v = model.visual
    cur = sizes(model, "vision")
    ratios: dict[nn.Module, float] = {v.conv1: _rel_ratio(target["channels"][0], cur["channels"][0])}
    for i, stage in enumerate(v.stages):
        r = _rel_ratio(target["channels"][i + 1], cur["channels"][i + 1])
        for j, b in enumerate(stage):
            ratios[b.conv2] = r
            if isinstance(b.shortcut, nn.Sequential):
                ratios[b.shortcut[0]] = r
            ratios[b.conv1] = _rel_ratio(target["inner"][i][j], cur["inner"][i][j])
    if not any(r > 0 for r in ratios.values()):
        return cur
    last = v.stages[-1][-1].conv2  # its output channels are the pooled channels: their projection rows follow
    trunk = _Trunk(v)
    pruner = tp.pruner.BasePruner(trunk, example, importance, pruning_ratio=0.0, pruning_ratio_dict=ratios,
                                  round_to=round_to, root_module_types=[nn.Conv2d])
    dg = pruner.DG
    dg.check_pruning_group = lambda group: _check_group_ignoring_output(dg, group)
    removed: list[int] = []
    for group in pruner.step(interactive=True):
        if not any(dep.target.module in ratios and dg.is_out_channel_pruning_fn(dep.handler) for dep, _ in group):
            raise RuntimeError(f"vision: unexpected pruning group rooted at {group[0].dep.target}; the traced graph "
                               "misses a layer (pruning it would break the model)")
        for dep, idxs in group:
            if dep.target.module is last and dg.is_out_channel_pruning_fn(dep.handler):
                removed = sorted(int(i) for i in idxs)
        group.prune()
    if removed:
        per = v.stripes + 1
        gone = {c * per + k for c in removed for k in range(per)}
        keep = [r for r in range(v.proj.shape[0]) if r not in gone]
        v.proj = nn.Parameter(v.proj.detach()[keep].clone(), requires_grad=v.proj.requires_grad)
    return sizes(model, "vision")


# ------------------------------------------------------------------------------------------------ GRU text tower
def _elementwise(w: torch.Tensor, criterion: str) -> torch.Tensor:
    """Per-weight importance of a criterion (summed over what a unit owns; see the module docstring)."""
    if criterion == "taylor":
        if w.grad is None:
            raise RuntimeError("the taylor criterion needs gradients: call prune.taylor_gradients first")
        return (w.detach() * w.grad).abs()
    if criterion == "l1":
        return w.detach().abs()
    return w.detach().float() ** 2


def _top(scores: torch.Tensor, keep: int, criterion: str) -> torch.Tensor:
    """Indices (sorted) of the ``keep`` highest scores; random scores for the random criterion."""
    if criterion == "random":
        scores = torch.rand(scores.shape[0])
    return torch.sort(torch.topk(scores, keep).indices).values


def _gate_rows(units: torch.Tensor, hidden: int) -> torch.Tensor:
    """Rows of a GRU weight (reset, update and new gates stacked) that belong to ``units``."""
    return torch.cat([units + g * hidden for g in range(3)])


def prune_text_to(model: nn.Module, width: int, hidden: int, criterion: str) -> dict[str, Any]:
    """Prune the text tower to ``width`` token features and ``hidden`` GRU units per layer and direction, each
    keeping its most important by ``criterion`` (see the module docstring); returns the new sizes."""
    cur = sizes(model, "text")
    width, hidden = min(width, cur["width"]), min(hidden, cur["hidden"])
    if width >= cur["width"] and hidden >= cur["hidden"]:
        return cur
    gru, emb, proj = model.gru, model.token_embedding, model.text_projection
    h_old, layers = cur["hidden"], cur["layers"]
    w = {name: p for name, p in gru.named_parameters()}
    dirs = ("", "_reverse")
    # the embedding's columns: their own weights and the first layer's input columns, both directions
    e_score = _elementwise(emb.weight, criterion).sum(0)
    for d in dirs:
        e_score = e_score + _elementwise(w[f"weight_ih_l0{d}"], criterion).sum(0)
    cols = _top(e_score, width, criterion) if width < cur["width"] else torch.arange(cur["width"])
    keep: list[list[torch.Tensor]] = []
    for layer in range(layers):
        nxt = [w[f"weight_ih_l{layer + 1}{d}"] for d in dirs] if layer + 1 < layers else None
        per_dir = []
        for k, d in enumerate(dirs):
            own = sum(_elementwise(w[f"{n}_l{layer}{d}"], criterion).view(3, h_old, -1).sum(2)
                      for n in ("weight_ih", "weight_hh", "bias_ih", "bias_hh") if f"{n}_l{layer}{d}" in w)
            score = own.sum(0) + _elementwise(w[f"weight_hh_l{layer}{d}"], criterion).sum(0)
            readers = [_elementwise(x, criterion)[:, k * h_old:(k + 1) * h_old].sum(0) for x in nxt] if nxt else \
                [_elementwise(proj, criterion)[k * h_old:(k + 1) * h_old].sum(1)]
            score = score + sum(readers)
            per_dir.append(_top(score, hidden, criterion) if hidden < h_old else torch.arange(h_old))
        keep.append(per_dir)
    new = nn.GRU(width, hidden, num_layers=layers, batch_first=gru.batch_first, bidirectional=True,
                 bias=gru.bias)
    with torch.no_grad():
        for layer in range(layers):
            prev = cols if layer == 0 else torch.cat([keep[layer - 1][0], keep[layer - 1][1] + h_old])
            for k, d in enumerate(dirs):
                rows = _gate_rows(keep[layer][k], h_old)
                getattr(new, f"weight_ih_l{layer}{d}").copy_(w[f"weight_ih_l{layer}{d}"][rows][:, prev])
                getattr(new, f"weight_hh_l{layer}{d}").copy_(w[f"weight_hh_l{layer}{d}"][rows][:, keep[layer][k]])
                if gru.bias:
                    for n in ("bias_ih", "bias_hh"):
                        getattr(new, f"{n}_l{layer}{d}").copy_(w[f"{n}_l{layer}{d}"][rows])
        last = torch.cat([keep[-1][0], keep[-1][1] + h_old])
        model.gru = new
        table = nn.Embedding(emb.num_embeddings, width)
        table.weight.copy_(emb.weight[:, cols])
        model.token_embedding = table
        model.text_projection = nn.Parameter(proj.detach()[last].clone())
    return sizes(model, "text")
