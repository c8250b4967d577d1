"""One section of a markdown file (BENCHMARKS.md), replaced or appended by the GPU scripts that
report there (attention.py, e2e_wan.py, demo_gpu.py), the other sections kept as they are."""
from __future__ import annotations

import os
from pathlib import Path


def update_section(path: str | os.PathLike, title: str, section: str) -> None:
    """Replace the section headed `title` (from it up to the next "## " heading) with `section`,
    or append it after a blank line where the file has none; `section` starts with `title` and
    ends with a newline. The file is written atomically (a missing one is made)."""
    from vsopt.core.io import atomic_write_text

    path = Path(path)
    text = path.read_text() if path.exists() else "# vsopt benchmarks\n"
    if title in text:
        head, _, rest = text.partition(title)
        nxt = rest.find("\n## ")
        text = head + section + (rest[nxt + 1:] if nxt >= 0 else "")
    else:
        text = text.rstrip("\n") + "\n\n" + section
    atomic_write_text(path, text)
