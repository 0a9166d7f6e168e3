"""The emulated TEE through the service API: accepted when right, refused for each fault."""

from __future__ import annotations

import base64
import json
import os
import stat

from _att_kits import FakeClock, Project, provision

from zenfed.attestation import AttestationResult, AttestationService, Verdict


def _tamper(evidence: bytes, edit) -> bytes:
    data = json.loads(evidence)
    edit(data["evidence"][0])
    return json.dumps(data).encode()


def test_correct_evidence_is_accepted(project: Project) -> None:
    # Prepare
    server, site = project.service("server"), project.service("site-1")
    nonce = server.issue_nonce("site-1")
    # Execute
    record = server.verify_peer("site-1", site.evidence_for(nonce))
    # Assert
    assert record.verdict is Verdict.PASS, record.reason
    assert (record.participant, record.kind, record.nonce) == ("site-1", "emulated", nonce)
    assert record.verifier == "server" and len(record.measurement) == 64
    assert AttestationResult.from_dict(json.loads(record.to_json())) == record


def test_verification_is_mutual(project: Project) -> None:
    server, site = project.service("server"), project.service("site-1")
    nonce = site.issue_nonce("server")
    record = site.verify_peer("server", server.evidence_for(nonce))
    assert record.passed, record.reason


def test_wrong_measurement_is_refused(project: Project) -> None:
    # Prepare: site-1 changes its runtime configuration after provisioning
    server, site = project.service("server"), project.service("site-1")
    (project.workspace("site-1") / "local" / "site_policy.yaml").write_text("site: evil\n")
    nonce = server.issue_nonce("site-1")
    # Execute
    record = server.verify_peer("site-1", site.evidence_for(nonce))
    # Assert
    assert record.verdict is Verdict.FAIL
    assert "is not among the 1 accepted" in record.reason
    assert record.measurement  # the record says what was measured


def test_changed_package_is_refused(project: Project) -> None:
    server, site = project.service("server"), project.service("site-1")
    (project.package_dir / "sub" / "mod.py").write_text("def f():\n    return 2\n")
    record = server.verify_peer("site-1", site.evidence_for(server.issue_nonce("site-1")))
    assert not record.passed and "measurement" in record.reason


def test_replayed_nonce_is_refused(project: Project) -> None:
    server, site = project.service("server"), project.service("site-1")
    evidence = site.evidence_for(server.issue_nonce("site-1"))
    first = server.verify_peer("site-1", evidence)
    replay = server.verify_peer("site-1", evidence)
    assert first.passed
    assert replay.verdict is Verdict.FAIL and "already used" in replay.reason


def test_nonce_not_issued_by_verifier_is_refused(project: Project) -> None:
    server, site = project.service("server"), project.service("site-1")
    record = server.verify_peer("site-1", site.evidence_for("00" * 32))
    assert not record.passed and "not issued by this verifier" in record.reason


def test_nonce_issued_for_another_site_is_refused(project: Project) -> None:
    server, site2 = project.service("server"), project.service("site-2")
    nonce = server.issue_nonce("site-1")
    record = server.verify_peer("site-2", site2.evidence_for(nonce))
    assert not record.passed and "issued for 'site-1'" in record.reason


def test_expired_evidence_is_refused(project: Project) -> None:
    # Prepare: evidence produced in time, delivered after the nonce expired
    server, site = project.service("server"), project.service("site-1")
    evidence = site.evidence_for(server.issue_nonce("site-1"))
    project.clock.advance(121)
    # Execute
    record = server.verify_peer("site-1", evidence)
    # Assert
    assert record.verdict is Verdict.FAIL and "expired" in record.reason


def test_old_evidence_is_refused_by_its_signed_time(project: Project) -> None:
    # Prepare: the site's clock is 10 minutes behind (its evidence is stale when signed)
    server = project.service("server")
    nonce = server.issue_nonce("site-1")
    late = AttestationService.from_workspace(
        project.workspace("site-1"),
        clock=FakeClock(project.clock.now - 600),
        package_dir=project.package_dir,
    )
    record = server.verify_peer("site-1", late.evidence_for(nonce))
    assert not record.passed and "evidence expired: issued 600.0 s ago" in record.reason


def test_tampered_signature_is_refused(project: Project) -> None:
    server, site = project.service("server"), project.service("site-1")
    evidence = site.evidence_for(server.issue_nonce("site-1"))

    def flip(item: dict) -> None:
        raw = bytearray(base64.b64decode(item["body"]["signature"]))
        raw[0] ^= 1
        item["body"]["signature"] = base64.b64encode(bytes(raw)).decode()

    record = server.verify_peer("site-1", _tamper(evidence, flip))
    assert record.verdict is Verdict.FAIL and "signature" in record.reason


def test_tampered_measurement_is_refused(project: Project) -> None:
    # A forged payload claiming the accepted measurement breaks the signature.
    server, site = project.service("server"), project.service("site-1")
    (project.workspace("site-1") / "local" / "site_policy.yaml").write_text("site: evil\n")
    good = server._peers["site-1"].per_kind["emulated"].allowed_measurements[0]
    evidence = site.evidence_for(server.issue_nonce("site-1"))

    def forge(item: dict) -> None:
        item["body"]["payload"]["measurement"] = good

    record = server.verify_peer("site-1", _tamper(evidence, forge))
    assert not record.passed and "signature" in record.reason


def test_key_from_another_project_is_refused(project: Project, tmp_path) -> None:
    # Prepare: another project provisions a participant with the same name and package
    provision(tmp_path / "other", package_dir=project.package_dir, project="other")
    foreign = AttestationService.from_workspace(
        tmp_path / "other" / "site-1", clock=project.clock, package_dir=project.package_dir
    )
    server = project.service("server")
    # Execute
    record = server.verify_peer("site-1", foreign.evidence_for(server.issue_nonce("site-1")))
    # Assert
    assert record.verdict is Verdict.FAIL
    assert "not certified by this project's attestation root" in record.reason


def test_site_impersonating_another_is_refused(project: Project) -> None:
    server, site2 = project.service("server"), project.service("site-2")
    evidence = site2.evidence_for(server.issue_nonce("site-1"))
    record = server.verify_peer("site-1", evidence)
    assert not record.passed and "evidence is from 'site-2'" in record.reason


def test_debug_mode_is_refused(project: Project) -> None:
    server = project.service("server")
    site = project.service("site-1")
    site._attesters[0]._debug = True
    record = server.verify_peer("site-1", site.evidence_for(server.issue_nonce("site-1")))
    assert not record.passed and "debug mode" in record.reason


def test_garbage_evidence_fails_closed(project: Project) -> None:
    server = project.service("server")
    server.issue_nonce("site-1")
    for junk in (b"", b"\x80\x04pickle", b"{}", b'{"format": "zenfed-evidence/1"}'):
        record = server.verify_peer("site-1", junk)
        assert record.verdict is Verdict.FAIL and record.reason


def test_key_file_is_private(project: Project) -> None:
    mode = os.stat(project.workspace("site-1") / "startup" / "attestation_key.pem").st_mode
    assert stat.S_IMODE(mode) == 0o600
