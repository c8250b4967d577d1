"""The terminal rendering of a DiffReport: both views as text that fits `width` columns (80 by
default), with ANSI colour only when asked (the CLI asks when stdout is a tty).

    STRUCTURE  per site in execution order: where it is in the source, the ops before and after,
               the plan per head; sites left alone with their reason; unchanged runs collapsed.
    NUMERICS   one row per rewritten site: isolated and accumulated cosine / relative L2, the
               worst head; the model output's PSNR; the first site over the threshold.
"""
from __future__ import annotations

import math
import textwrap
from collections import Counter
from typing import Any

from vsopt.debug.report_data import ReportData, SiteEntry


_COLOURS = {"bold": "1", "dim": "2", "red": "31", "green": "32", "yellow": "33", "cyan": "36"}


class _Style:
    def __init__(self, color: bool):
        self.color = color

    def __call__(self, text: str, *styles: str) -> str:
        if not self.color or not styles:
            return text
        codes = ";".join(_COLOURS[s] for s in styles)
        return f"\x1b[{codes}m{text}\x1b[0m"


def _num(x: float, digits: int = 3) -> str:
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    return f"{x:.{digits}g}" if abs(x) < 1e-3 or abs(x) >= 1e4 else f"{x:.{digits + 1}f}".rstrip("0").rstrip(".")


def _fit(text: str, width: int) -> str:
    return text if len(text) <= width else text[: max(0, width - 1)] + "…"


def _wrapped(label: str, text: str, width: int, indent: int = 6) -> list[str]:
    prefix = " " * indent + label
    return textwrap.wrap(text, width=width, initial_indent=prefix,
                         subsequent_indent=" " * len(prefix), break_on_hyphens=False) or [prefix.rstrip()]


def _plan_summary(heads: list[dict[str, Any]]) -> str:
    """'8 heads: 6 pattern local_window / hfw / int8 (0.31), 2 dense / fhw / none (1)'."""
    groups = Counter()
    for h in heads:
        kind = h["pattern"] or h["sparsity"]
        density = "dynamic" if h["density"] is None else _num(h["density"], 2)
        groups[f"{kind} / {h['order']} / {h['quant']} ({density})"] += 1
    return f"{len(heads)} heads: " + ", ".join(f"{n}x {g}" for g, n in groups.most_common())


def _ops_with_lines(nodes) -> str:
    """'transpose, matmul, mul (model.py:40); softmax, matmul (model.py:41)': consecutive ops from
    the same source line share it."""
    groups: list[tuple[str, list[str]]] = []
    for n in nodes:
        where = n.source.short() if n.source else ""
        if groups and groups[-1][0] == where:
            groups[-1][1].append(n.op)
        else:
            groups.append((where, [n.op]))
    return "; ".join(", ".join(ops) + (f" ({where})" if where else "") for where, ops in groups)


def _site_block(entry: SiteEntry, width: int, s: _Style) -> list[str]:
    lines = []
    if entry.status == "rewritten":
        r = entry.region
        head = f"  {s('●', 'green')} {s(entry.site_id, 'bold')}  rewritten"
        detail = f" by {', '.join(r.passes)}" if r.passes else ""
        lines.append(_fit(head + detail + (f" (rule {entry.rule})" if entry.rule else ""), width + _ansi_extra(head)))
        if entry.source:
            lines.append(_fit(f"      at {entry.source.short()}  {entry.source.code}", width))
        lines += _wrapped("before: ", _ops_with_lines(r.before.nodes), width)
        lines += _wrapped("after:  ", ", ".join(f"{n.op}" for n in r.after.nodes), width)
        if entry.plan_heads:
            lines += _wrapped("plan:   ", _plan_summary(entry.plan_heads), width)
        if entry.reason:
            lines += _wrapped("note:   ", entry.reason, width)
    else:
        head = f"  {s('○', 'yellow')} {s(entry.site_id, 'bold')}  {s(entry.status, 'yellow')}"
        lines.append(_fit(head + (f" (rule {entry.rule})" if entry.rule else ""), width + _ansi_extra(head)))
        lines += _wrapped("reason: ", entry.reason or "none given", width)
        if entry.source:
            lines.append(_fit(f"      at {entry.source.short()}  {entry.source.code}", width))
    return lines


def _ansi_extra(text: str) -> int:
    """Characters of `text` that are escape codes (they take no column)."""
    import re
    return len(text) - len(re.sub(r"\x1b\[[0-9;]*m", "", text))


