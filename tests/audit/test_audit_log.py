"""The log writer: records, chaining, resuming, crash recovery, refusal of secrets."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from zenfed.audit import AuditError, AuditLog, crypto, events
from zenfed.audit.verify import verify_log
from zenfed.digest import sha256_hex


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_new_log_starts_with_identity_and_chains(project, tmp_path):
    # Prepare
    path = tmp_path / "site-1.jsonl"
    # Execute
    with AuditLog.for_kit(project.startup["site-1"], log_path=path) as log:
        rec = log.append(events.ROUND_STARTED, round=1)
    # Assert
    first, second = _lines(path)
    assert first["event"] == events.KIT_IDENTITY and first["seq"] == 0
    assert first["prev"] == crypto.GENESIS
    assert first["participant"] == "site-1"
    assert first["fields"]["role"] == "client"
    assert first["fields"]["certificate_pem"].startswith("-----BEGIN CERTIFICATE-----")
    cert = crypto.load_cert(project.cert("site-1"))
    assert first["cert_sha256"] == crypto.cert_fingerprint(cert) == log.cert_sha256
    raw_first = path.read_bytes().split(b"\n")[0]
    assert second == rec and rec["seq"] == 1 and rec["prev"] == sha256_hex(raw_first)
    assert rec["fields"] == {"round": 1}
    assert crypto.RSA_PSS == rec["sig_alg"]
    assert verify_log(path, root_ca_path=project.root_ca).ok


@pytest.mark.parametrize("kit", ["server1", "admin@example.com"])
def test_for_kit_finds_server_and_admin_keys(project, tmp_path, kit):
    path = tmp_path / "log.jsonl"
    with AuditLog.for_kit(project.startup[kit], log_path=path) as log:
        log.append(events.JOB_SUBMITTED, job="demo", spec_sha256="00" * 32)
    first = _lines(path)[0]
    assert first["participant"] == kit
    assert first["fields"]["role"] == ("server" if kit == "server1" else "admin")
    assert verify_log(path, root_ca_path=project.root_ca).ok


def test_reopen_resumes_chain(project, tmp_path):
    path = tmp_path / "server1.jsonl"
    with AuditLog.for_kit(project.startup["server1"], log_path=path) as log:
        log.append(events.JOB_STARTED, job_id="j")
    with AuditLog.for_kit(project.startup["server1"], log_path=path) as log:
        rec = log.append(events.ROUND_STARTED, round=1)
    assert [r["seq"] for r in _lines(path)] == [0, 1, 2]
    assert rec["event"] == events.ROUND_STARTED
    assert verify_log(path, root_ca_path=project.root_ca).ok


def test_reopen_with_other_participants_key_is_refused(project, tmp_path):
    path = tmp_path / "site-1.jsonl"
    AuditLog.for_kit(project.startup["site-1"], log_path=path).close()
    with pytest.raises(AuditError, match="not 'site-2'"):
        AuditLog.for_kit(project.startup["site-2"], log_path=path)


def test_mismatched_key_and_cert_are_refused(project, tmp_path):
    with pytest.raises(AuditError, match="does not belong"):
        AuditLog.open(tmp_path / "x.jsonl", participant="site-1",
                      key_path=project.key("site-1"), cert_path=project.cert("site-2"))


def test_crash_mid_write_tail_is_moved_aside_not_deleted(project, tmp_path):
    # Prepare: a log whose last write was cut short
    path = tmp_path / "site-1.jsonl"
    with AuditLog.for_kit(project.startup["site-1"], log_path=path) as log:
        log.append(events.ROUND_STARTED, round=1)
    partial = b'{"cert_sha256":"1a35","event":"upd'
    with open(path, "ab") as fh:
        fh.write(partial)
    before = verify_log(path, root_ca_path=project.root_ca)
    # Execute
    with AuditLog.for_kit(project.startup["site-1"], log_path=path) as log:
        log.append(events.ROUND_ENDED, round=1)
    # Assert: the earlier records verified; the tail is kept as evidence; the chain goes on
    assert before.first_bad.kind.value == "truncated" and before.intact == 2
    corrupt = list(tmp_path.glob("site-1.jsonl.corrupt-*"))
    assert len(corrupt) == 1 and corrupt[0].read_bytes() == partial
    records = _lines(path)
    assert [r["event"] for r in records] == [events.KIT_IDENTITY, events.ROUND_STARTED,
                                             events.LOG_RECOVERED, events.ROUND_ENDED]
    assert records[2]["fields"]["moved_to"] == corrupt[0].name
    assert records[2]["fields"]["sha256"] == sha256_hex(partial)
    assert verify_log(path, root_ca_path=project.root_ca).ok


@pytest.mark.parametrize(
    ("fields", "match"),
    [
        ({"payload": b"\x00\x01"}, "is bytes"),
        ({"note": "x" * 4097}, "4097 characters"),
        ({"api_key": "abc"}, "secret"),
        ({"secret_value": 1}, "secret"),
        ({"db_password": "p"}, "secret"),
        ({"authToken": "t"}, "secret"),
        ({"nested": {"private_key_pem": "..."}}, "nested.private_key_pem"),
        ({"values": list(range(5000))}, "5000 items"),
        ({"loss": float("nan")}, "finite"),
        ({"obj": object()}, "object"),
    ],
)
def test_secrets_and_bulk_data_are_refused(project, tmp_path, fields, match):
    with AuditLog.for_kit(project.startup["site-1"], log_path=tmp_path / "s.jsonl") as log:
        with pytest.raises(AuditError, match=match):
            log.append(events.ERROR, **fields)
        ok = log.append(events.EVALUATED, metrics={"num_tokens": 12, "loss": 0.5})
    assert ok["fields"]["metrics"]["num_tokens"] == 12


def test_unknown_event_is_refused(project, tmp_path):
    with AuditLog.for_kit(project.startup["site-1"], log_path=tmp_path / "s.jsonl") as log:
        with pytest.raises(AuditError, match="unknown audit event"):
            log.append("round_strated", round=1)


def test_concurrent_appends_from_threads_and_two_handles_keep_one_chain(project, tmp_path):
    # Prepare: two handles on one file (as two processes would have) and 4 threads each
    path = tmp_path / "server1.jsonl"
    logs = [AuditLog.for_kit(project.startup["server1"], log_path=path) for _ in range(2)]

    def work(log: AuditLog, n: int) -> None:
        for i in range(10):
            log.append(events.UPDATE_RECEIVED, site=f"s{n}", round=i, sha256="0" * 64, size=1)

    threads = [threading.Thread(target=work, args=(logs[n % 2], n)) for n in range(4)]
    # Execute
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for log in logs:
        log.close()
    # Assert
    assert [r["seq"] for r in _lines(path)] == list(range(41))
    assert verify_log(path, root_ca_path=project.root_ca).ok


def _ec_kit(tmp_path: Path) -> tuple[Path, Path, Path]:
    """An EC root CA and an EC participant certificate issued by it."""
    import datetime as dt

    def name(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    now = dt.datetime.now(dt.UTC)
    root_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    root = (x509.CertificateBuilder().subject_name(name("ecproj")).issuer_name(name("ecproj"))
            .public_key(root_key.public_key()).serial_number(1).not_valid_before(now)
            .not_valid_after(now + dt.timedelta(days=1)).sign(root_key, hashes.SHA256()))
    cert = (x509.CertificateBuilder().subject_name(name("site-ec")).issuer_name(name("ecproj"))
            .public_key(key.public_key()).serial_number(2).not_valid_before(now)
            .not_valid_after(now + dt.timedelta(days=1)).sign(root_key, hashes.SHA256()))
    pem = serialization.Encoding.PEM
    (tmp_path / "rootCA.pem").write_bytes(root.public_bytes(pem))
    (tmp_path / "ec.crt").write_bytes(cert.public_bytes(pem))
    (tmp_path / "ec.key").write_bytes(key.private_bytes(
        pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    return tmp_path / "ec.key", tmp_path / "ec.crt", tmp_path / "rootCA.pem"


def test_ec_keys_and_rsa_pkcs1v15_sign_verifiable_logs(project, tmp_path):
    key, cert, root = _ec_kit(tmp_path)
    with AuditLog.open(tmp_path / "ec.jsonl", participant="site-ec", key_path=key,
                       cert_path=cert) as log:
        assert log.append(events.ROUND_STARTED, round=1)["sig_alg"] == crypto.ECDSA
    with AuditLog.open(tmp_path / "pk.jsonl", participant="site-1", key_path=project.key("site-1"),
                       cert_path=project.cert("site-1"), scheme=crypto.RSA_PKCS1V15) as log:
        assert log.append(events.ROUND_STARTED, round=1)["sig_alg"] == crypto.RSA_PKCS1V15
    assert verify_log(tmp_path / "ec.jsonl", root_ca_path=root).ok
    assert verify_log(tmp_path / "pk.jsonl", root_ca_path=project.root_ca).ok
