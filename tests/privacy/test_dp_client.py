"""Client-level DP: every clipped update is within C, and the noise has the promised std."""

import math

import pytest
import torch

from zenfed.privacy.dp import (
    DistributedClientDP,
    LocalClientDP,
    PrivacyAccountant,
    PrivacyError,
    add_gaussian_noise,
    client_level_dp,
    clip_update,
    planned_epsilon,
    update_norm,
)


def _update(scale, seed):
    gen = torch.Generator().manual_seed(seed)
    return {
        "layers.0.q_proj.lora_A.weight": torch.randn(8, 64, generator=gen) * scale,
        "layers.0.q_proj.lora_B.weight": torch.randn(64, 8, generator=gen) * scale,
        "layers.1.v_proj.lora_A.weight": torch.randn(8, 64, generator=gen) * scale,
    }


@pytest.mark.parametrize("clip", [1e-3, 0.5, 1.0, 7.0])
def test_every_clipped_update_has_norm_at_most_c(clip):
    for seed, scale in enumerate([1e-6, 1e-3, 0.01, 0.1, 1.0, 10.0, 1e4]):
        update = _update(scale, seed)
        original = {k: v.clone() for k, v in update.items()}

        clipped, norm = clip_update(update, clip_norm=clip)

        assert norm == pytest.approx(update_norm(original), rel=1e-12)
        assert update_norm(clipped) <= clip
        if norm <= clip:  # small updates pass unchanged
            assert all(torch.equal(clipped[k], original[k]) for k in original)
        else:  # large ones keep their direction and land on the sphere
            assert update_norm(clipped) == pytest.approx(clip, rel=1e-5)
        assert all(torch.equal(update[k], original[k]) for k in original)  # input untouched


def test_noise_std_matches_over_many_draws():
    std = 0.37
    zeros = {"a": torch.zeros(500, 100), "b": torch.zeros(1000)}
    gen = torch.Generator().manual_seed(11)

    draws = torch.cat(
        [
            torch.cat(
                [t.flatten() for t in add_gaussian_noise(zeros, std=std, generator=gen).values()]
            )
            for _ in range(20)
        ]
    ).double()

    assert draws.numel() == 1_020_000
    assert draws.mean().item() == pytest.approx(0.0, abs=4 * std / math.sqrt(draws.numel()))
    assert draws.std().item() == pytest.approx(std, rel=0.005)


def test_local_mode_adds_sigma_c_at_each_site():
    dp = client_level_dp(mode="local", clip_norm=2.0, noise_multiplier=1.5)
    update = _update(100.0, 1)

    result = dp.privatize(update, generator=torch.Generator().manual_seed(0))
    noise = torch.cat(
        [(result.update[k] - clip_update(update, clip_norm=2.0)[0][k]).flatten() for k in update]
    )

    assert isinstance(dp, LocalClientDP)
    assert result.noise_std == 3.0 and result.clipped
    assert noise.std().item() == pytest.approx(3.0, rel=0.05)
    assert dp.accounted_noise_multiplier(honest_contributors=1) == 1.5


def test_distributed_mode_sum_of_k_sites_carries_sigma_c():
    # Prepare: k sites, each with an all-zero update, so the sum is the noise alone.
    k, sigma, clip = 4, 1.2, 0.5
    dp = client_level_dp(mode="distributed", clip_norm=clip, noise_multiplier=sigma, num_sites=k)
    zeros = {"w": torch.zeros(100_000)}

    # Execute
    parts = [
        dp.privatize(zeros, generator=torch.Generator().manual_seed(s)).update["w"]
        for s in range(k)
    ]
    total = torch.stack(parts).sum(0)

    # Assert
    assert isinstance(dp, DistributedClientDP)
    assert dp.noise_std() == pytest.approx(sigma * clip / 2)
    assert parts[0].std().item() == pytest.approx(sigma * clip / math.sqrt(k), rel=0.02)
    assert total.std().item() == pytest.approx(sigma * clip, rel=0.02)
    # With fewer honest sites in the sum, the guarantee weakens to sigma*sqrt(h/k).
    assert dp.accounted_noise_multiplier(honest_contributors=k) == pytest.approx(sigma)
    assert dp.accounted_noise_multiplier(honest_contributors=1) == pytest.approx(sigma / 2)


def test_client_level_accounting_matches_gaussian_rounds():
    dp = DistributedClientDP(clip_norm=1.0, noise_multiplier=2.0, num_sites=3)
    acct = PrivacyAccountant(method="rdp")

    for _ in range(5):
        dp.account_round(acct, honest_contributors=3)

    assert acct.get_epsilon(1e-5) == pytest.approx(
        planned_epsilon(noise_multiplier=2.0, sample_rate=1.0, steps=5, delta=1e-5, method="rdp")
    )


@pytest.mark.parametrize(
    "call",
    [
        lambda: clip_update({}, clip_norm=1.0),
        lambda: clip_update({"w": torch.ones(3)}, clip_norm=-1.0),
        lambda: clip_update({"w": torch.tensor([float("nan")])}, clip_norm=1.0),
        lambda: add_gaussian_noise({"w": torch.ones(3)}, std=-0.1),
        lambda: client_level_dp(mode="central", clip_norm=1.0, noise_multiplier=1.0),
        lambda: DistributedClientDP(clip_norm=1.0, noise_multiplier=1.0, num_sites=0),
    ],
)
def test_bad_parameters_raise_privacy_error(call):
    with pytest.raises(PrivacyError):
        call()
