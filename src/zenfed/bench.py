"""``zenfed bench NAME``: run a benchmark from the source checkout's ``bench/`` folder.

Benchmarks live beside the tests, not in the installed package; each module
``bench/bench_NAME.py`` exposes ``run(*, tiny: bool) -> dict``.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from typing import Any

from zenfed.errors import ZenfedError

BENCH_DIR = Path(__file__).resolve().parents[2] / "bench"


def run_benchmark(name: str, *, tiny: bool, bench_dir: Path = BENCH_DIR) -> dict[str, Any]:
    """Run ``bench/bench_NAME.py``'s ``run`` and return its JSON-able result.

    Raises:
        ZenfedError: If the benchmark does not exist in this checkout.
    """
    path = bench_dir / f"bench_{name}.py"
    if not path.is_file():
        raise ZenfedError(f"benchmark {name!r} not found at {path}; benchmarks run from a source checkout")
    spec = importlib.util.spec_from_file_location(f"zenfed_bench_{name}", path)
    if spec is None or spec.loader is None:
        raise ZenfedError(f"cannot load {path}")
    module = importlib.util.module_from_spec(spec)
    # Registered first: dataclasses (and pickling-free introspection) look their module up by name.
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    result: dict[str, Any] = module.run(tiny=tiny)
    return result
