"""The HTML rendering of a DiffReport: one self-contained page (inline CSS, JS and SVG; no network,
no external asset; a Content-Security-Policy forbids any fetch).

    nav   the sites in execution order, coloured by isolated error; a filter box; j / k move
    main  the error per site plotted (log scale, threshold line), the collapsed structure, then
          one section per site: source location, reason or plan per head, the before / after
          subgraphs drawn as SVG, and the error per head.

Everything is rendered here in Python; the script only navigates (filter, keys, highlight). When
it has run it sets <body data-ready="1"> and writes the site count, which the browser test reads.
"""
from __future__ import annotations

import html
import math
import re
from typing import TYPE_CHECKING, Any

from vsopt.debug.graph import Subgraph, layered_layout
from vsopt.debug.report_data import ReportData, SiteEntry

if TYPE_CHECKING:
    from vsopt.debug.numeric import ErrorStats, SiteError


def _e(x: Any) -> str:
    return html.escape(str(x), quote=True)


def _num(x: float | None, digits: int = 3) -> str:
    if x is None:
        return "-"
    if not math.isfinite(x):
        return str(x)
    return f"{x:.{digits}g}"


def anchor_id(index: int, site_id: str) -> str:
    """The HTML id of a site's section: unique and safe whatever the site id holds."""
    return f"site-{index}-" + re.sub(r"[^A-Za-z0-9_.-]", "_", site_id)


_CSS = """
:root{--ok:#2e7d32;--bad:#c62828;--warn:#ef6c00;--mute:#777;--line:#ddd;--bg:#fafafa;--sel:#e3f2fd}
*{box-sizing:border-box}body{margin:0;font:14px/1.45 system-ui,sans-serif;color:#222;background:#fff}
header{padding:12px 20px;border-bottom:1px solid var(--line);background:var(--bg)}
h1{font-size:20px;margin:0 0 4px}h2{font-size:17px;margin:18px 0 8px}h3{font-size:14px;margin:12px 0 6px}
.summary{margin:0;color:#444}.layout{display:flex;align-items:flex-start}
nav{position:sticky;top:0;width:260px;min-width:260px;max-height:100vh;overflow:auto;padding:12px;
border-right:1px solid var(--line);background:var(--bg)}
nav input{width:100%;padding:4px 6px;margin-bottom:8px;border:1px solid #ccc;border-radius:4px}
nav ul{list-style:none;margin:0;padding:0}nav li{margin:1px 0;border-radius:4px}
nav li a{display:flex;justify-content:space-between;gap:8px;padding:4px 6px;color:inherit;text-decoration:none}
nav li.selected{background:var(--sel)}nav li a:hover{background:#eee}
.dot{display:inline-block;width:9px;height:9px;border-radius:50%;margin-right:6px;background:var(--ok)}
.site-bad .dot{background:var(--bad)}.site-alone .dot{background:var(--warn);border-radius:2px}
.badge{color:var(--mute);font-variant-numeric:tabular-nums}
main{flex:1;padding:4px 24px 40px;min-width:0}
section.site{border-top:1px solid var(--line);padding-top:4px;margin-top:12px}
section.site.selected h2{color:#0d47a1}
.status{font-size:12px;padding:1px 6px;border-radius:8px;margin-left:8px;vertical-align:middle;color:#fff}
.status.rewritten{background:var(--ok)}.status.alone{background:var(--warn)}
.reason{background:#fff3e0;border-left:3px solid var(--warn);padding:6px 10px}
code,.mono{font-family:ui-monospace,Menlo,Consolas,monospace;font-size:12.5px}
.graphs{display:flex;flex-wrap:wrap;gap:16px;align-items:flex-start}.graphs figure{margin:0;border:1px solid var(--line);
border-radius:6px;padding:6px;background:#fff;overflow:auto;max-width:100%}
figcaption{font-weight:600;font-size:13px;margin-bottom:4px}
table{border-collapse:collapse;margin:6px 0;font-variant-numeric:tabular-nums}
th,td{border-bottom:1px solid var(--line);padding:2px 10px;text-align:right}
th:first-child,td:first-child{text-align:left}td.bad{color:var(--bad);font-weight:600}
.timeline{list-style:none;padding:0;margin:0}.timeline li{padding:1px 0}
.timeline .unchanged{color:var(--mute)}
.callout{padding:8px 12px;border-radius:6px;margin:8px 0}
.callout.bad{background:#ffebee;border-left:4px solid var(--bad)}
.callout.ok{background:#e8f5e9;border-left:4px solid var(--ok)}
.callout.warn{background:#fff3e0;border-left:4px solid var(--warn)}
svg text{font-family:system-ui,sans-serif}.plot{overflow-x:auto}
#js-errors{background:#ffebee;color:var(--bad);padding:8px;white-space:pre-wrap}
"""

