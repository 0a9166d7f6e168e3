"""The encoding and keys every signature rests on: canonical JSON, key loading, sign and verify."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from zenfed import signing
from zenfed.audit import AuditError, crypto
from zenfed.digest import CanonicalJSONError, canonical_json
from zenfed.errors import ZenfedError


def _pem(key: object, path: Path, *, password: bytes | None = None) -> Path:
    encryption = (
        serialization.BestAvailableEncryption(password) if password else serialization.NoEncryption()
    )
    path.write_bytes(
        key.private_bytes(  # type: ignore[attr-defined]
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption
        )
    )
    return path


@pytest.fixture(scope="module")
def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def test_canonical_json_bytes_are_sorted_compact_utf8() -> None:
    # Execute
    data = canonical_json({"b": [1, 2.5, None, True], "a": "é", "c": {"y": 1, "x": -0.0}})
    # Assert: the exact bytes every existing hash and signature was taken over.
    assert data == '{"a":"é","b":[1,2.5,null,true],"c":{"x":-0.0,"y":1}}'.encode()


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_canonical_json_refuses_non_finite_numbers_with_a_typed_error(bad: float) -> None:
    # Execute / Assert: a typed zenfed error that says what to do.
    with pytest.raises(CanonicalJSONError, match="replace NaN or infinity with None") as caught:
        canonical_json({"loss": [bad]})
    assert isinstance(caught.value, ZenfedError) and isinstance(caught.value, ValueError)


def test_the_audit_encoding_is_the_shared_one_and_raises_audit_errors() -> None:
    # Assert
    assert crypto.canonical({"z": 1, "a": [0.5]}) == canonical_json({"z": 1, "a": [0.5]})
    with pytest.raises(AuditError, match="finite numbers"):
        crypto.canonical({"loss": math.nan})
    with pytest.raises(AuditError, match="cannot encode an audit record"):
        crypto.canonical({"obj": object()})


def test_key_loading_says_what_is_wrong(tmp_path: Path, rsa_key: rsa.RSAPrivateKey) -> None:
    # Prepare
    ed_path = _pem(ed25519.Ed25519PrivateKey.generate(), tmp_path / "ed.key")
    locked = _pem(rsa_key, tmp_path / "locked.key", password=b"pw")
    junk = tmp_path / "junk.key"
    junk.write_text("not a key")
    rsa_only = (rsa.RSAPrivateKey,)
    # Execute / Assert
    with pytest.raises(signing.SigningKeyError, match="does not exist"):
        signing.load_private_key(tmp_path / "missing.key", kinds=rsa_only)
    with pytest.raises(signing.SigningKeyError, match="not an unencrypted PEM private key"):
        signing.load_private_key(junk, kinds=rsa_only)
    with pytest.raises(signing.SigningKeyError, match="not an unencrypted PEM private key"):
        signing.load_private_key(locked, kinds=rsa_only)
    with pytest.raises(signing.SigningKeyError, match="holds a .*Ed25519.*; use an RSA key"):
        signing.load_private_key(ed_path, kinds=rsa_only)
    assert isinstance(signing.load_private_key(ed_path, kinds=signing.PRIVATE_KEY_TYPES),
                      ed25519.Ed25519PrivateKey)


def test_the_audit_loader_wraps_key_errors_as_audit_errors(tmp_path: Path) -> None:
    with pytest.raises(AuditError, match="does not exist; pass the .key file"):
        crypto.load_private_key(tmp_path / "missing.key")


@pytest.mark.parametrize(
    "scheme",
    [signing.RSA_PSS, signing.RSA_PSS_MAX_SALT, signing.RSA_PKCS1V15, signing.ECDSA, signing.ED25519],
)
def test_each_scheme_verifies_its_own_signature_only(scheme: str, rsa_key: rsa.RSAPrivateKey) -> None:
    # Prepare
    key = {signing.ECDSA: ec.generate_private_key(ec.SECP256R1()),
           signing.ED25519: ed25519.Ed25519PrivateKey.generate()}.get(scheme, rsa_key)
    # Execute
    signature = signing.sign(key, scheme, b"body")
    # Assert
    assert signing.verify(key.public_key(), scheme, b"body", signature)
    assert not signing.verify(key.public_key(), scheme, b"edited", signature)
    assert not signing.verify(key.public_key(), "unknown", b"body", signature)


def test_the_two_pss_salts_are_distinct_schemes(rsa_key: rsa.RSAPrivateKey) -> None:
    # The ledger's files are signed with the longest salt, the audit log's with 32 bytes.
    signature = signing.sign(rsa_key, signing.RSA_PSS_MAX_SALT, b"ledger")
    assert not signing.verify(rsa_key.public_key(), signing.RSA_PSS, b"ledger", signature)
    with pytest.raises(signing.SigningKeyError, match="does not fit"):
        signing.sign(rsa_key, signing.ED25519, b"x")
    with pytest.raises(AuditError, match="unknown signature scheme"):
        crypto.check_scheme(rsa_key, signing.RSA_PSS_MAX_SALT)
