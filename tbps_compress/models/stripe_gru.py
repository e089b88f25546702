"""The ``stripe-gru`` model family: a residual CNN with horizontal-stripe pooling and a bidirectional GRU text tower.

Trained from scratch on a CPU budget, a ViT-style image tower (patchify, convolutional stem or hybrid) with a
transformer text tower learns SynthPedes slowly: on the fixed benchmark test split it reaches about the
upper-and-lower-colour oracle after an hour. Part-based pooling and a recurrent text encoder are the two
inductive biases that change that, and they only work together (measured in ``benchmarks/results/teacher_ground``):

- **image**: a small ResNet trunk (a stride-2 conv3x3 stem, then stages whose first basic block halves the
  resolution) to a stride-16 map; the map is average-pooled over the whole image and over ``stripes`` horizontal
  bands (head, torso, legs, feet at 4 bands: the PCB pooling of person re-identification), the ``stripes + 1``
  vectors are concatenated and projected (``visual.proj``) to the joint embedding. An image embedding thus keeps
  *where* a colour is, which is what tells "red coat, black trousers" from "black coat, red trousers".
- **text**: the BPE tokens of the toolkit's tokenizer (the same vocabulary pruning applies), a ``layers``-deep
  bidirectional GRU over the whole padded context, max-pooled over the caption's own tokens (padding masked) and
  projected (``text_projection``) to the joint embedding. No position embeddings: the recurrence orders words.

The module keeps the attribute names the rest of the toolkit reads from an open_clip ``CLIP`` where they have the
same meaning (``visual.conv1``, ``visual.proj``, ``token_embedding``, ``text_projection``, ``logit_scale``,
``encode_image`` / ``encode_text(normalize=...)``), so training, evaluation, vocabulary pruning, ONNX export
(the GRU becomes one ONNX ``GRU`` node per layer), quantisation and benchmarking treat it like any other model.
It has no transformer blocks: structured pruning (:mod:`tbps_compress.compress.prune_stripe`) narrows its widths
instead, and a distilled student's ``init: inherit`` is its teacher pruned to the student's widths; depth pruning,
layer selection, the module-importance probe and hidden-state distillation, which work on blocks, refuse it with an
error naming the family.

Config (``models/configs/synth-stripe-gru.json``)::

    {"family": "stripe-gru", "embed_dim": 256,
     "vision_cfg": {"image_size": [96, 48], "channels": [32, 64, 128, 256], "blocks": [1, 2, 2], "stripes": 4},
     "text_cfg": {"context_length": 48, "vocab_size": 49408, "width": 256, "hidden": 256, "layers": 2}}

``channels[0]`` is the stem's width; stage ``i`` (``i >= 1``) has ``blocks[i - 1]`` basic blocks of
``channels[i]`` channels, the first with stride 2. An optional ``inner`` (one list per stage, one width per block)
gives each block's inner width, between its two convolutions (default: the stage's width); structured pruning
(:mod:`tbps_compress.compress.prune_stripe`) writes it, together with the narrower ``channels``.
"""

from __future__ import annotations

import copy
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from .config import positive_int

FAMILY = "stripe-gru"
_TOP = {"family", "description", "name", "embed_dim", "vision_cfg", "text_cfg"}
_VISION = {"image_size", "channels", "blocks", "stripes"}
_VISION_OPTIONAL = {"inner"}
_TEXT = {"context_length", "vocab_size", "width", "hidden", "layers"}


def _int_list(value: Any, key: str, source: str, length: int | None = None) -> list[int]:
    if not isinstance(value, list) or not value:
        raise ConfigError(f"{source}: '{key}' must be a non-empty list of positive integers, got {value!r}")
    for i, v in enumerate(value):
        positive_int(v, f"{key}[{i}]", source)
    if length is not None and len(value) != length:
        raise ConfigError(f"{source}: '{key}' needs {length} entries (one per stage after the stem), got {len(value)}")
    return list(value)


