"""The accountant agrees with dp-accounting, persists as JSON, and the solver hits its target."""

import json

import dp_accounting
import pytest
from dp_accounting.pld import PLDAccountant
from dp_accounting.rdp import RdpAccountant

from zenfed.privacy.dp import (
    PrivacyAccountant,
    PrivacyError,
    default_delta,
    plan_record_dp,
    planned_epsilon,
    solve_noise_multiplier,
)


def _direct_epsilon(accountant, phases, delta):
    for sigma, rate, steps in phases:
        event = dp_accounting.PoissonSampledDpEvent(rate, dp_accounting.GaussianDpEvent(sigma))
        accountant.compose(event, steps)
    return accountant.get_epsilon(delta)


@pytest.mark.parametrize(
    ("method", "direct"),
    [("rdp", RdpAccountant), ("pld", lambda: PLDAccountant(value_discretization_interval=1e-3))],
)
def test_epsilon_equals_direct_dp_accounting(method, direct):
    # Prepare: two rounds of 50 local steps, then a round at another sigma.
    phases = [(1.1, 0.01, 50), (1.1, 0.01, 50), (0.9, 0.02, 30)]
    delta = 1e-5
    acct = PrivacyAccountant(method=method)

    # Execute
    for sigma, rate, steps in phases:
        acct.step(noise_multiplier=sigma, sample_rate=rate, num_steps=steps)
    ours = acct.get_epsilon(delta)
    theirs = _direct_epsilon(direct(), phases, delta)

    # Assert
    assert ours == pytest.approx(theirs, rel=1e-9)
    assert acct.total_steps == 130
    assert len(acct.history) == 2  # identical consecutive steps are merged


def test_single_steps_compose_like_one_block():
    one_by_one = PrivacyAccountant(method="rdp")
    for _ in range(20):
        one_by_one.step(noise_multiplier=1.0, sample_rate=0.05)
    block = planned_epsilon(
        noise_multiplier=1.0, sample_rate=0.05, steps=20, delta=1e-5, method="rdp"
    )

    assert one_by_one.get_epsilon(1e-5) == pytest.approx(block, rel=1e-12)


def test_no_steps_is_zero_and_more_steps_cost_more():
    acct = PrivacyAccountant()
    assert acct.get_epsilon(1e-5) == 0.0
    acct.step(noise_multiplier=1.0, sample_rate=0.1, num_steps=10)
    first = acct.get_epsilon(1e-5)
    acct.step(noise_multiplier=1.0, sample_rate=0.1, num_steps=10)
    assert acct.get_epsilon(1e-5) > first > 0


def test_state_dict_is_json_and_restores_the_same_epsilon():
    acct = PrivacyAccountant(method="rdp")
    acct.step(noise_multiplier=1.3, sample_rate=0.02, num_steps=40)
    acct.step(noise_multiplier=0.8, sample_rate=0.02, num_steps=5)

    state = json.loads(json.dumps(acct.state_dict()))
    restored = PrivacyAccountant.from_state_dict(state)

    assert restored.method == "rdp"
    assert restored.history == acct.history
    assert restored.get_epsilon(1e-6) == acct.get_epsilon(1e-6)


def test_projected_epsilon_does_not_change_the_accountant():
    acct = PrivacyAccountant()
    acct.step(noise_multiplier=1.0, sample_rate=0.1, num_steps=5)
    before = acct.get_epsilon(1e-5)

    projected = acct.projected_epsilon(
        delta=1e-5, noise_multiplier=1.0, sample_rate=0.1, num_steps=5
    )

    assert projected == pytest.approx(
        planned_epsilon(noise_multiplier=1.0, sample_rate=0.1, steps=10, delta=1e-5)
    )
    assert acct.get_epsilon(1e-5) == before


@pytest.mark.parametrize("target", [1.0, 8.0])
def test_solver_hits_the_target_from_the_safe_side(target):
    kwargs = {"delta": 1e-4, "sample_rate": 0.05, "steps": 40, "method": "rdp"}

    sigma = solve_noise_multiplier(target_epsilon=target, **kwargs)

    at_sigma = planned_epsilon(noise_multiplier=sigma, **kwargs)
    a_bit_less_noise = planned_epsilon(noise_multiplier=sigma * 0.995, **kwargs)
    assert at_sigma <= target
    assert at_sigma == pytest.approx(target, rel=0.01)
    assert a_bit_less_noise > target


def test_plan_record_dp_uses_default_delta_and_true_sample_rate():
    plan = plan_record_dp(
        rounds=3,
        local_steps=10,
        batch_size=8,
        num_records=400,
        noise_multiplier=1.0,
        method="rdp",
    )

    assert plan.delta == default_delta(400) == pytest.approx(1 / 4000)
    assert plan.sample_rate == pytest.approx(0.02)
    assert plan.steps == 30
    assert plan.epsilon == pytest.approx(
        planned_epsilon(
            noise_multiplier=1.0, sample_rate=0.02, steps=30, delta=1 / 4000, method="rdp"
        )
    )
    assert json.loads(json.dumps(plan.to_dict()))["epsilon"] == plan.epsilon


def test_plan_record_dp_solves_sigma_from_target():
    plan = plan_record_dp(
        rounds=2,
        local_steps=5,
        batch_size=4,
        num_records=100,
        target_epsilon=3.0,
        method="rdp",
    )

    assert plan.epsilon <= 3.0
    assert plan.epsilon == pytest.approx(3.0, rel=0.01)


@pytest.mark.parametrize(
    "call",
    [
        lambda: PrivacyAccountant().step(noise_multiplier=0.0, sample_rate=0.1),
        lambda: PrivacyAccountant().step(noise_multiplier=1.0, sample_rate=1.5),
        lambda: PrivacyAccountant().step(noise_multiplier=1.0, sample_rate=0.1, num_steps=-1),
        lambda: PrivacyAccountant().get_epsilon(0.0),
        lambda: PrivacyAccountant(method="moments"),
        lambda: PrivacyAccountant().load_state_dict({"history": []}),
        lambda: plan_record_dp(rounds=1, local_steps=1, batch_size=1, num_records=10),
        lambda: default_delta(0),
    ],
)
def test_bad_parameters_raise_privacy_error(call):
    with pytest.raises(PrivacyError):
        call()
