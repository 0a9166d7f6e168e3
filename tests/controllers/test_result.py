"""The job result: each round reports the evaluation of the adapter that round produced."""

from __future__ import annotations

import json

from zenfed.controllers.result import RESULT_FILE, shift_evaluations, write_result


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
    assert (
        rounds[0]["sites"]["a"]["eval_loss"] == 3.1 and rounds[1]["sites"]["b"]["accuracy"] == 0.6
    )


def test_training_figures_stay_with_their_round():
    # Execute
    rounds = shift_evaluations(HISTORY, FINAL, FINAL_SITES)

    # Assert
    assert [r["sites"]["a"]["train_loss"] for r in rounds] == [4.0, 2.5]
    assert HISTORY[0]["eval_loss"] == 5.0  # the input history is not modified


def test_write_result_writes_json(tmp_path):
    # Execute
    path = write_result(tmp_path, {"rounds": []})

    # Assert
    assert path == tmp_path / RESULT_FILE
    assert json.loads(path.read_text()) == {"rounds": []}