def validate(cfg: dict[str, Any], source: str) -> dict[str, Any]:
    """Check a ``stripe-gru`` config's keys and values; return a deep copy with ``image_size`` as [h, w]."""
    cfg = copy.deepcopy(cfg)
    unknown = set(cfg) - _TOP
    if unknown:
        raise ConfigError(f"{source}: unknown key(s) {sorted(unknown)} for family '{FAMILY}'; allowed: {sorted(_TOP)}")
    for key in ("embed_dim", "vision_cfg", "text_cfg"):
        if key not in cfg:
            raise ConfigError(f"{source}: missing key '{key}'")
    positive_int(cfg["embed_dim"], "embed_dim", source)
    v, t = cfg["vision_cfg"], cfg["text_cfg"]
    for tower, keys, allowed in (("vision_cfg", v, _VISION), ("text_cfg", t, _TEXT)):
        if not isinstance(keys, dict):
            raise ConfigError(f"{source}: '{tower}' must be an object")
        extra = set(keys) - allowed - (_VISION_OPTIONAL if tower == "vision_cfg" else set())
        missing = allowed - set(keys)
        if extra:
            raise ConfigError(f"{source}: unknown key(s) {sorted(extra)} in '{tower}'; allowed: {sorted(allowed)}")
        if missing:
            raise ConfigError(f"{source}: missing key(s) {sorted(missing)} in '{tower}' (family '{FAMILY}')")
    channels = _int_list(v["channels"], "vision_cfg.channels", source)
    if len(channels) < 2:
        raise ConfigError(f"{source}: 'vision_cfg.channels' needs the stem's width and at least one stage, "
                          f"got {channels}")
    blocks = _int_list(v["blocks"], "vision_cfg.blocks", source, len(channels) - 1)
    if "inner" in v:
        inner = v["inner"]
        if not isinstance(inner, list) or len(inner) != len(blocks):
            raise ConfigError(f"{source}: 'vision_cfg.inner' needs one list per stage ({len(blocks)}), got {inner!r}")
        for i, (widths, n) in enumerate(zip(inner, blocks, strict=True)):
            _int_list(widths, f"vision_cfg.inner[{i}]", source)
            if len(widths) != n:
                raise ConfigError(f"{source}: 'vision_cfg.inner[{i}]' needs one width per block of stage {i + 1} "
                                  f"({n}), got {len(widths)}")
    stripes = positive_int(v["stripes"], "vision_cfg.stripes", source)
    size = v["image_size"]
    hw = [size, size] if isinstance(size, int) and not isinstance(size, bool) else size
    if not isinstance(hw, list) or len(hw) != 2:
        raise ConfigError(f"{source}: 'vision_cfg.image_size' must be an int or [height, width], got {size!r}")
    for i, s in enumerate(hw):
        positive_int(s, f"vision_cfg.image_size[{i}]", source)
    stride = 2 ** len(channels)
    if hw[0] % stride or hw[1] % stride:
        raise ConfigError(f"{source}: 'vision_cfg.image_size' {hw} is not divisible by the trunk's stride {stride} "
                          f"({len(channels)} stride-2 layers)")
    if stripes > hw[0] // stride:
        raise ConfigError(f"{source}: 'vision_cfg.stripes' {stripes} is more than the feature map's "
                          f"{hw[0] // stride} rows at image height {hw[0]}")
    v["image_size"] = list(hw)
    for key in sorted(_TEXT):
        positive_int(t[key], f"text_cfg.{key}", source)
    return cfg


def inner_widths(v: dict[str, Any]) -> list[list[int]]:
    """Each block's inner width, per stage: ``vision_cfg.inner`` when given, else the stage's width."""
    if "inner" in v:
        return [list(x) for x in v["inner"]]
    return [[c] * n for c, n in zip(v["channels"][1:], v["blocks"], strict=True)]


class DownBlock(nn.Module):
    """A ResNet basic block (two conv3x3 + BN, ``c_mid`` channels between them) with an optional stride and a 1x1
    projection shortcut."""

    def __init__(self, c_in: int, c_mid: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_mid, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_mid)
        self.conv2 = nn.Conv2d(c_mid, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(y)) + self.shortcut(x))


