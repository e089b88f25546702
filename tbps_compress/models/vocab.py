"""Vocabulary pruning: a token table cut down to the tokens a training corpus uses.

CLIP's BPE table has 49,408 rows; a from-scratch model on one dataset uses a few hundred of them, and AdamW updates
every row every step. :func:`prune_vocabulary` keeps id 0, the used ids, an unknown-token row, SOT and EOT, and
records the mapping (``vocab_map.json`` in the artifact) so the tokenizer maps original ids to rows.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from .factory import EOT_TOKEN, SOT_TOKEN
from .meta import meta_of, set_meta

log = logging.getLogger(__name__)


@torch.no_grad()
def prune_vocabulary(
    model: nn.Module, captions: Sequence[str], tokenizer: Callable[[Sequence[str]], Tensor], batch_size: int = 1024
) -> tuple[nn.Module, dict[int, int], int]:
    """Shrink ``model``'s token table to the tokens ``captions`` use; returns ``(model, vocab_map, unk_id)``.

    ``tokenizer`` maps captions to ORIGINAL BPE ids (``models.tokenizer.get_tokenizer(cfg)`` without a map). The
    new table holds, in order: id 0, the used ids (ascending), an unk row (the mean embedding, or the old unk row
    of an already pruned model), SOT, EOT, so EOT is the largest id. A model that already carries a vocabulary
    map is pruned further (the maps compose). The model is changed in place; its metadata (``meta_of(model)``:
    config, vocabulary map, unknown id) is updated. Captions whose tokens are all kept embed exactly as before.
    """
    from .factory import config_from_model

    old_map: dict[int, int] | None = meta_of(model).vocab_map or None
    old_unk = meta_of(model).unk_id
    used: set[int] = set()
    for s in range(0, len(captions), batch_size):
        used.update(int(x) for x in torch.unique(tokenizer(list(captions[s:s + batch_size]))).tolist())
    used -= {0, SOT_TOKEN, EOT_TOKEN}
    if old_map is not None:
        used = {o for o in used if o in old_map}
    ordered = sorted(used)

    def cur(orig: int) -> int:
        return old_map[orig] if old_map is not None else orig

    emb = model.token_embedding
    table = emb.weight.detach()
    if old_map is not None and old_unk is not None:
        unk_row = table[old_unk]
    else:
        unk_row = table.mean(dim=0)
    rows = [table[0]] + [table[cur(o)] for o in ordered]
    rows += [unk_row, table[cur(SOT_TOKEN)], table[cur(EOT_TOKEN)]]
    k = len(ordered)
    vocab_map = {0: 0, **{o: i + 1 for i, o in enumerate(ordered)}, SOT_TOKEN: k + 2, EOT_TOKEN: k + 3}
    unk_id = k + 1
    new = nn.Embedding(len(rows), table.shape[1]).to(device=table.device, dtype=table.dtype)
    new.weight.copy_(torch.stack(rows))
    new.weight.requires_grad_(emb.weight.requires_grad)
    model.token_embedding = new
    set_meta(model, vocab_map=vocab_map)
    set_meta(model, unk_id=unk_id)
    set_meta(model, config=config_from_model(model))
    log.info("vocabulary pruned: %d -> %d token embeddings", table.shape[0], len(rows))
    return model, vocab_map, unk_id


def vocabulary_captions(records: Sequence[Any], augment: Any, clean: Callable[[str], str]) -> list[str]:
    """The text a training run can feed the tokenizer: captions, back-translations and synonyms (when on)."""
    texts = [clean(c) for r in records for c in r.captions]
    if augment.text.back_translation_p > 0:
        texts += [clean(c) for r in records for c in (r.captions_bt or ())]
    if augment.text.synonym_p > 0:
        from ..data.transforms import _SYNONYMS

        texts += [w for ws in _SYNONYMS.values() for w in ws]
    return texts
