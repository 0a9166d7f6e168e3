"""TEE attestation: nonce-bound evidence, enforced expiry, measurement policy, audit records.

The core knows nothing of FLARE. ``zenfed.executors.cc_authorizer`` plugs it into
FLARE's ``CCAuthorizer`` seam; ``zenfed.provisioning.attestation_builder`` issues
keys and policies into startup kits.
"""

from zenfed.attestation.base import Claims, TEEVerifier
from zenfed.attestation.emulated import EmulatedTEE
from zenfed.attestation.exchange import Answer, Challenge
from zenfed.attestation.identity import AttestationIdentity, AttestationRoot
from zenfed.attestation.measure import Measurement, measure, package_digest
from zenfed.attestation.nonces import NonceRegistry
from zenfed.attestation.nvidia_gpu import NvidiaGpuTEE
from zenfed.attestation.policy import (
    KNOWN_KINDS,
    AttestationPolicy,
    KindPolicy,
    PeerPolicy,
    load_policy,
)
from zenfed.attestation.records import (
    AttestationError,
    AttestationResult,
    AttestationUnavailable,
    Evidence,
    EvidenceBundle,
    EvidenceRejected,
    Verdict,
)
from zenfed.attestation.service import AttestationService
from zenfed.attestation.sev_snp import SevSnpTEE
from zenfed.attestation.tdx import TdxTEE

__all__ = [
    "KNOWN_KINDS",
    "Answer",
    "AttestationError",
    "AttestationIdentity",
    "AttestationPolicy",
    "AttestationResult",
    "AttestationRoot",
    "AttestationService",
    "AttestationUnavailable",
    "Challenge",
    "Claims",
    "EmulatedTEE",
    "Evidence",
    "EvidenceBundle",
    "EvidenceRejected",
    "KindPolicy",
    "Measurement",
    "NonceRegistry",
    "NvidiaGpuTEE",
    "PeerPolicy",
    "SevSnpTEE",
    "TEEVerifier",
    "TdxTEE",
    "Verdict",
    "load_policy",
    "measure",
    "package_digest",
]
