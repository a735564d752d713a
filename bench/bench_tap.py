"""What the tap costs vLLM: generation throughput with the tap off vs on,
measured side by side in one run (same machine, same model, same batch).

    .venv/bin/python bench/bench_tap.py [--model tiny] [--batch 16] [--max-tokens 128] [--repeats 5]

Each configuration runs in its own process (a fresh engine, vLLM's default
compiled mode); the tap-on run streams to a real sidecar. Prints medians and
the ratio. Numbers are for the machine you run it on; never a CI gate.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time


def child(args) -> None:
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    from eigenwatch.hooks.models import resolve_model

    path, _ = resolve_model(args.model)
    llm = LLM(model=str(path), max_model_len=1024, seed=0)
    import random

    rng = random.Random(0)
    prompts = [TokensPrompt(prompt_token_ids=[rng.randrange(3, 2000) for _ in range(args.prompt_tokens)])
               for _ in range(args.batch)]
    params = SamplingParams(max_tokens=args.max_tokens, temperature=0.0, ignore_eos=True)
    llm.generate(prompts, params, use_tqdm=False)  # warm-up
    times = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        llm.generate(prompts, params, use_tqdm=False)
        times.append(time.perf_counter() - t0)
    stats = llm.collective_rpc("eigenwatch_stats")[0] if os.environ.get("EIGENWATCH_ENABLE") else {}
    print("RESULT " + json.dumps({"times": times, "tap": {k: stats.get(k) for k in
                                  ("installed", "frames_emitted", "frames_sent", "frames_dropped", "hook_errors")}}),
          flush=True)
    llm.llm_engine.engine_core.shutdown()


def run(args, env) -> dict:
    cmd = [sys.executable, __file__, "--child", "--model", args.model, "--batch", str(args.batch),
           "--prompt-tokens", str(args.prompt_tokens), "--max-tokens", str(args.max_tokens),
           "--repeats", str(args.repeats)]
    env = {**env, "VLLM_LOGGING_LEVEL": "WARNING", "VLLM_CPU_KVCACHE_SPACE": env.get("VLLM_CPU_KVCACHE_SPACE", "1")}
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800)
    for line in out.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    raise RuntimeError(f"benchmark child failed ({out.returncode}):\n{out.stderr[-3000:]}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--prompt-tokens", type=int, default=64)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child(args)
        return

    from eigenwatch.monitor.cli.processes import SidecarProcess, tap_env

    base = {k: v for k, v in os.environ.items() if not k.startswith("EIGENWATCH_")}
    tap_no_sidecar = {**base, "EIGENWATCH_ENABLE": "1", "EIGENWATCH_SIDECAR": "127.0.0.1:1",
                      "EIGENWATCH_MODEL_NAME": args.model}
    results = [
        ("tap off", run(args, base)),
        ("tap on, every request opted out", run(args, {**tap_no_sidecar, "EIGENWATCH_DEFAULT": "off"})),
        ("tap on, no sidecar (frames dropped)", run(args, tap_no_sidecar)),
    ]
    sidecar = SidecarProcess(["--listen", "127.0.0.1:0", "--metrics-port", "-1"]).start()
    try:
        env = {**base, **{k: v for k, v in tap_env(sidecar.grpc, model_name=args.model).items()
                          if k.startswith("EIGENWATCH_")}}
        results.append(("tap on, sidecar on the same machine", run(args, env)))
    finally:
        sidecar.stop()

    toks = args.batch * args.max_tokens
    ref = statistics.median(results[0][1]["times"])
    print(f"model={args.model} batch={args.batch} prompt={args.prompt_tokens} generated={args.max_tokens} "
          f"repeats={args.repeats}; vLLM default compiled mode; {os.cpu_count()} CPUs")
    print(f"  {'configuration':38s} {'median ms':>10s} {'tok/s':>8s} {'time ratio':>10s}")
    for name, res in results:
        med = statistics.median(res["times"])
        print(f"  {name:38s} {med * 1e3:10.1f} {toks / med:8.0f} {med / ref:10.3f}")
    for name, res in results[1:]:
        print(f"  [{name}] tap counters: {res['tap']}")


if __name__ == "__main__":
    main()
