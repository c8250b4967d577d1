"""`vsopt --help` and every command's help (issue 15 item 6: `vsopt --help` took 8 s when every
command module was imported to build the parser, `vsopt bench --help` 4-10 s while its parser
imported vsopt.core for BenchSettings' defaults): answered without importing torch, in a fresh interpreter."""
import subprocess
import sys

import pytest

from vsopt.cli import COMMANDS

PROBE = """
import sys, time
t0 = time.perf_counter()
from vsopt.cli import main
try:
    main({argv!r})
except SystemExit as e:
    code = e.code
print("TORCH", "torch" in sys.modules, "CODE", code, "SECONDS", round(time.perf_counter() - t0, 3))
"""


@pytest.mark.parametrize("argv", [["--help"]] + [[command, "--help"] for command in COMMANDS])
def test_help_does_not_import_torch(argv):
    out = subprocess.run([sys.executable, "-c", PROBE.format(argv=argv)], capture_output=True, text=True, check=True)
    last = out.stdout.strip().splitlines()[-1].split()
    assert last[:4] == ["TORCH", "False", "CODE", "0"], out.stdout[-500:] + out.stderr[-2000:]
    assert "usage: vsopt" in out.stdout
