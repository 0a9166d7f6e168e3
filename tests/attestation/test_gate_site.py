"""The per-job gate, site side: every site checks the server before it accepts a task.

site-1's policy leaves server attestation to the job; site-2's policy requires an
attested server (``require_attested_server: true``).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from _gate_kits import SERVER, SITES, Federation, bad_package, provision_federation

from zenfed.errors import PolicyError
from zenfed.site.attestation import ServerNotAttested, read_server_name


@pytest.fixture(scope="module")
def provisioned(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return provision_federation(tmp_path_factory.mktemp("gate-site"))


@pytest.fixture
def fed(provisioned: tuple[Path, Path], tmp_path: Path) -> Federation:
    return Federation.copy(*provisioned, tmp_path)


def _exchange(fed, gate, sites, rnd=1):
    """Challenge, answer, verify; return the server's evidence for the admitted sites."""
    challenge = gate.challenge(sites=list(sites), round=rnd)
    gate.verify({name: site.answer(challenge) for name, site in sites.items()})
    return gate.server_evidence()


def test_a_site_requiring_an_attested_server_refuses_a_server_with_a_wrong_measurement(
    fed, tmp_path
):
    # Prepare: the server runs another build of zenfed than was provisioned
    gate = fed.gate(mode="preferred", package_dir=bad_package(tmp_path, fed.package_dir))
    sites = {name: fed.site(name, mode="preferred") for name in SITES}
    evidence = _exchange(fed, gate, sites)

    # Execute
    lenient = sites["site-1"].check_server(evidence)
    with pytest.raises(ServerNotAttested) as refused:
        sites["site-2"].check_server(evidence)

    # Assert: site-2 refuses with the reason; site-1 records the failure and goes on
    assert isinstance(refused.value, PolicyError)
    assert "measurement" in str(refused.value) and SERVER in str(refused.value)
    assert lenient is not None and not lenient.passed
    (record_2,) = fed.attestation_records("site-2")
    assert record_2["decision"] == "refused" and record_2["verdict"] == "fail"
    assert "measurement" in record_2["reason"] and record_2["required"] is True
    (record_1,) = fed.attestation_records("site-1")
    assert record_1["decision"] == "recorded" and record_1["required"] is False
    # Refused once, refused again for every later task, without a second record.
    with pytest.raises(ServerNotAttested):
        sites["site-2"].check_server(None)
    assert len(fed.attestation_records("site-2")) == 1


def test_a_site_that_accepts_another_server_measurement_refuses_this_server(fed):
    # Prepare: site-2's provisioned rules accept only another server build (loopback-friendly:
    # every participant here runs the same package, so the site's rules are what changes)
    rules = fed.kit("site-2") / "startup" / "attestation.json"
    policy = json.loads(rules.read_text())
    policy["peers"][SERVER]["per_kind"]["emulated"]["allowed_measurements"] = ["0" * 64]
    rules.write_text(json.dumps(policy))
    gate = fed.gate(mode="preferred")
    sites = {name: fed.site(name, mode="preferred") for name in SITES}
    evidence = _exchange(fed, gate, sites)

    # Execute
    accepted = sites["site-1"].check_server(evidence)
    with pytest.raises(ServerNotAttested, match="is not among the 1 accepted"):
        sites["site-2"].check_server(evidence)

    # Assert: the server still admitted both sites; only site-2 refuses the server
    assert gate.admitted == frozenset(SITES)
    assert accepted is not None and accepted.passed


def test_with_attestation_required_every_site_requires_the_server(fed, tmp_path):
    # Prepare
    gate = fed.gate(mode="required", package_dir=bad_package(tmp_path, fed.package_dir))
    sites = {name: fed.site(name, mode="required") for name in SITES}
    evidence = _exchange(fed, gate, sites)

    # Execute / Assert
    for site in sites.values():
        with pytest.raises(ServerNotAttested, match="measurement"):
            site.check_server(evidence)


def test_a_server_that_passed_is_accepted_for_later_tasks_without_rechecking(fed):
    # Prepare
    gate = fed.gate(mode="required")
    site = fed.site("site-2", mode="required")
    evidence = _exchange(fed, gate, {"site-2": site})

    # Execute: the train task carries the evidence, later tasks carry it again or nothing
    first = site.check_server(evidence)
    again = site.check_server(evidence)
    later = site.check_server(None)

    # Assert
    assert first is not None and first.passed and again is first and later is first
    assert len(fed.attestation_records("site-2")) == 1


def test_a_missing_or_replayed_server_evidence_is_refused(fed):
    # Prepare: a correct round 1; the site answers the re-attestation before round 3
    gate = fed.gate(mode="required", every=2)
    site = fed.site("site-2", mode="required")
    old_evidence = _exchange(fed, gate, {"site-2": site})
    site.check_server(old_evidence)
    challenge = gate.challenge(sites=["site-2"], round=3)
    gate.verify({"site-2": site.answer(challenge)})

    # Execute: the server replays its round-1 evidence
    with pytest.raises(ServerNotAttested) as replayed:
        site.check_server(old_evidence)

    # Assert
    assert "replayed" in str(replayed.value)
    # And a server that answers nothing after a challenge is refused too.
    challenge = gate.challenge(sites=["site-2"], round=5)
    gate.verify({"site-2": site.answer(challenge)})
    with pytest.raises(ServerNotAttested, match="no evidence"):
        site.check_server(None)
    decisions = [r["decision"] for r in fed.attestation_records("site-2")]
    assert decisions == ["accepted", "refused", "refused"]


def test_a_site_requiring_an_attested_server_refuses_a_job_without_attestation(fed):
    # Prepare: the job has attestation off, so no challenge ever reaches the sites
    requiring = fed.site("site-2", mode="off")
    indifferent = fed.site("site-1", mode="off")

    # Execute
    with pytest.raises(ServerNotAttested) as refused:
        requiring.check_server(None)
    unchecked = indifferent.check_server(None)

    # Assert
    assert "has not attested" in str(refused.value)
    assert unchecked is None and fed.attestation_records("site-1") == []
    (record,) = fed.attestation_records("site-2")
    assert record["decision"] == "refused" and record["mode"] == "off"


def test_the_site_finds_the_server_name_in_its_kit(fed):
    # Execute / Assert
    assert read_server_name(fed.kit("site-1")) == SERVER
