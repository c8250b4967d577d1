"""Read a custom-form ONNX model back into the plan it runs (the round trip of the custom form).

Every vsopt.BlockSparseAttention node names its site and heads; its tables are initializers
(static heads: one block mask per head, from the table) or come from a vsopt.DynamicBlockMask
node through vsopt.MaskToTable (dynamic heads: the method, value and reuse_steps attributes).
Orders, quant and block sizes are the node's attributes; the sites' shapes and grids are the
model's "vsopt.sites" metadata. The result is a Plan whose heads are MASK / DENSE / SKIP / DYNAMIC
(a pattern comes back as the block mask it makes), so compare() checks meaning, not spelling.
"""
from __future__ import annotations

import json
from typing import Any

import numpy as np
import onnx
import torch
from onnx import numpy_helper

from vsopt.core.dynamic import DynamicSpec
from vsopt.core.ir import TokenGrid
from vsopt.core.patterns import num_blocks
from vsopt.core.plan import HeadPlan, Plan, SitePlan, Sparsity
from vsopt.core.semantics import static_mask

from .schemas import DOMAIN


def _attrs(node: onnx.NodeProto) -> dict[str, Any]:
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def _text(v: Any) -> Any:
    if isinstance(v, bytes):
        return v.decode()
    if isinstance(v, list):
        return [_text(x) for x in v]
    return v


def _table_masks(indices: np.ndarray, counts: np.ndarray, kb: int) -> np.ndarray:
    """(1, H, QB, W) table + (1, H, QB) counts -> bool (H, QB, KB)."""
    _, H, QB, W = indices.shape
    valid = np.arange(W)[None, None, :] < counts[0][..., None]
    masks = np.zeros((H, QB, kb + 1), dtype=bool)
    idx = np.where(valid, indices[0], kb)
    np.put_along_axis(masks, idx.astype(np.int64), True, axis=-1)
    return masks[..., :kb]


def plan_from_onnx(model: onnx.ModelProto) -> Plan:
    meta = {p.key: p.value for p in model.metadata_props}
    shapes = json.loads(meta.get("vsopt.sites", "{}"))
    init = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    producer = {out: n for n in model.graph.node for out in n.output}
    heads: dict[str, dict[int, HeadPlan]] = {}
    for node in model.graph.node:
        if node.domain != DOMAIN or node.op_type != "BlockSparseAttention":
            continue
        a = {k: _text(v) for k, v in _attrs(node).items()}
        site_id, group = a["site_id"], list(a["heads"])
        shape = shapes[site_id]
        orders = a.get("orders") or ["fhw"] * len(group)
        common = dict(quant=a["quant"], block_m=int(a["block_m"]), block_n=int(a["block_n"]))
        if node.input[3] in init and node.input[4] in init:
            kb = num_blocks(shape["kv_len"], common["block_n"])
            masks = _table_masks(init[node.input[3]], init[node.input[4]], kb)
            for i, h in enumerate(group):
                m = torch.from_numpy(masks[i])
                if bool(m.all()):
                    hp = HeadPlan(Sparsity.DENSE, order=orders[i], **common)
                elif not bool(m.any()):
                    hp = HeadPlan(Sparsity.SKIP, order=orders[i], **common)
                else:
                    hp = HeadPlan(Sparsity.MASK, order=orders[i], mask=m, **common)
                heads.setdefault(site_id, {})[h] = hp
        else:
            table = producer[node.input[3]]
            dyn = producer.get(table.input[0]) if table.op_type == "MaskToTable" else None
            if dyn is not None and dyn.op_type == "Or":   # a joint site's text blocks OR-ed into the mask
                dyn = producer.get(dyn.input[0])
            if dyn is None or dyn.op_type != "DynamicBlockMask":
                raise ValueError(f"site {site_id!r}: the table of {node.name} is neither an initializer nor a "
                                 "DynamicBlockMask's")
            d = {k: _text(v) for k, v in _attrs(dyn).items()}
            # ONNX float attributes are float32: 7 significant digits give back the plan's decimal value
            spec = DynamicSpec(d["method"], float(f"{d['value']:.7g}"), int(d["reuse_steps"]))
            for i, h in enumerate(group):
                heads.setdefault(site_id, {})[h] = HeadPlan(Sparsity.DYNAMIC, order=orders[i], dynamic=spec, **common)
    sites = {}
    for site_id, by_head in heads.items():
        shape = shapes[site_id]
        grid = TokenGrid.from_dict(shape["grid"]) if shape.get("grid") else None
        n = shape["num_heads"]
        if sorted(by_head) != list(range(n)):
            raise ValueError(f"site {site_id!r}: the model's launches cover heads {sorted(by_head)} of {n}")
        sites[site_id] = SitePlan(site_id, n, shape["q_len"], shape["kv_len"], grid, tuple(by_head[h] for h in range(n)))
    return Plan(sites, {"source": "onnx"})


def compare(read: Plan, plan: Plan | None) -> list[str]:
    """What differs between a plan read back from ONNX and the plan exported (empty: the same
    meaning: per head the same blocks, order, precision and block size)."""
    problems = []
    expected = {sid for sid, sp in (plan.sites.items() if plan else ()) if not sp.is_dense}
    for sid in sorted(expected - set(read.sites)):
        problems.append(f"site {sid!r} is in the plan but has no vsopt node in the file")
    for sid, got in read.sites.items():
        want = plan.sites.get(sid) if plan else None
        if want is None:
            problems.append(f"site {sid!r} has vsopt nodes but is not in the plan")
            continue
        for h, (g, w) in enumerate(zip(got.heads, want.heads)):
            where = f"site {sid!r} head {h}"
            for name in ("order", "quant", "block_m", "block_n"):
                if getattr(g, name) != getattr(w, name):
                    problems.append(f"{where}: {name} {getattr(g, name)} in the file, {getattr(w, name)} in the plan")
            if (g.sparsity is Sparsity.DYNAMIC) != (w.sparsity is Sparsity.DYNAMIC):
                problems.append(f"{where}: {g.sparsity.value} in the file, {w.sparsity.value} in the plan")
            elif g.sparsity is Sparsity.DYNAMIC:
                if g.dynamic != w.dynamic:
                    problems.append(f"{where}: dynamic {g.dynamic} in the file, {w.dynamic} in the plan")
            else:
                mg, mw = static_mask(got, g), static_mask(want, w)   # the meaning (text blocks included)
                if not torch.equal(mg, mw):
                    problems.append(f"{where}: block mask differs in {int((mg != mw).sum())} block(s)")
    return problems
