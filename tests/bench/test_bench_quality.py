"""Smoke test of the quality benchmark: the JSON it prints, on a very small configuration."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench" / "bench_quality.py"


@pytest.fixture(scope="module")
def bench_quality():
    spec = importlib.util.spec_from_file_location("bench_quality", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_quality"] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def small_result(bench_quality):
    config = dataclasses.replace(
        bench_quality.TINY, rounds=2, local_steps=1, batch_size=2, train_per_site=6,
        test_per_task=2, max_new_tokens=3, tiny_hidden=32, tiny_layers=1, tiny_vocab=400,
    )
    return bench_quality.run(tiny=True, sites=2, seed=1, config=config)


def _is_score(value: object) -> bool:
    return (
        isinstance(value, dict)
        and set(value) == {"eval_loss", "accuracy"}
        and math.isfinite(value["eval_loss"])
        and 0.0 <= value["accuracy"] <= 1.0
    )


def test_the_result_has_the_contract_keys_and_is_json(small_result):
    # Execute
    text = json.dumps(small_result, allow_nan=False)

    # Assert
    assert {"base", "central", "federated", "sites", "fed_gain_over_central", "config",
            "seconds"} <= set(json.loads(text))
    for arm in ("base", "central", "federated"):
        assert _is_score(small_result[arm]), arm


def test_every_site_is_scored_alone(small_result):
    # Assert
    assert [entry["site"] for entry in small_result["sites"]] == ["site-1", "site-2"]
    for entry in small_result["sites"]:
        assert _is_score({k: v for k, v in entry.items() if k != "site"})


def test_the_ratio_is_computed_from_the_reported_losses(small_result):
    # Prepare
    base = small_result["base"]["eval_loss"]
    expected = (base - small_result["federated"]["eval_loss"]) / (
        base - small_result["central"]["eval_loss"]
    )

    # Assert
    assert small_result["fed_gain_over_central"] == pytest.approx(expected, abs=1e-3)


def test_every_arm_gets_the_same_number_of_steps(small_result):
    # Prepare
    config = small_result["config"]

    # Assert: central and each site train as many steps as the whole federation.
    assert config["steps_per_arm"] == config["rounds"] * config["local_steps"] * config["sites"]
    assert config["steps_per_arm"] == 4
    assert config["test_examples"] == 6


def test_training_moves_every_arm_away_from_the_base(small_result):
    # Assert: loss is measured after training, not on the untouched initial adapter.
    base = small_result["base"]["eval_loss"]
    for arm in ("central", "federated"):
        assert small_result[arm]["eval_loss"] != base
    for entry in small_result["sites"]:
        assert entry["eval_loss"] != base
