"""What monitoring costs a vLLM server: tap off vs tap on (with the sidecar
running on the same machine), interleaved A/B in one run.

    .venv/bin/python bench/bench_overhead.py [--models tiny,small,minilm] [--pairs 5]

Per model, two engine processes with the same settings (vLLM's default
compiled mode), one with the tap and one without, each started once and kept
warm; the same load goes to A, then B, then A, ... for --pairs pairs, so drift
in the machine's load hits both. Generate models (tiny: the demo's random
Llama; small: the same recipe at hidden 1024 × 8 layers, ~110M parameters):
--concurrency requests of --prompt-tokens random tokens, --max-tokens
generated each (ignore_eos), driven step by step through the engine; the
wall time of every decode step is the inter-token latency of each running
request (one token each), reported as p50/p99, and tokens/s is generated
tokens over the whole run's wall time. MiniLM (embeddings): texts/s over
--embed-texts texts. Ratios are tap on / tap off per pair (throughput: off/on),
reported as median and min..max over the pairs. Never a CI gate: numbers
belong to the machine and moment they were measured on.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import time

DEFAULT_CONCURRENCY = {"tiny": 64, "small": 16, "minilm": 64}


# ---------------------------------------------------------------- the engine processes

def child(args) -> None:
    """One engine; runs the workload each time a line arrives on stdin."""
    from eigenwatch.hooks._vllm_engine import Engine
    from eigenwatch.hooks.models import resolve_model

    path, runner = resolve_model(args.model)
    tap = {"EIGENWATCH_SIDECAR": args.sidecar, "EIGENWATCH_MODEL_NAME": args.model} if args.tap == "on" else {}
    if args.tap == "off":
        tap = {"EIGENWATCH_ENABLE": None, "EIGENWATCH_DISABLE": "1"}
    engine = Engine(path, runner, tap_env=tap, max_model_len=None if runner == "pooling" else 1024)
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    rng = random.Random(0)
    if runner == "pooling":
        import pydoc_data.topics as topics

        words = " ".join(topics.topics[k] for k in sorted(topics.topics)).split()
        texts = [" ".join(words[i * 40:(i + 1) * 40]) for i in range(args.embed_texts)]

        def workload() -> dict:
            t0 = time.perf_counter()
            engine.embed(texts)
            return {"wall": time.perf_counter() - t0, "texts": len(texts)}
    else:
        prompts = [TokensPrompt(prompt_token_ids=[rng.randrange(3, 2000) for _ in range(args.prompt_tokens)])
                   for _ in range(args.concurrency)]
        params = SamplingParams(max_tokens=args.max_tokens, temperature=0.0, ignore_eos=True)
        llm = engine.llm
        counter = iter(range(10**9))

        def workload() -> dict:
            eng = llm.llm_engine
            for p in prompts:
                eng.add_request(f"b{next(counter)}", p, params)
            steps, tokens = [], 0
            t0 = time.perf_counter()
            while eng.has_unfinished_requests():
                s0 = time.perf_counter()
                outs = eng.step()
                dt = time.perf_counter() - s0
                done = sum(1 for o in outs if o.finished)
                running = len(outs)
                steps.append((dt, running, done))
            wall = time.perf_counter() - t0
            tokens = args.concurrency * args.max_tokens
            # Decode steps: every request had its prompt (a step that returns one
            # output per running request, all of them generating).
            itl = [dt for dt, running, _ in steps if running == args.concurrency][1:]
            return {"wall": wall, "tokens": tokens, "itl": itl}

    workload()  # warm-up (compilation of any new shapes)
    print("READY", flush=True)
    for line in sys.stdin:
        if line.strip() == "quit":
            break
        res = workload()
        if args.tap == "on":
            st = engine.tap_stats()
            res["tap"] = {k: st.get(k) for k in ("capture_path", "frames_emitted", "frames_sent", "frames_dropped",
                                                 "hook_errors")}
        print("RESULT " + json.dumps(res), flush=True)
    engine.close()


class Server:
    def __init__(self, args, model: str, tap: str, sidecar: str):
        cmd = [sys.executable, __file__, "--child", "--model", model, "--tap", tap, "--sidecar", sidecar,
               "--concurrency", str(args.concurrency or DEFAULT_CONCURRENCY[model]),
               "--prompt-tokens", str(args.prompt_tokens), "--max-tokens", str(args.max_tokens),
               "--embed-texts", str(args.embed_texts)]
        env = {k: v for k, v in os.environ.items() if not k.startswith("EIGENWATCH_")}
        env.update(VLLM_LOGGING_LEVEL="WARNING", TQDM_DISABLE="1")
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env,
                                     bufsize=1)
        self._expect("READY")

    def _expect(self, word: str) -> str:
        for line in self.proc.stdout:
            if line.startswith(word):
                return line
        raise RuntimeError(f"engine process exited ({self.proc.wait()}) before {word}")

    def run(self) -> dict:
        self.proc.stdin.write("go\n")
        self.proc.stdin.flush()
        return json.loads(self._expect("RESULT ")[7:])

    def close(self) -> None:
        try:
            self.proc.stdin.write("quit\n")
            self.proc.stdin.flush()
            self.proc.wait(60)
        except Exception:
            self.proc.kill()


# ---------------------------------------------------------------- the comparison

def _spread(values) -> str:
    return f"{statistics.median(values):.3f} ({min(values):.3f}..{max(values):.3f})"


def compare(args, model: str, sidecar) -> list[str]:
    off = Server(args, model, "off", "-")
    on = Server(args, model, "on", sidecar.grpc)
    pairs = []
    try:
        for i in range(args.pairs):
            order = [("off", off), ("on", on)] if i % 2 == 0 else [("on", on), ("off", off)]
            got = {name: srv.run() for name, srv in order}
            pairs.append(got)
    finally:
        off.close()
        on.close()
    lines = []
    if "texts" in pairs[0]["off"]:
        rate = {k: [p[k]["texts"] / p[k]["wall"] for p in pairs] for k in ("off", "on")}
        ratio = [a / b for a, b in zip(rate["off"], rate["on"])]
        lines.append(f"{model} (embeddings, {pairs[0]['off']['texts']} texts per run): texts/s off "
                     f"{statistics.median(rate['off']):.1f}, on {statistics.median(rate['on']):.1f}; "
                     f"cost (off/on) {_spread(ratio)}")
    else:
        tps = {k: [p[k]["tokens"] / p[k]["wall"] for p in pairs] for k in ("off", "on")}
        p50 = {k: [statistics.median(p[k]["itl"]) for p in pairs] for k in ("off", "on")}
        p99 = {k: [sorted(p[k]["itl"])[int(0.99 * (len(p[k]["itl"]) - 1))] for p in pairs] for k in ("off", "on")}
        c = args.concurrency or DEFAULT_CONCURRENCY[model]
        lines.append(f"{model} ({c} concurrent, {args.prompt_tokens} prompt + {args.max_tokens} generated tokens):")
        lines.append(f"  tokens/s   off {statistics.median(tps['off']):8.1f}  on {statistics.median(tps['on']):8.1f}"
                     f"  cost (off/on) {_spread([a / b for a, b in zip(tps['off'], tps['on'])])}")
        for name, d in (("ITL p50 ms", p50), ("ITL p99 ms", p99)):
            lines.append(f"  {name} off {1e3 * statistics.median(d['off']):8.2f}  on "
                         f"{1e3 * statistics.median(d['on']):8.2f}  ratio (on/off) "
                         f"{_spread([b / a for a, b in zip(d['off'], d['on'])])}")
    lines.append(f"  tap counters (last pair): {pairs[-1]['on'].get('tap')}")
    return lines


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="tiny,small,minilm")
    p.add_argument("--pairs", type=int, default=5)
    p.add_argument("--concurrency", type=int, default=None,
                   help="concurrent requests (default: tiny 64, small 16, minilm 64 texts per call)")
    p.add_argument("--prompt-tokens", type=int, default=64)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--embed-texts", type=int, default=512)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    p.add_argument("--tap", choices=["on", "off"], help=argparse.SUPPRESS)
    p.add_argument("--sidecar", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child(args)
        return
    if args.pairs < 1:
        p.error("--pairs: expected an integer >= 1")

    from eigenwatch.monitor.cli.processes import SidecarProcess

    sidecar = SidecarProcess(["--listen", "127.0.0.1:0", "--metrics-port", "-1"]).start()
    try:
        print(f"bench_overhead: {os.cpu_count()} CPUs, {args.pairs} interleaved pairs per model, vLLM default "
              f"compiled mode; the sidecar runs on the same machine", flush=True)
        for model in [m.strip() for m in args.models.split(",") if m.strip()]:
            for line in compare(args, model, sidecar):
                print(line, flush=True)
    finally:
        sidecar.stop()


if __name__ == "__main__":
    main()
