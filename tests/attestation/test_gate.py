"""The per-job gate, server side, on kits from a real `nvflare provision`.

Sites answer in-process with the same classes the executor uses; the messages
are the JSON-able dicts that cross FLARE.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from _gate_kits import SERVER, SITES, Federation, provision_federation

from zenfed.attestation import AttestationError
from zenfed.audit.verify import verify_log
from zenfed.server.attestation_gate import AttestationQuorumError, ServerAttestationGate
from zenfed.spec import JobSpec


@pytest.fixture(scope="module")
def provisioned(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return provision_federation(tmp_path_factory.mktemp("gate"))


@pytest.fixture
def fed(provisioned: tuple[Path, Path], tmp_path: Path) -> Federation:
    return Federation.copy(*provisioned, tmp_path)


def _attest(fed: Federation, gate: ServerAttestationGate, rnd: int, sites=None):
    """One attestation exchange; return (answers, admitted, records)."""
    sites = sites or {name: fed.site(name) for name in SITES}
    challenge = gate.challenge(sites=list(SITES), round=rnd)
    answers = {name: site.answer(challenge) for name, site in sites.items()}
    admitted, records = gate.verify(answers)
    return answers, admitted, records


def test_a_correct_round_admits_both_sites_and_both_sites_accept_the_server(fed):
    # Prepare
    gate = fed.gate(mode="required")
    sites = {name: fed.site(name) for name in SITES}

    # Execute
    challenge = gate.challenge(sites=list(SITES), round=1)
    answers = {name: site.answer(challenge) for name, site in sites.items()}
    admitted, records = gate.verify(answers)
    gate.enforce_quorum(admitted)
    server_evidence = gate.server_evidence()
    checks = {name: site.check_server(server_evidence) for name, site in sites.items()}

    # Assert: both ways, on the record
    assert admitted == set(SITES) and gate.admitted == frozenset(SITES)
    assert [r["peer"] for r in records] == list(SITES)
    assert all(r["verdict"] == "pass" and r["decision"] == "admitted" for r in records)
    assert set(server_evidence) == set(SITES)
    assert all(c is not None and c.passed and c.participant == SERVER for c in checks.values())
    logged = fed.attestation_records(SERVER)
    assert logged == records
    for record in logged:
        nonce = challenge["nonces"][record["peer"]]
        assert record["nonce_sha256"] == hashlib.sha256(nonce.encode()).hexdigest()
        assert record["tee_kind"] == "emulated" and len(record["measurement"]) == 64
        assert record["verifier"] == SERVER and record["round"] == 1
    for name in SITES:
        (site_record,) = fed.attestation_records(name)
        assert site_record["peer"] == SERVER and site_record["decision"] == "accepted"
        assert site_record["verdict"] == "pass"
    # The records are signed and chained in a log that verifies.
    log = fed.prod.parent / "audit" / f"{SERVER}.jsonl"
    assert verify_log(log, root_ca_path=fed.kit(SERVER) / "startup" / "rootCA.pem").ok


def test_a_site_whose_policy_was_edited_after_provisioning_is_excluded_with_the_reason(fed):
    # Prepare: site-2's measured configuration no longer matches what was provisioned
    policy = fed.kit("site-2") / "local" / "zenfed_site.yaml"
    policy.write_text(policy.read_text() + "torch_threads: 7\n")
    gate = fed.gate(mode="preferred")

    # Execute
    _, admitted, records = _attest(fed, gate, 1)

    # Assert
    assert admitted == {"site-1"}
    bad = next(r for r in records if r["peer"] == "site-2")
    assert bad["verdict"] == "fail" and bad["decision"] == "excluded"
    assert "measurement" in bad["reason"] and "not among the" in bad["reason"]
    assert bad["measurement"]  # the measurement it reported, for the operator to compare
    assert gate.reasons == {"site-2": bad["reason"]}
    assert fed.attestation_records(SERVER) == records
    gate.enforce_quorum(admitted)  # preferred: excluded, not aborted


def test_required_mode_aborts_only_when_too_few_sites_pass(fed):
    # Prepare
    policy = fed.kit("site-2") / "local" / "zenfed_site.yaml"
    policy.write_text(policy.read_text() + "torch_threads: 7\n")
    strict = fed.gate(mode="required", min_sites=2)
    lenient = fed.gate(mode="required", min_sites=1)

    # Execute
    _, admitted, _ = _attest(fed, strict, 1)
    with pytest.raises(AttestationQuorumError) as raised:
        strict.enforce_quorum(admitted)
    _, admitted_lenient, _ = _attest(fed, lenient, 1)
    lenient.enforce_quorum(admitted_lenient)

    # Assert: the abort names the refused site and its reason, and is on the record
    assert admitted == admitted_lenient == {"site-1"}
    assert "min_sites=2" in str(raised.value) and "site-2: measurement" in str(raised.value)
    assert not strict.quorum_met(admitted) and lenient.quorum_met(admitted_lenient)


def test_replayed_evidence_is_refused(fed):
    # Prepare: a correct round 1, then the re-attestation before round 3 (R=2)
    gate = fed.gate(mode="required", every=2, min_sites=1)
    old_answers, first, _ = _attest(fed, gate, 1)
    assert first == set(SITES) and gate.needed(3)

    # Execute: site-1's round-1 answer is replayed; site-2 answers afresh
    challenge = gate.challenge(sites=list(SITES), round=3)
    fresh = fed.site("site-2").answer(challenge)
    admitted, records = gate.verify({"site-1": old_answers["site-1"], "site-2": fresh})

    # Assert
    assert admitted == {"site-2"}
    replay = next(r for r in records if r["peer"] == "site-1")
    assert replay["verdict"] == "fail" and "replayed" in replay["reason"]


def test_evidence_under_another_name_a_missing_answer_and_a_stranger_are_refused(fed):
    # Prepare: site-1 signs site-2's nonce and sends it as site-2's answer
    gate = fed.gate(mode="preferred", min_sites=1)
    challenge = gate.challenge(sites=["site-1", "site-2"], round=1)
    stolen = {**challenge, "nonces": {"site-1": challenge["nonces"]["site-2"]}}
    forged = {**fed.site("site-1").answer(stolen), "site": "site-2"}
    stranger = fed.site("site-1").answer(challenge)

    # Execute: site-1 itself stays silent; an unknown site-9 answers
    admitted, records = gate.verify({"site-2": forged, "site-9": stranger})

    # Assert
    assert admitted == set()
    reasons = {r["peer"]: r["reason"] for r in records}
    assert "did not answer" in reasons["site-1"]
    assert "evidence is from 'site-1'" in reasons["site-2"]
    assert "without being challenged" in reasons["site-9"]
    with pytest.raises(AttestationError, match="challenge"):
        gate.verify({"site-1": stranger})  # the challenge was answered once


def test_a_site_that_cannot_attest_is_excluded_with_its_own_reason_and_gets_no_task(fed):
    # Prepare: site-2 lost its attestation key; the executor sends the error text back
    (fed.kit("site-2") / "startup" / "attestation_key.pem").unlink()
    gate = fed.gate(mode="preferred", min_sites=1)
    challenge = gate.challenge(sites=list(SITES), round=1)
    with pytest.raises(AttestationError) as cannot:
        fed.site("site-2").answer(challenge)

    # Execute
    admitted, records = gate.verify(
        {"site-1": fed.site("site-1").answer(challenge), "site-2": str(cannot.value)}
    )

    # Assert
    assert admitted == {"site-1"}
    assert gate.eligible(["site-1", "site-2", "site-3"]) == ["site-1"]
    reason = next(r["reason"] for r in records if r["peer"] == "site-2")
    assert reason.startswith("site-2 could not attest: ") and "attestation_key.pem" in reason


@pytest.mark.parametrize(
    ("mode", "every", "expected"),
    [
        ("required", 0, [1]),
        ("preferred", 2, [1, 3, 5]),
        ("required", 3, [1, 4]),
        ("off", 2, []),
    ],
)
def test_the_gate_attests_before_round_1_and_every_r_rounds(fed, mode, every, expected):
    # Prepare
    gate = fed.gate(mode=mode, every=every)
    asked = []

    # Execute
    for rnd in range(1, 6):
        if gate.needed(rnd):
            asked.append(rnd)
            gate.challenge(sites=list(SITES), round=rnd)

    # Assert
    assert asked == expected


def test_a_resumed_job_attests_before_its_first_round_and_off_needs_no_kit(fed, tmp_path):
    # Prepare
    resumed = fed.gate(mode="required", every=0)
    spec = JobSpec.model_validate({"name": "j", "attestation": {"mode": "off"}})

    # Execute
    off = ServerAttestationGate(
        spec=spec, workspace_root=tmp_path / "nothing", audit=fed.audit(SERVER)
    )

    # Assert
    assert resumed.needed(3)  # first round run by this gate
    assert not off.enabled and not off.needed(1)
    assert off.eligible(["site-2", "site-1"]) == ["site-1", "site-2"]
    with pytest.raises(AttestationError, match="off"):
        off.challenge(sites=["site-1"], round=1)
    with pytest.raises(AttestationError, match="attestation"):
        ServerAttestationGate(
            spec=JobSpec.model_validate({"name": "j", "attestation": {"mode": "required"}}),
            workspace_root=tmp_path / "no-kit",
            audit=fed.audit(SERVER),
        )
