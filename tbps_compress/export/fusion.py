"""Operator fusion of exported towers for the CPU provider (``tbps-compress export --optimize``).

Two passes, on one tower's ModelProto:

1. Attention (this module): the dynamo exporter writes ``scaled_dot_product_attention`` as a qkv MatMul + bias,
   a 5-D Reshape ``(B, S, 3, heads, head_dim)``, a Transpose, three Slice/Squeeze, a reshape dance that transposes
   K, the scale applied to Q and K by two Muls, MatMul, (the causal mask Add), Softmax, MatMul, Transpose and a
   Reshape to ``(B, S, heads * head_dim)``. onnxruntime's transformer optimiser matches only the TorchScript
   exporter's patterns, so this pass matches the dynamo one and writes one ``com.microsoft`` ``Attention`` node
   (packed qkv weights and bias; ``num_heads`` read from THAT block's Reshape, so pruned models whose blocks keep
   different head counts fuse correctly; ``scale`` = the product of the two Mul constants; ``unidirectional=1``
   for a mask that is exactly causal). A block that does not match (another mask, a non-scalar scale, sizes that
   disagree) is left unfused and its reason recorded.
2. onnxruntime's ``optimize_model`` (model type ``bert``, ``opt_level=0``, attention off because pass 1 did it):
   Gelu / BiasGelu, LayerNormalization, SkipLayerNormalization and bias fusions. Its SkipLayerNormalization fusion
   needs onnxruntime's symbolic shape inference, which fails on the dynamo graphs (an ``Expand`` of the class
   token); the session-level optimiser (``ORT_ENABLE_ALL``) fuses those at load time anyway.

:func:`fuse_tower` returns the fused model and what it did; the caller (``export_onnx``) proves parity with
PyTorch per tower and keeps the unfused graph when the fused one fails.
"""

from __future__ import annotations

import contextlib
import copy
import io
import logging
from collections import Counter
from typing import Any

import numpy as np

__all__ = ["MS_DOMAIN", "fuse_attention", "fuse_tower", "op_counts"]

log = logging.getLogger(__name__)

MS_DOMAIN = "com.microsoft"
# onnxruntime's transformer modules log under their bare module names (and print a line when shape inference fails)
_ORT_LOGGER_PREFIXES = ("onnxruntime.transformers", "fusion", "onnx_model", "optimizer", "shape_infer",
                        "symbolic_shape_infer")


def op_counts(model: Any) -> dict[str, int]:
    """Nodes per op type (``domain:op`` for non-default domains), sorted by name."""
    counts = Counter(n.op_type if n.domain in ("", "ai.onnx") else f"{n.domain}:{n.op_type}"
                     for n in model.graph.node)
    return dict(sorted(counts.items()))


class _Graph:
    """Producer / consumer maps and constant lookup over a GraphProto."""

    def __init__(self, graph: Any) -> None:
        from onnx import numpy_helper

        self.graph = graph
        self.producer = {o: n for n in graph.node for o in n.output}
        self.consumers: dict[str, list[Any]] = {}
        for n in graph.node:
            for i in n.input:
                self.consumers.setdefault(i, []).append(n)
        self.inits = {t.name: t for t in graph.initializer}
        self._np = numpy_helper

    def const(self, name: str) -> np.ndarray | None:
        """The value of an initializer or a Constant node's output, else None."""
        if name in self.inits:
            return self._np.to_array(self.inits[name])
        node = self.producer.get(name)
        if node is not None and node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value":
                    return self._np.to_array(attr.t)
        return None

    def src(self, name: str, op_type: str) -> Any | None:
        node = self.producer.get(name)
        return node if node is not None and node.op_type == op_type else None

    def only_consumer(self, name: str) -> Any | None:
        users = self.consumers.get(name, [])
        return users[0] if len(users) == 1 else None


def _attr(node: Any, name: str, default: Any = None) -> Any:
    from onnx import helper

    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def _scalar(value: np.ndarray | None) -> float | None:
    if value is None or value.size != 1 or value.dtype.kind != "f":
        return None
    return float(value.reshape(()))


