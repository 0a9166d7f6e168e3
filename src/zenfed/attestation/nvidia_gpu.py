"""NVIDIA GPU confidential computing, through NVIDIA's ``nv_attestation_sdk``.

Generation and verification both need ``nv_attestation_sdk`` (and, to generate,
a Hopper-or-later GPU in CC mode with its driver). Without them the adapter
fails closed and says what is missing. The nonce the SDK binds into the GPU
report is derived from the verifier's nonce and the participant's name.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from zenfed.attestation.base import Claims, TEEVerifier
from zenfed.attestation.records import AttestationUnavailable, Evidence, EvidenceRejected

NRAS_URL = "https://nras.attestation.nvidia.com/v4/attest/gpu"
_DEFAULT_RULES = {
    "version": "4.0",
    "authorization-rules": {
        "type": "JWT",
        "overall-claims": {"x-nvidia-overall-att-result": True, "x-nvidia-ver": "3.0"},
        "detached-claims": {
            "measres": "success",
            "x-nvidia-gpu-attestation-report-nonce-match": True,
            "x-nvidia-gpu-attestation-report-signature-verified": True,
            "x-nvidia-gpu-driver-rim-signature-verified": True,
            "x-nvidia-gpu-vbios-rim-signature-verified": True,
        },
    },
}


def sdk_nonce(*, participant: str, nonce: str) -> str:
    """Return the 32-byte hex nonce handed to the SDK (binds participant and nonce)."""
    return hashlib.sha256(f"zenfed/1\0nvidia-gpu\0{participant}\0{nonce}".encode()).hexdigest()


def _sdk() -> Any:
    try:
        from nv_attestation_sdk import attestation  # type: ignore[import-not-found]
    except ImportError:
        return None
    return attestation


class NvidiaGpuTEE(TEEVerifier):
    """NVIDIA GPU CC attestation via ``nv_attestation_sdk`` (local or NRAS remote verifier).

    Args:
        participant: This participant's name.
        verifier_url: NRAS URL for remote verification; "" for the SDK's local verifier.
        rules_file: JSON appraisal rules for ``validate_token``; zenfed's defaults if None.
        clock: Returns the current time in seconds.

    """

    kind = "nvidia-gpu"

    def __init__(
        self,
        *,
        participant: str,
        verifier_url: str = NRAS_URL,
        rules_file: str | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        super().__init__(participant=participant, clock=clock)
        self._url = verifier_url
        self._rules = Path(rules_file).read_text() if rules_file else json.dumps(_DEFAULT_RULES)

    def _client(self, sdk: Any, *, name: str, nonce: str) -> Any:
        client = sdk.Attestation()
        client.set_name(name)
        client.set_nonce(nonce)
        env = sdk.Environment.REMOTE if self._url else sdk.Environment.LOCAL
        client.add_verifier(sdk.Devices.GPU, env, self._url, "")
        return client

    def _generate_body(self, *, nonce: str, issued_at: float) -> dict[str, Any]:
        sdk = _sdk()
        if sdk is None:
            raise AttestationUnavailable(
                "nv_attestation_sdk is not installed; install NVIDIA's attestation SDK on a "
                "machine with a confidential-computing GPU"
            )
        bound = sdk_nonce(participant=self.participant, nonce=nonce)
        try:
            client = self._client(sdk, name=self.participant, nonce=bound)
            if not client.attest(client.get_evidence()):
                raise AttestationUnavailable("the NVIDIA verifier did not attest this GPU")
            token = client.get_token()
        except AttestationUnavailable:
            raise
        except Exception as err:  # noqa: BLE001 - the SDK raises many types; all mean "no evidence"
            raise AttestationUnavailable(
                f"NVIDIA GPU evidence failed ({type(err).__name__}: {err}); is a GPU in CC mode "
                "present with its driver?"
            ) from None
        return {"token": token if isinstance(token, str) else json.dumps(token)}

    def _claims(self, *, evidence: Evidence, nonce: str) -> Claims:
        token = evidence.body.get("token")
        if not isinstance(token, str):
            raise EvidenceRejected("NVIDIA GPU evidence has no 'token'")
        sdk = _sdk()
        if sdk is None:
            raise EvidenceRejected(
                "cannot verify NVIDIA GPU evidence here: nv_attestation_sdk is not installed"
            )
        bound = sdk_nonce(participant=evidence.participant, nonce=nonce)
        claims = _detached_claims(token)
        if claims.get("eat_nonce") != bound:
            raise EvidenceRejected("the GPU token does not carry this nonce and participant")
        client = self._client(sdk, name=evidence.participant, nonce=bound)
        client.set_token(name=evidence.participant, eat_token=token)
        if not client.validate_token(self._rules):
            raise EvidenceRejected("the GPU token fails the NVIDIA appraisal rules")
        identity = "|".join(
            str(claims.get(k, ""))
            for k in ("hwmodel", "x-nvidia-gpu-driver-version", "x-nvidia-gpu-vbios-version")
        )
        driver = str(claims.get("x-nvidia-gpu-driver-version", "0")).split(".")[0]
        return Claims(
            measurement=hashlib.sha256(identity.encode()).hexdigest(),
            issued_at=evidence.issued_at,
            # GPU CC debug (devtools) mode changes the RIM measurements checked above.
            debug=False,
            tcb={"driver_major": int(driver) if driver.isdigit() else 0},
        )


def _detached_claims(token: str) -> dict[str, Any]:
    import jwt

    try:
        parts = json.loads(token)
        gpu = parts[1]["REMOTE_GPU_CLAIMS"] if "REMOTE_GPU_CLAIMS" in parts[1] else parts[1]
        first = next(iter(gpu.values())) if isinstance(gpu, dict) else gpu[0][1]
        claims = jwt.decode(first, options={"verify_signature": False})
    except Exception:  # noqa: BLE001 - any malformed token is a rejection
        raise EvidenceRejected("the NVIDIA GPU token is not in the SDK's EAT format") from None
    if not isinstance(claims, dict):
        raise EvidenceRejected("the NVIDIA GPU token's claims are not an object")
    return claims
