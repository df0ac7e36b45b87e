"""The README's Python examples run as written (output paths redirected to a temp dir)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from _xla_flags import optimized_env

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_readme_python_blocks_run(tmp_path, shared_data):
    text = (REPO / "README.md").read_text()
    code = "\n".join(re.findall(r"```python\n(.*?)```", text, re.S))
    assert "jcompress.load_hf" in code and "eigen_attention" in code
    code = code.replace('"/tmp/', f'"{tmp_path}/').replace("../shared/data", str(shared_data))
    script = tmp_path / "readme.py"
    script.write_text(code)
    # the examples run real passes over text: compute-bound, at -O1 (tests/_xla_flags.py)
    r = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, cwd=REPO,
                       env=optimized_env())  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    assert "| layer |" in r.stdout
    for out in ("out", "ckpt", "eigen-dense", "eigen-factors"):
        assert (tmp_path / out).is_dir(), out
