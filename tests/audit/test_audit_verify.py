"""Each kind of damage is caught and named, on the server log and on a site log."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest

from zenfed.audit import AuditLog, crypto, events
from zenfed.audit.verify import Damage, main_verify, verify_log, verify_result

PARTICIPANTS = ["server1", "site-1"]
TARGET = 5  # 0-based index of the line that is tampered with


def _read(path: Path) -> list[bytes]:
    return path.read_bytes().split(b"\n")[:-1]


def _write(path: Path, lines: list[bytes]) -> None:
    path.write_bytes(b"".join(line + b"\n" for line in lines))


def _resign(record: dict, key_path: Path) -> bytes:
    body = {k: v for k, v in record.items() if k != "sig"}
    key = crypto.load_private_key(key_path)
    record["sig"] = crypto.sign(key, record["sig_alg"], crypto.canonical(body))
    return crypto.canonical(record)


def edit(path, project):
    lines = _read(path)
    rec = json.loads(lines[TARGET])
    rec["fields"]["tampered"] = True
    lines[TARGET] = crypto.canonical(rec)
    _write(path, lines)


def delete(path, project):
    lines = _read(path)
    del lines[TARGET]
    _write(path, lines)


def insert(path, project):
    lines = _read(path)
    forged = json.loads(lines[TARGET])
    forged["event"], forged["fields"] = events.ERROR, {"kind": "forged"}
    lines.insert(TARGET, crypto.canonical(forged))
    _write(path, lines)


def replay(path, project):
    lines = _read(path)
    lines.insert(TARGET, lines[2])
    _write(path, lines)


def reorder(path, project):
    lines = _read(path)
    lines[TARGET], lines[TARGET + 1] = lines[TARGET + 1], lines[TARGET]
    _write(path, lines)


def truncate(path, project):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 40])


def wrong_key(path, project):
    lines = _read(path)
    rec = json.loads(lines[TARGET])
    rec["fields"]["tampered"] = True
    lines[TARGET] = _resign(rec, project.key("site-2"))
    _write(path, lines)


EXPECTED = {
    edit: (Damage.EDITED, TARGET + 1),
    delete: (Damage.DELETED, TARGET + 1),
    insert: (Damage.INSERTED, TARGET + 1),
    replay: (Damage.INSERTED, TARGET + 1),
    reorder: (Damage.REORDERED, TARGET + 1),
    wrong_key: (Damage.WRONG_KEY, TARGET + 1),
}


def test_untouched_result_verifies(result_dir):
    verdict = verify_result(result_dir)
    assert verdict.ok, verdict.describe()
    assert set(verdict.logs) == {"server1", "site-1", "site-2"}
    assert verdict.server == "server1"
    assert verdict.matched_updates == 6
    out = io.StringIO()
    assert main_verify(result_dir, out=out) == 0
    assert "verdict: INTACT" in out.getvalue()


@pytest.mark.parametrize("participant", PARTICIPANTS)
@pytest.mark.parametrize("tamper", list(EXPECTED), ids=lambda f: f.__name__)
def test_tampering_is_caught_and_named(result_dir, project, participant, tamper):
    # Prepare
    path = result_dir / "audit" / f"{participant}.jsonl"
    kind, line = EXPECTED[tamper]
    # Execute
    tamper(path, project)
    single = verify_log(path, root_ca_path=result_dir / "audit" / "rootCA.pem")
    whole = verify_result(result_dir)
    out = io.StringIO()
    code = main_verify(path, out=out)
    # Assert
    assert single.first_bad is not None
    assert (single.first_bad.kind, single.first_bad.line) == (kind, line), single.describe()
    assert single.intact == TARGET
    assert not whole.ok and whole.logs[participant].first_bad.kind == kind
    assert code == 1 and f"line {line}" in out.getvalue() and kind.value in out.getvalue()


@pytest.mark.parametrize("participant", PARTICIPANTS)
def test_truncated_tail_is_named_and_earlier_records_verify(result_dir, project, participant):
    path = result_dir / "audit" / f"{participant}.jsonl"
    n = len(_read(path))
    truncate(path, project)
    verdict = verify_log(path, root_ca_path=result_dir / "audit" / "rootCA.pem")
    assert verdict.first_bad.kind == Damage.TRUNCATED
    assert verdict.first_bad.line == n and verdict.intact == n - 1


@pytest.mark.parametrize("participant", PARTICIPANTS)
def test_wrong_key_names_the_signer_in_a_result(result_dir, project, participant):
    path = result_dir / "audit" / f"{participant}.jsonl"
    wrong_key(path, project)
    verdict = verify_result(result_dir).logs[participant]
    assert verdict.first_bad.kind == Damage.WRONG_KEY
    assert "'site-2'" in verdict.first_bad.detail


@pytest.mark.parametrize("participant", PARTICIPANTS)
def test_log_rewritten_with_another_projects_kit_is_foreign(result_dir, foreign_project,
                                                            participant):
    # Prepare: the whole log re-created and signed with a kit from another project
    path = result_dir / "audit" / f"{participant}.jsonl"
    path.unlink()
    with AuditLog.for_kit(foreign_project.startup[participant], log_path=path) as log:
        log.append(events.ROUND_STARTED, round=1)
    # Execute
    verdict = verify_log(path, root_ca_path=result_dir / "audit" / "rootCA.pem")
    # Assert
    assert verdict.first_bad.kind == Damage.FOREIGN_CERTIFICATE
    assert verdict.first_bad.line == 1
    assert "not by this project's root CA" in verdict.first_bad.detail
    assert not verify_result(result_dir).ok


def test_given_kit_certificate_overrides_embedded_one(result_dir, project):
    path = result_dir / "audit" / "site-1.jsonl"
    root = result_dir / "audit" / "rootCA.pem"
    assert verify_log(path, root_ca_path=root, cert_path=project.cert("site-1")).ok
    other = verify_log(path, root_ca_path=root, cert_path=project.cert("site-2"))
    assert other.first_bad.kind == Damage.WRONG_KEY and other.first_bad.line == 1


def test_deleting_first_records_is_named_deleted(result_dir):
    path = result_dir / "audit" / "site-1.jsonl"
    _write(path, _read(path)[2:])
    verdict = verify_log(path, root_ca_path=result_dir / "audit" / "rootCA.pem")
    assert (verdict.first_bad.kind, verdict.first_bad.line) == (Damage.DELETED, 1)


def test_missing_site_log_is_flagged(result_dir):
    (result_dir / "audit" / "site-2.jsonl").unlink()
    verdict = verify_result(result_dir)
    assert verdict.missing_logs == ["site-2"]
    assert not verdict.ok
    out = io.StringIO()
    assert main_verify(result_dir, out=out) == 1
    assert "MISSING LOG: site-2" in out.getvalue()


def test_sent_received_mismatch_is_flagged(project, make_result):
    # Prepare: the server says it got another hash than site-2 sent; both logs stay intact
    result = make_result("mismatch")
    server_log = result / "audit" / "server1.jsonl"
    records = [json.loads(x) for x in _read(server_log)]
    received = next(r for r in records if r["event"] == events.UPDATE_RECEIVED
                    and r["fields"]["site"] == "site-2")
    lines = [x for x in _read(server_log)]
    server_log.unlink()
    with AuditLog.for_kit(project.startup["server1"], log_path=server_log) as log:
        for rec in records[1:]:
            fields = dict(rec["fields"])
            if rec is received:
                fields["sha256"] = "ee" * 32
            log.append(rec["event"], **fields)
    assert len(_read(server_log)) == len(lines)
    # Execute
    verdict = verify_result(result)
    # Assert
    assert all(v.ok for v in verdict.logs.values())
    assert len(verdict.mismatches) == 1
    assert "site-2 sent round 1" in verdict.mismatches[0]
    assert "eeeeeeeeeeeeeeee" in verdict.mismatches[0]
    assert verdict.matched_updates == 5


def test_records_cut_from_a_site_logs_end_are_caught_by_the_servers_anchor(result_dir):
    path = result_dir / "audit" / "site-1.jsonl"
    _write(path, _read(path)[:-1])
    verdict = verify_result(result_dir)
    assert verdict.logs["site-1"].ok  # the chain alone cannot see a cut end
    assert any("deleted from its end" in p for p in verdict.problems)
    assert not verdict.ok


def test_single_log_without_root_ca_cannot_be_verified(result_dir, tmp_path):
    lone = tmp_path / "lone" / "site-1.jsonl"
    lone.parent.mkdir()
    lone.write_bytes((result_dir / "audit" / "site-1.jsonl").read_bytes())
    out = io.StringIO()
    assert main_verify(lone, out=out) == 2
    assert "rootCA.pem" in out.getvalue()


@pytest.mark.parametrize("scheme", [crypto.RSA_PSS, crypto.RSA_PKCS1V15])
def test_rsa_signature_recovery_tells_edit_from_foreign_key_without_other_certs(
    project, tmp_path, scheme
):
    # Prepare: a site log, then two copies: one edited, one edited and re-signed by site-2
    path = tmp_path / "site-1.jsonl"
    with AuditLog.open(path, participant="site-1", key_path=project.key("site-1"),
                       cert_path=project.cert("site-1"), scheme=scheme) as log:
        for rnd in range(8):
            log.append(events.ROUND_STARTED, round=rnd)
    edited, resigned = tmp_path / "a" / "edited.jsonl", tmp_path / "b" / "resigned.jsonl"
    for target in (edited, resigned):
        target.parent.mkdir()
        target.write_bytes(path.read_bytes())
    edit(edited, project)
    wrong_key(resigned, project)
    # Execute: no other certificate is offered, only this participant's and the root
    a = verify_log(edited, root_ca_path=project.root_ca)
    b = verify_log(resigned, root_ca_path=project.root_ca)
    # Assert
    assert (a.first_bad.kind, a.first_bad.line) == (Damage.EDITED, TARGET + 1)
    assert (b.first_bad.kind, b.first_bad.line) == (Damage.WRONG_KEY, TARGET + 1)
    assert "not this participant's" in b.first_bad.detail


def test_site_log_swapped_for_another_jobs_log_is_caught_by_cross_check(result_dir,
                                                                         make_result):
    # Prepare: site-1's genuine log from another job of the same project
    other = make_result("other", rounds=2)
    (result_dir / "audit" / "site-1.jsonl").write_bytes(
        (other / "audit" / "site-1.jsonl").read_bytes())
    # Execute
    verdict = verify_result(result_dir)
    # Assert: the swapped log verifies on its own, but not against the server's records
    assert verdict.logs["site-1"].ok
    assert not verdict.ok
    assert verdict.mismatches or verdict.problems


def test_main_verify_accepts_the_audit_folder(result_dir):
    out = io.StringIO()
    assert main_verify(result_dir / "audit", out=out) == 0
    assert "server1: INTACT" in out.getvalue()


@pytest.mark.parametrize("cut", [1, 5])
def test_whole_records_cut_from_the_end_of_the_servers_log_are_caught(result_dir, cut):
    # Prepare: the release decision and model_released go with the last records
    path = result_dir / "audit" / "server1.jsonl"
    _write(path, _read(path)[:-cut])

    # Execute
    verdict = verify_result(result_dir)

    # Assert: the chain alone cannot see a cut end; the missing closing record does
    assert verdict.logs["server1"].ok
    assert any("records were cut from its end" in p for p in verdict.problems)
    assert not verdict.ok


def test_a_result_file_changed_after_the_job_is_caught(result_dir):
    # Prepare
    path = result_dir / "zenfed_result.json"
    result = json.loads(path.read_text())
    result["final"]["accuracy"] = 0.99
    path.write_text(json.dumps(result, indent=2))

    # Execute
    verdict = verify_result(result_dir)

    # Assert
    assert any("changed after the job" in p for p in verdict.problems) and not verdict.ok


def test_a_failure_record_never_explains_a_substituted_update(make_result):
    # Prepare: the server swapped site-2's round-1 update, then recorded site-2 as silent in round 3
    result = make_result("swap", substituted=("site-2", 1), server_errors=(
        {"kind": "no_answer", "site": "site-2", "round": 3, "message": "site-2 did not answer"},))

    # Execute
    verdict = verify_result(result)

    # Assert
    assert not verdict.ok
    assert any("site-2 sent round 1" in m and "the server received" in m for m in verdict.mismatches)
    assert not any("round 1" in e for e in verdict.explained)