_JS = """
(function(){
  var items = Array.prototype.slice.call(document.querySelectorAll('#site-list li'));
  var filter = document.getElementById('filter');
  var current = -1;
  function visible(){ return items.filter(function(li){ return li.style.display !== 'none'; }); }
  function select(li, scroll){
    items.forEach(function(x){ x.classList.remove('selected'); });
    document.querySelectorAll('section.site.selected').forEach(function(s){ s.classList.remove('selected'); });
    if(!li){ current = -1; return; }
    li.classList.add('selected');
    current = items.indexOf(li);
    var target = document.getElementById(li.getAttribute('data-target'));
    if(target){ target.classList.add('selected'); if(scroll){ target.scrollIntoView({block:'start'}); } }
  }
  items.forEach(function(li){ li.addEventListener('click', function(){ select(li, false); }); });
  filter.addEventListener('input', function(){
    var q = filter.value.toLowerCase();
    items.forEach(function(li){
      li.style.display = li.getAttribute('data-site').toLowerCase().indexOf(q) >= 0 ? '' : 'none';
    });
  });
  document.addEventListener('keydown', function(ev){
    if(ev.target === filter || (ev.key !== 'j' && ev.key !== 'k')){ return; }
    var vis = visible(); if(!vis.length){ return; }
    var at = vis.indexOf(items[current]);
    var next = ev.key === 'j' ? Math.min(vis.length - 1, at + 1) : Math.max(0, at - 1);
    select(vis[next], true);
  });
  var fromHash = items.filter(function(li){ return '#' + li.getAttribute('data-target') === location.hash; })[0];
  if(fromHash){ select(fromHash, false); }
  document.getElementById('site-count').textContent =
    items.length + (items.length === 1 ? ' site' : ' sites');
  document.body.setAttribute('data-ready', '1');
})();
"""

# Errors thrown by any later script land on the page, where the browser test sees them.
_ONERROR = """window.onerror = function(msg, src, line){
  var box = document.getElementById('js-errors') || document.body.insertBefore(document.createElement('div'),
    document.body.firstChild);
  box.id = 'js-errors'; box.textContent += 'script error: ' + msg + ' (line ' + line + ')\\n';
};"""


# ----------------------------------------------------------------------------- SVG drawings

# The arrow head every drawing uses, defined once per page (ids must be unique).
_DEFS = ('<svg width="0" height="0" style="position:absolute" aria-hidden="true"><defs><marker id="arrow" '
         'viewBox="0 0 10 10" refX="9" refY="5" markerWidth="7" markerHeight="7" orient="auto-start-reverse">'
         '<path d="M0,0 L10,5 L0,10 z" fill="#888"/></marker></defs></svg>')
_BOX_W, _BOX_H, _GAP_X, _GAP_Y = 132, 34, 10, 26