def _unbind_index(g: _Graph, name: str, permute: str) -> int | None:
    """``name`` = Squeeze(Slice(permute, [i], [i+1], axes=[0]), [0]): return i."""
    sq = g.src(name, "Squeeze")
    if sq is None or len(sq.input) < 2 or _const_list(g, sq.input[1]) != [0]:
        return None
    sl = g.src(sq.input[0], "Slice")
    if sl is None or sl.input[0] != permute or len(sl.input) < 4:
        return None
    start, end, axes = (_const_list(g, x) for x in sl.input[1:4])
    if axes != [0] or start is None or end != [start[0] + 1] or len(sl.input) > 4 and _const_list(
            g, sl.input[4]) not in (None, [1]):
        return None
    return start[0]


def _const_list(g: _Graph, name: str) -> list[int] | None:
    value = g.const(name)
    if value is None or value.dtype.kind not in "iu":
        return None
    return [int(v) for v in value.reshape(-1)]


def _is_causal(mask: np.ndarray | None) -> bool:
    if mask is None or mask.ndim < 2 or mask.shape[-1] != mask.shape[-2]:
        return False
    m = mask.reshape(-1, *mask.shape[-2:])
    if m.shape[0] != 1:
        return False
    upper = np.triu(np.ones(m.shape[1:], dtype=bool), k=1)
    body = m[0]
    return bool(np.all(body[~upper] == 0) and np.all(np.isneginf(body[upper])))


