"""Every task is signed by the server; a site refuses a changed, forged, foreign or replayed one."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest

from _pki import make_ca, make_kit
from zenfed import protocol as P
from zenfed.protocol import Message
from zenfed.server.transport import InProcessTransport, SigningTransport
from zenfed.site.run_state import SiteRunState
from zenfed.task_auth import LAST_SEQ, TaskAuthError, TaskResent, TaskVerifier, sign_task
from zenfed.update_auth import UpdateSigner, UpdateVerifier


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """One project's kits (a server, a relay, a site, an admin named like the server) and a foreign server's."""
    root = tmp_path_factory.mktemp("kits")
    ca = make_ca()
    kits = {
        "server": make_kit(root, "server", ca, stem="server"),
        "relay": make_kit(root, "relay-1", ca, stem="server"),
        "admin-named-server": make_kit(root / "admin", "server", ca, stem="server", role="project_admin"),
        "site": make_kit(root, "site-1", ca),
        "foreign": make_kit(root / "other", "server", make_ca("other-ca"), stem="server"),
    }
    return {name: UpdateSigner.from_kit(kit, stem="server" if name != "site" else "client")
            for name, kit in kits.items()}, UpdateVerifier.from_kit(kits["site"])


def task(**header) -> Message:
    return Message(header={P.H_ROUND: 2, P.H_COHORT: ["site-1", "site-2"], P.H_TOTAL_WEIGHT: 0.75, **header},
                   payload=b"the global sum", server_evidence={"nonce-1": "evidence"})


def verifier_at(folder: Path, root_ca: UpdateVerifier, *, job_id: str = "job-1") -> TaskVerifier:
    return TaskVerifier(root_ca, server="server", site="site-1", job_id=job_id, facts=SiteRunState(folder))


def signed(signer: UpdateSigner, message: Message, *, seq: int = 1, name: str = P.TASK_TRAIN,
           job_id: str = "job-1", targets: tuple[str, ...] = ("site-1", "site-2")) -> Message:
    return sign_task(signer, job_id=job_id, task=name, message=message, seq=seq, targets=targets)


def test_a_signed_task_passes_and_its_number_is_kept_beyond_the_process(project, tmp_path):
    # Prepare
    signers, root_ca = project

    # Execute: two tasks in order, then the first again at a new process of the same job run
    verifier_at(tmp_path, root_ca).check(P.TASK_TRAIN, signed(signers["server"], task(), seq=1))
    verifier_at(tmp_path, root_ca).check(P.TASK_TRAIN, signed(signers["server"], task(), seq=2))

    # Assert: the replay is refused by a verifier that never saw it in memory
    with pytest.raises(TaskAuthError, match="replay: its sequence number 1 is not above 2"):
        verifier_at(tmp_path, root_ca).check(P.TASK_TRAIN, signed(signers["server"], task(), seq=1))


@pytest.mark.parametrize(("what", "change"), [
    ("cohort", lambda m: m.header.__setitem__(P.H_COHORT, ["site-1"])),
    ("weight", lambda m: m.header.__setitem__(P.H_TOTAL_WEIGHT, 1.0)),
    ("payload", lambda m: setattr(m, "payload", b"another sum")),
    ("evidence", lambda m: setattr(m, "server_evidence", {"nonce-1": "other evidence"})),
    ("number", lambda m: m.header.__setitem__(P.H_TASK_SEQ, 99)),
    ("addressees", lambda m: m.header.__setitem__(P.H_TARGETS, ["site-1", "site-2", "site-3"])),
])
def test_a_task_changed_on_the_way_is_refused(project, tmp_path, what, change):
    # Prepare: a relay without the server's key changes one thing and keeps the signature
    signers, root_ca = project
    message = signed(signers["server"], task())
    change(message)

    # Execute / Assert
    with pytest.raises(TaskAuthError, match="does not match what arrived: the task was changed on the way"):
        verifier_at(tmp_path, root_ca).check(P.TASK_TRAIN, message)


def test_a_task_signed_for_another_job_or_under_another_name_is_refused(project, tmp_path):
    # Prepare
    signers, root_ca = project

    # Execute / Assert: the statement binds both
    with pytest.raises(TaskAuthError, match="does not match"):
        verifier_at(tmp_path / "a", root_ca).check(P.TASK_TRAIN, signed(signers["server"], task(), job_id="job-2"))
    with pytest.raises(TaskAuthError, match="does not match"):
        verifier_at(tmp_path / "b", root_ca).check(P.TASK_RELEASE, signed(signers["server"], task()))


@pytest.mark.parametrize(("signer", "reason"), [
    ("relay", "signed with the certificate of 'relay-1'"),
    ("site", "signed with the certificate of 'site-1'"),
    ("admin-named-server", "certificate for the role 'project_admin' \\(an admin's\\), not the server's"),
    ("foreign", "not issued by this project's root CA"),
])
def test_a_task_signed_by_anyone_but_the_server_is_refused(project, tmp_path, signer, reason):
    # Prepare: each holds a real key; only the server's certificate names the server, as a server, from this CA
    signers, root_ca = project

    # Execute / Assert
    with pytest.raises(TaskAuthError, match=reason):
        verifier_at(tmp_path, root_ca).check(P.TASK_TRAIN, signed(signers[signer], task()))


def test_an_unsigned_or_unnumbered_task_is_refused(project, tmp_path):
    # Prepare
    signers, root_ca = project

    # Execute / Assert
    with pytest.raises(TaskAuthError, match="not signed by the server"):
        verifier_at(tmp_path / "a", root_ca).check(P.TASK_TRAIN, task())
    with pytest.raises(TaskAuthError, match="no valid sequence number"):
        verifier_at(tmp_path / "b", root_ca).check(P.TASK_TRAIN, signed(signers["server"], task(), seq=0))


def test_the_signing_transport_numbers_each_task_and_leaves_the_callers_message_alone(project, tmp_path):
    # Prepare
    signers, root_ca = project
    received: list[Message] = []
    inner = InProcessTransport({"site-1": lambda name, message: received.append(message) or Message()})
    transport = SigningTransport(inner, signer=signers["server"], job_id="job-1")
    message = task()

    # Execute
    for _ in range(2):
        transport.broadcast(task=P.TASK_TRAIN, message=message, targets=["site-1"], min_responses=1, timeout_s=1,
                            wait_after_min_s=0, on_result=lambda site, answer: None)

    # Assert: 1 then 2, each verifies in order; the caller's message carries no signature
    assert [m.header[P.H_TASK_SEQ] for m in received] == [1, 2]
    verifier = verifier_at(tmp_path, root_ca)
    for message_received in received:
        verifier.check(P.TASK_TRAIN, message_received)
    assert P.H_SERVER_SIGNATURE not in message.header and P.H_TASK_SEQ not in message.header


def test_a_task_sent_to_another_site_is_refused(project, tmp_path):
    # Prepare: the release goes to site-2 alone; a relay hands it to site-1 as well
    signers, root_ca = project
    release = signed(signers["server"], task(), name=P.TASK_RELEASE, targets=("site-2",))

    # Execute / Assert
    with pytest.raises(TaskAuthError, match=r"addressed to \['site-2'\], not to site-1: it was redirected"):
        verifier_at(tmp_path, root_ca).check(P.TASK_RELEASE, release)


def test_flares_resend_of_a_task_is_declined_without_alarm_and_a_forged_number_moves_nothing(project, tmp_path):
    # Prepare
    signers, root_ca = project
    verifier = verifier_at(tmp_path, root_ca)
    first = signed(signers["server"], task(), seq=1)
    verifier.check(P.TASK_TRAIN, first)
    forged = signed(signers["server"], task(), seq=2)
    forged.header[P.H_TASK_SEQ] = 99  # a relay bumps the number without the key

    # Execute / Assert: the identical copy is a resend (a policy refusal, not an attack); a changed copy
    # with the same number is a replay; the forged number is refused and leaves the count at 1
    with pytest.raises(TaskResent, match="sent the zenfed_train task \\(number 1\\) again"):
        verifier.check(P.TASK_TRAIN, first)
    with pytest.raises(TaskAuthError, match="replay"):
        verifier.check(P.TASK_TRAIN, signed(signers["server"], task(**{P.H_ROUND: 3}), seq=1))
    with pytest.raises(TaskAuthError, match="does not match"):
        verifier.check(P.TASK_TRAIN, forged)
    assert SiteRunState(tmp_path).get(LAST_SEQ) == 1
    verifier.check(P.TASK_TRAIN, signed(signers["server"], task(), seq=2))


def test_a_task_checks_as_it_arrives_from_the_wire_and_an_odd_one_is_refused_with_the_reason(project, tmp_path):
    # Prepare: empty attestation fields are left out on the wire; a payload that is not bytes cannot be hashed
    signers, root_ca = project
    sent = signed(signers["server"], Message(header={P.H_ROUND: 1}, attest={}, server_evidence={}))
    odd = signed(signers["server"], task(), seq=2)
    odd.payload = "not bytes"

    # Execute / Assert
    verifier = verifier_at(tmp_path, root_ca)
    verifier.check(P.TASK_TRAIN, Message.from_mapping(sent.to_dict()))
    with pytest.raises(TaskAuthError, match="cannot be checked: the payload is str, not bytes"):
        verifier.check(P.TASK_TRAIN, odd)


def test_an_expired_server_certificate_is_refused(project, tmp_path):
    # Prepare
    signers, root_ca = project
    later = dt.datetime.now(dt.UTC) + dt.timedelta(days=365)

    # Execute / Assert
    with pytest.raises(TaskAuthError, match="not valid now"):
        verifier_at(tmp_path, root_ca).check(P.TASK_TRAIN, signed(signers["server"], task()), now=later)
