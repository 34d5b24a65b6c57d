"""The package must import in the Neuron containers (Python 3.10-3.12, torch 2.9): no syntax newer
than 3.10 anywhere in src/, and nothing heavy imported just to list the verbs. (Importing under
torch 2.9 itself is exercised by `make test-xla`, whose venv has torch 2.9.)"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "recipe_runner"


def test_sources_parse_as_python_3_10():
    bad = []
    for path in sorted(SRC.rglob("*.py")):
        try:
            ast.parse(path.read_text(), filename=str(path), feature_version=(3, 10))
        except SyntaxError as e:
            bad.append(f"{path.relative_to(SRC)}:{e.lineno}: {e.msg}")
    assert not bad, "syntax newer than Python 3.10:\n" + "\n".join(bad)


def test_cli_help_does_not_import_torch():
    code2 = ("import sys\nfrom recipe_runner.cli import build_parser\nbuild_parser()\n"
             "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code2], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