def _match_block(g: _Graph, softmax: Any) -> tuple[dict[str, Any] | None, str]:
    """Match one attention block around ``softmax``: (match, "") or (None, reason)."""
    if _attr(softmax, "axis", -1) not in (-1, 3):
        return None, "Softmax is not over the last axis"
    scores_name, mask = softmax.input[0], None
    add = g.src(scores_name, "Add")
    if add is not None:
        mms = [i for i in add.input if g.src(i, "MatMul") is not None and g.const(i) is None]
        consts = [i for i in add.input if g.const(i) is not None]
        if len(mms) != 1 or len(consts) != 1:
            return None, "the scores are added to something other than one constant mask"
        mask = g.const(consts[0])
        if not _is_causal(mask):
            return None, "the attention mask is not the causal mask (fused Attention supports causal only)"
        scores_name = mms[0]
    scores = g.src(scores_name, "MatMul")
    if scores is None:
        return None, "Softmax does not follow a MatMul"
    q_mul, k_mul = g.src(scores.input[0], "Mul"), g.src(scores.input[1], "Mul")
    if q_mul is None or k_mul is None:
        return None, "Q and K are not scaled by Mul nodes (unexpected exporter pattern)"
    scales, tensors = [], []
    for mul in (q_mul, k_mul):
        c = [_scalar(g.const(i)) for i in mul.input]
        if c[0] is not None and c[1] is None:
            scales.append(c[0])
            tensors.append(mul.input[1])
        elif c[1] is not None and c[0] is None:
            scales.append(c[1])
            tensors.append(mul.input[0])
        else:
            return None, "the Q/K scale is not a scalar constant"
    # K^T: Reshape((B*H, S, D)) -> Transpose([0, 2, 1]) -> Reshape((B, H, D, S)), or one Transpose([0, 1, 3, 2])
    k_name = tensors[1]
    tr = g.src(k_name, "Transpose")
    if tr is not None and list(_attr(tr, "perm", [])) == [0, 1, 3, 2]:
        k_name = tr.input[0]
    else:
        r2 = g.src(k_name, "Reshape")
        tr = g.src(r2.input[0], "Transpose") if r2 is not None else None
        r1 = g.src(tr.input[0], "Reshape") if tr is not None else None
        if r1 is None or list(_attr(tr, "perm", [])) != [0, 2, 1]:
            return None, "K is not transposed by the exporter's Reshape/Transpose/Reshape pattern"
        k_name = r1.input[0]
    out_mm = g.only_consumer(softmax.output[0])
    if out_mm is None or out_mm.op_type != "MatMul" or out_mm.input[0] != softmax.output[0]:
        return None, "Softmax does not feed one MatMul with V"
    q_sq = g.src(tensors[0], "Squeeze")
    if q_sq is None or g.src(q_sq.input[0], "Slice") is None:
        return None, "Q is not a slice of the packed qkv tensor"
    permute_name = g.src(q_sq.input[0], "Slice").input[0]
    idx = [_unbind_index(g, n, permute_name) for n in (tensors[0], k_name, out_mm.input[1])]
    if idx != [0, 1, 2]:
        return None, f"Q, K, V are not slices 0, 1, 2 of one packed tensor (got {idx})"
    permute = g.src(permute_name, "Transpose")
    if permute is None or list(_attr(permute, "perm", [])) != [2, 0, 3, 1, 4]:
        return None, "the packed qkv tensor is not transposed (2, 0, 3, 1, 4)"
    reshape5 = g.src(permute.input[0], "Reshape")
    shape5 = _const_list(g, reshape5.input[1]) if reshape5 is not None else None
    if shape5 is None or len(shape5) != 5 or shape5[2] != 3 or shape5[3] < 1 or shape5[4] < 1:
        return None, "the qkv Reshape is not (B, S, 3, heads, head_dim) with constant heads and head_dim"
    heads, head_dim = shape5[3], shape5[4]
    bias_add = g.src(reshape5.input[0], "Add")
    if bias_add is None:
        return None, "the qkv projection has no bias Add"
    b_in = [i for i in bias_add.input if g.const(i) is not None]
    mm_in = [i for i in bias_add.input if g.src(i, "MatMul") is not None]
    if len(b_in) != 1 or len(mm_in) != 1:
        return None, "the qkv bias Add does not add one constant to one MatMul"
    qkv_mm = g.src(mm_in[0], "MatMul")
    weight, bias = g.const(qkv_mm.input[1]), g.const(b_in[0])
    inner = heads * head_dim
    if weight is None or weight.ndim != 2 or weight.shape[1] != 3 * inner or bias is None or bias.shape != (
            3 * inner,):
        return None, (f"qkv weights {None if weight is None else weight.shape} / bias "
                      f"{None if bias is None else bias.shape} disagree with {heads} heads x {head_dim}")
    tr_out = g.only_consumer(out_mm.output[0])
    if tr_out is None or tr_out.op_type != "Transpose" or list(_attr(tr_out, "perm", [])) != [0, 2, 1, 3]:
        return None, "the attention output is not transposed (0, 2, 1, 3)"
    rs_out = g.only_consumer(tr_out.output[0])
    shape3 = _const_list(g, rs_out.input[1]) if rs_out is not None and rs_out.op_type == "Reshape" else None
    if shape3 is None or len(shape3) != 3 or shape3[2] != inner:
        return None, f"the attention output is not reshaped to (B, S, {inner})"
    # the intermediates must be private to this block (its nodes are deleted)
    private = {reshape5.input[0]: 1, permute.output[0]: 3, scores.output[0]: 1, softmax.output[0]: 1}
    for name, n_users in private.items():
        if len(g.consumers.get(name, [])) != n_users:
            return None, f"{name} is used outside the attention block"
    return {
        "x": qkv_mm.input[0], "weight": weight, "bias": bias, "heads": heads, "head_dim": head_dim,
        "scale": scales[0] * scales[1], "causal": mask is not None, "out": rs_out.output[0],
        "name": qkv_mm.name or softmax.name, "dtype_ok": weight.dtype == np.float32,
    }, ""


def _remove_dead(model: Any) -> None:
    """Drop nodes whose outputs nothing needs and initializers nothing reads (keeps graph order)."""
    graph = model.graph
    needed = {o.name for o in graph.output}
    keep = []
    for node in reversed(graph.node):
        if any(o in needed for o in node.output):
            keep.append(node)
            needed.update(i for i in node.input if i)
            for attr in node.attribute:  # subgraphs would read outer names; none are fused here
                if attr.g.node or attr.graphs:
                    needed.update(i for sub in [attr.g, *attr.graphs] for n in sub.node for i in n.input)
    keep.reverse()
    del graph.node[:]
    graph.node.extend(keep)
    inits = [t for t in graph.initializer if t.name in needed]
    del graph.initializer[:]
    graph.initializer.extend(inits)
    vi = [v for v in graph.value_info if v.name in needed]
    del graph.value_info[:]
    graph.value_info.extend(vi)


