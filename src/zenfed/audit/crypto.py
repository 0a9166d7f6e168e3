"""Canonical encoding, hashing, signing and certificate checks shared by the writer and verifier.

The canonical form of a record is its JSON with sorted keys, no spaces, UTF-8,
and no NaN or infinity. A record's line in the file is exactly that form, so a
verifier can hash the bytes it reads and get the hash the writer chained.
"""

from __future__ import annotations

import base64
import hashlib
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from zenfed import signing
from zenfed.audit.errors import AuditError
from zenfed.digest import CanonicalJSONError, canonical_json

GENESIS = "0" * 64
"""The ``prev`` of a log's first record."""

RSA_PSS = signing.RSA_PSS
RSA_PKCS1V15 = signing.RSA_PKCS1V15
ECDSA = signing.ECDSA
ED25519 = signing.ED25519
SIGNATURE_SCHEMES = (RSA_PSS, RSA_PKCS1V15, ECDSA, ED25519)
"""The schemes an audit record may be signed with."""


def canonical(obj: Any) -> bytes:
    """Return the canonical JSON bytes of ``obj``; AuditError if it has none (NaN, a non-JSON type)."""
    try:
        return canonical_json(obj)
    except CanonicalJSONError as exc:
        raise AuditError(
            f"cannot encode an audit record as JSON ({exc.__cause__}); pass only str, int, float, "
            "bool, None, lists and dicts, with finite numbers"
        ) from exc


