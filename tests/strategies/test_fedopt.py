"""FedOpt at the sites: FedAvgM, FedAdam and FedYogi steps, once per round, resumable, refusing a missed round."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from zenfed.errors import PolicyError
from zenfed.spec import JobSpec
from zenfed.strategies import FedAdam, FedAvgM, FedYogi, make_strategy

OPT = {"learning_rate": 0.5, "momentum": 0.8, "beta1": 0.9, "beta2": 0.95, "tau": 1e-2}


def strategy(name: str):
    return make_strategy(JobSpec(name="opt", federation={"strategy": name, "server_optimizer": OPT}))


def means(count: int = 4, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return [{"a": torch.randn(3, 2, generator=gen) * 0.1, "b": torch.randn(4, generator=gen) * 0.1}
            for _ in range(count)]


def reference(name: str, start: dict, sequence: list[dict]) -> list[dict]:
    """The textbook updates (Reddi et al., 2021), in numpy."""
    x = {k: v.double().numpy().copy() for k, v in start.items()}
    m = {k: np.zeros_like(v) for k, v in x.items()}
    v2 = {k: np.zeros_like(v) for k, v in x.items()}
    out = []
    for mean in sequence:
        for k in x:
            d = mean[k].double().numpy() - x[k]
            if name == "fedavgm":
                m[k] = OPT["momentum"] * m[k] + d
                x[k] = x[k] + OPT["learning_rate"] * m[k]
                continue
            m[k] = OPT["beta1"] * m[k] + (1 - OPT["beta1"]) * d
            if name == "fedadam":
                v2[k] = OPT["beta2"] * v2[k] + (1 - OPT["beta2"]) * d * d
            else:
                v2[k] = v2[k] - (1 - OPT["beta2"]) * d * d * np.sign(v2[k] - d * d)
            x[k] = x[k] + OPT["learning_rate"] * m[k] / (np.sqrt(v2[k]) + OPT["tau"])
        out.append({k: v.copy() for k, v in x.items()})
    return out


@pytest.mark.parametrize(("name", "cls"), [("fedavgm", FedAvgM), ("fedadam", FedAdam), ("fedyogi", FedYogi)])
def test_each_step_is_the_textbook_update(name, cls):
    # Prepare
    opt = strategy(name)
    start = {"a": torch.zeros(3, 2), "b": torch.full((4,), 0.05)}
    sequence = means()

    # Execute
    opt.begin(start)
    got = [opt.after_decrypt(mean, global_round=r) for r, mean in enumerate(sequence, start=1)]

    # Assert
    assert isinstance(opt, cls) and opt.global_at_sites
    for ours, theirs in zip(got, reference(name, start, sequence), strict=True):
        for k in ours:
            assert np.allclose(ours[k].double().numpy(), theirs[k], atol=1e-6), k


def test_the_same_sum_twice_steps_once():
    # Prepare: the final evaluation and the release carry the same sum
    opt = strategy("fedadam")
    opt.begin({"w": torch.zeros(3)})
    first = opt.after_decrypt({"w": torch.ones(3) * 0.1}, global_round=1)

    # Execute
    again = opt.after_decrypt({"w": torch.ones(3) * 0.1}, global_round=1)

    # Assert
    assert torch.equal(first["w"], again["w"]) and opt.steps == 1


def test_a_site_that_missed_a_round_refuses_the_next_sum():
    # Prepare
    opt = strategy("fedavgm")
    opt.begin({"w": torch.zeros(3)})
    opt.after_decrypt({"w": torch.ones(3)}, global_round=1)

    # Execute / Assert
    with pytest.raises(PolicyError, match="missed a round"):
        opt.after_decrypt({"w": torch.ones(3)}, global_round=3)
    with pytest.raises(PolicyError, match="no global"):
        strategy("fedavgm").after_decrypt({"w": torch.ones(3)}, global_round=1)


def test_a_restarted_site_resumes_its_state_exactly():
    # Prepare
    sequence = means(count=3)
    original = strategy("fedyogi")
    original.begin({"a": torch.zeros(3, 2), "b": torch.zeros(4)})
    original.after_decrypt(sequence[0], global_round=1)
    restarted = strategy("fedyogi")

    # Execute
    restarted.load_state_dict(original.state_dict())
    ours = restarted.after_decrypt(sequence[1], global_round=2)
    theirs = original.after_decrypt(sequence[1], global_round=2)

    # Assert
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_fedavg_keeps_no_state_and_steps_nothing():
    # Execute
    avg = make_strategy(JobSpec(name="a"))
    mean = {"w": torch.ones(2)}

    # Assert
    assert avg.after_decrypt(mean, global_round=1) is mean and avg.state_dict() is None
    assert not avg.global_at_sites