def fuse_attention(model: Any) -> tuple[Any, dict[str, Any]]:
    """Replace each matched attention block by one ``com.microsoft`` ``Attention`` node (module docs).

    Returns ``(fused copy, info)``; ``info``: ``fused`` (count), ``heads`` (per fused block, in graph order),
    ``refused`` (``{"softmax": name, "reason": ...}`` per unmatched Softmax)."""
    from onnx import helper, numpy_helper

    model = copy.deepcopy(model)
    g = _Graph(model.graph)
    info: dict[str, Any] = {"fused": 0, "heads": [], "head_dim": [], "refused": []}
    replacements: dict[str, Any] = {}  # output name of the block -> new node
    for node in list(model.graph.node):
        if node.op_type != "Softmax":
            continue
        match, reason = _match_block(g, node)
        if match is None or not match["dtype_ok"]:
            info["refused"].append({"softmax": node.name, "reason": reason or "weights are not float32"})
            continue
        k = info["fused"]
        w_name, b_name = f"fused_attention_{k}_qkv_weight", f"fused_attention_{k}_qkv_bias"
        model.graph.initializer.extend([numpy_helper.from_array(match["weight"], w_name),
                                        numpy_helper.from_array(match["bias"].astype(np.float32), b_name)])
        replacements[match["out"]] = helper.make_node(
            "Attention", [match["x"], w_name, b_name], [match["out"]], name=f"fused_attention_{k}",
            domain=MS_DOMAIN, num_heads=match["heads"], scale=float(match["scale"]),
            unidirectional=int(match["causal"]))  # equal q/k/v sizes: no qkv_hidden_sizes (QAttention lacks it)
        info["fused"] += 1
        info["heads"].append(match["heads"])
        info["head_dim"].append(match["head_dim"])
    if not replacements:
        return model, info
    nodes = []
    for node in model.graph.node:
        hit = [o for o in node.output if o in replacements]
        nodes.append(replacements[hit[0]] if hit else node)
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    _remove_dead(model)
    if not any(op.domain == MS_DOMAIN for op in model.opset_import):
        model.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))
    return model, info


def fuse_tower(model: Any) -> tuple[Any, dict[str, Any]]:
    """Attention fusion, then onnxruntime's transformer optimiser (module docs). Returns ``(fused, info)`` with
    ``ops_before`` / ``ops_after`` (per op type), ``attention`` (:func:`fuse_attention`'s info) and ``ort``
    (onnxruntime's fused-operator statistics, non-zero entries)."""
    from onnxruntime.transformers.fusion_options import FusionOptions
    from onnxruntime.transformers.optimizer import optimize_model

    before = op_counts(model)
    fused, attention = fuse_attention(model)
    options = FusionOptions("bert")
    options.enable_attention = False  # done above; its BERT patterns do not match dynamo graphs
    options.enable_embed_layer_norm = False  # CLIP has no BERT embedding block (and the pattern would misfire)
    names = [n for n in logging.root.manager.loggerDict if n.startswith(_ORT_LOGGER_PREFIXES)]
    levels = [(lg, lg.level) for lg in map(logging.getLogger, names)]
    for lg, _ in levels:
        lg.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            optimizer = optimize_model(fused, model_type="bert", num_heads=0, hidden_size=0,
                                       optimization_options=options, opt_level=0, use_gpu=False)
        stats = {k: int(v) for k, v in optimizer.get_fused_operator_statistics().items() if v}
        out = optimizer.model
    finally:
        for lg, level in levels:
            lg.setLevel(level)
    return out, {"ops_before": before, "ops_after": op_counts(out), "attention": attention, "ort": stats}
