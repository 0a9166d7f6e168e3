"""Smoke test of the alignment benchmark: every arm trains and is scored on the same held-out pairs."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench" / "bench_alignment.py"


@pytest.fixture(scope="module")
def result():
    spec = importlib.util.spec_from_file_location("bench_alignment", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_alignment"] = module
    spec.loader.exec_module(module)
    config = dataclasses.replace(module.TINY, sft_rounds=1, dpo_rounds=1, local_steps=2, train_per_site=16,
                                 pairs_per_site=16, test_per_task=2, test_pairs_per_task=4, dp_pair_batch_size=8,
                                 max_new_tokens=3)
    return module.run(tiny=True, config=config)


def test_every_arm_is_scored_and_the_goals_are_computed_from_them(result):
    # Assert
    json.dumps(result)  # one JSON object
    arms = result["arms"]
    assert set(arms) == {"base", "sft", "federated_dpo", "central_dpo", "federated_dpo_dp", "central_dpo_dp"}
    for figures in arms.values():
        assert {"preference_accuracy", "reward_margin", "eval_loss", "accuracy", "seconds"} <= set(figures)
    # The base model is its own reference: every held-out pair a tie.
    assert (arms["base"]["preference_accuracy"], arms["base"]["reward_margin"]) == (0.5, 0.0)
    gain = arms["federated_dpo"]["preference_accuracy"] - arms["sft"]["preference_accuracy"]
    assert result["goals"]["no_dp"]["gain_points_over_sft"] == round(100 * gain, 2)
    assert result["goals"]["no_dp"]["gain_points_met"] == (gain * 100 >= 20)


def test_each_dp_arm_spends_what_it_planned_and_no_more_than_epsilon_8(result):
    # Assert: every site's accountant and the central one counted exactly the planned steps.
    privacy = result["privacy"]
    assert set(privacy) == {"site-1", "site-2", "site-3", "central"}
    for plan in privacy.values():
        assert plan["spent_epsilon"] == pytest.approx(plan["planned_epsilon"], rel=1e-6)
        assert plan["spent_epsilon"] <= 8.0
