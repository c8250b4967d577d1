"""Pass: give each attention site its TokenGrid (frames, height, width, token order, other tokens).

In order of precedence: a grid the user gave for the site (config.grids[site_id], which must have
the site's query length: ConfigError otherwise), the user's global grid (config.grid) for every
site whose query length is its token count, a grid inferred from the graph; otherwise the grid
stays unknown (GridSource.UNKNOWN), never guessed. User-given grids win over inference. A global
grid that fits no site of the graph is not used: a warning (logger "vsopt"), an error in strict
mode. A self-attention site left without a grid says how to give one (a note and an info log).

Inference (passes/token_segments.py): the graph's patch embeddings (Conv3d, per-frame Conv2d,
a patchify reshape of a (B, C, F, H, W), (B, F, H, W, C) or (B, F, C, H, W) video), then a
forward dataflow along every path from them, through concatenations and slices of the token
axis; the state at the query's token source (ctx.matches[site_id].q_token_source) is what the
site's tokens are: a tuple of segments, video (with a grid and token order) or other tokens.
The grid is the largest video segment (the first of equal ones), in its own token order
(TokenGrid.axes); every other token, further video segments included, is counted in
text_before / text_after, and the other video segments are recorded in TokenGrid.segments.
One fallback (per_frame_grid): an attention within each frame of a per-frame Conv2d video whose
tokens went through the batch axis on the way (divided space-time attention) gets the one-frame
grid 1 x H x W when a cat on the way to its queries adds up to q_len. Otherwise, when nothing
reaches the query's tokens from a patch embedding, or the tokens do not add up to q_len, or two
paths disagree: the grid is unknown.
"""
from __future__ import annotations

import dataclasses
import logging
from collections import deque

import torch
import torch.fx

from vsopt.core.errors import ConfigError
from vsopt.core.ir import GridSource, TokenGrid, VideoSegment

from .infra import PassContext, PassReport
from .carried_tokens import seeded
from .data_sizes import data_tokens_last, is_data_dependent
from .layout_trace import TraceError, shape_of
from .token_segments import token_states
from .token_state import TokenState, Video

NAME = "infer_grid"
log = logging.getLogger("vsopt")
aten = torch.ops.aten
MAX_VISITED = 20000  # bound on the backward search of per_frame_grid
HOW_TO_GIVE = ("give it with the option 'grid', e.g. options={'grid': (frames, height, width)} or "
               "{'grid': {'frames': 4, 'height': 8, 'width': 8, 'text_after': 16}} (tokens ordered (h, w, f): "
               "add 'axes': 'hwf'), or per site: {'grids': {%r: (4, 8, 8)}}")


def patch_embeddings_in(states: dict) -> bool:
    """Whether any patch embedding of the graph was found (token_states starts from them)."""
    return any(isinstance(st, TokenState) and any(isinstance(s, Video) for s in st.segments) for st in states.values())


def _exact(site_id: str, q_len: int) -> str:
    """The grid option for one site of q_len tokens, spelled out."""
    return (f"; for this site: options={{'grids': {{{site_id!r}: {{'frames': F, 'height': H, 'width': W, "
            f"'text_before': B, 'text_after': A}}}}}} with F * H * W + B + A = {q_len} (F, H, W: the latent "
            f"video after patchify, frames x height x width in tokens; B, A: other tokens before / after "
            f"the video in the sequence)")


def grid_of(state: TokenState) -> TokenGrid | None:
    """The TokenGrid of a token axis's segments: the largest video segment, the rest around it."""
    videos = [s for s in state.segments if isinstance(s, Video)]
    if not videos:
        return None
    main = max(videos, key=lambda v: v.size)  # max keeps the first of equal ones
    pos, before, others = 0, None, []
    for s in state.segments:
        if s is main and before is None:
            before = pos
        elif isinstance(s, Video):
            others.append(VideoSegment(pos, s.frames, s.height, s.width, s.axes))
        pos += s.size
    return TokenGrid(main.frames, main.height, main.width, before, pos - before - main.size, axes=main.axes,
                     segments=tuple(others))


