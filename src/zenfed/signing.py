"""Private keys and signatures: one loader and one sign/verify pair for every signed file.

The audit log, the privacy ledger and the attestation keys all load a PEM
private key from a startup kit and sign canonical bytes with it. Loading
failures raise :class:`SigningKeyError`; each caller re-raises it as its own
typed error with a hint that fits it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, TypeVar

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa

from zenfed.errors import ZenfedError

RSA_PSS = "rsa-pss-sha256"
"""RSA-PSS with SHA-256 and a salt as long as the digest (32 bytes)."""
RSA_PSS_MAX_SALT = "rsa-pss-sha256-max-salt"
"""RSA-PSS with SHA-256 and the longest salt the key allows (the privacy ledger's scheme)."""
RSA_PKCS1V15 = "rsa-pkcs1v15-sha256"
ECDSA = "ecdsa-sha256"
ED25519 = "ed25519"

PRIVATE_KEY_TYPES: tuple[type, ...] = (
    rsa.RSAPrivateKey,
    ec.EllipticCurvePrivateKey,
    ed25519.Ed25519PrivateKey,
)
"""The key types zenfed signs with."""

_KEY_FOR_SCHEME: dict[str, tuple[type, type]] = {
    RSA_PSS: (rsa.RSAPrivateKey, rsa.RSAPublicKey),
    RSA_PSS_MAX_SALT: (rsa.RSAPrivateKey, rsa.RSAPublicKey),
    RSA_PKCS1V15: (rsa.RSAPrivateKey, rsa.RSAPublicKey),
    ECDSA: (ec.EllipticCurvePrivateKey, ec.EllipticCurvePublicKey),
    ED25519: (ed25519.Ed25519PrivateKey, ed25519.Ed25519PublicKey),
}
SCHEMES = tuple(_KEY_FOR_SCHEME)

_K = TypeVar("_K")


class SigningKeyError(ZenfedError):
    """A private key cannot be read, is not unencrypted PEM, or is of the wrong type."""


def private_key_from_pem(data: bytes, *, source: str, kinds: tuple[type[_K], ...]) -> _K:
    """Parse an unencrypted PEM private key of one of ``kinds``.

    Args:
        data: the PEM bytes.
        source: where they came from (a path), for the error message.
        kinds: the key classes the caller accepts, e.g. ``(rsa.RSAPrivateKey,)``.

    Raises:
        SigningKeyError: If the bytes are not an unencrypted PEM key, or the key is
            not one of ``kinds``.

    """
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as err:  # TypeError: the key is encrypted
        raise SigningKeyError(f"{source} is not an unencrypted PEM private key ({err})") from None
    if not isinstance(key, kinds):
        wanted = " or ".join(_kind_name(k) for k in kinds)
        raise SigningKeyError(f"{source} holds a {type(key).__name__}; use an {wanted} key")
    return key


def load_private_key(path: Path, *, kinds: tuple[type[_K], ...]) -> _K:
    """Read and parse an unencrypted PEM private key file of one of ``kinds``.

    Raises:
        SigningKeyError: If the file cannot be read or holds no usable key.

    """
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        raise SigningKeyError(f"private key {path} does not exist") from None
    except OSError as err:
        raise SigningKeyError(f"cannot read private key {path} ({err.strerror or err})") from None
    return private_key_from_pem(data, source=str(path), kinds=kinds)


_KIND_NAMES: dict[type, str] = {
    rsa.RSAPrivateKey: "RSA",
    ec.EllipticCurvePrivateKey: "EC",
    ed25519.Ed25519PrivateKey: "Ed25519",
}


def _kind_name(kind: type) -> str:
    return _KIND_NAMES.get(kind, kind.__name__)


def public_der(key: Any) -> bytes:
    """Return the DER SubjectPublicKeyInfo of a private key's public half (or a public key)."""
    public = key.public_key() if hasattr(key, "public_key") else key
    der: bytes = public.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return der


def keys_match(private_key: Any, cert: x509.Certificate) -> bool:
    """Return True if ``private_key`` belongs to ``cert``."""
    return public_der(private_key) == public_der(cert.public_key())


def scheme_fits(key: Any, scheme: str) -> bool:
    """Return True if ``scheme`` is known and can sign with (or verify under) ``key``."""
    kinds = _KEY_FOR_SCHEME.get(scheme)
    return kinds is not None and isinstance(key, kinds)


def _pss(scheme: str) -> padding.PSS:
    salt = padding.PSS.MAX_LENGTH if scheme == RSA_PSS_MAX_SALT else padding.PSS.DIGEST_LENGTH
    return padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=salt)


def sign(key: Any, scheme: str, data: bytes) -> bytes:
    """Sign ``data`` with ``key`` under ``scheme`` and return the raw signature.

    Raises:
        SigningKeyError: If ``scheme`` is unknown or does not fit the key.

    """
    if not scheme_fits(key, scheme):
        raise SigningKeyError(f"scheme {scheme!r} does not fit a {type(key).__name__}")
    if scheme in (RSA_PSS, RSA_PSS_MAX_SALT):
        signature: bytes = key.sign(data, _pss(scheme), hashes.SHA256())
    elif scheme == RSA_PKCS1V15:
        signature = key.sign(data, padding.PKCS1v15(), hashes.SHA256())
    elif scheme == ECDSA:
        signature = key.sign(data, ec.ECDSA(hashes.SHA256()))
    else:
        signature = key.sign(data)
    return signature


def verify(public_key: Any, scheme: str, data: bytes, signature: bytes) -> bool:
    """Return True if ``signature`` is ``scheme``'s valid signature of ``data`` under ``public_key``.

    A scheme that does not fit the key, or a malformed signature, is simply False.
    """
    if not scheme_fits(public_key, scheme):
        return False
    try:
        if scheme in (RSA_PSS, RSA_PSS_MAX_SALT):
            public_key.verify(signature, data, _pss(scheme), hashes.SHA256())
        elif scheme == RSA_PKCS1V15:
            public_key.verify(signature, data, padding.PKCS1v15(), hashes.SHA256())
        elif scheme == ECDSA:
            public_key.verify(signature, data, ec.ECDSA(hashes.SHA256()))
        else:
            public_key.verify(signature, data)
    except (InvalidSignature, ValueError, TypeError):
        return False
    return True
