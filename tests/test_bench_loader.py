from pathlib import Path

import pytest

from zenfed.bench import run_benchmark
from zenfed.errors import ZenfedError


def test_a_benchmark_module_with_dataclasses_loads_and_runs(tmp_path: Path) -> None:
    # Prepare: a benchmark shaped like bench/bench_quality.py (postponed annotations + a dataclass).
    (tmp_path / "bench_probe.py").write_text(
        "from __future__ import annotations\n"
        "from dataclasses import dataclass\n\n"
        "@dataclass(frozen=True)\nclass Config:\n    steps: int\n\n"
        "def run(*, tiny: bool) -> dict:\n    return {'tiny': tiny, 'steps': Config(steps=3).steps}\n"
    )
    # Execute / Assert
    assert run_benchmark("probe", tiny=True, bench_dir=tmp_path) == {"tiny": True, "steps": 3}


def test_an_unknown_benchmark_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ZenfedError, match="not found"):
        run_benchmark("nothing", tiny=True, bench_dir=tmp_path)
