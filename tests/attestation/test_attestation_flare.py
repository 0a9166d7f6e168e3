"""FLARE-facing parts: a real `nvflare provision` run, and the CCAuthorizer seam."""

from __future__ import annotations

import base64
import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from _att_kits import FakeClock, make_package

from zenfed.attestation import AttestationService, Verdict

PROJECT_YML = """\
api_version: 3
name: attproj
description: attestation builder test
participants:
  - {{name: server, type: server, org: z, fed_learn_port: 18002, admin_port: 18003}}
  - {{name: site-1, type: client, org: z}}
  - {{name: site-2, type: client, org: z}}
  - {{name: admin@z.org, type: admin, org: z, role: project_admin}}
builders:
  - path: nvflare.lighter.impl.workspace.WorkspaceBuilder
    args: {{template_file: master_template.yml}}
  - path: nvflare.lighter.impl.static_file.StaticFileBuilder
    args: {{config_folder: config}}
  - path: nvflare.lighter.impl.cert.CertBuilder
  - path: zenfed.provisioning.attestation_builder.AttestationBuilder
    args:
      measured_files: [local/resources.json.default]
      package_dir: {package_dir}
  - path: nvflare.lighter.impl.signature.SignatureBuilder
"""


@pytest.fixture(scope="module")
def kits(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Provision a 2-site project once with the real `nvflare provision` command."""
    base = tmp_path_factory.mktemp("prov")
    package_dir = make_package(base / "pkg" / "zenfed")
    (base / "project.yml").write_text(PROJECT_YML.format(package_dir=package_dir))
    nvflare = Path(sys.executable).with_name("nvflare")
    done = subprocess.run(
        [str(nvflare), "provision", "-p", "project.yml", "-w", "ws"],
        cwd=base,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    prod = base / "ws" / "attproj" / "prod_00"
    return {"prod": prod, "package": package_dir, "state": base / "ws" / "attproj" / "state"}


def _service(kits: dict[str, Path], name: str, clock: FakeClock) -> AttestationService:
    return AttestationService.from_workspace(
        kits["prod"] / name, package_dir=kits["package"], clock=clock
    )


def test_provisioned_kits_hold_keys_and_policies(kits: dict[str, Path]) -> None:
    for name in ("server", "site-1", "site-2"):
        startup = kits["prod"] / name / "startup"
        key_mode = stat.S_IMODE(os.stat(startup / "attestation_key.pem").st_mode)
        policy = json.loads((startup / "attestation.json").read_text())
        assert key_mode == 0o600
        assert policy["participant"] == name and set(policy["peers"]) == {
            "server",
            "site-1",
            "site-2",
        }
    assert not (kits["prod"] / "admin@z.org" / "startup" / "attestation.json").exists()
    root_key = kits["state"] / "zenfed_attestation_root.key"
    assert stat.S_IMODE(os.stat(root_key).st_mode) == 0o600


def test_provisioned_participants_attest_each_other(kits: dict[str, Path]) -> None:
    # Prepare
    server, site = _service(kits, "server", FakeClock()), _service(kits, "site-1", FakeClock())
    # Execute: both directions, fresh nonces
    to_server = server.verify_peer("site-1", site.evidence_for(server.issue_nonce("site-1")))
    to_site = site.verify_peer("server", server.evidence_for(site.issue_nonce("server")))
    # Assert
    assert to_server.passed, to_server.reason
    assert to_site.passed, to_site.reason


def test_signature_builder_signed_the_attestation_files(kits: dict[str, Path]) -> None:
    # Only HE/CC kits are signed by FLARE 2.9; when a kit is signed, ours must be in it.
    sig = kits["prod"] / "site-1" / "startup" / "signature.json"
    if sig.exists():
        assert "attestation.json" in json.loads(sig.read_text())


def test_changed_local_config_fails_the_servers_check(kits: dict[str, Path], tmp_path) -> None:
    # Prepare: a copy of site-2's kit with an edited measured file
    import shutil

    copy = tmp_path / "site-2"
    shutil.copytree(kits["prod"] / "site-2", copy)
    resources = copy / "local" / "resources.json.default"
    resources.write_text(resources.read_text().replace("{", '{"extra": 1,', 1))
    tampered = AttestationService.from_workspace(
        copy, package_dir=kits["package"], clock=FakeClock()
    )
    server = _service(kits, "server", FakeClock())
    # Execute
    record = server.verify_peer("site-2", tampered.evidence_for(server.issue_nonce("site-2")))
    # Assert
    assert record.verdict is Verdict.FAIL and "measurement" in record.reason


def _authorizer(kits: dict[str, Path], name: str):
    from zenfed.executors.cc_authorizer import ZenfedCCAuthorizer

    return ZenfedCCAuthorizer(
        kind="emulated", workspace_dir=str(kits["prod"] / name), package_dir=str(kits["package"])
    )


def test_cc_authorizer_round_trip_and_replay(kits: dict[str, Path]) -> None:
    from nvflare.app_opt.confidential_computing.cc_authorizer import CCAuthorizer

    # Prepare
    site, server = _authorizer(kits, "site-1"), _authorizer(kits, "server")
    # Execute
    token = site.generate()
    first, replay = server.verify(token), server.verify(token)
    # Assert
    assert isinstance(site, CCAuthorizer) and site.get_namespace() == "x-zenfed-emulated"
    assert first is True and replay is False
    records = server.records()
    assert [r["verdict"] for r in records] == ["pass", "fail"]
    assert records[0]["participant"] == "site-1" and "already seen" in records[1]["reason"]


def test_cc_authorizer_fails_closed(kits: dict[str, Path], tmp_path: Path) -> None:
    from zenfed.executors.cc_authorizer import ZenfedCCAuthorizer

    server = _authorizer(kits, "server")
    forged = base64.b64encode(b'{"format": "zenfed-evidence/1"}').decode()
    lost = ZenfedCCAuthorizer(kind="emulated", workspace_dir=str(tmp_path / "nowhere"))
    assert server.verify("not base64!") is False
    assert server.verify(forged) is False
    assert lost.generate() == "" and lost.verify(forged) is False
