"""Client-level DP: clip a site's whole update to C and add Gaussian noise.

Two ways to place the noise (see docs/privacy.md for the threat models):

- :class:`LocalClientDP`: every site adds std sigma*C. Each update is private on
  its own, even if the server sees it in the clear or colludes with other sites.
- :class:`DistributedClientDP`: every site adds std sigma*C/sqrt(k). Only the sum
  of k updates carries std sigma*C, so this is sound only when encrypted
  aggregation shows the server nothing but the sum of at least k honest sites.

Updates are ``dict[str, Tensor]``; the L2 norm is taken over all tensors together.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from zenfed.privacy.dp.accountant import PrivacyAccountant, _check_rate, _positive
from zenfed.privacy.dp.errors import PrivacyError
from zenfed.privacy.dp.sgd import _CLIP_SLACK, secure_generator

Update = dict[str, torch.Tensor]


def update_norm(update: Update) -> float:
    """Return the global L2 norm of all tensors of ``update`` (computed in float64)."""
    if not update:
        raise PrivacyError("the update is empty; it must hold at least one tensor")
    return math.sqrt(sum(float(t.detach().double().pow(2).sum()) for t in update.values()))


def clip_update(update: Update, *, clip_norm: float) -> tuple[Update, float]:
    """Scale ``update`` so that its global L2 norm is at most ``clip_norm``.

    Returns:
        The clipped update (new tensors; the input is not changed) and the norm before clipping.

    """
    clip_norm = _positive("clip_norm", clip_norm)
    norm = update_norm(update)
    if not math.isfinite(norm):
        raise PrivacyError("the update holds NaN or infinite values; the local training diverged")
    factor = min(1.0, clip_norm / (norm * (1 + _CLIP_SLACK))) if norm > 0 else 1.0
    return {name: t.detach() * factor for name, t in update.items()}, norm


def add_gaussian_noise(
    update: Update, *, std: float, generator: torch.Generator | None = None
) -> Update:
    """Return ``update`` plus independent N(0, std^2) noise on every entry.

    Args:
        update: tensors to noise (not changed).
        std: the noise standard deviation (>= 0).
        generator: noise source; default a securely seeded one. Pass a seeded
            generator only in tests: a predictable seed removes the privacy.

    """
    if not std >= 0 or math.isinf(std):
        raise PrivacyError(f"std must be a finite number >= 0, got {std!r}")
    generator = generator if generator is not None else secure_generator()
    noised = {}
    for name, t in update.items():
        noise = torch.normal(0.0, std, size=t.shape, generator=generator, device=generator.device)
        noised[name] = t.detach() + noise.to(device=t.device, dtype=t.dtype)
    return noised


@dataclass(frozen=True)
class ClientDPResult:
    """A privatized update and what was done to it (the norm is not DP: keep it at the site)."""

    update: Update
    pre_clip_norm: float
    clipped: bool
    noise_std: float


class ClientLevelDP:
    """Base of the client-level DP mechanisms: clip to C, add Gaussian noise.

    Args:
        clip_norm: C, the bound on a site's whole update.
        noise_multiplier: sigma, so that the aggregate carries noise std sigma*C.

    """

    mode = "base"

    def __init__(self, *, clip_norm: float, noise_multiplier: float) -> None:
        self.clip_norm = _positive("clip_norm", clip_norm)
        self.noise_multiplier = _positive("noise_multiplier", noise_multiplier)

    def noise_std(self) -> float:
        """Return the noise std that this site adds."""
        raise NotImplementedError

    def accounted_noise_multiplier(self, *, honest_contributors: int) -> float:
        """Return the sigma that protects this site, if ``honest_contributors`` sites add noise.

        ``honest_contributors`` counts the sites (this one included) whose noise
        ends up in what an adversary sees and who do not reveal it.
        """
        raise NotImplementedError

    def privatize(
        self, update: Update, *, generator: torch.Generator | None = None
    ) -> ClientDPResult:
        """Clip ``update`` to C and add this mode's noise."""
        clipped, norm = clip_update(update, clip_norm=self.clip_norm)
        std = self.noise_std()
        return ClientDPResult(
            update=add_gaussian_noise(clipped, std=std, generator=generator),
            pre_clip_norm=norm,
            clipped=norm > self.clip_norm,
            noise_std=std,
        )

    def account_round(
        self,
        accountant: PrivacyAccountant,
        *,
        honest_contributors: int,
        site_sample_rate: float = 1.0,
    ) -> None:
        """Compose one round of this mechanism into ``accountant``.

        Args:
            accountant: the site's client-level accountant.
            honest_contributors: see :meth:`accounted_noise_multiplier`.
            site_sample_rate: probability that a site is picked in a round (1.0 if all are).

        """
        accountant.step(
            noise_multiplier=self.accounted_noise_multiplier(
                honest_contributors=honest_contributors
            ),
            sample_rate=_check_rate(site_sample_rate),
        )


class LocalClientDP(ClientLevelDP):
    """Every site adds std sigma*C: private against anyone who sees its update."""

    mode = "local"

    def noise_std(self) -> float:
        """Return sigma*C."""
        return self.noise_multiplier * self.clip_norm

    def accounted_noise_multiplier(self, *, honest_contributors: int) -> float:
        """Return sigma: this site's own noise protects it whatever the others do."""
        return self.noise_multiplier


class DistributedClientDP(ClientLevelDP):
    """Every site adds std sigma*C/sqrt(k): only the encrypted sum of k sites carries sigma*C.

    Args:
        clip_norm: C.
        noise_multiplier: sigma of the sum.
        num_sites: k; choose the minimum number of sites whose updates are in every
            sum (the job's ``min_sites``), so that a round with k sites still carries sigma*C.

    """

    mode = "distributed"

    def __init__(self, *, clip_norm: float, noise_multiplier: float, num_sites: int) -> None:
        super().__init__(clip_norm=clip_norm, noise_multiplier=noise_multiplier)
        if num_sites < 1:
            raise PrivacyError(f"num_sites must be at least 1, got {num_sites}")
        self.num_sites = num_sites

    def noise_std(self) -> float:
        """Return sigma*C/sqrt(k)."""
        return self.noise_multiplier * self.clip_norm / math.sqrt(self.num_sites)

    def accounted_noise_multiplier(self, *, honest_contributors: int) -> float:
        """Return sigma*sqrt(h/k) for h honest sites in the sum (sigma when h >= k)."""
        if honest_contributors < 1:
            raise PrivacyError(
                f"honest_contributors must be at least 1 (this site), got {honest_contributors}"
            )
        share = min(honest_contributors, self.num_sites) / self.num_sites
        return self.noise_multiplier * math.sqrt(share)


def client_level_dp(
    *, mode: str, clip_norm: float, noise_multiplier: float, num_sites: int = 1
) -> ClientLevelDP:
    """Return the client-level mechanism for ``mode`` ("local" or "distributed").

    ``num_sites`` is used by the distributed mode only (see :class:`DistributedClientDP`).
    """
    if mode == "local":
        return LocalClientDP(clip_norm=clip_norm, noise_multiplier=noise_multiplier)
    if mode == "distributed":
        return DistributedClientDP(
            clip_norm=clip_norm, noise_multiplier=noise_multiplier, num_sites=num_sites
        )
    raise PrivacyError(f"unknown client-level DP mode {mode!r}; use 'local' or 'distributed'")
