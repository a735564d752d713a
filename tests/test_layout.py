"""The package's shape, read from the source (the `ast` of every module, lazy
imports inside functions included): no import cycles, imports only along the
dependency direction of DESIGN.md (kernels <- hooks <- monitor), vLLM only in
the private modules of hooks/, a sidecar import closure without torch or vLLM,
and a docstring opening every module. The README's layout lists the tree."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = {"kernels": "eigenwatch.kernels", "hooks": "eigenwatch.hooks", "monitor": "eigenwatch.monitor"}
VLLM_MODULES = {"eigenwatch.hooks.plugin", "eigenwatch.hooks._vllm_worker", "eigenwatch.hooks._vllm_engine"}


def _modules() -> dict[str, Path]:
    out = {"eigenwatch": ROOT / "eigenwatch" / "__init__.py"}
    for folder, package in FOLDERS.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            rel = path.relative_to(ROOT / folder).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            out[".".join([package, *parts])] = path
    return out


MODULES = _modules()


def _is_package(name: str) -> bool:
    return MODULES[name].name == "__init__.py"


def _imports(name: str) -> list[tuple[str, int, bool]]:
    """(imported module, line, at module level) for every import in `name`'s source;
    `from pkg import sub` counts as importing pkg.sub when that is a module of ours."""
    tree = ast.parse(MODULES[name].read_text(), str(MODULES[name]))
    package = name if _is_package(name) else name.rsplit(".", 1)[0]
    top = {id(n) for n in tree.body}
    out = []
    for node in ast.walk(tree):
        module_level = id(node) in top
        if isinstance(node, ast.Import):
            out += [(a.name, node.lineno, module_level) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = ".".join(base[: len(base) - node.level + 1])
                base = f"{base}.{node.module}" if node.module else base
            else:
                base = node.module
            for a in node.names:
                sub = f"{base}.{a.name}"
                out.append((sub if sub in MODULES else base, node.lineno, module_level))
    return out


def _ours(target: str) -> str | None:
    """The module of ours `target` names (or lies in), None for third-party imports."""
    while target:
        if target in MODULES:
            return target
        target = target.rpartition(".")[0]
    return None


def _layer(name: str) -> str:
    for package in FOLDERS.values():
        if name == package or name.startswith(package + "."):
            return package
    return name


ALLOWED = {  # what each layer may import of ours (eigenwatch.v1: the generated stubs)
    "eigenwatch.kernels": {"eigenwatch.kernels"},
    "eigenwatch.hooks": {"eigenwatch.kernels", "eigenwatch.hooks", "eigenwatch.v1"},
    "eigenwatch.monitor": {"eigenwatch.kernels", "eigenwatch.hooks", "eigenwatch.monitor", "eigenwatch.v1"},
    "eigenwatch": set(),
}


def test_imports_follow_the_dependency_direction():
    bad = []
    for name in MODULES:
        allowed = ALLOWED[_layer(name)]
        for target, line, _ in _imports(name):
            if target.startswith("eigenwatch.v1"):
                theirs = "eigenwatch.v1"
            elif target.startswith("eigenwatch"):
                theirs = _layer(_ours(target) or target)
            else:
                continue
            if theirs not in allowed:
                bad.append(f"{MODULES[name].relative_to(ROOT)}:{line}: {name} imports {target}")
    assert not bad, "imports against kernels <- hooks <- monitor:\n" + "\n".join(bad)


def test_vllm_only_in_the_private_modules_of_hooks():
    bad = [f"{MODULES[name].relative_to(ROOT)}:{line}: {target}"
           for name in MODULES if name not in VLLM_MODULES
           for target, line, _ in _imports(name) if target == "vllm" or target.startswith("vllm.")]
    assert not bad, "vLLM imported outside hooks/plugin.py, _vllm_worker.py, _vllm_engine.py:\n" + "\n".join(bad)
    # monitor/ reaches vLLM only through the in-process engine hooks/ provides
    bad = [f"{MODULES[name].relative_to(ROOT)}:{line}: {target}"
           for name in MODULES if _layer(name) == "eigenwatch.monitor"
           for target, line, _ in _imports(name)
           if _ours(target) in VLLM_MODULES - {"eigenwatch.hooks._vllm_engine"}]
    assert not bad, "monitor/ imports vLLM internals:\n" + "\n".join(bad)


def _graph(module_level_only: bool) -> dict[str, set[str]]:
    graph = {}
    for name in MODULES:
        edges = set()
        for target, _, top in _imports(name):
            ours = _ours(target)
            if ours and ours != name and (top or not module_level_only):
                edges.add(ours)
        graph[name] = edges
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the path, 2: done
    path: list[str] = []

    def visit(n):
        state[n] = 1
        path.append(n)
        for m in sorted(graph[n]):
            if state.get(m) == 1:
                return path[path.index(m):] + [m]
            if m not in state:
                found = visit(m)
                if found:
                    return found
        path.pop()
        state[n] = 2
        return None

    for n in sorted(graph):
        if n not in state:
            found = visit(n)
            if found:
                return found
    return None


def test_no_import_cycles_even_through_lazy_imports():
    cycle = _cycle(_graph(module_level_only=False))
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_cycle_finder_finds_a_planted_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a", "d"}, "d": set()}
    assert _cycle(graph) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


@pytest.mark.parametrize("entry", ["eigenwatch.monitor.sidecar.server", "eigenwatch.monitor.cli.main"])
def test_the_sidecar_import_closure_has_no_torch_or_vllm(entry):
    """What `eigenwatch sidecar` loads at import time (module-level imports,
    followed through our modules) never includes torch, transformers or vLLM."""
    graph = _graph(module_level_only=True)
    seen, todo, third = set(), [entry], {}
    while todo:
        n = todo.pop()
        if n in seen:
            continue
        seen.add(n)
        # importing a.b.c runs a/__init__ and a.b/__init__ too
        parent = n.rpartition(".")[0]
        while parent:
            if parent in MODULES:
                todo.append(parent)
            parent = parent.rpartition(".")[0]
        todo += graph[n]
        for target, line, top in _imports(n):
            if top and not target.startswith("eigenwatch"):
                third.setdefault(target.split(".")[0], f"{MODULES[n].relative_to(ROOT)}:{line}")
    heavy = {k: v for k, v in third.items() if k in ("torch", "transformers", "vllm", "triton", "matplotlib")}
    assert not heavy, f"{entry} imports at load time: {heavy}"


def test_every_module_opens_with_a_docstring():
    missing = [str(p.relative_to(ROOT)) for name, p in MODULES.items()
               if not ast.get_docstring(ast.parse(p.read_text()))]
    assert not missing, "modules without a docstring saying what they are for: " + ", ".join(missing)


def test_readme_layout_names_every_folder_and_module():
    """The README's layout section lists each source folder and each module in it."""
    readme = (ROOT / "README.md").read_text()
    section = re.search(r"## Layout\n(.*?)\n## ", readme, re.S)
    assert section, "README.md has no '## Layout' section"
    text = section.group(1)
    missing = []
    for name, path in MODULES.items():
        if name == "eigenwatch" or path.name == "__main__.py":
            continue
        stem = path.parent.name if path.name == "__init__.py" else path.stem
        if not re.search(rf"(?<![\w]){re.escape(stem)}(?![\w])", text):
            missing.append(str(path.relative_to(ROOT)))
    assert not missing, "README layout does not mention: " + ", ".join(missing)