def draw_subgraph(sub: Subgraph, title: str) -> str:
    """The nodes of a region in one graph, top to bottom in data-flow order; boundary nodes (kept
    neighbours) dashed and grey. Each box shows the op and shape; hovering shows name and source."""
    pos = layered_layout(sub)
    if not pos:
        return f'<svg role="img" aria-label="{_e(title)}" width="160" height="30"><text x="6" y="20" ' \
               f'fill="#777">(nothing)</text></svg>'
    rows = max(r for _, r in pos.values()) + 1
    layers = max(layer for layer, _ in pos.values()) + 1
    width, height = rows * (_BOX_W + _GAP_X) + _GAP_X, layers * (_BOX_H + _GAP_Y) + _GAP_Y
    inside = {n.name for n in sub.nodes}
    xy = {n: (_GAP_X + r * (_BOX_W + _GAP_X), _GAP_Y // 2 + layer * (_BOX_H + _GAP_Y)) for n, (layer, r) in pos.items()}
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" role="img" aria-label="{_e(title)}" width="{width}" '
             f'height="{height}" viewBox="0 0 {width} {height}">']
    for u, v in sub.edges:
        (x1, y1), (x2, y2) = xy[u], xy[v]
        parts.append(f'<line x1="{x1 + _BOX_W / 2}" y1="{y1 + _BOX_H}" x2="{x2 + _BOX_W / 2}" y2="{y2}" '
                     f'stroke="#888" stroke-width="1.2" marker-end="url(#arrow)"/>')
    for node in (*sub.boundary, *sub.nodes):
        x, y = xy[node.name]
        changed = node.name in inside
        fill, stroke = ("#e3f2fd", "#1565c0") if changed else ("#f5f5f5", "#aaa")
        dash = "" if changed else ' stroke-dasharray="4 3"'
        tip = f"{node.name}: {node.op}" + (f" [{node.shape}]" if node.shape else "")
        if node.source:
            tip += f"\n{node.source.file}:{node.source.line}\n{node.source.code}"
        label = node.op if len(node.op) <= 20 else node.op[:19] + "…"
        parts.append(f'<g class="node{" changed" if changed else ""}"><title>{_e(tip)}</title>'
                     f'<rect x="{x}" y="{y}" width="{_BOX_W}" height="{_BOX_H}" rx="6" fill="{fill}" '
                     f'stroke="{stroke}"{dash}/>'
                     f'<text x="{x + _BOX_W / 2}" y="{y + 14}" text-anchor="middle" font-size="12" '
                     f'fill="{"#0d47a1" if changed else "#666"}">{_e(label)}</text>'
                     f'<text x="{x + _BOX_W / 2}" y="{y + 27}" text-anchor="middle" font-size="10" '
                     f'fill="#888">{_e(node.shape or node.name)}</text></g>')
    parts.append("</svg>")
    return "".join(parts)


def draw_error_plot(report: ReportData, anchors: dict[str, str]) -> str:
    """Relative L2 per rewritten site on a log scale: isolated as bars, accumulated as a line,
    the threshold dashed. Bars link to the site's section."""
    num = report.numerical
    sites = num.sites
    if not sites:
        return "<p>No rewritten site to plot.</p>"
    values = [v for s in sites for v in (s.isolated.rel_l2, s.accumulated.rel_l2) if v > 0] + [num.threshold]
    # the threshold sits well inside the plot; exact (zero) errors rest on the bottom line
    lo = 10 ** math.floor(math.log10(max(min(min(values), num.threshold * 1e-3), 1e-12)))
    hi = 10 ** math.ceil(math.log10(max(values) * 1.01))
    left, top, plot_h, step = 60, 16, 200, max(28, min(60, 900 // len(sites)))
    width = left + step * len(sites) + 60  # room for the last rotated label
    label_h = 8 + 6.5 * max(len(s.site_id) for s in sites) * 0.72
    height = top + plot_h + label_h + 10

    def y(v: float) -> float:
        v = min(max(v, lo), hi)
        return top + plot_h * (1 - (math.log10(v) - math.log10(lo)) / (math.log10(hi) - math.log10(lo)))

    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" id="error-plot" role="img" '
             f'aria-label="relative L2 error per site" width="{width}" height="{height:.0f}">']
    decade = lo
    while decade <= hi * 1.0001:
        yy = y(decade)
        parts.append(f'<line x1="{left}" x2="{width - 50}" y1="{yy:.1f}" y2="{yy:.1f}" stroke="#eee"/>'
                     f'<text x="{left - 6}" y="{yy + 4:.1f}" font-size="10" text-anchor="end" fill="#777">'
                     f'{decade:.0e}</text>')
        decade *= 10
    for i, s in enumerate(sites):
        x = left + i * step + step * 0.2
        bad = s.isolated.rel_l2 > num.threshold
        yy = y(s.isolated.rel_l2)
        parts.append(f'<a href="#{_e(anchors[s.site_id])}"><rect class="bar" x="{x:.1f}" y="{yy:.1f}" '
                     f'width="{step * 0.6:.1f}" height="{top + plot_h - yy:.1f}" '
                     f'fill="{"#c62828" if bad else "#66bb6a"}"><title>{_e(s.site_id)}: isolated rel L2 '
                     f'{_num(s.isolated.rel_l2)}, accumulated {_num(s.accumulated.rel_l2)}</title></rect></a>')
        cx = left + i * step + step / 2
        parts.append(f'<text x="{cx:.1f}" y="{top + plot_h + 10}" font-size="10" fill="#444" '
                     f'transform="rotate(45 {cx:.1f} {top + plot_h + 10})">{_e(s.site_id)}</text>')
    points = " ".join(f"{left + i * step + step / 2:.1f},{y(s.accumulated.rel_l2):.1f}" for i, s in enumerate(sites))
    parts.append(f'<polyline points="{points}" fill="none" stroke="#1565c0" stroke-width="2"/>')
    for i, s in enumerate(sites):
        parts.append(f'<circle cx="{left + i * step + step / 2:.1f}" cy="{y(s.accumulated.rel_l2):.1f}" r="3" '
                     f'fill="#1565c0"/>')
    ty = y(num.threshold)
    parts.append(f'<line x1="{left}" x2="{width - 50}" y1="{ty:.1f}" y2="{ty:.1f}" stroke="#c62828" '
                 f'stroke-dasharray="6 4"/><text x="{width - 52}" y="{ty - 4:.1f}" font-size="10" '
                 f'text-anchor="end" fill="#c62828">threshold {_num(num.threshold)}</text>')
    parts.append(f'<line x1="{left}" x2="{left}" y1="{top}" y2="{top + plot_h}" stroke="#999"/></svg>')
    legend = ('<p class="mono"><span style="color:#66bb6a">■</span> isolated (only this site optimized) '
              '&nbsp; <span style="color:#1565c0">●—</span> accumulated (every site up to here) '
              '&nbsp; relative L2 of the site output, log scale</p>')
    return "".join(parts) + legend


def draw_steps_plot(report: ReportData) -> str:
    """PSNR of the sampler state after each step, optimized trajectory against dense."""
    psnrs = [s.state.psnr if math.isfinite(s.state.psnr) else 100.0 for s in report.steps]
    lo, hi = math.floor(min(psnrs) / 5) * 5, math.ceil(max(psnrs) / 5) * 5 + 5
    left, top, w, h = 50, 10, max(200, 40 * len(psnrs)), 160
    def xy(i, v):
        return left + (i + 0.5) * w / len(psnrs), top + h * (1 - (v - lo) / (hi - lo))
    pts = " ".join(f"{x:.1f},{y:.1f}" for x, y in (xy(i, v) for i, v in enumerate(psnrs)))
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" id="steps-plot" width="{left + w + 20}" height="{top + h + 44}">',
             f'<text x="12" y="{top + h / 2:.0f}" font-size="11" fill="#444" text-anchor="middle" '
             f'transform="rotate(-90 12 {top + h / 2:.0f})">PSNR dB</text>',
             f'<text x="{left + w / 2:.0f}" y="{top + h + 38}" font-size="11" fill="#444" '
             f'text-anchor="middle">step</text>']
    for v in range(int(lo), int(hi) + 1, 5):
        yy = xy(0, v)[1]
        parts.append(f'<line x1="{left}" x2="{left + w}" y1="{yy:.1f}" y2="{yy:.1f}" stroke="#eee"/>'
                     f'<text x="{left - 6}" y="{yy + 4:.1f}" font-size="10" text-anchor="end">{v}</text>')
    parts.append(f'<polyline points="{pts}" fill="none" stroke="#1565c0" stroke-width="2"/>')
    for i, v in enumerate(psnrs):
        x, yy = xy(i, v)
        parts.append(f'<circle cx="{x:.1f}" cy="{yy:.1f}" r="3" fill="#1565c0"><title>step {i}: PSNR '
                     f'{v:.2f} dB</title></circle><text x="{x:.1f}" y="{top + h + 16}" font-size="10" '
                     f'text-anchor="middle">{i}</text>')
    parts.append("</svg>")
    return "".join(parts)


# ----------------------------------------------------------------------------- page sections


def _stats_cells(st: "ErrorStats", threshold: float) -> str:
    cls = ' class="bad"' if st.rel_l2 > threshold else ""
    return f"<td>{st.cosine:.6f}</td><td{cls}>{_num(st.rel_l2)}</td><td>{_num(st.max_abs)}</td>"


def _site_section(entry: SiteEntry, anchor: str, error: "SiteError | None", threshold: float) -> str:
    rewritten = entry.status == "rewritten"
    out = [f'<section class="site" id="{_e(anchor)}" data-site="{_e(entry.site_id)}">',
           f'<h2>{_e(entry.site_id)}<span class="status {"rewritten" if rewritten else "alone"}">'
           f'{_e(entry.status)}</span></h2>']
    facts = []
    if entry.rule:
        facts.append(f"rule <code>{_e(entry.rule)}</code>")
    if entry.region and entry.region.passes:
        facts.append("passes " + ", ".join(f"<code>{_e(p)}</code>" for p in entry.region.passes))
    if entry.site:
        s = entry.site
        facts.append(f"heads {s.heads} (kv {s.kv_heads}), head_dim {s.head_dim}, q/kv tokens {s.q_len}/{s.kv_len}, "
                     f"layout {_e(s.layout.value)}, grid {_e(s.grid) if s.grid else 'unknown'}")
    out.append("<p>" + " · ".join(facts) + "</p>")
    if entry.source:
        out.append(f'<p class="mono" title="{_e(entry.source.file)}">{_e(entry.source.short())}: '
                   f'<code>{_e(entry.source.code)}</code></p>')
    if not rewritten:
        out.append(f'<p class="reason"><b>Left alone:</b> {_e(entry.reason or "no reason given")}</p>')
    elif entry.reason:
        out.append(f'<p class="reason"><b>Note:</b> {_e(entry.reason)}</p>')
    if entry.region:
        out.append('<div class="graphs">'
                   f'<figure><figcaption>before ({len(entry.region.before.nodes)} ops)</figcaption>'
                   f'{draw_subgraph(entry.region.before, "before " + entry.site_id)}</figure>'
                   f'<figure><figcaption>after ({len(entry.region.after.nodes)} ops)</figcaption>'
                   f'{draw_subgraph(entry.region.after, "after " + entry.site_id)}</figure></div>')
        ops = "".join(f"<tr><td><code>{_e(n.name)}</code></td><td>{_e(n.op)}</td><td>{_e(n.shape)}</td>"
                      f"<td>{_e(n.source.short()) if n.source else ''}</td></tr>" for n in entry.region.before.nodes)
        out.append(f"<details><summary>original ops with source lines</summary><table><tr><th>node</th><th>op</th>"
                   f"<th>shape</th><th>source</th></tr>{ops}</table></details>")
    if entry.plan_heads:
        rows = "".join(f"<tr><td>{h}</td><td>{_e(p['sparsity'])}</td><td>{_e(p['pattern'] or '-')}</td>"
                       f"<td>{_e(p['order'])}</td><td>{_e(p['quant'])}</td><td>{_e('x'.join(map(str, p['block'])))}</td>"
                       f"<td>{_num(p['density']) if p['density'] is not None else 'dynamic'}</td></tr>"
                       for h, p in enumerate(entry.plan_heads))
        out.append("<h3>Plan per head</h3><table><tr><th>head</th><th>sparsity</th><th>pattern</th><th>order</th>"
                   f"<th>precision</th><th>block</th><th>density</th></tr>{rows}</table>")
    if error is not None:
        head_rows = "".join(f"<tr><td>{h}</td>{_stats_cells(i, threshold)}{_stats_cells(a, threshold)}</tr>"
                            for h, (i, a) in enumerate(zip(error.heads_isolated, error.heads_accumulated)))
        out.append("<h3>Error</h3><table><tr><th></th><th colspan=3>isolated</th><th colspan=3>accumulated</th></tr>"
                   "<tr><th>head</th><th>cosine</th><th>rel L2</th><th>max err</th><th>cosine</th><th>rel L2</th>"
                   f"<th>max err</th></tr><tr><td><b>all</b></td>{_stats_cells(error.isolated, threshold)}"
                   f"{_stats_cells(error.accumulated, threshold)}</tr>{head_rows}</table>")
    out.append("</section>")
    return "".join(out)


def _timeline(report: ReportData, anchors: dict[str, str]) -> str:
    items = []
    for kind, value in report.structure.timeline:
        if kind == "unchanged":
            items.append(f'<li class="unchanged">┆ {value} unchanged node{"s" if value != 1 else ""}</li>')
            continue
        if kind == "region":
            region = report.structure.regions[value]
            site_id = next((i for i in region.site_ids if i in anchors), None)
            if site_id is None:
                items.append(f"<li>◆ change outside any site: {_e(', '.join(n.op for n in region.before.nodes))} → "
                             f"{_e(', '.join(n.op for n in region.after.nodes))}</li>")
                continue
            e = report.entry(site_id)
            items.append(f'<li>● <a href="#{_e(anchors[site_id])}">{_e(site_id)}</a>: '
                         f'{_e(", ".join(n.op for n in region.before.nodes))} → '
                         f'<b>{_e(", ".join(n.op for n in region.after.nodes))}</b></li>')
        elif value in anchors:
            e = report.entry(value)
            items.append(f'<li>○ <a href="#{_e(anchors[value])}">{_e(value)}</a>: {_e(e.status)}: '
                         f'{_e(e.reason or "")}</li>')
    return f'<ul class="timeline mono">{"".join(items)}</ul>'


def render_html(report: ReportData) -> str:
    """The whole page as a string."""
    anchors = {e.site_id: anchor_id(i, e.site_id) for i, e in enumerate(report.entries)}
    num = report.numerical
    errors = {s.site_id: s for s in num.sites} if num else {}
    st = report.structure
    summary = (f"{len(report.rewritten)} rewritten, {len(report.left_alone)} left alone · {len(st.removed)} nodes "
               f"removed, {len(st.created)} created, {len(st.kept)} unchanged")
    if num:
        summary += f" · model output PSNR {num.output.psnr:.2f} dB, relative L2 {_num(num.output.rel_l2)}"

    nav = []
    for e in report.entries:
        err = errors.get(e.site_id)
        cls = "site-alone" if e.status != "rewritten" else (
            "site-bad" if err and err.isolated.rel_l2 > num.threshold else "site-ok")
        badge = _num(err.isolated.rel_l2, 2) if err else ("dense" if e.status != "rewritten" else "")
        nav.append(f'<li class="{cls}" data-site="{_e(e.site_id)}" data-target="{_e(anchors[e.site_id])}">'
                   f'<a href="#{_e(anchors[e.site_id])}"><span><span class="dot"></span>{_e(e.site_id)}</span>'
                   f'<span class="badge">{_e(badge)}</span></a></li>')

    body = [f"<h2>Structure</h2>{_timeline(report, anchors)}"]
    if num:
        first = num.first_over_threshold
        if first:
            e = errors[first]
            h = e.worst_head()
            callout = (f'<div class="callout bad" id="first-over">Error enters at <a href="#{_e(anchors[first])}">'
                       f'<b>{_e(first)}</b></a>: isolated relative L2 {_num(e.isolated.rel_l2)} &gt; '
                       f'{_num(num.threshold)}' + (f", worst head {h}" if h is not None else "") + "</div>")
        elif num.first_accumulated_over_threshold:
            acc = num.first_accumulated_over_threshold
            callout = (f'<div class="callout warn" id="first-over">No site\'s own (isolated) error is over the '
                       f'threshold ({_num(num.threshold)}); the accumulated error crosses it at '
                       f'<a href="#{_e(anchors[acc])}"><b>{_e(acc)}</b></a>.</div>')
        else:
            callout = f'<div class="callout ok" id="first-over">No site over the threshold ({_num(num.threshold)}).</div>'
        body.insert(0, f"<h2>Error per site</h2>{callout}<div class=\"plot\">{draw_error_plot(report, anchors)}</div>")
    if report.steps:
        rows = "".join(f"<tr><td>{s.step}</td><td>{s.state.psnr:.2f}</td><td>{_num(s.state.rel_l2)}</td>"
                       f"<td>{_e(s.numerical.first_over_threshold or '-')}</td></tr>" for s in report.steps)
        body.append(f"<h2>Sampler steps</h2>{draw_steps_plot(report)}<table><tr><th>step</th><th>PSNR dB</th>"
                    f"<th>rel L2</th><th>first site over threshold</th></tr>{rows}</table>")
    body += [_site_section(e, anchors[e.site_id], errors.get(e.site_id), num.threshold if num else math.inf)
             for e in report.entries]

    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            "<meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; style-src 'unsafe-inline'; "
            "script-src 'unsafe-inline'; img-src data:\">"
            f"<meta name=\"viewport\" content=\"width=device-width\"><title>vsopt diff: {_e(report.model)}</title>"
            f"<style>{_CSS}</style><script>{_ONERROR}</script></head>"
            f"<body>{_DEFS}<header><h1>vsopt diff: {_e(report.model)}</h1><p class=\"summary\">{_e(summary)}</p></header>"
            f"<div class=\"layout\"><nav><input id=\"filter\" type=\"search\" placeholder=\"filter sites (j/k move)\" "
            f"aria-label=\"filter sites\"><div class=\"badge\" id=\"site-count\"></div>"
            f"<ul id=\"site-list\">{''.join(nav)}</ul></nav>"
            f"<main>{''.join(body)}</main></div><script>{_JS}</script></body></html>\n")
