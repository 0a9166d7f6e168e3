"""Pairwise masks inside the packed CKKS sum: they cancel exactly, hide one site, and survive a dropout."""

from __future__ import annotations

import stat

import numpy as np
import pytest
import torch

from zenfed.privacy.he import (
    EncryptedSum,
    Encryptor,
    HEDecodeError,
    HEError,
    PackingConfig,
    UpdateLayout,
    decrypt_sum,
    make_public_context,
    make_secret_context,
)
from zenfed.privacy.he.params import slot_layout
from zenfed.privacy.pairwise import (
    KEY_FILE,
    PairwiseError,
    PairwiseMasker,
    check_cohort,
    load_or_create_key,
    mask_stream,
    parse_public_key,
    public_key_text,
)

JOB = "job-1"


@pytest.fixture(scope="module")
def contexts():
    secret = make_secret_context()
    return secret, make_public_context(secret)


def _keys(n: int):
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

    return {f"site-{i:02d}": X25519PrivateKey.generate() for i in range(1, n + 1)}


def _maskers(keys, cohort, round_index=1):
    return {
        site: PairwiseMasker(key=keys[site], site=site, job_id=JOB, round_index=round_index,
                             peers={p: keys[p].public_key() for p in cohort if p != site})
        for site in cohort
    }


def _updates(sites, n=300, seed=0, clip=0.5):
    rng = np.random.default_rng(seed)
    return {s: {"a": torch.from_numpy(rng.uniform(-clip, clip, size=(n,)).astype(np.float32))} for s in sites}


def _plain_mean(updates, weights):
    total = sum(weights.values())
    return sum(updates[s]["a"].double() * weights[s] for s in updates) / total


def test_masks_cancel_exactly_at_the_largest_cohort(contexts):
    secret, public = contexts
    packing = PackingConfig(quant_bits=16, max_sites=64, clip=0.5, masked=True)
    sites = sorted(_keys(64))
    keys = _keys(64)
    maskers = _maskers(keys, sites)
    updates = _updates(sites)
    weights = {s: 0.25 + 0.75 * i / 63 for i, s in enumerate(sites)}
    layout = UpdateLayout.from_update(updates[sites[0]])
    total = EncryptedSum(context=public)
    with Encryptor(context=secret, packing=packing) as enc:
        for s in sites:
            total.add(enc.encrypt(updates[s], weight=weights[s], layout=layout, mask=maskers[s].mask))
    mean = decrypt_sum(total.to_bytes(), context=secret, packing=packing, layout=layout, total_weight=None)
    step = packing.step
    # Each weighted value is rounded once (half a step), and the weight itself to 1/Q^2.
    assert float((mean["a"].double() - _plain_mean(updates, weights)).abs().max()) <= step


def test_one_masked_ciphertext_decrypts_to_noise(contexts):
    secret, public = contexts
    packing = PackingConfig(quant_bits=16, max_sites=16, clip=0.5, masked=True)
    lay = slot_layout(secret.params, packing)
    sites = ["a", "b", "c"]
    keys = {s: k for s, k in zip(sites, _keys(3).values(), strict=True)}
    maskers = _maskers(keys, sites)
    updates = _updates(sites, n=4000, seed=1)
    layout = UpdateLayout.from_update(updates["a"])
    with Encryptor(context=secret, packing=packing) as enc:
        blob = enc.encrypt(updates["a"], weight=1.0, layout=layout, mask=maskers["a"].mask)
    # The key holder opens site a's ciphertext alone: the site count it carries is noise...
    with pytest.raises(HEDecodeError, match="masks did not cancel"):
        decrypt_sum(blob, context=secret, packing=packing, layout=layout, total_weight=None)
    # ... and the raw slots, read as the packed values they hide, do not correlate with the update.
    from zenfed.privacy.he.ckks import split_chunks
    from zenfed.privacy.he.seal import SealKit
    from zenfed.privacy.he.wire import expand_ciphertexts

    with SealKit(secret) as kit:
        reals = np.concatenate([kit.decrypt(expand_ciphertexts(c)[1]) for c in split_chunks(blob)])
    seen = np.rint(reals[:4000]).astype(np.int64)
    assert seen.min() >= 0 and seen.max() < lay.mask_modulus  # a value modulo M, nothing else
    corr = np.corrcoef(seen.astype(np.float64), updates["a"]["a"].double().numpy())[0, 1]
    assert abs(corr) < 4 / np.sqrt(4000)  # chance level


