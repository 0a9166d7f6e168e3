"""Smoke test of the GPU benchmark on this CPU: every arm is measured or reported with its error."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench" / "bench_gpu.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_gpu", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_gpu"] = module
    spec.loader.exec_module(module)
    return module


def test_training_arms_are_timed_side_by_side_and_a_failing_arm_is_reported(bench):
    # Prepare: PEFT only, and an fp16 arm this CPU cannot run.
    config = dataclasses.replace(bench.TINY, engines=("peft",), precisions=("fp32", "bf16", "fp16-mixed"),
                                 batches=(4,), steps=1)

    # Execute
    result = bench.run(tiny=True, device="cpu", sections=("training",), config=config, say=lambda text: None)

    # Assert
    json.dumps(result)
    rows = {(r["precision"], r.get("dp")): r for r in result["training"]}
    # No upper bound on mfu here: on a CPU, fp32 training can outrun the bf16 matrix rate it is divided by.
    for key in (("fp32", False), ("fp32", True), ("bf16", False), ("bf16", True)):
        assert rows[key]["tokens_per_s"] > 0 and rows[key]["peak_mib"] > 0 and rows[key]["mfu"] > 0
    assert "fp16-mixed needs a CUDA device" in rows[("fp16-mixed", None)]["error"]
    bf16 = next(r for r in result["ratios"] if r["precision"] == "bf16" and not r["dp"])
    assert bf16["bf16_over_fp32_speed"] > 0 and "bf16_over_fp32_memory" not in bf16  # no memory ratio on a CPU
    assert result["device"]["kind"] == "cpu" and result["matmul"]["bf16_flops"] > 0


def test_the_privacy_arm_spends_the_budget_it_names(bench):
    # Prepare
    config = dataclasses.replace(bench.TINY, privacy_records=40, privacy_batch=8, privacy_rounds=1,
                                 privacy_steps=1, privacy_test_per_task=1)

    # Execute
    result = bench.run(tiny=True, device="cpu", sections=("privacy",), config=config, say=lambda text: None)

    # Assert
    privacy = result["privacy_at_scale"]
    assert privacy["records_per_site"] == 40 and privacy["expected_batch"] == 8
    assert all(7.5 < spent <= 8.0 for spent in privacy["epsilon_8"]["epsilon_spent"].values())
    assert privacy["no_dp"]["eval_loss"] > 0
