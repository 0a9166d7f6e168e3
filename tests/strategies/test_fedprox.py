"""FedProx: the proximal term's gradient, and that it keeps a site near the global in both training loops."""

from __future__ import annotations

import pytest
import torch

from zenfed.errors import ZenfedError
from zenfed.spec import JobSpec
from zenfed.strategies import FedProx, make_strategy
from zenfed.strategies.fedprox import ProximalTerm
from zenfed.types import RecordDP


def distance(a, b) -> float:
    return sum(float((a[k] - b[k]).double().pow(2).sum()) for k in a) ** 0.5


def test_the_gradient_is_that_of_the_proximal_loss():
    # Prepare
    gen = torch.Generator().manual_seed(0)
    anchor = {"a": torch.randn(3, 4, generator=gen), "b": torch.randn(5, generator=gen)}
    params = {k: torch.nn.Parameter(v + torch.randn(v.shape, generator=gen)) for k, v in anchor.items()}
    term = ProximalTerm(global_adapter=anchor, mu=0.3)

    # Execute: autograd of mu/2 ||w - g||^2 against the term's own gradient
    loss = sum(0.15 * (params[k] - anchor[k]).pow(2).sum() for k in params)
    expected = torch.autograd.grad(loss, list(params.values()))
    term.add_gradient(params)

    # Assert
    for (name, param), grad in zip(params.items(), expected, strict=True):
        assert torch.allclose(param.grad, grad, atol=1e-6), name
    assert term.value({k: p.detach() for k, p in params.items()}) == pytest.approx(float(loss), rel=1e-6)


def test_a_parameter_outside_the_global_is_an_error():
    # Execute / Assert
    with pytest.raises(ZenfedError, match="not in the global adapter"):
        ProximalTerm(global_adapter={"a": torch.zeros(1)}, mu=1.0).add_gradient(
            {"b": torch.nn.Parameter(torch.zeros(1))})


def test_the_term_keeps_a_site_nearer_the_global(engine, examples):
    # Prepare
    start = engine.initial_adapter()

    # Execute
    free = engine.train(adapter=start, examples=examples, steps=8, seed=1)
    prox = engine.train(adapter=start, examples=examples, steps=8, seed=1,
                        loss_term=ProximalTerm(global_adapter=start, mu=10.0))

    # Assert
    assert distance(prox.adapter, start) < 0.8 * distance(free.adapter, start)


def test_the_term_runs_in_the_dp_sgd_loop_too(engine, examples):
    # Prepare: no noise and every record in every batch make DP-SGD deterministic
    start = engine.initial_adapter()

    def dp() -> RecordDP:
        return RecordDP(noise_multiplier=0.0, clip_norm=0.05, sample_rate=1.0, accountant=None)

    # Execute
    free = engine.train(adapter=start, examples=examples, steps=6, seed=1, dp=dp())
    prox = engine.train(adapter=start, examples=examples, steps=6, seed=1, dp=dp(),
                        loss_term=ProximalTerm(global_adapter=start, mu=10.0))

    # Assert
    assert distance(prox.adapter, start) < 0.8 * distance(free.adapter, start)


def test_the_job_spec_selects_fedprox_with_its_mu():
    # Execute
    strategy = make_strategy(JobSpec(name="p", federation={"strategy": "fedprox", "proximal_mu": 0.5}))
    term = strategy.loss_term(global_adapter={"w": torch.zeros(2)})

    # Assert
    assert isinstance(strategy, FedProx) and isinstance(term, ProximalTerm) and term.mu == 0.5
    assert make_strategy(JobSpec(name="a")).loss_term(global_adapter={"w": torch.zeros(2)}) is None
    with pytest.raises(ValueError, match="proximal_mu"):
        JobSpec(name="p", federation={"strategy": "fedprox", "proximal_mu": 0})
