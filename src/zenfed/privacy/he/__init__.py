"""Homomorphic encryption for zenfed: the public API in one place.

- Parameters and security (``params``): :class:`HEParams`, :class:`PackingConfig`,
  :func:`packing_for`, :func:`security_level`.
- Contexts and their files (``context``): :class:`HEContext`, :func:`make_secret_context`,
  :func:`make_public_context`, :func:`load_context`, :func:`save_context`.
- Packed CKKS (``ckks``, with ``pack``, ``seal`` and ``wire`` below it): :class:`Encryptor`,
  :class:`EncryptedSum`, :func:`decrypt_sum`, :class:`UpdateLayout`, :func:`fingerprint`.
- Envelopes (``envelope``): :func:`seal_envelope`, :func:`open_envelope`, :func:`read_envelope`.
- Errors (``errors``): every HE failure is an :class:`HEError`.

See docs/he.md for the packing, the parameters and the threat model.
"""

from zenfed.privacy.he.ckks import (
    EncryptedSum,
    Encryptor,
    MaskSource,
    decrypt_sum,
    expected_ciphertext_bytes,
    fingerprint,
    open_update,
)
from zenfed.privacy.he.context import (
    SERVER_CONTEXT_FILE,
    SITE_CONTEXT_FILE,
    HEContext,
    context_has_secret_key,
    load_context,
    make_public_context,
    make_secret_context,
    save_context,
)
from zenfed.privacy.he.envelope import EnvelopeHeader, open_envelope, read_envelope, seal_envelope
from zenfed.privacy.he.errors import (
    EnvelopeError,
    HashMismatchError,
    HEDecodeError,
    HEError,
    HEKeyError,
    HESecurityError,
    LengthMismatchError,
    ParameterMismatchError,
    ReplayError,
    SiteMismatchError,
    UndecodableEnvelopeError,
)
from zenfed.privacy.he.pack import UpdateLayout
from zenfed.privacy.he.params import HEParams, PackingConfig, packing_for, security_level

__all__ = [
    "SERVER_CONTEXT_FILE",
    "SITE_CONTEXT_FILE",
    "EncryptedSum",
    "Encryptor",
    "EnvelopeError",
    "EnvelopeHeader",
    "HEContext",
    "HEDecodeError",
    "HEError",
    "HEKeyError",
    "HEParams",
    "HESecurityError",
    "HashMismatchError",
    "LengthMismatchError",
    "MaskSource",
    "PackingConfig",
    "ParameterMismatchError",
    "ReplayError",
    "SiteMismatchError",
    "UndecodableEnvelopeError",
    "UpdateLayout",
    "context_has_secret_key",
    "decrypt_sum",
    "expected_ciphertext_bytes",
    "fingerprint",
    "load_context",
    "make_public_context",
    "make_secret_context",
    "open_envelope",
    "open_update",
    "packing_for",
    "read_envelope",
    "save_context",
    "seal_envelope",
    "security_level",
]
