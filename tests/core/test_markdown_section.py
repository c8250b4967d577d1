"""benchmarks/markdown_section.py: a BENCHMARKS.md section replaced in place (between others, or
last) or appended, the other sections kept byte for byte."""
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _update_section():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        from markdown_section import update_section
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    return update_section


def test_a_section_is_replaced_in_place_or_appended(tmp_path):
    update_section = _update_section()
    md = tmp_path / "B.md"
    md.write_text("# vsopt benchmarks\n\n## A\n\nold a\n\n## B\n\nold b\n")
    update_section(md, "## A", "## A\n\nnew a\n\n")
    assert md.read_text() == "# vsopt benchmarks\n\n## A\n\nnew a\n\n## B\n\nold b\n"
    update_section(md, "## B", "## B\n\nnew b\n")                 # the last section: to the end
    assert md.read_text() == "# vsopt benchmarks\n\n## A\n\nnew a\n\n## B\n\nnew b\n"
    update_section(md, "## C", "## C\n\nc\n")                     # absent: appended after a blank line
    assert md.read_text().endswith("## B\n\nnew b\n\n## C\n\nc\n")


def test_a_missing_file_is_made(tmp_path):
    md = tmp_path / "sub" / "B.md"
    _update_section()(md, "## A", "## A\n\na\n")
    assert md.read_text() == "# vsopt benchmarks\n\n## A\n\na\n"
