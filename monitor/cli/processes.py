"""Child processes the CLI starts: the sidecar (waiting for its READY line)
and the environment that turns the tap on in a vLLM server. torch-free."""

from __future__ import annotations

import os
import queue
import re
import subprocess
import sys
import threading

READY = re.compile(r"eigenwatch sidecar READY grpc=(\S+) metrics=(\S+)")


class SidecarProcess:
    """`eigenwatch sidecar` in a child process; waits for its READY line."""

    def __init__(self, args: list[str], env: dict | None = None, echo: bool = False):
        self.args = args
        self.env = env
        self.echo = echo
        self.proc: subprocess.Popen | None = None
        self.grpc: str | None = None
        self.metrics: str | None = None
        self.lines: list[str] = []

    def start(self, timeout: float = 60.0) -> "SidecarProcess":
        cmd = [sys.executable, "-m", "eigenwatch.monitor.cli", "sidecar", *self.args]
        self.proc = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=self.env, bufsize=1
        )
        ready: queue.Queue = queue.Queue()

        def pump():
            for line in self.proc.stdout:
                self.lines.append(line.rstrip())
                if len(self.lines) > 2000:
                    del self.lines[:1000]
                m = READY.search(line)
                if m:
                    ready.put(m.groups())
                elif self.echo:
                    sys.stderr.write("[sidecar] " + line)
            ready.put(None)

        threading.Thread(target=pump, daemon=True, name="sidecar-stdout").start()
        try:
            got = ready.get(timeout=timeout)
        except queue.Empty:
            got = None
        if got is None:
            self.stop()
            raise RuntimeError("the sidecar did not start:\n" + "\n".join(self.lines[-30:]))
        self.grpc, self.metrics = got
        return self

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout: float = 10.0) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def tap_env(sidecar_addr: str, *, layers: str | None = None, window: int | None = None,
            stride: int | None = None, default: str | None = None, model_name: str | None = None,
            proj_dim: int | None = None) -> dict:
    """This process's environment plus the tap's settings (hooks/config.py reads them)."""
    env = dict(os.environ)
    env["EIGENWATCH_ENABLE"] = "1"
    env["EIGENWATCH_SIDECAR"] = sidecar_addr
    for key, value in (("LAYERS", layers), ("WINDOW", window), ("STRIDE", stride),
                       ("DEFAULT", default), ("MODEL_NAME", model_name), ("PROJ_DIM", proj_dim)):
        if value is not None and value != "":
            env["EIGENWATCH_" + key] = str(value)
    # vLLM on CPU needs a KV-cache size; 1 GiB is plenty for small models.
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    return env
