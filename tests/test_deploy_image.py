"""The sidecar image's Dockerfile: hadolint passes it, and its steps, run here
without a container daemon, give a sidecar that starts and answers health.

No docker/buildah here, so the test plays the Dockerfile itself: each stage gets
its own directory as its root, COPY and WORKDIR map into it, ENV applies, and the
stages' `pip` RUN steps run verbatim in a fresh virtualenv per stage (python:3.11
stands in for the base image; the system-user step is the one RUN not run).
Packages come from a local wheelhouse (PIP_FIND_LINKS + PIP_NO_INDEX, filled from
pip's cache) so the test needs no network. Then ENTRYPOINT starts the sidecar as
`docker run IMAGE --listen ...` would, and the HEALTHCHECK command runs verbatim."""

import fnmatch
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
import venv
from importlib.metadata import version
from pathlib import Path

import pytest

from eigenwatch.monitor.cli.processes import READY

REPO = Path(__file__).resolve().parents[1]
HADOLINT = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
SYSTEM_STEPS = ("groupadd ", "useradd ")  # the non-root user: system state, not run on this machine


def instructions(text: str):
    """(INSTRUCTION, arguments) per Dockerfile line, continuations joined, comments dropped."""
    lines, buf = [], ""
    for raw in text.splitlines():
        if raw.lstrip().startswith("#") and not buf:
            continue
        if raw.rstrip().endswith("\\"):
            buf += raw.rstrip()[:-1] + " "
            continue
        buf += raw
        if buf.strip():
            word, _, rest = buf.strip().partition(" ")
            lines.append((word.upper(), rest.strip()))
        buf = ""
    return lines


def dockerignore_filter(patterns):
    def ignore(directory, names):
        rel_dir = Path(directory).relative_to(REPO)
        out = []
        for n in names:
            rel = (rel_dir / n).as_posix()
            for p in patterns:
                if fnmatch.fnmatch(rel, p) or (p.startswith("**/") and fnmatch.fnmatch(n, p[3:])):
                    out.append(n)
                    break
        return out
    return ignore


def exec_form(args: str) -> list[str]:
    return json.loads(args)


@pytest.fixture(scope="module")
def wheelhouse(tmp_path_factory):
    """Build requirements (pyproject's [build-system]) and the sidecar's runtime, as wheels."""
    house = tmp_path_factory.mktemp("wheelhouse")
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    build = project["build-system"]["requires"]
    runtime = [re.split(r"[<>=!~;\[ ]", d, maxsplit=1)[0] for d in project["project"]["dependencies"]]
    pins = [f"{n}=={version(n)}" for n in runtime]  # this environment's versions: served from pip's cache
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "-w", str(house), *build, *pins], check=True)
    return house


def test_dockerfile_passes_hadolint():
    out = subprocess.run([HADOLINT, "--failure-threshold", "style", str(REPO / "Dockerfile")],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def test_dockerfile_steps_give_a_torch_free_sidecar_that_answers_health(wheelhouse, tmp_path):
    from grpc_health.v1 import health_pb2, health_pb2_grpc  # noqa: F401  (the healthcheck's imports, here too)

    steps = instructions((REPO / "Dockerfile").read_text())
    ignore = dockerignore_filter([p.strip() for p in (REPO / ".dockerignore").read_text().splitlines()
                                  if p.strip() and not p.startswith("#")])
    stages, stage, skipped = {}, None, []
    for word, args in steps:
        if word == "FROM":
            base, _, name = args.partition(" AS ")
            assert re.fullmatch(r"python:3\.\d+-slim-\w+", base.strip()), base  # a pinned, small base
            root = tmp_path / (name.strip() or f"stage{len(stages)}")
            env_dir = root / ".venv"
            venv.EnvBuilder(with_pip=True).create(env_dir)
            stage = {"root": root, "cwd": root, "env": {}, "venv": env_dir}
            stages[name.strip() or "final"] = stage
        elif word == "WORKDIR":
            stage["cwd"] = stage["root"] / args.lstrip("/")
            stage["cwd"].mkdir(parents=True, exist_ok=True)
        elif word == "ENV":
            for item in shlex.split(args):
                k, _, v = item.partition("=")
                stage["env"][k] = v
        elif word == "COPY":
            parts = args.split()
            src_root, parts = REPO, parts
            if parts[0].startswith("--from="):
                src_root, parts = stages[parts[0].split("=", 1)[1]]["root"], parts[1:]
            src, dst = parts
            src_path = src_root / src.lstrip("/") if src_root is not REPO else REPO / src
            dst_path = stage["cwd"] / dst if not dst.startswith("/") else stage["root"] / dst.lstrip("/")
            shutil.copytree(src_path, dst_path, dirs_exist_ok=True,
                            ignore=ignore if src_root is REPO else None, symlinks=True)
        elif word == "RUN":
            if args.startswith(SYSTEM_STEPS):
                skipped.append(args)
                continue
            env = {**os.environ, **stage["env"], "PATH": f"{stage['venv'] / 'bin'}:{os.environ['PATH']}",
                   "PIP_NO_INDEX": "1", "PIP_FIND_LINKS": str(wheelhouse), "VIRTUAL_ENV": str(stage["venv"])}
            env.pop("PYTHONPATH", None)
            out = subprocess.run(["bash", "-c", args], cwd=stage["cwd"], env=env, capture_output=True, text=True)
            assert out.returncode == 0, f"RUN {args}\n{out.stdout}{out.stderr}"
        else:
            stage.setdefault(word, args)
    assert len(skipped) == 1 and "useradd" in skipped[0]

    final = stages["final"]
    assert final["USER"].split(":")[0] not in ("", "0", "root")  # non-root
    env = {**os.environ, **final["env"], "PATH": f"{final['venv'] / 'bin'}:{os.environ['PATH']}"}
    env.pop("PYTHONPATH", None)
    py = str(final["venv"] / "bin" / "python")
    for banned in ("torch", "vllm"):  # small: the wheel and its runtime only
        assert subprocess.run([py, "-c", f"import {banned}"], capture_output=True, cwd=tmp_path).returncode != 0

    # `docker run IMAGE --listen 127.0.0.1:0 --metrics-port 0`: the ENTRYPOINT with new arguments.
    cmd = exec_form(final["ENTRYPOINT"]) + ["--listen", "127.0.0.1:0", "--metrics-port", "0"]
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        lines = []
        for line in proc.stdout:
            lines.append(line)
            if m := READY.search(line):
                grpc_target = m.group(1)
                break
        else:
            pytest.fail("the image's sidecar exited before READY:\n" + "".join(lines[-30:]))
        health = final["HEALTHCHECK"]
        check = exec_form(health[health.index("CMD") + 3:].strip())
        env["EIGENWATCH_HEALTH_TARGET"] = grpc_target
        ok = subprocess.run(check, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=30)
        assert ok.returncode == 0, ok.stdout + ok.stderr
    finally:
        proc.terminate()
        proc.wait(10)
    down = subprocess.run(check, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=30)
    assert down.returncode != 0  # the healthcheck fails once nothing answers
