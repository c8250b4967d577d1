"""What did vsopt change? The graph diff of a diffusers Wan transformer under a plan: the sites
rewritten and those left alone (with the reason), and where the error enters.

    python examples/graph_diff.py --html diff.html

Uses the public vsopt.diff(model, example_inputs, plan); report.render_text() is what
`vsopt diff` prints, report.write_html() the page it writes.
"""
from __future__ import annotations

import argparse

import vsopt
from small_wan import make, window_plan


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--html", default=None, help="also write the HTML report here")
    args = p.parse_args()

    model, inputs = make(frames=2, size=8)
    report = vsopt.diff(model, inputs, window_plan(model, inputs))
    print(report.render_text())
    if args.html:
        print(f"wrote {report.write_html(args.html)}")


if __name__ == "__main__":
    main()
