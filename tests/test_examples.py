"""The examples run as a user runs them (a fresh interpreter, nothing of vitrim edited)."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_custom_method_example(tmp_path):
    """A method defined outside the package goes through apply, flops, solve, compare, visualize,
    forward_dense and a one-epoch train."""
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run([sys.executable, str(ROOT / "examples" / "custom_method.py"), "--output", str(out),
                           "--max-images", "64"], capture_output=True, text=True, env=env, timeout=1800)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    text = proc.stdout
    assert "registered methods:" in text and "normtopk" in text.split("registered methods:")[1].splitlines()[0]
    flops_line = next(line for line in text.splitlines() if line.startswith("flops:"))
    base, reduced = [float(w) for w in flops_line.replace(",", " ").split() if w.replace(".", "", 1).isdigit()][:2]
    assert reduced < base
    assert "solve: target" in text and "'keep_rate':" in text
    assert "| normtopk | keep_rate=0.7 |" in text and "| evit | keep_rate=0.5 |" in text
    assert (out / "compare" / "results.csv").is_file() and (out / "compare" / "acc_vs_gmacs.png").is_file()
    assert (out / "normtopk.png").read_bytes()[:4] == b"\x89PNG"
    assert "forward_dense: (1, 8, 8, 64)" in text
    assert (out / "run" / "best.pt").is_file() and "train: one epoch, val top-1" in text