def infer_site(states: dict, source: torch.fx.Node, token_axes: tuple[int, ...], q_len: int) -> TokenGrid | None:
    """The grid of the query's tokens (axes `token_axes` of `source`), or None."""
    st = states.get(source)
    if isinstance(st, TokenState) and st.data_after != _data_dependent_axis(source, st.dim):
        return None  # never: a state and its tensor disagree on whether data-dependent tokens follow
    if not isinstance(st, TokenState) or st.dim not in token_axes or st.total != q_len:
        fr = getattr(states, "frames", {}).get(source)  # the frames of each position (divided space-time)
        if isinstance(fr, TokenState) and fr.dim in token_axes and fr.total == q_len:
            return grid_of(fr)
        return per_frame_grid(states, source, q_len)
    return grid_of(st)


def _data_dependent_axis(source: torch.fx.Node, dim: int) -> bool:
    val = source.meta.get("val")
    return isinstance(val, torch.Tensor) and val.dim() > dim and is_data_dependent(val.shape[dim])


def _token_axis(m) -> tuple[torch.fx.Node, int]:
    """A match's query token source and its (last) token axis."""
    return m.q_token_source[0], tuple(m.q_token_source[1])[-1]


def data_dependent_tail(states: dict, source: torch.fx.Node) -> bool:
    """Whether the query's tokens end in tokens of a data-dependent count (text cut by a mask)."""
    st = states.get(source)
    return isinstance(st, TokenState) and st.data_after


def infer(source: torch.fx.Node, batch: int, q_len: int) -> TokenGrid | None:
    """The grid of the q_len tokens of `source` (on whichever axis holds them), or None: for a pass
    that finds its sites itself (ring_attention). `batch` is not needed any more (kept for callers)."""
    states = token_states(source.graph)
    st = states.get(source)
    if isinstance(st, TokenState) and st.whole is not None and st.whole.total == q_len:
        return grid_of(st.whole)  # a rank's shard of the q_len tokens (ring attention)
    return infer_site(states, source, tuple(range(source.meta["val"].dim())), q_len)


def _ancestors(node: torch.fx.Node) -> set[str]:
    seen, todo = {node}, deque([node])
    while todo and len(seen) < MAX_VISITED:
        for a in todo.popleft().all_input_nodes:
            if a not in seen:
                seen.add(a)
                todo.append(a)
    return {n.name for n in seen}


def per_frame_grid(states: dict, source: torch.fx.Node, q_len: int) -> TokenGrid | None:
    """The one-frame grid of an attention within each frame of a per-frame Conv2d video whose
    tokens the dataflow lost on a detour through other axes (divided space-time attention, as in
    TimeSformer: the frames go into the batch and back). The cat nearest the query's source
    (searched back from it) whose output has q_len tokens along its axis, and one of whose inputs
    has a frame's H x W tokens there and is computed from that video's convolution, names the
    other tokens. None unless the counts add up exactly."""
    videos = {s for st in states.values() if isinstance(st, TokenState) for s in st.segments
              if isinstance(s, Video) and s.per_frame}
    if not videos:
        return None
    seen, todo = {source}, deque([source])
    while todo and len(seen) < MAX_VISITED:
        n = todo.popleft()
        if n.target is aten.cat.default:
            try:
                dim = (n.args[1] if len(n.args) > 1 else n.kwargs.get("dim", 0)) % len(shape_of(n))
                sizes = [shape_of(t)[dim] for t in n.args[0]]
                fits = shape_of(n)[dim] == q_len
            except TraceError:
                fits = False
            for i, t in enumerate(n.args[0] if fits else ()):
                for v in sorted(videos, key=lambda v: v.source):
                    if sizes[i] == v.size and v.source in _ancestors(t):
                        return TokenGrid(1, v.height, v.width, sum(sizes[:i]), sum(sizes[i + 1:]), axes=v.axes)
        for a in n.all_input_nodes:
            if a not in seen and isinstance(a.meta.get("val"), (torch.Tensor, list, tuple)):  # a tuple: layer norm
                seen.add(a)
                todo.append(a)
    return None