class StripeCNN(nn.Module):
    """Residual trunk to a stride-``2**len(channels)`` map; global + ``stripes`` band average pools; projection."""

    def __init__(self, channels: list[int], inner: list[list[int]], stripes: int, embed_dim: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, channels[0], 3, 2, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels[0])
        stages = []
        for c_in, c_out, mids in zip(channels[:-1], channels[1:], inner, strict=True):
            stages.append(nn.Sequential(*[DownBlock(c_in if j == 0 else c_out, mid, c_out, 2 if j == 0 else 1)
                                          for j, mid in enumerate(mids)]))
        self.stages = nn.Sequential(*stages)
        self.stripes = int(stripes)
        pooled = channels[-1] * (self.stripes + 1)
        self.proj = nn.Parameter(torch.randn(pooled, embed_dim) * pooled ** -0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.stages(torch.relu(self.bn1(self.conv1(x))))
        bands = F.adaptive_avg_pool2d(f, (self.stripes, 1)).flatten(2)  # (B, C, stripes)
        pooled = torch.cat([f.mean(dim=(2, 3)).unsqueeze(2), bands], dim=2).flatten(1)
        return pooled @ self.proj


class StripeGRU(nn.Module):
    """Image and text towers of the ``stripe-gru`` family with CLIP's interface (see the module docstring)."""

    def __init__(self, cfg: dict[str, Any]) -> None:
        super().__init__()
        v, t = cfg["vision_cfg"], cfg["text_cfg"]
        d = int(cfg["embed_dim"])
        self.visual = StripeCNN(list(v["channels"]), inner_widths(v), int(v["stripes"]), d)
        self.context_length = int(t["context_length"])
        self.token_embedding = nn.Embedding(int(t["vocab_size"]), int(t["width"]))
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        self.gru = nn.GRU(int(t["width"]), int(t["hidden"]), num_layers=int(t["layers"]), batch_first=True,
                          bidirectional=True)
        out = 2 * int(t["hidden"])
        self.text_projection = nn.Parameter(torch.randn(out, d) * out ** -0.5)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))

    def encode_image(self, image: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        x = self.visual(image)
        return F.normalize(x, dim=-1) if normalize else x

    def encode_text(self, text: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        states, _ = self.gru(self.token_embedding(text))
        valid = (text != 0).unsqueeze(2)
        pooled = states.masked_fill(~valid, -1e4).amax(dim=1)
        x = pooled @ self.text_projection
        return F.normalize(x, dim=-1) if normalize else x


def build(cfg: dict[str, Any]) -> StripeGRU:
    """The model of a validated config (random initialisation)."""
    return StripeGRU(cfg)


def config_from_model(model: StripeGRU, base: dict[str, Any]) -> dict[str, Any]:
    """The config of the model as it is: the token table's current size (after vocabulary pruning), the joint
    embedding width, and after structured pruning the token width and GRU hidden size and the image tower's stage
    and inner widths (``inner`` only when a block's differs from its stage's width)."""
    cfg = copy.deepcopy(base)
    t = cfg["text_cfg"]
    t["vocab_size"] = int(model.token_embedding.num_embeddings)
    t["width"] = int(model.token_embedding.embedding_dim)
    t["hidden"] = int(model.gru.hidden_size)
    cfg["embed_dim"] = int(model.visual.proj.shape[1])
    v = cfg["vision_cfg"]
    stages = list(model.visual.stages)
    v["channels"] = [int(model.visual.conv1.out_channels)] + [int(s[0].conv2.out_channels) for s in stages]
    v["blocks"] = [len(s) for s in stages]
    inner = [[int(b.conv1.out_channels) for b in s] for s in stages]
    v.pop("inner", None)
    if inner != inner_widths(v):
        v["inner"] = inner
    return validate(cfg, cfg.get("name", FAMILY))


def count_macs(cfg: dict[str, Any]) -> dict[str, int]:
    """Multiply-accumulates of one image (convolutions, projection) and one caption (GRU gates, projection)."""
    v, t = cfg["vision_cfg"], cfg["text_cfg"]
    h, w = v["image_size"]
    ch = v["channels"]
    h, w = (h + 1) // 2, (w + 1) // 2
    macs = h * w * ch[0] * 3 * 9
    for c_in, c_out, mids in zip(ch[:-1], ch[1:], inner_widths(v), strict=True):
        h, w = (h + 1) // 2, (w + 1) // 2
        macs += h * w * c_in * c_out  # the first block's shortcut
        for j, mid in enumerate(mids):
            macs += h * w * ((c_in if j == 0 else c_out) * mid * 9 + mid * c_out * 9)
    vision = macs + ch[-1] * (v["stripes"] + 1) * cfg["embed_dim"]
    hidden, width, steps = t["hidden"], t["width"], t["context_length"]
    text = 0
    for layer in range(t["layers"]):
        d_in = width if layer == 0 else 2 * hidden
        text += 2 * steps * 3 * hidden * (d_in + hidden)  # both directions, three gates, input and recurrent
    text += 2 * hidden * cfg["embed_dim"]
    return {"vision": int(vision), "text": int(text)}
