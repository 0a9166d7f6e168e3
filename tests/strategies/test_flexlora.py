"""FlexLoRA: sites send B·A, every site factorises the mean to the job's rank by SVD."""

from __future__ import annotations

import pytest
import torch

from zenfed.errors import PolicyError, SpecError
from zenfed.spec import JobSpec, parse_model
from zenfed.strategies import FlexLoRA, make_strategy

A, B = "m.layers.0.q_proj.lora_A.weight", "m.layers.0.q_proj.lora_B.weight"
PRODUCT = "m.layers.0.q_proj.lora_BA.weight"


def _spec(**federation) -> JobSpec:
    return JobSpec(name="flex", lora={"rank": 2, "alpha": 4.0}, federation={"strategy": "flexlora", **federation})


def _site(seed: int, rank: int = 2) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {A: torch.randn(rank, 6, generator=generator), B: torch.randn(5, rank, generator=generator)}


def test_the_mean_of_products_is_factorised_to_its_best_rank_r_approximation():
    # Prepare: two sites' trained adapters (scale alpha/rank = 2).
    strategy = make_strategy(_spec())
    sites = [_site(1), _site(2)]

    # Execute: what each sends, their mean (the server's), and what every site rebuilds.
    sent = [strategy.update_to_send(global_adapter={}, local_adapter=site) for site in sites]
    mean = {PRODUCT: (sent[0][PRODUCT] + sent[1][PRODUCT]) / 2}
    rebuilt = strategy.after_decrypt(mean, global_round=1)

    # Assert: each sent product is 2·B·A; the rebuilt rank-2 update is the SVD truncation of the true mean
    # update (Eckart-Young), closer to it than averaging A and B separately.
    assert isinstance(strategy, FlexLoRA) and set(sent[0]) == {PRODUCT}
    torch.testing.assert_close(sent[0][PRODUCT], 2 * sites[0][B] @ sites[0][A])
    true_mean = mean[PRODUCT].double()
    u, s, vh = torch.linalg.svd(true_mean)
    best = (u[:, :2] * s[:2]) @ vh[:2]
    got = 2 * rebuilt[B].double() @ rebuilt[A].double()
    torch.testing.assert_close(got, best, rtol=1e-5, atol=1e-5)
    separate = 2 * ((sites[0][B] + sites[1][B]) / 2).double() @ ((sites[0][A] + sites[1][A]) / 2).double()
    assert (got - true_mean).norm() < (separate - true_mean).norm()
    assert rebuilt[A].shape == (2, 6) and rebuilt[B].shape == (5, 2)


def test_one_site_alone_gets_its_own_update_back_exactly():
    strategy = make_strategy(_spec())
    site = _site(3)
    rebuilt = strategy.after_decrypt(strategy.update_to_send(global_adapter={}, local_adapter=site), global_round=1)
    torch.testing.assert_close(rebuilt[B] @ rebuilt[A], site[B] @ site[A], rtol=1e-5, atol=1e-5)
    assert strategy.wire_template(site)[PRODUCT].shape == (5, 6)


def test_a_global_that_is_not_products_is_refused():
    with pytest.raises(PolicyError, match="not a LoRA product"):
        make_strategy(_spec()).after_decrypt({A: torch.zeros(2, 6)}, global_round=1)


@pytest.mark.parametrize(("extra", "message"), [
    ({"encryption": {"enabled": True}}, "use ffa_lora for heterogeneous ranks"),
    ({"privacy": {"level": "client", "noise_multiplier": 1.0}}, "does not combine"),
])
def test_flexlora_is_refused_where_it_does_not_fit(extra, message):
    data = {"name": "flex", "federation": {"strategy": "flexlora"}, **extra}
    with pytest.raises(SpecError, match=message):
        parse_model(JobSpec, data, kind="job spec", source="test")