def test_dropped_site_is_recovered_by_the_survivors_corrections(contexts):
    secret, public = contexts
    packing = PackingConfig(quant_bits=16, max_sites=8, clip=0.5, masked=True)
    sites = ["h1", "h2", "h3", "h4"]
    keys = {s: k for s, k in zip(sites, _keys(4).values(), strict=True)}
    maskers = _maskers(keys, sites, round_index=3)
    updates = _updates(sites, seed=2)
    layout = UpdateLayout.from_update(updates["h1"])
    survivors, dropped = ["h1", "h2", "h4"], ["h3"]
    total = EncryptedSum(context=public)
    with Encryptor(context=secret, packing=packing) as enc:
        for s in survivors:
            total.add(enc.encrypt(updates[s], weight=1.0, layout=layout, mask=maskers[s].mask))
        incomplete = total.to_bytes()
        for s in survivors:
            total.add(enc.encrypt_correction(layout.n_values, maskers[s].correction(dropped)))
    with pytest.raises(HEDecodeError, match="masks did not cancel"):
        decrypt_sum(incomplete, context=secret, packing=packing, layout=layout, total_weight=None)
    with pytest.raises(HEDecodeError, match="the server says 4"):
        decrypt_sum(total.to_bytes(), context=secret, packing=packing, layout=layout, total_weight=None,
                    contributors=4)
    mean = decrypt_sum(total.to_bytes(), context=secret, packing=packing, layout=layout, total_weight=None,
                       contributors=3)
    expected = _plain_mean({s: updates[s] for s in survivors}, dict.fromkeys(survivors, 1.0))
    assert float((mean["a"].double() - expected).abs().max()) <= packing.step


def test_masks_depend_on_round_and_pair():
    keys = _keys(3)
    sites = sorted(keys)
    r1, r2 = _maskers(keys, sites, 1), _maskers(keys, sites, 2)
    m1, m2 = r1[sites[0]].mask(64, 40), r2[sites[0]].mask(64, 40)
    assert not np.array_equal(m1, m2)
    total = np.zeros(64, dtype=np.uint64)
    for s in sites:
        total = total + r1[s].mask(64, 40)
    assert not (total & np.uint64((1 << 40) - 1)).any()  # the cohort's masks cancel modulo 2^40


def test_masking_is_refused_where_it_cannot_work(contexts):
    secret, _ = contexts
    with pytest.raises(HEError, match="quantised"):
        PackingConfig(quant_bits=None, masked=True)
    packing = PackingConfig(quant_bits=16, max_sites=4, masked=True)
    update = {"a": torch.zeros(10)}
    with Encryptor(context=secret, packing=packing) as enc, pytest.raises(HEError, match="masked before"):
        enc.encrypt(update, weight=1.0, layout=UpdateLayout.from_update(update))
    with pytest.raises(PairwiseError, match="max_sites=2"):
        check_cohort(["a", "b", "c"], site="a", max_sites=2)
    with pytest.raises(PairwiseError, match="does not name"):
        check_cohort(["a", "b"], site="c", max_sites=8)
    keys = _keys(3)
    masker = _maskers(keys, sorted(keys))[sorted(keys)[0]]
    with pytest.raises(PairwiseError, match="not other sites"):
        masker.correction(["site-99"])
    with pytest.raises(PairwiseError, match="32-byte"):
        parse_public_key("AAAA", site="x")


def test_key_file_is_private_and_reused(tmp_path):
    key = load_or_create_key(tmp_path / "keys")
    path = tmp_path / "keys" / KEY_FILE
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "keys").stat().st_mode) == 0o700
    assert public_key_text(load_or_create_key(tmp_path / "keys")) == public_key_text(key)
    path.write_text("not a key")
    with pytest.raises(PairwiseError, match="delete it"):
        load_or_create_key(tmp_path / "keys")


def test_mask_stream_is_uniform_in_range():
    values = mask_stream(bytes(32), count=20000, bits=22)
    assert int(values.max()) < 1 << 22
    assert abs(values.astype(np.float64).mean() / (1 << 22) - 0.5) < 0.01
