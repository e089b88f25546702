"""Structured pruning of the ``stripe-gru`` family's image tower (:mod:`tbps_compress.models.stripe_gru`).

What is pruned (``prune.vision``; the GRU text tower is not prunable, so every ``prune.text`` ratio must be 0):

- ``width_ratio``: the channels of the stem and of every stage. A stage's channels form one torch-pruning group
  (every block's second convolution and BN, the first block's shortcut, the residual additions and the next
  stage's first convolution and shortcut); the last stage's channels also remove their rows of the stripe
  projection ``visual.proj``.
- ``mlp_ratio``: each residual block's inner channels (between its two convolutions), the analogue of a
  transformer block's MLP width.

Heads, depth (``drop_layers``) and ``global_pruning`` do not apply to this family and are refused.

Mechanics: torch-pruning's ``BasePruner`` traces the trunk (stem and stages, up to the stride-16 feature map) with
an example image; ratios are given per convolution (``pruning_ratio_dict``), computed so that every group keeps
exactly the channel count the schedule asks for. The stripe pooling and projection are outside the traced graph:
pooling concatenates, for each channel ``c``, its whole-image mean and its ``stripes`` band means, so channel ``c``
owns rows ``c * (stripes + 1) ... c * (stripes + 1) + stripes`` of ``visual.proj``, and those rows follow the last
stage's pruned channels by hand (torch-pruning cannot map channels through that band layout). The criteria score
a group by its convolution and BN weights (the projection rows are not part of the score).
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

    t = cfg.text
    for key in ("width_ratio", "mlp_ratio", "head_ratio"):
        if getattr(t, key) > 0:
            raise ConfigError(f"prune.text.{key}: the stripe-gru family's GRU text tower is not prunable; set it to 0 "
                              "(prune.vision.width_ratio / mlp_ratio prune the image tower)")
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
    s = sizes(model, "vision")
    rt = cfg.round_to
    for key, widths in (("width_ratio", s["channels"]), ("mlp_ratio", [w for st in s["inner"] for w in st])):
        ratio = getattr(cfg.vision, key)
        if ratio > 0:
            for w in widths:
                if _keep(w, ratio, rt) < max(1, rt or 1):
                    raise ConfigError(f"prune.vision.{key}: {ratio} of {w} channels leaves none"
                                      + (f" once rounded to round_to={rt}" if rt else "") + "; use a smaller ratio")


def prune_tower(model: nn.Module, tower: str, cfg: Any, example: torch.Tensor, reference: dict[str, Any],
                step: int = 1, steps: int = 1, importance: Any = None) -> dict[str, Any]:
    """One round of stage-width and inner-width pruning of the image tower toward ``step``/``steps`` of the final
    targets (relative to ``reference``, the sizes before the first round). The text tower is left as it is."""
    import torch_pruning as tp

    from .prune import _check_group_ignoring_output, _keep, _partial, _rel_ratio, make_importance

    if tower == "text":
        return sizes(model, "text")
    t, rt = cfg.vision, cfg.round_to
    v = model.visual
    cur = sizes(model, "vision")

    def ratio(ref: int, now: int, frac: float) -> float:
        return _rel_ratio(_partial(ref, _keep(ref, frac, rt), step, steps, rt), now)

    ratios: dict[nn.Module, float] = {v.conv1: ratio(reference["channels"][0], cur["channels"][0], t.width_ratio)}
    for i, stage in enumerate(v.stages):
        r = ratio(reference["channels"][i + 1], cur["channels"][i + 1], t.width_ratio)
        for j, b in enumerate(stage):
            ratios[b.conv2] = r
            if isinstance(b.shortcut, nn.Sequential):
                ratios[b.shortcut[0]] = r
            ratios[b.conv1] = ratio(reference["inner"][i][j], cur["inner"][i][j], t.mlp_ratio)
    if not any(r > 0 for r in ratios.values()):
        return cur
    last = v.stages[-1][-1].conv2  # its output channels are the pooled channels: their projection rows follow
    trunk = _Trunk(v)
    pruner = tp.pruner.BasePruner(
        trunk, example, importance if importance is not None else make_importance(cfg.criterion),
        pruning_ratio=0.0, pruning_ratio_dict=ratios, round_to=rt, root_module_types=[nn.Conv2d])
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