def _structure(report: ReportData, width: int, s: _Style) -> list[str]:
    st = report.structure
    by_site = {e.site_id: e for e in report.entries}
    lines = [s("STRUCTURE", "bold") + s(" (execution order; unchanged runs collapsed)", "dim")]
    shown = set()
    for kind, value in st.timeline:
        if kind == "unchanged":
            lines.append(s(f"  ┆ {value} unchanged node{'s' if value != 1 else ''}", "dim"))
        elif kind == "anchor":
            if value in by_site and value not in shown:
                lines += _site_block(by_site[value], width, s)
                shown.add(value)
        else:
            region = st.regions[value]
            ids = [i for i in region.site_ids if i in by_site]
            for i in ids:
                if i not in shown:
                    lines += _site_block(by_site[i], width, s)
                    shown.add(i)
            if not ids:
                lines.append(f"  {s('◆', 'cyan')} change outside any site" +
                             (f" by {', '.join(region.passes)}" if region.passes else ""))
                lines += _wrapped("before: ", ", ".join(n.op for n in region.before.nodes) or "-", width)
                lines += _wrapped("after:  ", ", ".join(n.op for n in region.after.nodes) or "-", width)
    for e in report.entries:  # anything not placed on the timeline (e.g. an anchor on a missing node)
        if e.site_id not in shown:
            lines += _site_block(e, width, s)
    return lines


def _numerics(report: ReportData, width: int, s: _Style) -> list[str]:
    num = report.numerical
    lines = [s("NUMERICS", "bold") + s(f" (optimized vs dense; flagged above relative L2 {_num(num.threshold)})", "dim")]
    site_w = max(8, min(width - 58, max((len(x.site_id) for x in num.sites), default=8)))
    header1 = f"  {'':{site_w}}  {'isolated':^17}  {'accumulated':^17}  {'worst head':^14}"
    header2 = f"  {'site':{site_w}}  {'cos':>8} {'rel L2':>8}  {'cos':>8} {'rel L2':>8}  {'head':>4} {'rel L2':>9}"
    lines += [s(header1, "dim"), s(header2, "dim")]
    for e in num.sites:
        h = e.worst_head()
        head = f"{h:>4} {_num(e.heads_isolated[h].rel_l2):>9}" if h is not None else f"{'-':>4} {'-':>9}"
        over = e.isolated.rel_l2 > num.threshold
        acc_over = e.accumulated.rel_l2 > num.threshold
        row = (f"  {_fit(e.site_id, site_w):{site_w}}  {e.isolated.cosine:>8.5f} "
               f"{s(f'{_num(e.isolated.rel_l2):>8}', 'red' if over else 'green')}  {e.accumulated.cosine:>8.5f} "
               f"{s(f'{_num(e.accumulated.rel_l2):>8}', 'red' if acc_over else 'green')}  {head}")
        lines.append(row)
    if not num.sites:
        lines.append("  (no rewritten site)")
    o = num.output
    lines.append(f"  model output: PSNR {o.psnr:.2f} dB, rel L2 {_num(o.rel_l2)}, cosine {o.cosine:.6f}, "
                 f"max err {_num(o.max_abs)}")
    first, acc = num.first_over_threshold, num.first_accumulated_over_threshold
    if first is None and acc is None:
        lines.append(s(f"  no site over the threshold ({_num(num.threshold)})", "green"))
    elif first is None:
        msg = (f"  no site's own (isolated) error is over the threshold ({_num(num.threshold)}); the accumulated "
               f"error crosses it at {acc}")
        lines += [s(line, "yellow") for line in textwrap.wrap(msg, width, subsequent_indent="    ")]
    else:
        e = next(x for x in num.sites if x.site_id == first)
        h = e.worst_head()
        msg = (f"  first site over threshold: {first} (isolated rel L2 {_num(e.isolated.rel_l2)} > "
               f"{_num(num.threshold)}" + (f"; head {h}" if h is not None else "") + ")")
        lines += [s(line, "red") for line in textwrap.wrap(msg, width, subsequent_indent="    ")]
        if acc and acc != first:
            lines.append(_fit(f"  accumulated error first crosses it at {acc}", width))
    return lines


def _steps(report: ReportData, width: int, s: _Style) -> list[str]:
    lines = [s("SAMPLER STEPS", "bold") + s(" (state after each step, optimized trajectory vs dense)", "dim"),
             s(f"  {'step':>4}  {'PSNR dB':>8}  {'rel L2':>9}  first site over threshold", "dim")]
    for st in report.steps:
        first = st.numerical.first_over_threshold or "-"
        lines.append(_fit(f"  {st.step:>4}  {st.state.psnr:>8.2f}  {_num(st.state.rel_l2):>9}  {first}", width))
    return lines


def render_text(report: ReportData, width: int = 80, color: bool = False) -> str:
    """The report as terminal text, every line at most `width` columns (escape codes aside)."""
    s = _Style(color)
    st = report.structure
    n_left = len(report.left_alone)
    lines = [s(f"vsopt diff: {report.model}", "bold"),
             _fit(f"{len(report.rewritten)} site{'s' if len(report.rewritten) != 1 else ''} rewritten, "
                  f"{n_left} left alone; {len(st.removed)} nodes removed, {len(st.created)} created, "
                  f"{len(st.kept)} unchanged", width), ""]
    lines += _structure(report, width, s)
    if report.numerical is not None:
        lines += [""] + _numerics(report, width, s)
    if report.steps:
        lines += [""] + _steps(report, width, s)
    return "\n".join(lines)
