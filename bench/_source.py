"""Import `eigenwatch.kernels` (and, for the tap's own per-step code,
`eigenwatch.hooks`) straight from this checkout when eigenwatch is not
installed (the GPU machine has torch and triton, not eigenwatch or its gRPC
stubs): the benchmarks and the device checks run from a bare tree. kernels/
imports nothing else of ours; hooks/ imports nothing on import, and
hooks.hidden needs only kernels/, torch and numpy."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def ensure_kernels() -> None:
    try:
        import eigenwatch.kernels  # noqa: F401  (installed: nothing to do)
        return
    except ImportError:
        pass
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))  # the repo's eigenwatch/ (version only) is the parent package
    import eigenwatch

    spec = importlib.util.spec_from_file_location("eigenwatch.kernels", ROOT / "kernels" / "__init__.py",
                                                  submodule_search_locations=[str(ROOT / "kernels")])
    module = importlib.util.module_from_spec(spec)
    sys.modules["eigenwatch.kernels"] = module
    spec.loader.exec_module(module)
    eigenwatch.kernels = module


def ensure_hooks() -> None:
    """`eigenwatch.hooks` from this checkout (after the kernels) when not installed; import
    only its torch-only modules (hooks.hidden), never the vLLM or gRPC ones."""
    ensure_kernels()
    try:
        import eigenwatch.hooks  # noqa: F401
        return
    except ImportError:
        pass
    import eigenwatch

    spec = importlib.util.spec_from_file_location("eigenwatch.hooks", ROOT / "hooks" / "__init__.py",
                                                  submodule_search_locations=[str(ROOT / "hooks")])
    module = importlib.util.module_from_spec(spec)
    sys.modules["eigenwatch.hooks"] = module
    spec.loader.exec_module(module)
    eigenwatch.hooks = module
