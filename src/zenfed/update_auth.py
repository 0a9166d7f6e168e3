"""Every update is signed by its site: the statement both ends compute, the site's signer, the server's check.

A site signs, with its provisioned key (``startup/client.key``), a canonical
statement naming the job, round, site, the SHA-256 of the bytes it sends and
the weight they carry. It sends the signature and its certificate
(``startup/client.crt``) with the update. The server checks that the
certificate was issued by the project's root CA (``startup/rootCA.pem``) to
that very site and is valid now, then checks the signature over the statement
it recomputes from what arrived. A flipped bit with a recomputed hash, a
changed weight, another site's certificate or a foreign project's certificate
all fail, with the reason.

Kits without keys (the FLARE simulator) neither sign nor check.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID

from zenfed import protocol as P
from zenfed.digest import canonical_json, sha256_hex
from zenfed.errors import ZenfedError
from zenfed.signing import RSA_PSS, SigningKeyError, keys_match, load_private_key, sign, verify

STATEMENT_FORMAT = "zenfed-update-signature/1"
CORRECTION_FORMAT = "zenfed-mask-correction/1"
RELEASE_FORMAT = "zenfed-release/1"
ENROLLMENT_FORMAT = "zenfed-enrollment/1"
ROOT_CA = "rootCA.pem"


class UpdateAuthError(ZenfedError):
    """An update is unsigned, or its signature or certificate does not check out."""


def update_statement(*, job_id: str, round_index: int, site: str, payload: bytes, header: dict[str, Any]) -> bytes:
    """Return the bytes a site signs for one update: what it is, whose, and the weight it carries."""
    return canonical_json({
        "format": STATEMENT_FORMAT, "job": job_id, "round": round_index, "site": site,
        "payload_sha256": sha256_hex(payload), "payload_bytes": len(payload),
        "weight": header.get(P.H_WEIGHT), "num_examples": header.get(P.H_NUM_EXAMPLES),
    })


def correction_statement(*, job_id: str, round_index: int, site: str, payload: bytes) -> bytes:
    """The bytes a site signs for a mask correction (a statement no update signature can stand in for)."""
    return _payload_statement(CORRECTION_FORMAT, job_id=job_id, round_index=round_index, site=site, payload=payload)


def release_statement(*, job_id: str, round_index: int, site: str, payload: bytes, source_sha256: str | None) -> bytes:
    """The bytes a site signs for the final adapter it releases in the clear (it becomes the job's model).

    ``source_sha256`` is the SHA-256 of the final global the site decrypted it from, so the release is tied
    to the sum the server recorded.
    """
    return _payload_statement(RELEASE_FORMAT, job_id=job_id, round_index=round_index, site=site, payload=payload,
                              source_sha256=source_sha256)


def enrollment_statement(*, job_id: str, site: str, profile: dict[str, Any]) -> bytes:
    """The bytes a site signs for the profile it declares for a job (the server matches cohorts on it)."""
    return canonical_json({"format": ENROLLMENT_FORMAT, "job": job_id, "site": site, "profile": profile})


def _payload_statement(kind: str, *, job_id: str, round_index: int, site: str, payload: bytes,
                       **extra: Any) -> bytes:
    return canonical_json({
        "format": kind, "job": job_id, "round": round_index, "site": site,
        "payload_sha256": sha256_hex(payload), "payload_bytes": len(payload), **extra,
    })


@dataclass(frozen=True)
class UpdateSigner:
    """A participant's provisioned key and certificate: a site signs its updates, the server its tasks."""

    key: rsa.RSAPrivateKey
    cert_pem: str

    @classmethod
    def from_kit(cls, startup: Path | None, *, stem: str = "client") -> UpdateSigner | None:
        """Load ``STEM.key`` and ``STEM.crt`` from a kit's startup/; None where the kit has none.

        Args:
            startup: The kit's startup/ folder (None in the simulator).
            stem: ``client`` for a site's kit, ``server`` for the server's.

        Raises:
            UpdateAuthError: If the key is unreadable or does not belong to the certificate.
        """
        key_path, cert_path = (startup / f"{stem}.key", startup / f"{stem}.crt") if startup else (None, None)
        if key_path is None or cert_path is None or not key_path.is_file():
            return None
        try:
            key = load_private_key(key_path, kinds=(rsa.RSAPrivateKey,))
            cert_pem = cert_path.read_text()
            cert = x509.load_pem_x509_certificate(cert_pem.encode())
        except (SigningKeyError, OSError, ValueError) as err:
            raise UpdateAuthError(f"cannot load this {stem}'s signing key or certificate: {err}; "
                                  "re-provision it") from None
        if not keys_match(key, cert):
            raise UpdateAuthError(f"{key_path} does not belong to {cert_path}; re-provision it")
        return cls(key=key, cert_pem=cert_pem)

    def signature(self, statement: bytes) -> str:
        """Return the base64 RSA-PSS signature of ``statement``."""
        return base64.b64encode(sign(self.key, RSA_PSS, statement)).decode()

    def sign(self, statement: bytes) -> dict[str, str]:
        """Return the header fields that carry a site's signature and its certificate."""
        return {P.H_SIGNATURE: self.signature(statement), P.H_SITE_CERT: self.cert_pem}


class UpdateVerifier:
    """The server's check of each update against the project's root CA."""

    def __init__(self, root: x509.Certificate) -> None:
        self.root = root

    @classmethod
    def from_kit(cls, startup: Path | None) -> UpdateVerifier | None:
        """Load ``rootCA.pem`` from the server kit's startup/; None where the kit has none (simulator)."""
        if startup is None or not (startup / ROOT_CA).is_file():
            return None
        try:
            return cls(x509.load_pem_x509_certificate((startup / ROOT_CA).read_bytes()))
        except ValueError as err:
            raise UpdateAuthError(f"{startup / ROOT_CA} is not a PEM certificate ({err}); re-provision") from None

    def check(self, *, site: str, job_id: str, round_index: int, header: dict[str, Any], payload: bytes,
              now: dt.datetime | None = None) -> None:
        """Check that ``site`` signed exactly this update.

        Raises:
            UpdateAuthError: With the reason, if the update is unsigned or any check fails.
        """
        statement = update_statement(job_id=job_id, round_index=round_index, site=site, payload=payload,
                                     header=header)
        self.check_signed(site=site, statement=statement, header=header, what="update", now=now)

    def check_signed(self, *, site: str, statement: bytes, header: dict[str, Any], what: str,
                     now: dt.datetime | None = None, changed: str | None = None) -> None:
        """Check that ``site`` signed ``statement`` (its signature and certificate are in ``header``).

        Args:
            site: Who must have signed.
            statement: The bytes the verifier recomputed from what arrived.
            header: Holds the signature and the certificate.
            what: What was signed ("update", "pairwise key", ...), for the message.
            now: The time to check the certificate's validity at (default: now).
            changed: What a mismatch means, for the message (default: the update's wording).

        Raises:
            UpdateAuthError: With the reason, if it is unsigned or any check fails.
        """
        signature_b64, cert_pem = header.get(P.H_SIGNATURE), header.get(P.H_SITE_CERT)
        if not isinstance(signature_b64, str) or not isinstance(cert_pem, str):
            raise UpdateAuthError(f"the {what} from {site} is not signed; it must carry its site's "
                                  "signature (is the site provisioned by this project?)")
        cert = self.certificate(holder=site, cert_pem=cert_pem, what=what, now=now)
        self.check_signature(cert, statement=statement, signature_b64=signature_b64,
                             signed=f"the signature on the {what} from {site}",
                             changed=changed or f"the {what}, its weight or its round was changed on the way")

    @staticmethod
    def check_signature(cert: x509.Certificate, *, statement: bytes, signature_b64: str, signed: str,
                        changed: str) -> None:
        """Check a base64 RSA-PSS signature over ``statement`` with ``cert``'s key.

        Args:
            cert: The checked certificate of the signer.
            statement: The bytes the verifier recomputed from what arrived.
            signature_b64: The signature that arrived.
            signed: Names the signature, for the message ("the signature on the update from site-2").
            changed: What a mismatch means, for the message.

        Raises:
            UpdateAuthError: If the signature is not base64 or does not match.
        """
        try:
            signature = base64.b64decode(signature_b64, validate=True)
        except (binascii.Error, ValueError):
            raise UpdateAuthError(f"{signed} is not base64") from None
        if not verify(cert.public_key(), RSA_PSS, statement, signature):
            raise UpdateAuthError(f"{signed} does not match what arrived: {changed}")

    def certificate(self, *, holder: str, cert_pem: str, what: str, now: dt.datetime | None = None,
                    role: str | None = None) -> x509.Certificate:
        """Return ``cert_pem`` once checked: issued by the root CA to ``holder``, valid now.

        Args:
            holder: Who must hold it (the certificate's common name).
            cert_pem: The certificate that arrived.
            what: What it came with ("update", "task", ...), for the message.
            now: The time to check validity at (default: now).
            role: The holder's role. FLARE writes a role only into admins' certificates (e.g.
                ``project_admin``), so a certificate naming any other role than this one is refused.

        Raises:
            UpdateAuthError: With the reason, if any check fails.
        """
        now = now or dt.datetime.now(dt.UTC)
        try:
            cert = x509.load_pem_x509_certificate(cert_pem.encode())
        except ValueError as err:
            raise UpdateAuthError(f"the certificate sent by {holder} is not a PEM certificate ({err})") from None
        try:
            cert.verify_directly_issued_by(self.root)
        except (InvalidSignature, ValueError, TypeError):  # another issuer, key type or signature: not our CA
            raise UpdateAuthError(f"the certificate sent by {holder} was not issued by this project's root CA "
                                  "(a foreign project's participant, or a forged certificate)") from None
        names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        named = names[0].value if names else "(none)"
        if named != holder:
            raise UpdateAuthError(f"the {what} from {holder} is signed with the certificate of {named!r}")
        roles = cert.subject.get_attributes_for_oid(NameOID.UNSTRUCTURED_NAME)
        if role is not None and roles and roles[0].value != role:
            raise UpdateAuthError(f"the {what} from {holder} is signed with a certificate for the role "
                                  f"{roles[0].value!r} (an admin's), not the {role}'s")
        if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
            raise UpdateAuthError(f"the certificate of {holder} is not valid now; re-provision it")
        return cert
