"""The emulated TEE, for development and tests: software evidence, honestly labelled.

Evidence is a signed statement "participant P, answering nonce N at time T, runs
code and configuration with measurement M", signed with P's attestation key,
whose certificate the project's attestation root signed at provisioning.

It proves: the signer holds a key provisioned for P in this project, the
evidence is fresh (the verifier's nonce), and the software that signed reports
measurement M. It does not prove that the memory is isolated or that the
reported measurement is true: whoever holds the key file can sign anything.
"""

from __future__ import annotations

import base64
import time
from collections.abc import Callable
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature

from zenfed.attestation.base import Claims, TEEVerifier
from zenfed.attestation.identity import AttestationIdentity, verify_participant_cert
from zenfed.attestation.measure import Measurement
from zenfed.attestation.records import AttestationUnavailable, Evidence, EvidenceRejected
from zenfed.digest import canonical_json

PAYLOAD_FORMAT = "zenfed-emulated-tee/1"
EMULATOR_VERSION = 1


class EmulatedTEE(TEEVerifier):
    """Emulated TEE: Ed25519-signed, nonce-bound statements of the zenfed measurement.

    Args:
        participant: This participant's name.
        root: The project's attestation root certificate (trust anchor for peers).
        identity: This participant's attestation key and certificate; None for a
            verify-only instance.
        measure: Returns this participant's current measurement; None for verify-only.
        debug: Report a TEE in debug mode (to exercise the policy check).
        clock: Returns the current time in seconds.

    """

    kind = "emulated"

    def __init__(
        self,
        *,
        participant: str,
        root: x509.Certificate,
        identity: AttestationIdentity | None = None,
        measure: Callable[[], Measurement] | None = None,
        debug: bool = False,
        clock: Callable[[], float] = time.time,
    ) -> None:
        super().__init__(participant=participant, clock=clock)
        self._root = root
        self._identity = identity
        self._measure = measure
        self._debug = debug

    def _generate_body(self, *, nonce: str, issued_at: float) -> dict[str, Any]:
        if self._identity is None or self._measure is None:
            raise AttestationUnavailable(
                f"{self.participant} has no emulated-TEE key or measurement source; "
                "load the kit with AttestationService.from_workspace"
            )
        found = self._measure()
        payload = {
            "format": PAYLOAD_FORMAT,
            "kind": self.kind,
            "participant": self.participant,
            "nonce": nonce,
            "issued_at": issued_at,
            "measurement": found.value,
            "components": {"package": found.package, "config": found.config},
            "tcb": {"emulator": EMULATOR_VERSION},
            "debug": self._debug,
        }
        signature = self._identity.key.sign(canonical_json(payload))
        return {
            "payload": payload,
            "signature": base64.b64encode(signature).decode(),
            "cert": self._identity.cert_pem().decode(),
        }

    def _claims(self, *, evidence: Evidence, nonce: str) -> Claims:
        body = evidence.body
        payload, signature, cert_pem = body.get("payload"), body.get("signature"), body.get("cert")
        if not (
            isinstance(payload, dict) and isinstance(signature, str) and isinstance(cert_pem, str)
        ):
            raise EvidenceRejected("emulated evidence lacks its payload, signature or certificate")
        key = verify_participant_cert(
            cert_pem=cert_pem, root=self._root, participant=evidence.participant, now=self._clock()
        )
        try:
            key.verify(base64.b64decode(signature, validate=True), canonical_json(payload))
        except (InvalidSignature, ValueError):
            raise EvidenceRejected(
                f"the signature on {evidence.participant}'s emulated evidence is invalid "
                "(the evidence was altered or signed with another key)"
            ) from None
        expected = {
            "format": PAYLOAD_FORMAT,
            "kind": self.kind,
            "participant": evidence.participant,
            "nonce": nonce,
            "issued_at": evidence.issued_at,
        }
        for name, value in expected.items():
            if payload.get(name) != value:
                raise EvidenceRejected(f"signed payload field {name!r} does not match the evidence")
        measurement, tcb, debug = (
            payload.get("measurement"),
            payload.get("tcb"),
            payload.get("debug"),
        )
        if (
            not isinstance(measurement, str)
            or not isinstance(tcb, dict)
            or not isinstance(debug, bool)
        ):
            raise EvidenceRejected("signed payload lacks measurement, tcb or debug")
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in tcb.values()):
            raise EvidenceRejected("signed payload has a non-integer TCB version")
        return Claims(measurement=measurement, issued_at=evidence.issued_at, debug=debug, tcb=tcb)
