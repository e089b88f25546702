"""A convolutional stem for the ViT image tower (Xiao et al., "Early convolutions help transformers see better").

Patchifying with one large-stride convolution gives a small from-scratch ViT no locality prior, and on a CPU budget
it learns pedestrian colours and shapes slowly. :class:`ConvStem` replaces open_clip's ``visual.conv1`` with a few
3x3 stride-2 convolutions (BatchNorm, ReLU) followed by a projection convolution to the residual width whose kernel
and stride make up the rest of ``patch_size``. The token grid, the class token, the position embeddings and every
transformer block stay exactly as in the patchify tower, so pruning, distillation, export and quantisation treat it
like any other ViT; ``out_channels`` and ``weight`` are the projection's, as for the patchify convolution.

With ``blocks > 0`` (``vision_cfg.stem_blocks``) every stride-2 layer is followed by that many residual basic blocks
(two conv3x3 + BN, identity shortcut, as in ResNet-18), which turns the stem into a small convolutional trunk whose
stride-``patch_size`` feature map the transformer then pools (a hybrid ViT, as in Dosovitskiy et al.'s R50+ViT).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


class BasicBlock(nn.Module):
    """Two conv3x3 + BN layers with an identity shortcut (channels and resolution unchanged)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, kernel_size=3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, kernel_size=3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        nn.init.zeros_(self.bn2.weight)  # each block starts as the identity (Goyal et al.)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(x + self.bn2(self.conv2(y)))


class ConvStem(nn.Module):
    """``len(channels)`` conv3x3/2 + BN + ReLU layers, each followed by ``blocks`` residual blocks, then a
    ``patch_size / 2**len(channels)`` projection."""

    def __init__(self, channels: Sequence[int], width: int, patch_size: int, blocks: int = 0) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c_in = 3
        for c in channels:
            layers += [nn.Conv2d(c_in, int(c), kernel_size=3, stride=2, padding=1, bias=False),
                       nn.BatchNorm2d(int(c)), nn.ReLU(inplace=True)]
            layers += [BasicBlock(int(c)) for _ in range(int(blocks))]
            c_in = int(c)
        self.stem = nn.Sequential(*layers)
        k = patch_size // 2 ** len(channels)
        self.proj = nn.Conv2d(c_in, width, kernel_size=k, stride=k, bias=True)

    @property
    def out_channels(self) -> int:
        return int(self.proj.out_channels)

    @property
    def weight(self) -> torch.Tensor:
        return self.proj.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.stem(x))


def stem_macs(channels: Sequence[int], width: int, patch_size: int, hw: tuple[int, int], blocks: int = 0) -> int:
    """Multiply-accumulates of one image through the stem (convolutions only)."""
    h, w = hw
    macs, c_in = 0, 3
    for c in channels:
        h, w = (h + 1) // 2, (w + 1) // 2
        macs += h * w * c * c_in * 9 + int(blocks) * 2 * h * w * c * c * 9
        c_in = int(c)
    k = patch_size // 2 ** len(channels)
    return int(macs + (h // k) * (w // k) * width * c_in * k * k)
