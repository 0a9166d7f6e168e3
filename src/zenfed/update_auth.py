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
SITE_KEY, SITE_CERT, ROOT_CA = "client.key", "client.crt", "rootCA.pem"


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
    return canonical_json({
        "format": CORRECTION_FORMAT, "job": job_id, "round": round_index, "site": site,
        "payload_sha256": sha256_hex(payload), "payload_bytes": len(payload),
    })


@dataclass(frozen=True)
class UpdateSigner:
    """A site's provisioned key and certificate, to sign its updates."""

    key: rsa.RSAPrivateKey
    cert_pem: str

    @classmethod
    def from_kit(cls, startup: Path | None) -> UpdateSigner | None:
        """Load ``client.key`` and ``client.crt`` from a kit's startup/; None where the kit has none.

        Raises:
            UpdateAuthError: If the key is unreadable or does not belong to the certificate.
        """
        if startup is None or not (startup / SITE_KEY).is_file():
            return None
        try:
            key = load_private_key(startup / SITE_KEY, kinds=(rsa.RSAPrivateKey,))
            cert_pem = (startup / SITE_CERT).read_text()
            cert = x509.load_pem_x509_certificate(cert_pem.encode())
        except (SigningKeyError, OSError, ValueError) as err:
            raise UpdateAuthError(f"cannot load this site's signing key or certificate: {err}; "
                                  "re-provision the site") from None
        if not keys_match(key, cert):
            raise UpdateAuthError(f"{startup / SITE_KEY} does not belong to {startup / SITE_CERT}; "
                                  "re-provision the site")
        return cls(key=key, cert_pem=cert_pem)

    def sign(self, statement: bytes) -> dict[str, str]:
        """Return the header fields that carry the signature and the certificate."""
        signature = sign(self.key, RSA_PSS, statement)
        return {P.H_SIGNATURE: base64.b64encode(signature).decode(), P.H_SITE_CERT: self.cert_pem}


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
                     now: dt.datetime | None = None) -> None:
        """Check that ``site`` signed ``statement`` (its signature and certificate are in ``header``).

        Args:
            site: Who must have signed.
            statement: The bytes the verifier recomputed from what arrived.
            header: Holds the signature and the certificate.
            what: What was signed ("update", "pairwise key", ...), for the message.
            now: The time to check the certificate's validity at (default: now).

        Raises:
            UpdateAuthError: With the reason, if it is unsigned or any check fails.
        """
        signature_b64, cert_pem = header.get(P.H_SIGNATURE), header.get(P.H_SITE_CERT)
        if not isinstance(signature_b64, str) or not isinstance(cert_pem, str):
            raise UpdateAuthError(f"the {what} from {site} is not signed; it must carry its site's "
                                  "signature (is the site provisioned by this project?)")
        cert = self._certificate(site, cert_pem, now or dt.datetime.now(dt.UTC))
        try:
            signature = base64.b64decode(signature_b64, validate=True)
        except (binascii.Error, ValueError):
            raise UpdateAuthError(f"the signature on the {what} from {site} is not base64") from None
        if not verify(cert.public_key(), RSA_PSS, statement, signature):
            raise UpdateAuthError(f"the signature on the {what} from {site} does not match what arrived: "
                                  f"the {what}, its weight or its round was changed on the way")

    def _certificate(self, site: str, cert_pem: str, now: dt.datetime) -> x509.Certificate:
        try:
            cert = x509.load_pem_x509_certificate(cert_pem.encode())
        except ValueError as err:
            raise UpdateAuthError(f"the certificate sent by {site} is not a PEM certificate ({err})") from None
        try:
            cert.verify_directly_issued_by(self.root)
        except (InvalidSignature, ValueError, TypeError):  # another issuer, key type or signature: not our CA
            raise UpdateAuthError(f"the certificate sent by {site} was not issued by this project's root CA "
                                  "(a foreign project's site, or a forged certificate)") from None
        names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        holder = names[0].value if names else "(none)"
        if holder != site:
            raise UpdateAuthError(f"the update from {site} is signed with the certificate of {holder!r}")
        if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
            raise UpdateAuthError(f"the certificate of {site} is not valid now; re-provision the site")
        return cert
