"""Smoke test of the algorithms benchmark: every arm runs through the real round code and is reported."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench" / "bench_algorithms.py"


def _bench():
    """The benchmark module, loaded once (its dataclasses need it registered in sys.modules)."""
    if "bench_algorithms" not in sys.modules:
        spec = importlib.util.spec_from_file_location("bench_algorithms", BENCH)
        module = importlib.util.module_from_spec(spec)
        sys.modules["bench_algorithms"] = module
        spec.loader.exec_module(module)
    return sys.modules["bench_algorithms"]


@pytest.fixture(scope="module")
def result():
    module = _bench()
    config = dataclasses.replace(module.TINY, rounds=1, local_steps=1, batch_size=2, train_per_site=12,
                                 test_per_task=2, max_new_tokens=3, skews=(0.98,), dp_seeds=(0, 1), dp_rounds=1,
                                 dp_local_steps=1, dp_batch_size=4, dp_train_per_site=12, dp_test_per_task=2)
    return module.run(tiny=True, config=config)


def test_every_arm_is_reported_with_its_figures(result):
    # Assert
    json.dumps(result)  # one JSON object
    block = result["blocks"][0]
    assert block["skew"] == 0.98 and set(block["arms"]) == {
        "fedavg", "fedprox", "fedadam", "scaffold", "ffa_lora", "ffa_lora_ranks", "flexlora_ranks", "personal"}
    for figures in block["arms"].values():
        assert {"eval_loss", "accuracy", "own_task_accuracy", "bytes_per_site_round", "seconds"} <= set(figures)
        assert sorted(figures["own_task_accuracy"]) == ["site-1", "site-2", "site-3"]


def test_the_bytes_follow_what_each_algorithm_sends(result):
    # Assert: FFA-LoRA sends B only; SCAFFOLD sends a control change beside every tensor
    arms = result["blocks"][0]["arms"]
    assert arms["ffa_lora"]["bytes_per_site_round"] < 0.6 * arms["fedavg"]["bytes_per_site_round"]
    assert arms["scaffold"]["bytes_per_site_round"] > 1.9 * arms["fedavg"]["bytes_per_site_round"]
    # FlexLoRA sends d_out x d_in per module: more than both factors at this width and rank
    assert arms["flexlora_ranks"]["bytes_per_site_round"] > 1.5 * arms["fedavg"]["bytes_per_site_round"]
    assert result["blocks"][0]["flexlora_ranks_vs_full_rank_accuracy"] is not None


def test_the_dp_comparison_runs_both_strategies_at_the_budget_over_the_seeds(result):
    # Assert: every run spent (almost) the whole epsilon at every site; the spread is over the seeds.
    dp = result["dp_comparison"]
    assert dp["epsilon"] == 8.0 and dp["seeds"] == [0, 1] and set(dp["arms"]) == {"fedavg", "ffa_lora"}
    for arm in dp["arms"].values():
        assert [run["seed"] for run in arm["runs"]] == [0, 1]
        for run in arm["runs"]:
            assert sorted(run["epsilon_spent"]) == ["site-1", "site-2", "site-3"]
            assert all(7.0 < spent <= 8.0 for spent in run["epsilon_spent"].values())
        assert arm["accuracy_spread"] >= 0


def test_personal_layers_are_compared_with_each_site_training_alone(result):
    # Assert: `local` trained each site alone; the goal's figure is personal's own-task accuracy minus it
    block = result["blocks"][0]
    local = block["local"]["own_task_accuracy"]
    personal = block["arms"]["personal"]["own_task_accuracy"]
    assert sorted(local) == ["site-1", "site-2", "site-3"]
    assert block["personal_vs_local_own_task_accuracy"] == {
        site: round(personal[site] - local[site], 4) for site in local}
    assert block["central"]["accuracy"] >= 0 and block["best_arm"] in block["arms"]
    assert block["best_arm_by_eval_loss"] in block["arms"]
    assert result["config"]["personal_layers"] == [1]  # the top quarter of 2 layers, at least one


def test_a_stopped_run_resumes_after_its_last_finished_arm(tmp_path):
    # Prepare
    module = _bench()
    path = tmp_path / "progress.json"
    calls = []

    def work(figure):
        def compute():
            calls.append(figure)
            return {"accuracy": figure}
        return compute

    first = module.Progress(path, {"rounds": 16})
    first.run("skew-0.98/fedavg", work(0.5))

    # Execute: a new process with the same file and configuration
    again = module.Progress(path, {"rounds": 16})
    resumed = again.run("skew-0.98/fedavg", work(0.9))
    added = again.run("skew-0.98/scaffold", work(0.6))

    # Assert: the finished arm is not run again; a new one is, and both are kept
    assert resumed == {"accuracy": 0.5} and added == {"accuracy": 0.6} and calls == [0.5, 0.6]
    assert json.loads(path.read_text())["done"] == {"skew-0.98/fedavg": {"accuracy": 0.5},
                                                     "skew-0.98/scaffold": {"accuracy": 0.6}}
    assert not list(tmp_path.glob("*.partial"))

    # Assert: another configuration, or a damaged file, is refused rather than mixed in
    with pytest.raises(SystemExit, match="another configuration"):
        module.Progress(path, {"rounds": 8})
    path.write_text('{"config": ')
    with pytest.raises(SystemExit, match="not a progress file"):
        module.Progress(path, {"rounds": 16})


def test_the_gap_goal_is_computed_on_accuracy_and_on_eval_loss():
    # Prepare: FedAvg 0.1 below central in accuracy; SCAFFOLD 0.08 above FedAvg, FedProx best on loss
    module = _bench()
    arms = {"fedavg": {"accuracy": 0.6, "eval_loss": 1.0}, "scaffold": {"accuracy": 0.68, "eval_loss": 0.8},
            "fedprox": {"accuracy": 0.62, "eval_loss": 0.7}}

    # Execute
    block = module._block(0.98, arms, {"accuracy": 0.7, "eval_loss": 0.5}, None)

    # Assert: shares of the gap closed by the best arm on each measure
    assert block["best_arm"] == "scaffold" and block["best_closes_gap_share"] == pytest.approx(0.8)
    assert block["best_arm_by_eval_loss"] == "fedprox"
    assert block["best_closes_eval_loss_gap_share"] == pytest.approx(0.6)

    # Assert: no central baseline, no share; central no better than FedAvg, no share either
    assert module._block(0.98, arms, None, None)["best_closes_eval_loss_gap_share"] is None
    assert module._block(0.98, arms, {"accuracy": 0.5, "eval_loss": 1.5}, None)["best_closes_gap_share"] is None
