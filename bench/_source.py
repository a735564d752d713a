"""Import `eigenwatch.kernels` straight from this checkout when eigenwatch is
not installed (the GPU machine has torch and triton, not eigenwatch or its
gRPC stubs): the benchmarks and the device checks run from a bare tree.
kernels/ imports nothing else of ours, so the folder alone is enough."""

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
