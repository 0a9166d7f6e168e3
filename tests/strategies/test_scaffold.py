"""SCAFFOLD: the control-variate updates (option II), the gradient correction, once per round, resumable."""

from __future__ import annotations

import pytest
import torch

from zenfed.errors import PolicyError
from zenfed.spec import JobSpec
from zenfed.strategies import Scaffold, make_strategy
from zenfed.strategies.scaffold import CONTROL

SPEC = JobSpec(name="sc", training={"local_steps": 4, "learning_rate": 0.05}, federation={"strategy": "scaffold"})
SCALE = 4 * 0.05


def scaffold() -> Scaffold:
    strategy = make_strategy(SPEC)
    assert isinstance(strategy, Scaffold)
    strategy.begin({"w": torch.zeros(3)})
    return strategy


def test_one_round_of_control_variates_follows_option_two():
    # Prepare
    site = scaffold()
    x, y = {"w": torch.zeros(3)}, {"w": torch.tensor([0.1, -0.2, 0.3])}

    # Execute: the site's update, then the mean of two such sites comes back
    sent = site.update_to_send(global_adapter=x, local_adapter=y)
    other_change = torch.tensor([0.3, 0.0, -0.1])
    mean = {"w": (y["w"] + y["w"]) / 2, CONTROL + "w": (sent[CONTROL + "w"] + other_change) / 2}
    adapter = site.after_decrypt(mean, global_round=1)

    # Assert: c_i+ = c_i - c + (x - y)/(K lr); the site sends K lr (c_i+ - c_i) = x - y here; c += mean change
    assert torch.allclose(sent[CONTROL + "w"], x["w"] - y["w"])
    assert torch.allclose(site.site_control["w"], (x["w"] - y["w"]).double() / SCALE)
    assert torch.allclose(site.global_control["w"], mean[CONTROL + "w"].double() / SCALE)
    assert set(adapter) == {"w"} and torch.equal(adapter["w"], mean["w"])


def test_the_correction_adds_c_minus_ci_to_each_gradient():
    # Prepare
    site = scaffold()
    site.global_control["w"] = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)
    site.site_control["w"] = torch.tensor([0.5, 0.5, 0.5], dtype=torch.float64)
    param = torch.nn.Parameter(torch.zeros(3))
    param.grad = torch.ones(3)

    # Execute
    site.loss_term(global_adapter={"w": torch.zeros(3)}).add_gradient({"w": param})

    # Assert
    assert torch.allclose(param.grad, torch.tensor([1.5, 2.5, 3.5]))


def test_the_wire_carries_a_control_change_beside_each_tensor():
    # Execute
    template = scaffold().wire_template({"w": torch.zeros(3), "v": torch.zeros(2)})

    # Assert
    assert sorted(template) == sorted(["w", "v", CONTROL + "w", CONTROL + "v"])


def test_the_same_sum_twice_counts_once_and_a_missed_round_is_refused():
    # Prepare
    site = scaffold()
    mean = {"w": torch.zeros(3), CONTROL + "w": torch.ones(3)}
    site.after_decrypt(mean, global_round=1)

    # Execute
    site.after_decrypt(mean, global_round=1)

    # Assert
    assert torch.allclose(site.global_control["w"], torch.ones(3, dtype=torch.float64) / SCALE)
    with pytest.raises(PolicyError, match="missed a round"):
        site.after_decrypt(mean, global_round=3)


def test_a_restarted_site_resumes_both_control_variates():
    # Prepare
    site = scaffold()
    site.update_to_send(global_adapter={"w": torch.zeros(3)}, local_adapter={"w": torch.ones(3)})
    site.after_decrypt({"w": torch.ones(3), CONTROL + "w": torch.ones(3)}, global_round=1)
    restarted = make_strategy(SPEC)

    # Execute
    restarted.load_state_dict(site.state_dict())

    # Assert
    assert restarted.steps == 1
    assert torch.equal(restarted.global_control["w"], site.global_control["w"])
    assert torch.equal(restarted.site_control["w"], site.site_control["w"])


def test_the_new_site_control_is_the_mean_raw_gradient_of_the_round():
    # Prepare: two local steps whose loss gradients are 1 and 3
    site = scaffold()
    site.global_control["w"] = torch.full((3,), 0.5, dtype=torch.float64)
    term = site.loss_term(global_adapter={"w": torch.zeros(3)})
    param = torch.nn.Parameter(torch.zeros(3))
    for value in (1.0, 3.0):
        param.grad = torch.full((3,), value)
        term.add_gradient({"w": param})

    # Execute
    sent = site.update_to_send(global_adapter={"w": torch.zeros(3)}, local_adapter={"w": torch.ones(3)})
    before = site.site_control["w"].clone()
    site.after_decrypt({"w": torch.ones(3), CONTROL + "w": sent[CONTROL + "w"]}, global_round=1)

    # Assert: c_i+ = 2 (not the corrected gradients 1.5 and 3.5), sent as K lr (c_i+ - c_i); c_i takes it
    # only when the sum that holds its change comes back
    assert torch.equal(before, torch.zeros(3, dtype=torch.float64))
    assert torch.allclose(site.site_control["w"], torch.full((3,), 2.0, dtype=torch.float64))
    assert torch.allclose(sent[CONTROL + "w"], torch.full((3,), 2.0 * SCALE))


def test_a_rank_capped_adapter_is_refused_with_the_reason():
    # Execute / Assert: the control variates have the job's shape, the capped engine a smaller one
    with pytest.raises(PolicyError, match="max_lora_rank"):
        scaffold().loss_term(global_adapter={"w": torch.zeros(2)})


@pytest.mark.parametrize(("extra", "reason"), [
    ({"lora": {"personal_layers": [1]}}, "personal_layers"),
    ({"privacy": {"level": "client", "noise_multiplier": 1.0}}, "privacy.level 'client'"),
])
def test_scaffold_refuses_the_combinations_it_would_get_wrong(extra, reason):
    # Execute / Assert
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match=reason):
        JobSpec.model_validate({"name": "sc", "federation": {"strategy": "scaffold"}, **extra})
