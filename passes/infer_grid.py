"""Pass: give each attention site its TokenGrid (frames, height, width, text tokens).

In order of precedence: a grid the user gave for the site (config.grids[site_id], which must have
the site's query length: ConfigError otherwise), the user's global grid (config.grid) for every
site whose query length is its token count, a grid inferred from the graph; otherwise the grid
stays unknown (GridSource.UNKNOWN), never guessed. User-given grids win over inference. A global
grid that fits no site of the graph is not used: a warning (logger "vsopt"), an error in strict
mode.

Inference starts at the query's token source that detection found (ctx.matches[site_id]
.q_token_source) and follows it back through the graph (breadth-first, toward the inputs)
to the patch embedding, a convolution whose output tokens number the site's video tokens:
- Conv3d, output (B, C, F, H, W): grid F x H x W;
- Conv2d per frame, output (B*F, C, H, W): grid F x H x W with F = (B*F) / B;
- a patchify reshape of a (B, C, F, H, W) tensor whose token axis is (F/pf, H/ph, W/pw) patches
  (found with passes.layout_trace atoms: three outer parts of axes 2, 3, 4, in order).
Text tokens: the concatenation nearest the query along the way whose output has q_len tokens
and one input on the path; the inputs before / after it are text_before / text_after.
An image patchify (two axes) or any other token layout gives no grid (it stays unknown).
"""
from __future__ import annotations

import dataclasses
import logging
from collections import deque

import torch
import torch.fx

from vsopt.core.errors import ConfigError
from vsopt.core.ir import GridSource, TokenGrid

from .infra import PassContext, PassReport
from .layout_trace import TraceError, shape_of, trace_back

NAME = "infer_grid"
log = logging.getLogger("vsopt")
aten = torch.ops.aten
MAX_VISITED = 20000  # bound on the backward search per site
# torch.compile's graphs have aten.convolution; torch.export's keep aten.conv2d / conv3d
CONV_OPS = {aten.convolution.default, aten.conv2d.default, aten.conv3d.default, aten.conv2d.padding,
            aten.conv3d.padding}
PATCHIFY_OPS = {aten.view.default, aten._unsafe_view.default, aten.reshape.default, aten.flatten.using_ints}


def _inputs(node: torch.fx.Node) -> list[torch.fx.Node]:
    def is_tensor(v) -> bool:  # a tensor, or a tuple of them (unbind, split)
        return isinstance(v, torch.Tensor) or (isinstance(v, (list, tuple)) and any(is_tensor(x) for x in v))

    return [a for a in node.all_input_nodes if is_tensor(a.meta.get("val"))]


def infer(source: torch.fx.Node, batch: int, q_len: int) -> TokenGrid | None:
    """The grid of the tokens of `source` (the query's source tensor), or None."""
    parent: dict[torch.fx.Node, torch.fx.Node | None] = {source: None}
    todo = deque([source])
    while todo and len(parent) < MAX_VISITED:
        n = todo.popleft()
        if n.op == "call_function" and n.target in CONV_OPS:
            grid = _grid_from_conv(n, parent, batch, q_len)
            if grid is not None:
                return grid
            continue  # a convolution that does not fit: do not search behind it
        if n.op == "call_function" and n.target in PATCHIFY_OPS:
            grid = _grid_from_patchify(n, parent, q_len)
            if grid is not None:
                return grid
        for a in _inputs(n):
            if a not in parent:
                parent[a] = n
                todo.append(a)
    return None


def _grid_from_conv(conv, parent, batch: int, q_len: int) -> TokenGrid | None:
    try:
        out = shape_of(conv)
    except TraceError:
        return None
    if len(out) == 5:
        frames, h, w = out[2:]
    elif len(out) == 4 and batch and out[0] % batch == 0:
        frames, h, w = out[0] // batch, out[2], out[3]
    else:
        return None
    return _with_text(conv, parent, frames, h, w, q_len)


def _grid_from_patchify(node, parent, q_len: int) -> TokenGrid | None:
    """A patchify reshape: a (B, C, F, H, W) tensor reshaped / permuted so that one axis of `node`
    enumerates (F/pf, H/ph, W/pw) patches, row-major (the patch sizes pf, ph, pw may be 1)."""
    try:
        traced = trace_back(node, follow_scale=False)
        if len(shape_of(traced.source)) != 5:
            return None
    except TraceError:
        return None
    for atoms in traced.axes:
        if len(atoms) == 3 and [a.source_axis for a in atoms] == [2, 3, 4] and \
                all(traced.source_atoms[a.source_axis][0] is a for a in atoms):  # outer part = patch index
            grid = _with_text(node, parent, *(a.size for a in atoms), q_len)
            if grid is not None:
                return grid
    return None


def _with_text(found: torch.fx.Node, parent, frames: int, h: int, w: int, q_len: int) -> TokenGrid | None:
    """The grid with text tokens: on the path from `found` to the query's source, the cat nearest
    the source that has q_len tokens along its axis and the video tokens as the input on the path
    names the text before / after. None if the counts do not add up to q_len."""
    video = frames * h * w
    before = after = 0
    child, n = found, parent[found]
    while n is not None:
        if n.target is aten.cat.default and video != q_len:
            tensors = n.args[0]
            dim = n.args[1] if len(n.args) > 1 else n.kwargs.get("dim", 0)
            dim %= len(shape_of(n))
            sizes = [shape_of(t)[dim] for t in tensors]
            if shape_of(n)[dim] == q_len and child in tensors:
                i = tensors.index(child)
                if sizes[i] == video:
                    before, after = sum(sizes[:i]), sum(sizes[i + 1:])
        child, n = n, parent[n]
    if before + video + after != q_len:
        return None
    return TokenGrid(frames, h, w, before, after)


def run(gm: torch.fx.GraphModule, ctx: PassContext) -> PassReport:
    report = PassReport(NAME)
    cfg = ctx.config
    for i, site in enumerate(ctx.sites):
        grid, source = None, GridSource.UNKNOWN
        m = ctx.matches.get(site.site_id)
        if site.site_id in cfg.grids:
            grid, source = cfg.grids[site.site_id], GridSource.USER
            if grid.num_tokens != site.q_len:
                raise ConfigError(f"grid {grid} given for site {site.site_id!r} has {grid.num_tokens} tokens, "
                                  f"but the site's queries have {site.q_len}")
        elif cfg.grid is not None and cfg.grid.num_tokens == site.q_len:
            grid, source = cfg.grid, GridSource.USER
        elif m is not None and m.q_token_source is not None:
            grid = infer(m.q_token_source[0], site.batch, site.q_len)
            source = GridSource.INFERRED if grid else GridSource.UNKNOWN
        ctx.sites[i] = dataclasses.replace(site, grid=grid, grid_source=source)
        report.notes.append(f"{site.site_id}: grid {grid if grid else 'unknown'} ({source.value})")
    if cfg.grid is not None and ctx.sites and not any(s.q_len == cfg.grid.num_tokens for s in ctx.sites):
        lengths = sorted({s.q_len for s in ctx.sites})
        msg = (f"option 'grid' {cfg.grid} has {cfg.grid.num_tokens} tokens, but no attention site of this graph "
               f"has that many queries (they have {lengths}): it is not used")
        if cfg.strict:
            raise ConfigError(msg)
        log.warning("vsopt: %s", msg)
        report.notes.append(msg)
    return report