def utc_now() -> str:
    """Return the current UTC time in ISO 8601 with microseconds and a ``Z``."""
    return datetime.now(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


def cert_fingerprint(cert: x509.Certificate) -> str:
    """Return the SHA-256 fingerprint (hex) of a certificate's DER encoding."""
    return cert.fingerprint(hashes.SHA256()).hex()


def load_cert(path: Path) -> x509.Certificate:
    """Load a PEM certificate from ``path``."""
    try:
        return x509.load_pem_x509_certificate(Path(path).read_bytes())
    except FileNotFoundError as exc:
        raise AuditError(f"certificate {path} does not exist; pass the kit's .crt file") from exc
    except ValueError as exc:
        raise AuditError(f"{path} is not a PEM certificate ({exc})") from exc


def cert_from_pem(pem: str) -> x509.Certificate:
    """Parse a PEM certificate held in a record."""
    try:
        return x509.load_pem_x509_certificate(pem.encode("ascii"))
    except (ValueError, UnicodeEncodeError) as exc:
        raise AuditError(f"the embedded certificate is not valid PEM ({exc})") from exc


def cert_pem(cert: x509.Certificate) -> str:
    """Return the PEM text of a certificate."""
    return cert.public_bytes(serialization.Encoding.PEM).decode("ascii")


def common_name(name: x509.Name) -> str:
    """Return the first common name of an X.509 name, or its RFC 4514 string."""
    attrs = name.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
    return str(attrs[0].value) if attrs else name.rfc4514_string()


def load_private_key(path: Path) -> Any:
    """Load an unencrypted PEM private key (RSA, EC or Ed25519) from a startup kit."""
    try:
        return signing.load_private_key(Path(path), kinds=signing.PRIVATE_KEY_TYPES)
    except signing.SigningKeyError as exc:
        raise AuditError(f"{exc}; pass the .key file of the provisioned startup kit") from exc


def default_scheme(key: Any) -> str:
    """Return the signature scheme used by default for a private key."""
    if isinstance(key, rsa.RSAPrivateKey):
        return RSA_PSS
    if isinstance(key, ec.EllipticCurvePrivateKey):
        return ECDSA
    return ED25519


def check_scheme(key: Any, scheme: str) -> None:
    """Raise AuditError if ``scheme`` cannot be used with ``key``."""
    if scheme not in SIGNATURE_SCHEMES:
        raise AuditError(f"unknown signature scheme {scheme!r}; use one of {SIGNATURE_SCHEMES}")
    if not signing.scheme_fits(key, scheme):
        raise AuditError(f"scheme {scheme!r} does not fit a {type(key).__name__}")


def sign(key: Any, scheme: str, data: bytes) -> str:
    """Sign ``data`` and return the base64 signature."""
    return base64.b64encode(signing.sign(key, scheme, data)).decode("ascii")


def verify_signature(public_key: Any, scheme: str, data: bytes, sig_b64: str) -> bool:
    """Return True if ``sig_b64`` is a valid signature of ``data`` under ``public_key``."""
    if scheme not in SIGNATURE_SCHEMES:
        return False
    try:
        sig = base64.b64decode(sig_b64, validate=True)
    except ValueError:
        return False
    return signing.verify(public_key, scheme, data, sig)


def made_by_key(public_key: Any, scheme: str, sig_b64: str) -> bool | None:
    """Tell whether an invalid signature was still made with this RSA key, over other content.

    Applying an RSA public key to a signature undoes the private operation. If the
    result is a well-formed PKCS#1 v1.5 or PSS encoding, the signature was made by
    the matching private key over some other message: the record was edited after
    signing. Noise means a different key made it. For EC and Ed25519 keys there is
    no such test, and the answer is None (unknown).

    Args:
        public_key: the certificate's public key.
        scheme: the record's signature scheme.
        sig_b64: the record's base64 signature.

    """
    if not isinstance(public_key, rsa.RSAPublicKey) or scheme not in (RSA_PSS, RSA_PKCS1V15):
        return None
    try:
        sig = base64.b64decode(sig_b64, validate=True)
    except ValueError:
        return False
    numbers = public_key.public_numbers()
    k = (numbers.n.bit_length() + 7) // 8
    if len(sig) != k:
        return False
    em = pow(int.from_bytes(sig, "big"), numbers.e, numbers.n).to_bytes(k, "big")
    if scheme == RSA_PKCS1V15:
        prefix = bytes.fromhex("3031300d060960864801650304020105000420")  # DigestInfo SHA-256
        tail = b"\x00" + prefix
        pad_len = k - 2 - len(tail) - 32
        return em[:2] == b"\x00\x01" and em[2:2 + pad_len] == b"\xff" * pad_len and (
            em[2 + pad_len:-32] == tail
        )
    return _looks_like_pss(em, numbers.n.bit_length())


def _looks_like_pss(em_full: bytes, mod_bits: int) -> bool:
    em_bits = mod_bits - 1
    em_len = (em_bits + 7) // 8
    em = em_full[-em_len:]
    if len(em_full) > em_len and em_full[0] != 0:
        return False
    if em[-1] != 0xBC:
        return False
    h_len = 32
    masked_db, h = em[: em_len - h_len - 1], em[em_len - h_len - 1: -1]
    mask = _mgf1(h, len(masked_db))
    db = bytearray(a ^ b for a, b in zip(masked_db, mask, strict=True))
    db[0] &= 0xFF >> (8 * em_len - em_bits)
    sep = len(db) - h_len - 1  # salt length == digest length
    return not any(db[:sep]) and db[sep] == 0x01


def _mgf1(seed: bytes, length: int) -> bytes:
    out = b""
    counter = 0
    while len(out) < length:
        out += hashlib.sha256(seed + counter.to_bytes(4, "big")).digest()
        counter += 1
    return out[:length]


@dataclass(frozen=True)
class ChainCheck:
    """Result of checking a certificate against the project's root CA."""

    ok: bool
    reason: str


def check_issued_by(cert: x509.Certificate, root: x509.Certificate) -> ChainCheck:
    """Check that ``cert`` is the root itself or was signed directly by ``root``."""
    if cert == root:
        return ChainCheck(True, "is the root CA")
    if cert.issuer != root.subject:
        return ChainCheck(
            False,
            f"issued by '{cert.issuer.rfc4514_string()}', not by this project's root CA "
            f"'{root.subject.rfc4514_string()}'",
        )
    try:
        cert.verify_directly_issued_by(root)
    except (ValueError, TypeError, InvalidSignature) as exc:
        return ChainCheck(False, f"its signature does not verify with the root CA ({exc or 'bad'})")
    return ChainCheck(True, "signed by the project root CA")
