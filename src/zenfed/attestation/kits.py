"""Writing attestation material into startup kits (used by the provisioning builder).

FLARE-free, so it is tested without a provisioning run: the builder only maps
FLARE's project onto ``KitPlan`` objects and calls ``build_policies`` and
``write_kit``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from zenfed.attestation.identity import ROOT_CERT_FILE, AttestationIdentity
from zenfed.attestation.policy import POLICY_FILE, AttestationPolicy, KindPolicy, PeerPolicy


@dataclass(frozen=True)
class KitPlan:
    """What provisioning decided for one participant.

    Attributes:
        name: The participant's name.
        kinds: TEE kinds it attests with (and that its peers require of it).
        measured_files: Runtime configuration files in its measurement.
        accepted: Kind -> measurements its peers accept from it.

    """

    name: str
    kinds: tuple[str, ...]
    measured_files: tuple[str, ...] = ()
    accepted: Mapping[str, tuple[str, ...]] = field(default_factory=dict)


def build_policies(
    *,
    project: str,
    plans: Sequence[KitPlan],
    kind_settings: Mapping[str, Mapping[str, Any]] | None = None,
    min_tcb: Mapping[str, Mapping[str, int]] | None = None,
    allow_debug: bool = False,
    max_evidence_age_s: float = 300.0,
    nonce_ttl_s: float = 120.0,
) -> dict[str, AttestationPolicy]:
    """Return each participant's policy: every participant (itself included) must prove its kinds.

    Every participant gets the rules for all participants, not only the server:
    FLARE's CC manager also cross-checks sites and the server's own token.
    """
    used = {k for p in plans for k in p.kinds}
    settings = {k: dict(v) for k, v in (kind_settings or {}).items() if k in used}
    peers: dict[str, PeerPolicy] = {}
    for plan in plans:
        if not plan.kinds:
            continue
        per_kind = {
            kind: KindPolicy(
                allowed_measurements=tuple(plan.accepted.get(kind, ())),
                min_tcb=dict((min_tcb or {}).get(kind, {})),
                allow_debug=allow_debug,
                max_evidence_age_s=max_evidence_age_s,
            )
            for kind in plan.kinds
        }
        peers[plan.name] = PeerPolicy(kinds=plan.kinds, per_kind=per_kind)
    return {
        plan.name: AttestationPolicy(
            project=project,
            participant=plan.name,
            kinds=plan.kinds,
            kind_settings=settings,
            measured_files=plan.measured_files,
            nonce_ttl_s=nonce_ttl_s,
            peers=peers,
        )
        for plan in plans
    }


def write_kit(
    *,
    startup_dir: Path,
    policy: AttestationPolicy,
    root_cert_pem: bytes,
    identity: AttestationIdentity | None,
) -> None:
    """Write the policy, the root certificate and (if given) the key (0600) into ``startup_dir``."""
    startup = Path(startup_dir)
    startup.mkdir(parents=True, exist_ok=True)
    (startup / POLICY_FILE).write_text(policy.to_json(), encoding="utf-8")
    (startup / ROOT_CERT_FILE).write_bytes(root_cert_pem)
    if identity is not None:
        identity.save(startup_dir=startup)
