"""The job result: each round reports the evaluation of the adapter that round produced."""

from __future__ import annotations

import json

import torch

from zenfed.server.aggregation import PlainAggregation
from zenfed.server.result import (
    RESULT_FILE,
    build_result,
    round_record,
    round_summary,
    shift_evaluations,
)

PLAIN = PlainAggregation(method="fedavg", weight_of=lambda num_examples: 1.0)


def site(train_loss, eval_loss, accuracy, examples=10):
    return {
        "train_loss": train_loss,
        "eval_loss": eval_loss,
        "accuracy": accuracy,
        "eval_examples": examples,
    }


# Sites evaluate the adapter they receive: round 1's answers score the initial adapter,
# round 2's score round 1's result, and the final evaluation scores round 2's result.
HISTORY = [
    {
        "round": 1,
        "eval_loss": 5.0,
        "accuracy": 0.0,
        "evaluated_round": 0,
        "sites": {"a": site(4.0, 5.1, 0.0), "b": site(4.2, 4.9, 0.0)},
    },
    {
        "round": 2,
        "eval_loss": 3.0,
        "accuracy": 0.2,
        "evaluated_round": 1,
        "sites": {"a": site(2.5, 3.1, 0.2), "b": site(2.7, 2.9, 0.2)},
    },
]
FINAL = {"eval_loss": 2.0, "accuracy": 0.5}
FINAL_SITES = {
    "a": {"eval_loss": 2.1, "accuracy": 0.4, "eval_examples": 10},
    "b": {"eval_loss": 1.9, "accuracy": 0.6, "eval_examples": 10},
}


def test_evaluations_move_to_the_round_whose_adapter_they_scored():
    # Execute
    rounds = shift_evaluations(HISTORY, FINAL, FINAL_SITES)

    # Assert
    assert [(r["round"], r["evaluated_round"], r["eval_loss"], r["accuracy"]) for r in rounds] == [
        (1, 1, 3.0, 0.2),
        (2, 2, 2.0, 0.5),
    ]
    assert rounds[0]["sites"]["a"]["eval_loss"] == 3.1 and rounds[1]["sites"]["b"]["accuracy"] == 0.6


def test_training_figures_stay_with_their_round():
    # Execute
    rounds = shift_evaluations(HISTORY, FINAL, FINAL_SITES)

    # Assert
    assert [r["sites"]["a"]["train_loss"] for r in rounds] == [4.0, 2.5]
    assert HISTORY[0]["eval_loss"] == 5.0  # the input history is not modified


def test_build_result_writes_the_released_adapter_and_the_json(tmp_path):
    # Prepare
    import torch

    from zenfed.spec import JobSpec

    spec = JobSpec(name="result-test", lora={"rank": 2, "target_modules": ["q_proj"]})
    adapter = {
        "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.ones(2, 8),
        "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight": torch.zeros(8, 2),
    }

    # Execute
    result = build_result(
        spec=spec,
        job_id="job-1",
        out_dir=tmp_path,
        history=HISTORY,
        final_eval=FINAL,
        final_sites=FINAL_SITES,
        released=adapter,
        global_sha256="ab" * 32,
        aggregation="fedavg",
        base_model_sha256=None,
    )

    # Assert
    on_disk = json.loads((tmp_path / RESULT_FILE).read_text())
    assert on_disk == result
    assert result["baseline"] == {"eval_loss": 5.0, "accuracy": 0.0}
    assert result["final"]["eval_loss"] == 2.0 and result["final"]["adapter_dir"] == "adapter"
    assert result["job"]["spec_hash"] == spec.spec_hash()
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["r"] == 2 and config["target_modules"] == ["q_proj"]
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()


def test_build_result_without_a_release_writes_no_adapter(tmp_path):
    # Prepare
    from zenfed.spec import JobSpec

    # Execute
    result = build_result(
        spec=JobSpec(name="no-release"),
        job_id="job-2",
        out_dir=tmp_path,
        history=HISTORY,
        final_eval=FINAL,
        final_sites=FINAL_SITES,
        released=None,
        global_sha256="cd" * 32,
        aggregation="fedavg",
        base_model_sha256=None,
    )

    # Assert
    assert result["final"]["adapter_dir"] is None and result["final"]["adapter_sha256"] is None
    assert not (tmp_path / "adapter").exists()
    assert (tmp_path / RESULT_FILE).is_file()


def test_a_round_of_sites_under_dp_has_no_training_loss_and_its_summary_says_why():
    # Prepare: two sites answered with evaluations but, under DP, without training losses.
    sites = {name: {k: v for k, v in site(0.0, loss, 0.5).items() if k != "train_loss"}
             for name, loss in (("a", 1.0), ("b", 3.0))}
    sites["b"]["eval_examples"] = 30

    # Act
    entry = round_record(2, 0.0, PLAIN, sites, new_global={"lora_B": torch.zeros(2, 2)})

    # Assert: the evaluation is weighted by examples; the training loss is absent, not zero.
    assert entry["eval_loss"] == (1.0 * 10 + 3.0 * 30) / 40 and entry["train_loss"] is None
    assert "train loss withheld (DP)" in round_summary(entry)
