"""Typed errors of the homomorphic encryption modules, one hierarchy under :class:`HEError`."""

from zenfed.errors import ZenfedError


class HEError(ZenfedError):
    """Homomorphic encryption was misconfigured or misused."""


class HESecurityError(HEError):
    """A context's parameters give less than 128 bits of security."""


class HEKeyError(HEError):
    """A secret key is missing where it is needed, or present where it must not be."""


class HEDecodeError(HEError):
    """Ciphertext bytes cannot be decoded."""


class EnvelopeError(HEError):
    """An encrypted update was refused; the message says why."""


class UndecodableEnvelopeError(EnvelopeError, HEDecodeError):
    """The envelope bytes cannot be parsed."""


class ParameterMismatchError(EnvelopeError):
    """The update was encrypted under other HE parameters or another key."""


class LengthMismatchError(EnvelopeError):
    """The update has another number of values, or ciphertext size, than the round expects."""


class ReplayError(EnvelopeError):
    """The update belongs to another job or round (a replay or a stale result)."""


class SiteMismatchError(EnvelopeError):
    """The update claims to come from another site than the one that sent it."""


class HashMismatchError(EnvelopeError):
    """The ciphertext bytes do not match the SHA-256 in the header."""
