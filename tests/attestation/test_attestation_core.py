"""Nonce registry, policy checks, records and measurement, without any kit."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from _att_kits import FakeClock, make_package

from zenfed.attestation import (
    AttestationError,
    AttestationResult,
    AttestationRoot,
    EmulatedTEE,
    EvidenceRejected,
    KindPolicy,
    NonceRegistry,
    PeerPolicy,
    Verdict,
    load_policy,
    measure,
)
from zenfed.attestation.measure import combine
from zenfed.errors import SpecError


def test_nonce_is_accepted_once_and_only_before_expiry() -> None:
    clock = FakeClock()
    registry = NonceRegistry(ttl_s=10, clock=clock)
    fresh, stale = registry.issue(peer="a"), registry.issue(peer="a")
    assert len(fresh) == 64 and fresh != stale
    registry.consume(nonce=fresh, peer="a")
    with pytest.raises(EvidenceRejected, match="already used"):
        registry.consume(nonce=fresh, peer="a")
    clock.advance(11)
    with pytest.raises(EvidenceRejected, match="expired"):
        registry.consume(nonce=stale, peer="a")


def _emulated(clock: FakeClock, tmp_path: Path, *, debug: bool = False) -> EmulatedTEE:
    root = AttestationRoot.create(project="p")
    package = make_package(tmp_path / "pkg")
    return EmulatedTEE(
        participant="site-1",
        root=root.cert,
        identity=root.issue(participant="site-1"),
        measure=lambda: measure(workspace_dir=tmp_path, measured_files=(), package_dir=package),
        debug=debug,
        clock=clock,
    )


def test_min_tcb_below_minimum_is_refused(tmp_path: Path) -> None:
    clock = FakeClock()
    tee = _emulated(clock, tmp_path)
    evidence = tee.generate_evidence(nonce="ab" * 32)
    measured = evidence.body["payload"]["measurement"]
    ok = KindPolicy(allowed_measurements=(measured,), min_tcb={"emulator": 1})
    too_new = KindPolicy(allowed_measurements=(measured,), min_tcb={"emulator": 2})
    unknown = KindPolicy(allowed_measurements=(measured,), min_tcb={"microcode": 1})
    assert tee.verify(evidence=evidence, nonce="ab" * 32, policy=ok).passed
    low = tee.verify(evidence=evidence, nonce="ab" * 32, policy=too_new)
    assert not low.passed and "below the minimum 2" in low.reason
    assert (
        "no TCB component 'microcode'"
        in tee.verify(evidence=evidence, nonce="ab" * 32, policy=unknown).reason
    )


def test_empty_allow_list_accepts_nothing(tmp_path: Path) -> None:
    tee = _emulated(FakeClock(), tmp_path)
    evidence = tee.generate_evidence(nonce="cd" * 32)
    record = tee.verify(evidence=evidence, nonce="cd" * 32, policy=KindPolicy())
    assert record.verdict is Verdict.FAIL and "accepts no emulated measurement" in record.reason


def test_debug_allowed_only_when_policy_says_so(tmp_path: Path) -> None:
    tee = _emulated(FakeClock(), tmp_path, debug=True)
    evidence = tee.generate_evidence(nonce="ef" * 32)
    measured = evidence.body["payload"]["measurement"]
    strict = KindPolicy(allowed_measurements=(measured,))
    lax = KindPolicy(allowed_measurements=(measured,), allow_debug=True)
    assert not tee.verify(evidence=evidence, nonce="ef" * 32, policy=strict).passed
    assert tee.verify(evidence=evidence, nonce="ef" * 32, policy=lax).passed


def test_evidence_for_another_nonce_is_refused(tmp_path: Path) -> None:
    tee = _emulated(FakeClock(), tmp_path)
    evidence = tee.generate_evidence(nonce="01" * 32)
    record = tee.verify(evidence=evidence, nonce="02" * 32, policy=KindPolicy())
    assert not record.passed and "another nonce" in record.reason


def test_measurement_covers_paths_contents_and_config(tmp_path: Path) -> None:
    package = make_package(tmp_path / "pkg")
    (tmp_path / "policy.yaml").write_text("a: 1\n")
    first = measure(workspace_dir=tmp_path, measured_files=("policy.yaml",), package_dir=package)
    (package / "__pycache__").mkdir()
    (package / "__pycache__" / "x.cpython-311.pyc").write_bytes(b"\0")
    assert (
        measure(workspace_dir=tmp_path, measured_files=("policy.yaml",), package_dir=package)
        == first
    )
    (package / "sub" / "mod.py").rename(package / "sub" / "mod2.py")
    renamed = measure(workspace_dir=tmp_path, measured_files=("policy.yaml",), package_dir=package)
    assert renamed.package != first.package
    (tmp_path / "policy.yaml").write_text("a: 2\n")
    edited = measure(workspace_dir=tmp_path, measured_files=("policy.yaml",), package_dir=package)
    assert edited.config != renamed.config
    assert edited.value == combine(package=edited.package, config=edited.config).value
    with pytest.raises(AttestationError, match="is missing"):
        measure(workspace_dir=tmp_path, measured_files=("gone.yaml",), package_dir=package)


def test_installed_package_is_measured() -> None:
    from zenfed.attestation.measure import package_digest

    assert len(package_digest()) == 64


def test_policy_rejects_unknown_kind_and_missing_rules(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown TEE kind 'sgx'"):
        PeerPolicy(kinds=("sgx",), per_kind={})
    with pytest.raises(ValueError, match="no per_kind policy"):
        PeerPolicy(kinds=("emulated",), per_kind={})
    bad = tmp_path / "attestation.json"
    bad.write_text(json.dumps({"project": "p", "participant": "s", "peerz": {}}))
    with pytest.raises(SpecError, match="peerz"):
        load_policy(bad)
    with pytest.raises(AttestationError, match="does not exist"):
        load_policy(tmp_path / "none.json")


def test_a_failure_before_any_evidence_names_the_required_kinds() -> None:
    # Execute
    several = AttestationResult.failed(
        participant="site-1", kinds=("emulated", "tdx"), reason="no answer", nonce="n", at=0.0,
        verifier="server",
    )
    none = AttestationResult.failed(participant="site-1", kinds=(), reason="r", nonce="", at=0.0)

    # Assert
    assert several.verdict is Verdict.FAIL and not several.passed
    assert (several.kind, several.reason, several.nonce, several.verifier) == (
        "emulated+tdx", "no answer", "n", "server"
    )
    assert several.time.startswith("1970-01-01T00:00:00")
    assert none.kind == "unknown" and none.verifier == "" and none.measurement == ""
