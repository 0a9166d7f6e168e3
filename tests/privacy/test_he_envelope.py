"""Envelope checks: every bad update is refused with its own typed error."""

from __future__ import annotations

import pytest
import torch

from zenfed.privacy.he.ckks import (
    EncryptedSum,
    Encryptor,
    UpdateLayout,
    decrypt_sum,
    expected_ciphertext_bytes,
    fingerprint,
)
from zenfed.privacy.he.context import make_public_context, make_secret_context
from zenfed.privacy.he.envelope import open_envelope, seal_envelope
from zenfed.privacy.he.errors import (
    EnvelopeError,
    HashMismatchError,
    HEDecodeError,
    LengthMismatchError,
    ParameterMismatchError,
    ReplayError,
    SiteMismatchError,
    UndecodableEnvelopeError,
)
from zenfed.privacy.he.params import PackingConfig

PACKING = PackingConfig()
UPDATE = {"a": torch.full((40, 8), 0.01), "b": torch.full((8, 40), -0.02)}
LAYOUT = UpdateLayout.from_update(UPDATE)


@pytest.fixture(scope="module")
def keys():
    secret = make_secret_context()
    return secret, make_public_context(secret)


@pytest.fixture(scope="module")
def envelope(keys):
    secret, _ = keys
    blob = Encryptor(context=secret, packing=PACKING).encrypt(UPDATE, weight=1.0, layout=LAYOUT)
    return seal_envelope(
        job="job1", round=3, site="site-a", fingerprint=fingerprint(secret, PACKING),
        n_values=LAYOUT.n_values, ciphertext=blob,
    )


def _open(data, keys, **overrides):
    _, public = keys
    args = dict(
        job="job1", round=3, fingerprint=fingerprint(public, PACKING), n_values=LAYOUT.n_values,
        site="site-a",
        ciphertext_bytes=expected_ciphertext_bytes(
            n_values=LAYOUT.n_values, context=public, packing=PACKING
        ),
    )
    args.update(overrides)
    return open_envelope(data, **args)


def test_a_good_envelope_opens_and_its_ciphertext_adds_and_decrypts(keys, envelope):
    # Prepare
    secret, public = keys
    summed = EncryptedSum(context=public)
    # Execute
    header, ciphertext = _open(envelope, keys)
    summed.add(ciphertext)
    result = decrypt_sum(
        summed.to_bytes(), context=secret, packing=PACKING, layout=LAYOUT, total_weight=1.0
    )
    # Assert
    assert (header.job, header.round, header.site) == ("job1", 3, "site-a")
    assert torch.allclose(result["a"], UPDATE["a"], atol=PACKING.step)
    assert torch.allclose(result["b"], UPDATE["b"], atol=PACKING.step)


def test_another_key_is_a_parameter_mismatch(keys, envelope):
    other = make_secret_context()  # same parameters, different key
    with pytest.raises(ParameterMismatchError):
        _open(envelope, keys, fingerprint=fingerprint(other, PACKING))


def test_other_packing_is_a_parameter_mismatch(keys, envelope):
    _, public = keys
    with pytest.raises(ParameterMismatchError):
        _open(envelope, keys, fingerprint=fingerprint(public, PackingConfig(quant_bits=None)))


def test_wrong_number_of_values_is_a_length_mismatch(keys, envelope):
    with pytest.raises(LengthMismatchError):
        _open(envelope, keys, n_values=LAYOUT.n_values + 1)


def test_wrong_ciphertext_size_is_a_length_mismatch(keys, envelope):
    with pytest.raises(LengthMismatchError):
        _open(envelope, keys, ciphertext_bytes=123)


@pytest.mark.parametrize(("job", "round"), [("job1", 2), ("job1", 4), ("job2", 3)])
def test_another_round_or_job_is_a_replay(keys, envelope, job, round):
    with pytest.raises(ReplayError):
        _open(envelope, keys, job=job, round=round)


def test_a_header_naming_another_site_is_refused(keys, envelope):
    with pytest.raises(SiteMismatchError):
        _open(envelope, keys, site="site-b")


def test_a_flipped_ciphertext_byte_is_a_hash_mismatch(keys, envelope):
    tampered = bytearray(envelope)
    tampered[-100] ^= 0x01
    with pytest.raises(HashMismatchError):
        _open(bytes(tampered), keys)


@pytest.mark.parametrize(
    "mutate",
    [
        lambda b: b"garbage" + b,  # bad magic
        lambda b: b[:-1],  # truncated
        lambda b: b + b"\x00",  # padded
        lambda b: b[:6] + b"\xff\xff\xff\xff" + b[10:],  # absurd header length
        lambda b: b.replace(b'"round": 3', b'"round": "3"'),  # wrong type
        lambda b: b.replace(b'"job"', b'"jab"'),  # unknown field
        lambda b: b"",
    ],
)
def test_undecodable_bytes_are_refused(keys, envelope, mutate):
    with pytest.raises(UndecodableEnvelopeError) as info:
        _open(mutate(envelope), keys)
    assert isinstance(info.value, EnvelopeError) and isinstance(info.value, HEDecodeError)


def test_garbage_with_a_valid_hash_is_refused_when_added(keys):
    # Prepare: a sender that hashes garbage correctly passes the envelope checks ...
    secret, public = keys
    size = expected_ciphertext_bytes(n_values=LAYOUT.n_values, context=secret, packing=PACKING)
    envelope = seal_envelope(
        job="job1", round=3, site="site-a", fingerprint=fingerprint(secret, PACKING),
        n_values=LAYOUT.n_values, ciphertext=b"\x07" * size,
    )
    _, ciphertext = _open(envelope, keys)
    # Execute / Assert: ... but the server cannot decode it, and says so with a typed error
    with pytest.raises(HEDecodeError):
        EncryptedSum(context=public).add(ciphertext)
