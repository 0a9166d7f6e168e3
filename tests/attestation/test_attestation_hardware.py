"""Hardware kinds on a machine without them: they fail closed, with the reason on record."""

from __future__ import annotations

import base64
import hashlib
from pathlib import Path

import pytest
from _att_kits import FakeClock

from zenfed.attestation import (
    AttestationUnavailable,
    Evidence,
    KindPolicy,
    NvidiaGpuTEE,
    PeerPolicy,
    SevSnpTEE,
    TdxTEE,
)
from zenfed.attestation.base import report_data
from zenfed.attestation.records import EvidenceBundle
from zenfed.attestation.service import AttestationService
from zenfed.attestation.sev_snp import REPORT_SIZE, parse_report
from zenfed.attestation.tdx import parse_quote

NONCE = "5a" * 32


def _snp_report(*, participant: str, nonce: str, debug: bool) -> bytes:
    report = bytearray(REPORT_SIZE)
    report[0x08:0x10] = ((1 << 17) | (int(debug) << 19)).to_bytes(8, "little")
    report[0x50:0x90] = report_data(kind="sev-snp", participant=participant, nonce=nonce)
    report[0x90:0xC0] = bytes(range(48))
    report[0x180:0x188] = bytes([3, 0, 0, 0, 0, 0, 8, 115])
    return bytes(report)


def _tdx_quote(*, participant: str, nonce: str, debug: bool) -> bytes:
    header = (4).to_bytes(2, "little") + bytes(2) + (0x81).to_bytes(4, "little") + bytes(40)
    body = bytearray(584)
    body[120] = int(debug)
    body[136:184] = b"\x11" * 48
    body[520:584] = report_data(kind="tdx", participant=participant, nonce=nonce)
    return header + bytes(body) + b"signature-data"


@pytest.mark.parametrize(
    ("tee", "needle"),
    [
        (SevSnpTEE(participant="s", device="/nonexistent/sev-guest"), "not an AMD SEV-SNP guest"),
        (TdxTEE(participant="s", tsm_dir="/nonexistent/tsm"), "not an Intel TDX guest"),
        (NvidiaGpuTEE(participant="s"), "nv_attestation_sdk is not installed"),
    ],
)
def test_generation_without_hardware_fails_closed(tee, needle: str) -> None:
    with pytest.raises(AttestationUnavailable, match=needle):
        tee.generate_evidence(nonce=NONCE)


def test_snp_report_fields_are_read() -> None:
    fields = parse_report(_snp_report(participant="s", nonce=NONCE, debug=True))
    assert fields["measurement"] == bytes(range(48)).hex() and fields["debug"] is True
    assert fields["tcb"] == {"bootloader": 3, "tee": 0, "snp": 8, "microcode": 115}


def test_snp_report_for_another_nonce_is_refused_before_any_tool() -> None:
    tee = SevSnpTEE(participant="v", snpguest="/nonexistent/snpguest")
    raw = _snp_report(participant="s", nonce="00" * 32, debug=False)
    evidence = Evidence("sev-snp", "s", NONCE, 0.0, {"report": base64.b64encode(raw).decode()})
    record = tee.verify(evidence=evidence, nonce=NONCE, policy=KindPolicy())
    assert not record.passed and "REPORT_DATA" in record.reason


def test_snp_signature_unverifiable_without_tool_fails_closed() -> None:
    clock = FakeClock()
    tee = SevSnpTEE(participant="v", snpguest="/nonexistent/snpguest", clock=clock)
    raw = _snp_report(participant="s", nonce=NONCE, debug=False)
    body = {"report": base64.b64encode(raw).decode()}
    evidence = Evidence("sev-snp", "s", NONCE, clock(), body)
    policy = KindPolicy(allowed_measurements=(bytes(range(48)).hex(),))
    record = tee.verify(evidence=evidence, nonce=NONCE, policy=policy)
    assert not record.passed and "snpguest is not installed on this verifier" in record.reason


def test_tdx_quote_fields_are_read() -> None:
    fields = parse_quote(_tdx_quote(participant="s", nonce=NONCE, debug=True))
    assert fields["debug"] is True
    assert fields["measurement"] == hashlib.sha256(b"\x11" * 48 + bytes(192)).hexdigest()


def test_tdx_without_quote_verifier_fails_closed() -> None:
    clock = FakeClock()
    tee = TdxTEE(participant="v", clock=clock)
    quote = _tdx_quote(participant="s", nonce=NONCE, debug=False)
    evidence = Evidence("tdx", "s", NONCE, clock(), {"quote": base64.b64encode(quote).decode()})
    record = tee.verify(evidence=evidence, nonce=NONCE, policy=KindPolicy())
    assert not record.passed and "no quote verifier is configured" in record.reason


def test_service_records_why_a_peer_could_not_attest(tmp_path: Path) -> None:
    # Prepare: a site required to prove SEV-SNP, running on this (non-SNP) machine
    clock = FakeClock()
    site = AttestationService(
        participant="site-1",
        attesters=[SevSnpTEE(participant="site-1", device=str(tmp_path / "no-dev"), clock=clock)],
        verifiers={},
        peers={},
        clock=clock,
    )
    server = AttestationService(
        participant="server",
        attesters=[],
        verifiers={"sev-snp": SevSnpTEE(participant="server", clock=clock)},
        peers={"site-1": PeerPolicy(kinds=("sev-snp",), per_kind={"sev-snp": KindPolicy()})},
        clock=clock,
    )
    # Execute
    evidence = site.evidence_for(server.issue_nonce("site-1"))
    record = server.verify_peer("site-1", evidence)
    # Assert
    assert EvidenceBundle.from_bytes(evidence).items[0].error
    assert not record.passed
    assert "site-1 could not produce sev-snp evidence" in record.reason
    assert "not an AMD SEV-SNP guest" in record.reason
