"""The HTML page of vsopt diff, checked statically: self-contained, every site listed and linked,
reasons and plots present. tests/e2e/test_diff_browser.py loads it in a real browser."""
from __future__ import annotations

import importlib.util
import re
from html.parser import HTMLParser
from pathlib import Path

import pytest

from vsopt.debug.html import anchor_id, render_html

_spec = importlib.util.spec_from_file_location("_debug_cases", Path(__file__).with_name("test_debug.py"))
cases = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(cases)


class _Collect(HTMLParser):
    def __init__(self):
        super().__init__()
        self.ids, self.hrefs, self.srcs, self.tags = [], [], [], []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.tags.append(tag)
        if "id" in a:
            self.ids.append(a["id"])
        if "href" in a:
            self.hrefs.append(a["href"])
        for key in ("src", "srcset", "data"):
            if key in a:
                self.srcs.append(a[key])


@pytest.fixture(scope="module")
def page():
    report = cases.make_report({"blocks.1": 8.0})
    return report, render_html(report)


def test_page_is_self_contained(page):
    _, text = page
    p = _Collect()
    p.feed(text)
    assert p.srcs == []  # no <script src>, <img src>, <link>, <iframe>...
    assert "link" not in p.tags and "iframe" not in p.tags
    # the only URL is the SVG namespace, an identifier that is never fetched
    urls = set(re.findall(r"https?://[^\s\"'<>)]+", text))
    assert urls <= {"http://www.w3.org/2000/svg"}
    assert "Content-Security-Policy" in text and "default-src 'none'" in text


def test_every_site_listed_linked_and_unique(page):
    report, text = page
    p = _Collect()
    p.feed(text)
    assert len(p.ids) == len(set(p.ids))
    for href in p.hrefs:
        assert href.startswith("#") and href[1:] in p.ids, href
    for i, e in enumerate(report.entries):
        assert anchor_id(i, e.site_id) in p.ids
        assert f'data-site="{e.site_id}"' in text
    assert text.count('<li class="site-') == len(report.entries)


def test_page_shows_reason_drawings_and_first_site(page):
    report, text = page
    assert "softmax over axis -2, not the key axis" in text
    assert 'id="error-plot"' in text and text.count('class="bar"') == len(report.numerical.sites)
    # one before and one after drawing per rewritten site
    assert text.count('aria-label="before ') == 3 and text.count('aria-label="after ') == 3
    first = re.search(r'id="first-over">Error enters at <a href="#([^"]+)"><b>([^<]+)</b>', text)
    assert first and first.group(2) == "blocks.1"


def test_site_ids_are_escaped():
    from vsopt.debug.html import _e
    assert _e('a"<b>') == "a&quot;&lt;b&gt;"
    assert anchor_id(3, 'x"<y>.z') == "site-3-x__y_.z"
