"""The per-round table `make demo` and `zenfed run` print."""

from __future__ import annotations

from zenfed.demo import print_round_table


def _result(*, dp: bool) -> dict:
    def site(loss: float, eps: float) -> dict:
        metrics: dict = {"eval_loss": loss + 0.5, "accuracy": 0.25}
        if dp:
            metrics["privacy"] = {"epsilon": eps}
        else:
            metrics["train_loss"] = loss
        return metrics

    return {"baseline": {"eval_loss": 3.0, "accuracy": 0.0},
            "rounds": [{"round": 1, "eval_loss": 2.0, "accuracy": 0.25, "train_loss": None if dp else 1.5,
                        "sites": {"site-1": site(1.25, 2.5), "site-2": site(1.75, 2.75)}}]}


def test_without_dp_the_table_shows_each_sites_training_loss(capsys):
    print_round_table(_result(dp=False))

    header, _, baseline, round1, *_ = capsys.readouterr().out.splitlines()
    assert "loss site-1" in header and "eps site-1" not in header
    assert round1.split() == ["1", "2.0000", "25.0%", "1.5000", "1.2500", "1.7500"]
    assert baseline.split()[:3] == ["0", "3.0000", "0.0%"]


def test_under_dp_the_table_shows_epsilon_and_says_the_training_loss_is_withheld(capsys):
    print_round_table(_result(dp=True))

    out = capsys.readouterr().out
    header, _, _, round1, *notes = out.splitlines()
    assert "train loss" not in header and "eps site-2" in header
    assert round1.split() == ["1", "2.0000", "25.0%", "2.500", "2.750"]
    assert any("epsilon does not cover it" in line for line in notes)


def test_a_dpo_job_shows_each_rounds_objective_and_preference_figures(capsys):
    # Prepare: round 1 SFT, round 2 DPO.
    result = {"baseline": {"eval_loss": 3.0, "accuracy": 0.0, "preference_accuracy": 0.5, "reward_margin": 0.0},
              "rounds": [{"round": 1, "objective": "sft", "eval_loss": 2.0, "accuracy": 0.25,
                          "preference_accuracy": 0.625, "reward_margin": 0.125, "sites": {}},
                         {"round": 2, "objective": "dpo", "eval_loss": 2.5, "accuracy": 0.25,
                          "preference_accuracy": 0.875, "reward_margin": 1.5, "sites": {}}]}

    # Execute
    print_round_table(result)

    # Assert
    header, _, baseline, round1, round2, legend = capsys.readouterr().out.splitlines()
    assert "pref acc" in header and "trained" in header
    assert baseline.split() == ["0", "3.0000", "0.0%", "-", "50.0%", "0.000"]
    assert round1.split() == ["1", "2.0000", "25.0%", "SFT", "62.5%", "0.125"]
    assert round2.split() == ["2", "2.5000", "25.0%", "DPO", "87.5%", "1.500"]
    assert "preference pairs" in legend
