"""CKKS parameters: security table, refusal below 128 bits, context files."""

from __future__ import annotations

import json
import stat
import struct

import pytest

from zenfed.privacy.he.context import (
    HEContext,
    context_from_bytes,
    context_has_secret_key,
    context_to_bytes,
    load_context,
    make_public_context,
    make_secret_context,
    save_context,
)
from zenfed.privacy.he.errors import HEError, HEKeyError, HESecurityError
from zenfed.privacy.he.params import HEParams, PackingConfig, security_level, slot_layout


@pytest.mark.parametrize(
    ("degree", "bits", "level"),
    [(4096, 100, 128), (4096, 109, 128), (4096, 110, 0), (4096, 75, 192), (8192, 218, 128),
     (8192, 219, 0), (16384, 438, 128), (16384, 237, 256), (3000, 50, 0)],
)
def test_security_level_follows_the_standard_table(degree, bits, level):
    assert security_level(poly_modulus_degree=degree, total_modulus_bits=bits) == level


def test_default_parameters_are_128_bit_and_pack_two_16_bit_values_per_slot():
    params = HEParams()
    layout = slot_layout(params, PackingConfig())
    assert security_level(poly_modulus_degree=4096, total_modulus_bits=100) == 128
    assert layout.fields_per_slot == 2 and layout.field_bits == 22
    assert slot_layout(params, PackingConfig(quant_bits=8)).fields_per_slot == 3


def test_parameters_below_128_bits_are_refused():
    with pytest.raises(HESecurityError, match="109"):
        HEParams(poly_modulus_degree=4096, coeff_mod_bit_sizes=(60, 60))


def test_loading_a_context_below_128_bits_is_refused():
    # Prepare: SEAL itself will not build a sub-128-bit context, so forge the file's
    # header to claim weak parameters (N=2048 with 80 modulus bits: the limit is 54)
    data = context_to_bytes(make_secret_context())
    start = data.index(b"{")
    end = data.index(b"}", start) + 1
    header = json.loads(data[start:end])
    header.update(poly_modulus_degree=2048, coeff_mod_bit_sizes=[40, 40])
    text = json.dumps(header).encode()
    forged = data[: start - 4] + struct.pack("<I", len(text)) + text + data[end:]
    # Execute / Assert
    with pytest.raises(HESecurityError, match="below 128-bit"):
        context_from_bytes(forged)


def test_a_header_that_disagrees_with_its_context_is_refused():
    data = context_to_bytes(make_secret_context())
    forged = data.replace(b'"coeff_mod_bit_sizes": [60, 40]', b'"coeff_mod_bit_sizes": [60, 30]')
    forged = forged[:8] + struct.pack("<I", struct.unpack_from("<I", data, 8)[0]) + forged[12:]
    with pytest.raises(HEError, match="altered"):
        context_from_bytes(forged)


def test_saved_contexts_are_0600_and_keep_or_drop_the_secret(tmp_path):
    # Prepare
    secret = make_secret_context()
    public = make_public_context(secret)
    # Execute
    secret_path = save_context(secret, tmp_path / "site.ctx")
    public_path = save_context(public, tmp_path / "server.ctx")
    # Assert
    for path in (secret_path, public_path):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert context_has_secret_key(secret_path) and context_has_secret_key(secret)
    assert not context_has_secret_key(public_path) and not context_has_secret_key(public)
    loaded = load_context(public_path, require_secret=False)
    assert isinstance(loaded, HEContext) and loaded.key_id == secret.key_id
    with pytest.raises(HEKeyError):
        load_context(public_path, require_secret=True)
    with pytest.raises(HEKeyError):
        load_context(secret_path, require_secret=False)


def test_other_files_are_not_mistaken_for_secret_contexts(tmp_path):
    (tmp_path / "x.json").write_text('{"a": 1}')
    (tmp_path / "y.bin").write_bytes(bytes(range(256)) * 10)
    assert not context_has_secret_key(tmp_path / "x.json")
    assert not context_has_secret_key(tmp_path / "y.bin")


def test_a_garbled_context_file_raises_a_typed_error(tmp_path):
    path = tmp_path / "bad.ctx"
    path.write_bytes(b"not a context")
    with pytest.raises(HEError, match="not a zenfed HE context"):
        load_context(path)
    with pytest.raises(HEError, match="cannot read"):
        load_context(tmp_path / "missing.ctx")
