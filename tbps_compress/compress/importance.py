"""Importance scores for weight inheritance (and any stage that keeps the "most important" parts of a model).

Weight scores are sums of squared weights (squared L2 norms) over every parameter that reads from or writes to a
unit, so they need no data:

- residual channels of a tower: every tensor touching channel ``c`` of the residual stream (patch / token
  embedding, position and class embeddings, layer norms, attention and MLP in/out projections, output projection),
  each tensor normalised to sum 1 over the channels so a large table (the token embedding) does not outvote the
  blocks;
- joint embedding dimensions: the columns of both towers' output projections (normalised the same way);
- attention heads: the head's q, k, v rows (weights and biases) and its columns of the output projection;
- channels inside a head: q+k rows per query/key channel, v row + output column per value channel;
- MLP hidden channels: the ``c_fc`` row (and bias) and the ``c_proj`` column.

Layer importance is measured on data: the mean over samples and (non-padding) tokens of ``||block(x) - x|| / ||x||``,
the relative size of the block's residual update (a block that barely changes its input matters least).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from ..models.factory import tower_blocks


def _sq_rows(w: Tensor) -> Tensor:
    """Squared L2 norm of each row (dim 0) of a tensor of any rank."""
    return w.detach().float().reshape(w.shape[0], -1).square().sum(dim=1)


def _share(scores: Tensor) -> Tensor:
    total = scores.sum()
    return scores / total if total > 0 else scores


def residual_channel_scores(model: nn.Module, tower: str, layers: list[int] | None = None) -> Tensor:
    """Importance of each residual-stream channel of the 'vision' or 'text' tower, shape (width,).

    ``layers`` restricts the blocks counted (the teacher layers a student inherits); default all.
    """
    blocks = tower_blocks(model, tower)
    layers = list(range(len(blocks))) if layers is None else list(layers)
    parts: list[Tensor] = []
    if tower == "vision":
        v = model.visual
        parts += [_sq_rows(v.conv1.weight), v.class_embedding.detach().float().square(),
                  _sq_rows(v.positional_embedding.t()), _sq_rows(v.proj),
                  v.ln_pre.weight.detach().float().square(), v.ln_post.weight.detach().float().square()]
    else:
        parts += [_sq_rows(model.token_embedding.weight.t()), _sq_rows(model.positional_embedding.t()),
                  _sq_rows(model.text_projection), model.ln_final.weight.detach().float().square()]
    for i in layers:
        blk = blocks[i]
        parts += [blk.ln_1.weight.detach().float().square(), blk.ln_2.weight.detach().float().square(),
                  _sq_rows(blk.attn.qkv.weight.t()), _sq_rows(blk.attn.proj.weight),
                  _sq_rows(blk.mlp.c_fc.weight.t()), _sq_rows(blk.mlp.c_proj.weight)]
    return sum(_share(p) for p in parts)


def embed_dim_scores(model: nn.Module) -> Tensor:
    """Importance of each joint-embedding dimension, shape (embed_dim,): both towers' projection columns."""
    return _share(_sq_rows(model.visual.proj.t())) + _share(_sq_rows(model.text_projection.t()))


def _qkv_views(attn: nn.Module) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(Wq, Wk, Wv, bq, bk, bv, Wo) reshaped per head: W* (heads, head_dim, dim), b* (heads, head_dim),
    Wo (dim, heads, head_dim)."""
    h, d = int(attn.num_heads), int(attn.head_dim)
    w = attn.qkv.weight.detach().float().reshape(3, h, d, -1)
    b = attn.qkv.bias.detach().float().reshape(3, h, d)
    o = attn.proj.weight.detach().float().reshape(-1, h, d)
    return w[0], w[1], w[2], b[0], b[1], b[2], o


def head_scores(attn: nn.Module) -> Tensor:
    """Importance of each attention head, shape (num_heads,)."""
    wq, wk, wv, bq, bk, bv, wo = _qkv_views(attn)
    s = sum(x.square().sum(dim=(1, 2)) for x in (wq, wk, wv))
    s = s + sum(x.square().sum(dim=1) for x in (bq, bk, bv))
    return s + wo.square().sum(dim=(0, 2))


def head_channel_scores(attn: nn.Module, head: int) -> tuple[Tensor, Tensor]:
    """(query/key channel scores, value channel scores) inside one head, each shape (head_dim,)."""
    wq, wk, wv, bq, bk, bv, wo = _qkv_views(attn)
    qk = wq[head].square().sum(dim=1) + wk[head].square().sum(dim=1) + bq[head].square() + bk[head].square()
    v = wv[head].square().sum(dim=1) + bv[head].square() + wo[:, head].square().sum(dim=0)
    return qk, v


def mlp_scores(mlp: nn.Module) -> Tensor:
    """Importance of each MLP hidden channel, shape (mlp_dim,)."""
    return (_sq_rows(mlp.c_fc.weight) + mlp.c_fc.bias.detach().float().square()
            + _sq_rows(mlp.c_proj.weight.t()))


def top_k(scores: Tensor, k: int) -> list[int]:
    """Indices of the ``k`` largest scores, in ascending index order (ties: the lower index)."""
    if k > scores.numel():
        raise ValueError(f"cannot keep {k} of {scores.numel()} units")
    order = sorted(range(scores.numel()), key=lambda i: (-float(scores[i]), i))
    return sorted(order[:k])


def uniform_layers(n_teacher: int, n_student: int) -> list[int]:
    """``n_student`` teacher layer indices at a uniform stride, the first and the last always included."""
    if not 1 <= n_student <= n_teacher:
        raise ValueError(f"cannot pick {n_student} of {n_teacher} layers")
    if n_student == 1:
        return [n_teacher - 1]
    return sorted({round(i * (n_teacher - 1) / (n_student - 1)) for i in range(n_student)})


def _relative_updates(model: nn.Module, tower: str, run: Callable[[], object], mask: Tensor | None) -> Tensor:
    blocks = tower_blocks(model, tower)
    scores = torch.zeros(len(blocks))

    def make_hook(i: int) -> Callable:
        def hook(_m: nn.Module, inp: tuple, outp: Tensor) -> None:
            x, y = inp[0].float(), outp.float()
            rel = (y - x).norm(dim=-1) / x.norm(dim=-1).clamp_min(1e-6)  # (B, tokens)
            if mask is None:
                scores[i] = float(rel.mean())
            else:
                m = mask.to(rel.dtype)
                scores[i] = float((rel * m).sum() / m.sum().clamp_min(1))

        return hook

    hooks = [blk.register_forward_hook(make_hook(i)) for i, blk in enumerate(blocks)]
    try:
        run()
    finally:
        for h in hooks:
            h.remove()
    return scores


@torch.no_grad()
def layer_scores(model: nn.Module, images: Tensor, tokens: Tensor) -> dict[str, Tensor]:
    """Relative residual-update size of every block of both towers on a batch: {"vision": (L_v,), "text": (L_t,)}.

    ``images`` are normalised model inputs (B, 3, H, W); ``tokens`` the model's token ids (B, context); padding
    positions (id 0) of the text tower are ignored.
    """
    was = model.training
    model.eval()
    try:
        return {"vision": _relative_updates(model, "vision", lambda: model.encode_image(images), None),
                "text": _relative_updates(model, "text", lambda: model.encode_text(tokens), tokens != 0)}
    finally:
        model.train(was)
