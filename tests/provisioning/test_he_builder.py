"""A real `nvflare provision` with HEContextBuilder: secret keys reach site kits only."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from zenfed.privacy.he.ckks import EncryptedSum, Encryptor, UpdateLayout, decrypt_sum
from zenfed.privacy.he.context import (
    SERVER_CONTEXT_FILE,
    SITE_CONTEXT_FILE,
    context_has_secret_key,
    load_context,
)
from zenfed.privacy.he.errors import HEKeyError
from zenfed.privacy.he.params import PackingConfig

PROJECT = """\
api_version: 3
name: hetest
description: zenfed HE provisioning test
participants:
  - {name: server1, type: server, org: zen, fed_learn_port: 18002, admin_port: 18003}
  - {name: site-a, type: client, org: zen}
  - {name: site-b, type: client, org: zen}
  - {name: admin@zen.org, type: admin, org: zen, role: project_admin}
builders:
  - path: nvflare.lighter.impl.workspace.WorkspaceBuilder
    args: {template_file: [master_template.yml]}
  - path: nvflare.lighter.impl.static_file.StaticFileBuilder
    args: {config_folder: config}
  - path: nvflare.lighter.impl.cert.CertBuilder
  - path: zenfed.provisioning.he_builder.HEContextBuilder
    args: {poly_modulus_degree: 4096, coeff_mod_bit_sizes: [60, 40]}
  - path: nvflare.lighter.impl.signature.SignatureBuilder
"""


@pytest.fixture(scope="module")
def kits(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("prov")
    (root / "project.yml").write_text(PROJECT)
    nvflare = Path(sys.executable).with_name("nvflare")
    result = subprocess.run(
        [str(nvflare), "provision", "-p", "project.yml", "-w", "ws"],
        cwd=root, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    prods = sorted((root / "ws" / "hetest").glob("prod_*"))
    assert prods, "nvflare provision wrote no prod folder"
    return prods[-1]


def _files(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.is_file()]


def test_each_site_kit_gets_the_secret_context_in_startup(kits):
    for site in ("site-a", "site-b"):
        path = kits / site / "startup" / SITE_CONTEXT_FILE
        assert context_has_secret_key(path)
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        load_context(path, require_secret=True)


def test_no_file_in_the_server_or_admin_kits_holds_a_secret_key(kits):
    # Prepare
    server_files = _files(kits / "server1")
    admin_files = _files(kits / "admin@zen.org")
    # Execute / Assert
    assert kits / "server1" / "startup" / SERVER_CONTEXT_FILE in server_files
    assert not [p for p in server_files + admin_files if context_has_secret_key(p)]
    assert not [p for p in admin_files if "he" in p.name and p.suffix == ".context"]


def test_the_server_context_adds_but_cannot_decrypt(kits):
    # Prepare
    server = load_context(kits / "server1" / "startup" / SERVER_CONTEXT_FILE, require_secret=False)
    site_a = load_context(kits / "site-a" / "startup" / SITE_CONTEXT_FILE, require_secret=True)
    site_b = load_context(kits / "site-b" / "startup" / SITE_CONTEXT_FILE, require_secret=True)
    packing = PackingConfig()
    updates = [{"w": torch.full((4, 300), 0.01)}, {"w": torch.full((4, 300), 0.03)}]
    layout = UpdateLayout.from_update(updates[0])
    # Execute
    summed = EncryptedSum(context=server)
    for ctx, update in zip((site_a, site_b), updates, strict=True):
        with Encryptor(context=ctx, packing=packing) as enc:
            summed.add(enc.encrypt(update, weight=1.0, layout=layout))
    blob = summed.to_bytes()
    # Assert
    with pytest.raises(HEKeyError):
        decrypt_sum(blob, context=server, packing=packing, layout=layout, total_weight=2.0)
    with pytest.raises(ValueError):  # TenSEAL itself has no key to decrypt with
        summed._chunks[0][0].decrypt()
    mean = decrypt_sum(blob, context=site_b, packing=packing, layout=layout, total_weight=2.0)
    assert torch.allclose(mean["w"], torch.full((4, 300), 0.02), atol=packing.step)
    assert site_a.key_id == site_b.key_id == server.key_id
    assert os.access(kits / "server1" / "startup", os.R_OK)


def test_the_builder_refuses_parameters_below_128_bits():
    from zenfed.privacy.he.errors import HESecurityError
    from zenfed.provisioning.he_builder import HEContextBuilder

    with pytest.raises(HESecurityError):
        HEContextBuilder(poly_modulus_degree=4096, coeff_mod_bit_sizes=[60, 60])