def run(gm: torch.fx.GraphModule, ctx: PassContext) -> PassReport:
    report = PassReport(NAME)
    cfg = ctx.config
    states = None
    for i, site in enumerate(ctx.sites):
        if site.site_id not in ctx.matches and site.grid is not None:   # a site another pass found with its grid
            report.notes.append(f"{site.site_id}: grid {site.grid} ({site.grid_source.value}, from {site.rule})")
            continue
        grid, source = None, GridSource.UNKNOWN
        m = ctx.matches.get(site.site_id)
        data = m is not None and m.q_token_source is not None and bool(m.q_token_source[1]) and \
            _data_dependent_axis(*_token_axis(m))
        if data and (site.site_id in cfg.grids or cfg.grid is not None) and not data_tokens_last(*_token_axis(m)):
            # a user grid covers the static part only where the data-dependent tokens follow it
            msg = (f"site {site.site_id}: the grid option is not applied: the site's length is data-dependent "
                   f"and its data-dependent tokens are not proven to come after its {site.q_len} static ones")
            report.notes.append(msg)
            log.info("vsopt: %s", msg)
        elif site.site_id in cfg.grids:
            grid, source = cfg.grids[site.site_id], GridSource.USER
            if grid.num_tokens != site.q_len:
                raise ConfigError(f"grid {grid} given for site {site.site_id!r} has {grid.num_tokens} tokens, "
                                  f"but the site's queries have {site.q_len}")
        elif cfg.grid is not None and cfg.grid.num_tokens == site.q_len:
            grid, source = cfg.grid, GridSource.USER
        elif m is not None and m.q_token_source is not None:
            if states is None:
                states = token_states(gm.graph, seeded(gm.graph))  # once per graph, for every site
            grid = infer_site(states, m.q_token_source[0], tuple(m.q_token_source[1]), site.q_len)
            source = GridSource.INFERRED if grid else GridSource.UNKNOWN
            if grid is not None and data_dependent_tail(states, m.q_token_source[0]):
                report.notes.append(f"site {site.site_id}: {site.q_len} static tokens, then tokens of a "
                                    f"data-dependent count (text cut by a mask): the grid describes the static part")
        ctx.sites[i] = dataclasses.replace(site, grid=grid, grid_source=source)
        report.notes.append(f"{site.site_id}: grid {grid if grid else 'unknown'} ({source.value})")
        if grid is None and site.is_self_attention:
            if states is None:
                states = token_states(gm.graph, seeded(gm.graph))
            where = ("no patch embedding of this graph reaches its" if patch_embeddings_in(states) else
                     "this graph holds no patch embedding (a pre-patchified input, or a graph Dynamo started after "
                     "a graph break, the patch embedding being in an earlier graph) for its")
            msg = (f"site {site.site_id}: no video grid ({where} {site.q_len} query tokens), so no pattern or "
                   f"token order applies; " + HOW_TO_GIVE % site.site_id + _exact(site.site_id, site.q_len))
            log.info("vsopt: %s", msg)
            report.notes.append(msg)
    if cfg.grid is not None and ctx.sites and not any(s.q_len == cfg.grid.num_tokens for s in ctx.sites):
        lengths = sorted({s.q_len for s in ctx.sites})
        msg = (f"option 'grid' {cfg.grid} has {cfg.grid.num_tokens} tokens, but no attention site of this graph "
               f"has that many queries (they have {lengths}): it is not used")
        if cfg.strict:
            raise ConfigError(msg)
        log.warning("vsopt: %s", msg)
        report.notes.append(msg)
    return report
