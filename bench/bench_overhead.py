"""What monitoring costs a vLLM server: tap off vs tap on (with the sidecar
running on the same machine), interleaved A/B in one run.

    .venv/bin/python bench/bench_overhead.py [--models tiny,small,minilm] [--pairs 5] [--spectra sidecar,tap]
        [--sketch off,on [--sketch-every 4096 --sketch-sample 1]] [--hidden off,on]

Per model, engine processes with the same settings (vLLM's default compiled
mode): one without the tap and one with it per --spectra setting (where the
window spectra are computed: EIGENWATCH_SPECTRA) and --sketch setting (the
top-direction sketches of the drift detector: EIGENWATCH_SKETCH) and --hidden setting (the combined
score's hidden-state statistics, EIGENWATCH_CALIBRATION: the bench first runs `eigenwatch calibrate` on
--hidden-texts pydoc passages for the model, and hands the tap that file), each started once and kept
warm; the same load goes to each in turn, the order rotating every round, for
--pairs rounds, so drift in the machine's load hits all of them. Generate models (tiny: the demo's random
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
    tap = {"EIGENWATCH_SIDECAR": args.sidecar, "EIGENWATCH_MODEL_NAME": args.model,
           "EIGENWATCH_SPECTRA": args.spectra_at, "EIGENWATCH_SKETCH": args.sketch_on,
           "EIGENWATCH_SKETCH_EVERY": str(args.sketch_every), "EIGENWATCH_SKETCH_SAMPLE": str(args.sketch_sample)
           } if args.tap == "on" else {}
    if args.tap == "on" and args.calibration_file:
        off = json.loads(open(args.calibration_file).read())["offline"]
        tap.update(EIGENWATCH_CALIBRATION=args.calibration_file, EIGENWATCH_LAYERS=",".join(map(str, off["layers"])),
                   EIGENWATCH_WINDOW=str(off["window"]), EIGENWATCH_STRIDE=str(off["stride"]))
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
            res["tap"] = {k: st.get(k) for k in ("capture_path", "spectra_at", "frames_emitted", "frames_sent",
                                                 "frames_dropped", "hook_errors", "sketch", "hidden")}
        print("RESULT " + json.dumps(res), flush=True)
    engine.close()


class Server:
    def __init__(self, args, model: str, tap: str, sidecar: str, spectra_at: str = "auto", sketch: str = "off",
                 calibration: str = ""):
        cmd = [sys.executable, __file__, "--child", "--model", model, "--tap", tap, "--sidecar", sidecar,
               "--calibration-file", calibration,
               "--spectra-at", spectra_at, "--sketch-on", sketch, "--sketch-every", str(args.sketch_every),
               "--sketch-sample", str(args.sketch_sample),
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


def calibrate_for(model: str, n: int, folder: str) -> str:
    """CALIB.json for `model` from `eigenwatch calibrate` on n pydoc passages (the --hidden runs' file)."""
    import pydoc_data.topics as topics

    words = " ".join(topics.topics[k] for k in sorted(topics.topics)).split()
    texts = os.path.join(folder, f"{model}.jsonl")
    with open(texts, "w") as fh:
        for i in range(n):
            fh.write(json.dumps({"id": f"r{i}", "text": " ".join(words[i * 50:(i + 1) * 50])}) + "\n")
    out = os.path.join(folder, f"{model}.calib.json")
    subprocess.run([sys.executable, "-m", "eigenwatch.monitor.cli", "calibrate", "--model", model, "--texts", texts,
                    "--out", out], check=True, capture_output=True)
    return out


def compare(args, model: str, sidecar, folder: str) -> list[str]:
    """Tap off against tap on for each --spectra, --sketch and --hidden setting, in rotating order."""
    configs = {"off": Server(args, model, "off", "-")}
    calibration = calibrate_for(model, args.hidden_texts, folder) if "on" in args.hidden.split(",") else ""
    try:
        for where in args.spectra.split(","):
            for sketch in args.sketch.split(","):
                for hidden in args.hidden.split(","):
                    name = f"on/{where}" + ("+sketch" if sketch == "on" else "") + ("+hidden" if hidden == "on" else "")
                    configs[name] = Server(args, model, "on", sidecar.grpc, where, sketch,
                                           calibration if hidden == "on" else "")
        names = list(configs)
        pairs = []
        for i in range(args.pairs):
            order = names[i % len(names):] + names[:i % len(names)]
            pairs.append({name: configs[name].run() for name in order})
    finally:
        for srv in configs.values():
            srv.close()
    lines = []
    ons = [n for n in names if n != "off"]
    if "texts" in pairs[0]["off"]:
        rate = {k: [p[k]["texts"] / p[k]["wall"] for p in pairs] for k in names}
        lines.append(f"{model} (embeddings, {pairs[0]['off']['texts']} texts per run): texts/s off "
                     f"{statistics.median(rate['off']):.1f}")
        for k in ons:
            ratio = [a / b for a, b in zip(rate["off"], rate[k])]
            lines.append(f"  {k:12s} texts/s {statistics.median(rate[k]):8.1f}  cost (off/on) {_spread(ratio)}")
    else:
        tps = {k: [p[k]["tokens"] / p[k]["wall"] for p in pairs] for k in names}
        p50 = {k: [statistics.median(p[k]["itl"]) for p in pairs] for k in names}
        p99 = {k: [sorted(p[k]["itl"])[int(0.99 * (len(p[k]["itl"]) - 1))] for p in pairs] for k in names}
        c = args.concurrency or DEFAULT_CONCURRENCY[model]
        lines.append(f"{model} ({c} concurrent, {args.prompt_tokens} prompt + {args.max_tokens} generated tokens): "
                     f"off: {statistics.median(tps['off']):.1f} tokens/s, ITL p50 "
                     f"{1e3 * statistics.median(p50['off']):.2f} ms, p99 {1e3 * statistics.median(p99['off']):.2f} ms")
        for k in ons:
            lines.append(f"  {k:12s} tokens/s {statistics.median(tps[k]):8.1f}  cost (off/on) "
                         f"{_spread([a / b for a, b in zip(tps['off'], tps[k])])}")
            for name, d in (("ITL p50", p50), ("ITL p99", p99)):
                lines.append(f"  {'':12s} {name} {1e3 * statistics.median(d[k]):7.2f} ms  ratio (on/off) "
                             f"{_spread([b / a for a, b in zip(d['off'], d[k])])}")
    for k in ons:
        lines.append(f"  tap counters, {k} (last pair): {pairs[-1][k].get('tap')}")
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
    p.add_argument("--spectra", default="auto",
                   help="comma-separated EIGENWATCH_SPECTRA settings to run tap-on engines with (auto, sidecar, "
                        "tap); each is compared with tap off in the same rotation")
    p.add_argument("--sketch", default="off",
                   help="comma-separated EIGENWATCH_SKETCH settings for tap-on engines (off, on; 'off,on' compares "
                        "both in the same rotation)")
    p.add_argument("--sketch-every", type=int, default=4096, help="EIGENWATCH_SKETCH_EVERY (default %(default)s)")
    p.add_argument("--sketch-sample", type=int, default=1, help="EIGENWATCH_SKETCH_SAMPLE (default %(default)s)")
    p.add_argument("--hidden", default="off",
                   help="off,on: without / with the combined score's hidden-state statistics in the tap "
                        "(EIGENWATCH_CALIBRATION; default %(default)s)")
    p.add_argument("--hidden-texts", type=int, default=96, help="texts `calibrate` fits the --hidden file on")
    p.add_argument("--calibration-file", default="", help=argparse.SUPPRESS)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--sketch-on", default="off", help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    p.add_argument("--tap", choices=["on", "off"], help=argparse.SUPPRESS)
    p.add_argument("--sidecar", help=argparse.SUPPRESS)
    p.add_argument("--spectra-at", default="auto", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child(args)
        return
    if args.pairs < 1:
        p.error("--pairs: expected an integer >= 1")
    bad = [x for x in args.spectra.split(",") if x not in ("auto", "sidecar", "tap")]
    if bad:
        p.error(f"--spectra: expected a comma-separated list of auto, sidecar, tap; got {', '.join(bad)}")
    for flag, value in (("--sketch", args.sketch), ("--hidden", args.hidden)):
        bad = [x for x in value.split(",") if x not in ("on", "off")]
        if bad:
            p.error(f"{flag}: expected a comma-separated list of off, on; got {', '.join(bad)}")

    from eigenwatch.monitor.cli.processes import SidecarProcess

    sidecar = SidecarProcess(["--listen", "127.0.0.1:0", "--metrics-port", "-1"]).start()
    try:
        print(f"bench_overhead: {os.cpu_count()} CPUs, {args.pairs} interleaved pairs per model, vLLM default "
              f"compiled mode; the sidecar runs on the same machine at its default --nice", flush=True)
        import tempfile

        with tempfile.TemporaryDirectory() as folder:
            for model in [m.strip() for m in args.models.split(",") if m.strip()]:
                for line in compare(args, model, sidecar, folder):
                    print(line, flush=True)
    finally:
        sidecar.stop()


if __name__ == "__main__":
    main()
