"""Two aggregation tiers: partial encrypted sums from each tier, summed again at the top, equal the flat sum.

The arithmetic a relay tier would do (issue: hierarchy), with real CKKS and pairwise masks: each tier
adds its sites' ciphertexts without a key; the top adds the tiers' partial sums. Masks cancel only across
the whole cohort, so a tier's partial sum, even decrypted by a key holder, is refused as noise.
"""

from __future__ import annotations

import pytest
from test_pairwise import _keys, _maskers, _plain_mean, _updates

from zenfed.privacy.he import (
    EncryptedSum,
    Encryptor,
    HEDecodeError,
    PackingConfig,
    UpdateLayout,
    decrypt_sum,
    make_public_context,
    make_secret_context,
)


@pytest.fixture(scope="module")
def contexts():
    secret = make_secret_context()
    return secret, make_public_context(secret)


def test_tier_sums_summed_again_equal_the_flat_sum_and_a_tier_alone_reads_as_noise(contexts):
    # Prepare: eight masked sites in two tiers of four
    secret, public = contexts
    packing = PackingConfig(quant_bits=16, max_sites=8, clip=0.5, masked=True)
    keys = _keys(8)
    sites = sorted(keys)
    maskers = _maskers(keys, sites)
    updates = _updates(sites, n=200, seed=3)
    weights = {s: (1.0 + i) / 8 for i, s in enumerate(sites)}
    layout = UpdateLayout.from_update(updates[sites[0]])
    with Encryptor(context=secret, packing=packing) as enc:
        sent = {s: enc.encrypt(updates[s], weight=weights[s], layout=layout, mask=maskers[s].mask) for s in sites}
    tiers = [sites[:4], sites[4:]]

    # Execute: each tier sums its sites (no key); the top sums the tiers; and, for comparison, one flat sum
    partials = []
    for tier in tiers:
        partial = EncryptedSum(context=public)
        for site in tier:
            partial.add(sent[site])
        partials.append(partial.to_bytes())
    top, flat = EncryptedSum(context=public), EncryptedSum(context=public)
    for partial in partials:
        top.add(partial)
    for site in sites:
        flat.add(sent[site])

    # Assert: the two-tier sum decrypts to the weighted mean, as the flat one does
    two_tier = decrypt_sum(top.to_bytes(), context=secret, packing=packing, layout=layout, total_weight=None)
    one_tier = decrypt_sum(flat.to_bytes(), context=secret, packing=packing, layout=layout, total_weight=None)
    assert float((two_tier["a"] - one_tier["a"]).abs().max()) == 0.0
    assert float((two_tier["a"].double() - _plain_mean(updates, weights)).abs().max()) <= packing.step
    # A tier's partial sum still carries the masks it shares with the other tier: refused, not read
    with pytest.raises(HEDecodeError):
        decrypt_sum(partials[0], context=secret, packing=packing, layout=layout, total_weight=None)
