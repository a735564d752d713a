"""Fuzz every RPC of one sidecar process with hypothesis (the strategies of
tests/test_fuzz_rpc.py: random bytes, mutated valid messages, hostile field values),
>= 10,000 cases per RPC by default, and print per RPC the status codes it got, then
the sidecar's RSS and estimated state against its --memory-budget-mb. Fails (exit 1)
on an UNKNOWN/INTERNAL answer, a dead sidecar, or an estimate over the budget.

    .venv/bin/python bench/bench_fuzz.py [--cases 10000] [--budget-mb 64]
"""

from __future__ import annotations

import argparse
import collections
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

import grpc  # noqa: E402
from hypothesis import HealthCheck, Phase, given, settings  # noqa: E402

from conftest import metric_value, scrape  # noqa: E402
from test_fuzz_rpc import ALLOWED, CASES, call_rpc  # noqa: E402

from eigenwatch.monitor.cli.processes import SidecarProcess  # noqa: E402


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", type=int, default=10_000, help="generated cases per RPC (default %(default)s)")
    p.add_argument("--budget-mb", type=int, default=64, help="the sidecar's --memory-budget-mb (default %(default)s)")
    p.add_argument("--only", default="", help="comma-separated RPC names to fuzz (default: every RPC)")
    args = p.parse_args()
    only = {x.strip() for x in args.only.split(",") if x.strip()}
    cases = [c for c in CASES if not only or c[0].rsplit("/", 1)[1] in only]
    if not cases:
        p.error(f"--only: no RPC named {args.only!r}; known: {', '.join(c[0].rsplit('/', 1)[1] for c in CASES)}")
    # with the tests' risk model (model "m", layers 1 and 3): the risk path is fuzzed too
    from test_sidecar_risk import train_risk_model

    model = Path(tempfile.mkdtemp()) / "risk.onnx"
    train_risk_model(model)
    sc = SidecarProcess(["--listen", "127.0.0.1:0", "--metrics-port", "0", "--memory-budget-mb", str(args.budget_mb),
                         "--calibration-frames", "4", "--calibration-requests", "2", "--risk-model", str(model)]).start()
    channel = grpc.insecure_channel(sc.grpc)
    bad = []
    try:
        rss0 = rss_mb(sc.proc.pid)
        print(f"sidecar RSS at start {rss0:.0f} MiB; budget {args.budget_mb} MiB; {args.cases} cases per RPC")
        print(f"  {'rpc':28s} {'cases':>6s} {'s':>6s}  status codes")
        t_all = time.perf_counter()
        for method, kind, strategy in cases:
            codes: collections.Counter = collections.Counter()
            t0 = time.perf_counter()

            @settings(max_examples=args.cases, deadline=None, database=None, phases=[Phase.generate],
                      suppress_health_check=list(HealthCheck))
            @given(strategy)
            def one(payload):
                code = call_rpc(channel, method, kind, payload, timeout=0.2 if kind == "unary_stream" else 5.0)
                codes[code.name] += 1
                if code not in ALLOWED:
                    bad.append((method, code.name))

            one()
            name = method.rsplit("/", 2)[-2].rsplit(".", 1)[-1] + "/" + method.rsplit("/", 1)[-1]
            print(f"  {name:28s} {sum(codes.values()):6d} {time.perf_counter() - t0:6.1f}  "
                  + ", ".join(f"{k} {v}" for k, v in codes.most_common()))
        print(f"  all RPCs: {len(cases) * args.cases} cases in {time.perf_counter() - t_all:.0f} s")
        alive = sc.alive()
        rss1 = rss_mb(sc.proc.pid) if alive else float("nan")
        text = scrape(sc.metrics) if alive else ""
        held = metric_value(text, "eigenwatch_state_bytes") / 2**20
        print(f"sidecar alive: {alive}; RSS {rss0:.0f} -> {rss1:.0f} MiB (+{rss1 - rss0:.0f}); estimated state "
              f"{held:.1f} MiB of the {args.budget_mb} MiB budget; refused: "
              + ", ".join(f"{s.split('reason=')[1].split('}')[0].strip(chr(34))} {float(s.split()[-1]):.0f}"
                          for s in text.splitlines() if s.startswith("eigenwatch_refused_total{")))
        print(f"risk model: {metric_value(text, 'eigenwatch_risk_steps_total'):.0f} steps scored, "
              f"{metric_value(text, 'eigenwatch_risk_errors_total'):.0f} model errors")
        tracebacks = sum("Traceback" in l for l in sc.lines)
        print(f"tracebacks in the sidecar log: {tracebacks}; UNKNOWN/INTERNAL answers: {len(bad)}")
        ok = alive and not bad and not tracebacks and held <= args.budget_mb and rss1 - rss0 <= args.budget_mb
        return 0 if ok else 1
    finally:
        channel.close()
        sc.stop()


if __name__ == "__main__":
    sys.exit(main())
