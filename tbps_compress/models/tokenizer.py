"""Text tokenisation for models: open_clip's BPE tokenizer at the model's context length, with the optional
vocabulary mapping of a vocabulary-pruned model."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from .meta import meta_of


def get_tokenizer(cfg: dict[str, Any], vocab_map: dict[int, int] | None = None,
                  unk_id: int | None = None) -> Callable[[Sequence[str]], torch.Tensor]:
    """A callable mapping captions to a LongTensor (N, context_length): [SOT] tokens [EOT] 0-padded."""
    from open_clip.tokenizer import SimpleTokenizer

    tok = SimpleTokenizer(context_length=int(cfg["text_cfg"]["context_length"]))
    if not vocab_map:
        return lambda texts: tok(list(texts))
    size = max(max(vocab_map), 49407) + 1
    lut = torch.full((size,), -1 if unk_id is None else unk_id, dtype=torch.long)
    for old, new in vocab_map.items():
        lut[int(old)] = int(new)
    lut[0] = 0

    def encode(texts: Sequence[str]) -> torch.Tensor:
        ids = lut[tok(list(texts))]
        if (ids < 0).any():
            raise ValueError("caption uses a token outside the pruned vocabulary and the model has no unk_id")
        return ids

    return encode


def model_tokenizer(model: Any) -> Callable[[Sequence[str]], torch.Tensor]:
    """The tokenizer of a built or loaded model, with its vocabulary map if it was vocabulary-pruned."""
    return get_tokenizer(meta_of(model).config, meta_of(model).vocab_map,
                         meta_of(model).unk_id)
