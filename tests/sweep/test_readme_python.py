"""The README's Python sweep example, saved verbatim as a script and run as a new user would run it: from a
folder holding the repository's sweeps/, in a fresh interpreter that starts its own Ray instance."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]


def _example() -> str:
    text = (ROOT / "README.md").read_text()
    section = text.split("### From Python", 1)[1].split("\n### ", 1)[0]
    (code,) = re.findall(r"```python\n(.*?)```", section, re.S)
    return code


def test_the_readme_python_example_runs_to_the_end_as_a_script(tmp_path, hvae_cache):
    script = tmp_path / "sweep_example.py"
    script.write_text(_example())
    (tmp_path / "sweeps").symlink_to(ROOT / "sweeps")
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")}
    t0 = time.monotonic()
    out = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=900)
    wall = time.monotonic() - t0
    assert out.returncode == 0, (out.stdout + out.stderr)[-3000:]
    assert "Traceback" not in out.stderr, out.stderr[-3000:]
    # the ranked table it prints: all 8 trials, finished
    # pyarrow prints the schema ("trial_id: string") and then the columns ("trial_id: [[...]]")
    ids = next((line for line in out.stdout.splitlines() if line.startswith("trial_id: [[")), "")
    status = next((line for line in out.stdout.splitlines() if line.startswith("status: [[")), "")
    assert ids.count("_0000") == 8, out.stdout[-3000:]
    assert "completed" in status and "running" not in status and "pending" not in status, out.stdout[-3000:]
    print(f"README example: {wall:.0f} s")
