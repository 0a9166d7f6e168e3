"""Packed CKKS aggregation: the decrypted sum equals plaintext FedAvg."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from zenfed.privacy.he.ckks import (
    EncryptedSum,
    Encryptor,
    UpdateLayout,
    decrypt_sum,
    expected_ciphertext_bytes,
    pack_values,
    unpack_values,
)
from zenfed.privacy.he.context import make_public_context, make_secret_context
from zenfed.privacy.he.errors import HEDecodeError, HEError, HEKeyError
from zenfed.privacy.he.params import PackingConfig, slot_layout

QUANT = PackingConfig(quant_bits=16, max_sites=64, clip=0.05)
REAL = PackingConfig(quant_bits=None, max_sites=64)


@pytest.fixture(scope="module")
def secret():
    return make_secret_context()


@pytest.fixture(scope="module")
def public(secret):
    return make_public_context(secret)


def _updates(n_sites: int, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    shapes = {"l0.q.lora_A": (8, 64), "l0.q.lora_B": (64, 8), "l1.v.lora_B": (33, 7)}
    return [
        {name: torch.randn(shape, generator=gen) * 0.01 for name, shape in shapes.items()}
        for _ in range(n_sites)
    ]


def _fedavg(updates, weights, clip=None):
    total = sum(weights)
    value = (lambda t: t.double()) if clip is None else (lambda t: t.double().clamp(-clip, clip))
    pairs = list(zip(updates, weights, strict=True))
    return {k: sum(w * value(u[k]) for u, w in pairs) / total for k in updates[0]}


def _he_fedavg(secret, public, packing, updates, weights):
    layout = UpdateLayout.from_update(updates[0])
    summed = EncryptedSum(context=public)
    with Encryptor(context=secret, packing=packing) as enc:
        for update, weight in zip(updates, weights, strict=True):
            summed.add(enc.encrypt(update, weight=weight, layout=layout))
    blob = summed.to_bytes()
    assert len(blob) == expected_ciphertext_bytes(
        n_values=layout.n_values, context=secret, packing=packing, summed=True
    )
    return decrypt_sum(
        blob, context=secret, packing=packing, layout=layout, total_weight=sum(weights)
    )


@pytest.mark.parametrize("n_sites", [2, 3, 16])
def test_sum_without_quantisation_matches_fedavg_within_1e6(secret, public, n_sites):
    # Prepare
    updates = _updates(n_sites)
    weights = [float(w) for w in np.linspace(1.0, 50.0, n_sites)]  # any positive weights
    # Execute
    result = _he_fedavg(secret, public, REAL, updates, weights)
    # Assert: relative to the largest plaintext magnitude of each tensor
    plain = _fedavg(updates, weights)
    for name, tensor in plain.items():
        error = (result[name].double() - tensor).abs().max().item()
        assert error <= 1e-6 * tensor.abs().max().item(), (name, error)


@pytest.mark.parametrize("n_sites", [2, 3, 16])
def test_quantised_sum_matches_fedavg_within_one_step(secret, public, n_sites):
    # Prepare: weights normalised to (0, 1], as quantised mode requires
    updates = _updates(n_sites, seed=n_sites)
    weights = [float(w) for w in np.linspace(0.5, 1.0, n_sites)]
    # Execute
    result = _he_fedavg(secret, public, QUANT, updates, weights)
    # Assert: rounding error at most n * step / 2 on the sum, i.e. <= step on this mean
    plain = _fedavg(updates, weights, clip=QUANT.clip)
    bound = n_sites * QUANT.step / 2 / sum(weights)
    errors = [(result[k].double() - v).abs().max().item() for k, v in plain.items()]
    assert max(errors) <= bound <= QUANT.step
    assert max(errors) > 0  # it really was quantised


def test_the_whole_round_prints_nothing_on_stdout(secret, public, capfd):
    # TenSEAL warns on stdout for vectors spanning several ciphertexts; FLARE logs are ours
    big = [{"w": torch.full((30_000,), 0.01)}] * 2
    _he_fedavg(secret, public, QUANT, big, [1.0, 1.0])
    assert capfd.readouterr().out == ""


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_64_sites_at_the_clip_bound_use_the_full_headroom_without_overflow(secret, public, sign):
    # Prepare: every value of every site at +-clip: the largest packed sums there are
    updates = [{"w": torch.full((9000,), sign * QUANT.clip)} for _ in range(64)]
    # Execute
    result = _he_fedavg(secret, public, QUANT, updates, [1.0] * 64)
    # Assert: exact, since clip is a multiple of the step
    assert torch.allclose(result["w"], torch.full((9000,), sign * QUANT.clip), rtol=0, atol=1e-9)


def test_values_beyond_clip_are_clipped(secret, public):
    # Prepare
    update = {"w": torch.tensor([0.2, -0.3, 0.01])}
    # Execute
    result = _he_fedavg(secret, public, QUANT, [update, update], [1.0, 1.0])
    # Assert
    expected = torch.tensor([0.05, -0.05, 0.01])
    assert torch.allclose(result["w"], expected, atol=QUANT.step)


def test_16_bit_values_pack_two_per_slot_and_decode_exactly(secret):
    # Prepare
    layout = slot_layout(secret.params, QUANT)
    rng = np.random.default_rng(1)
    sites = [rng.uniform(-0.05, 0.05, 1001) for _ in range(64)]  # the full headroom
    # Execute: the plaintext sum of packed slots decodes to the sum of quantised values
    packed = sum(pack_values(v, packing=QUANT, layout=layout) for v in sites)
    decoded = unpack_values(packed, n_values=1001, packing=QUANT, layout=layout)
    # Assert
    quantised = sum(np.rint(v / QUANT.step) for v in sites) * QUANT.step
    assert layout.fields_per_slot == 2
    assert np.abs(packed).max() < 2.0**layout.value_bits
    assert np.allclose(decoded, quantised, rtol=0, atol=1e-12)


def test_wire_size_is_at_most_4x_float32(secret):
    # Prepare: an update big enough that padding of the last ciphertext is negligible
    n_values = 200_000
    # Execute
    upload = expected_ciphertext_bytes(n_values=n_values, context=secret, packing=QUANT)
    summed = expected_ciphertext_bytes(
        n_values=n_values, context=secret, packing=QUANT, summed=True
    )
    # Assert: 4 values per slot (2 packed x real/imaginary), seeded: about 1x float32 up
    assert upload <= 1.0 * 4 * n_values
    assert summed <= 2.0 * 4 * n_values


def test_server_context_cannot_decrypt(secret, public):
    # Prepare
    updates = _updates(2)
    layout = UpdateLayout.from_update(updates[0])
    blob = Encryptor(context=secret, packing=QUANT).encrypt(updates[0], weight=1.0, layout=layout)
    # Execute / Assert
    assert not public.has_secret_key
    with pytest.raises(HEKeyError):
        decrypt_sum(blob, context=public, packing=QUANT, layout=layout, total_weight=1.0)
    with pytest.raises(HEKeyError):
        Encryptor(context=public, packing=QUANT)


def test_ciphertext_of_another_key_or_shape_is_refused(secret, public):
    # Prepare
    updates = _updates(2)
    layout = UpdateLayout.from_update(updates[0])
    big = {"w": torch.zeros(20_000)}  # three ciphertexts; the others fit one
    enc = Encryptor(context=secret, packing=QUANT)
    summed = EncryptedSum(context=public)
    summed.add(enc.encrypt(big, weight=1.0, layout=UpdateLayout.from_update(big)))
    before = summed.to_bytes()
    # Execute / Assert: a different shape, scale or garbage leaves the sum untouched
    with pytest.raises(HEDecodeError):
        summed.add(enc.encrypt(updates[0], weight=1.0, layout=layout))
    with pytest.raises(HEDecodeError):
        real = Encryptor(context=secret, packing=REAL)
        summed.add(real.encrypt(updates[1], weight=1.0, layout=layout))
    with pytest.raises(HEDecodeError):
        summed.add(b"ZFB1" + b"\x00" * 40)
    assert summed.count == 1 and summed.to_bytes() == before


def test_weight_above_one_is_refused_when_quantising(secret):
    updates = _updates(1)
    layout = UpdateLayout.from_update(updates[0])
    with pytest.raises(HEError, match="normalise"):
        Encryptor(context=secret, packing=QUANT).encrypt(updates[0], weight=2.0, layout=layout)


def test_layout_order_is_respected_and_checked():
    update = {"b": torch.zeros(2), "a": torch.zeros(3)}
    assert [n for n, _ in UpdateLayout.from_update(update, order=["b", "a"]).entries] == ["b", "a"]
    assert [n for n, _ in UpdateLayout.from_update(update).entries] == ["a", "b"]
    with pytest.raises(HEError):
        UpdateLayout.from_update(update, order=["a"])
