"""Every answer is signed by its site; the server refuses a changed, forged, foreign or replayed one, saying why."""

from __future__ import annotations

import dataclasses
import os

import pytest

from _pki import make_ca, make_kit
from zenfed import protocol as P
from zenfed.answer_auth import (
    AnswerAuthError,
    AnswerToAnotherTask,
    SiteAnswerSigner,
    screen_answer,
    sign_answer,
    verify_answer,
)
from zenfed.audit.sink import AuditSink
from zenfed.digest import sha256_hex
from zenfed.protocol import Message
from zenfed.server.enrollment import Enrollment
from zenfed.server.transport import InProcessTransport, SigningTransport
from zenfed.spec import JobSpec
from zenfed.task_auth import task_statement
from zenfed.update_auth import UpdateSigner, UpdateVerifier, enrollment_statement

TASK_3 = sha256_hex(b"task 3")  # the SHA-256 of the statement of the task the server sent (here: any digest)


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """Two sites and a server of one project, and a site of another project named like site-1."""
    root = tmp_path_factory.mktemp("kits")
    ca = make_ca()
    kits = {"site-1": make_kit(root, "site-1", ca), "site-2": make_kit(root, "site-2", ca),
            "foreign": make_kit(root / "other", "site-1", make_ca("other-ca")),
            "server": make_kit(root, "server", ca, stem="server")}
    signers = {name: UpdateSigner.from_kit(kit, stem="server" if name == "server" else "client")
               for name, kit in kits.items()}
    return signers, UpdateVerifier.from_kit(kits["server"]), kits


def answer(**changes) -> Message:
    """A train answer as a site sends it: update, metrics, privacy spent, its log."""
    fields = {"header": {P.H_ROUND: 2, P.H_NUM_EXAMPLES: 60, P.H_EVAL_LOSS: 1.25, P.H_TRAIN_LOSS: 1.5,
                         P.H_DP_SPENT: {"epsilon": 2.5, "delta": 1e-5}},
              "payload": b"the site's update", "audit_log": b'{"event": "trained"}\n'}
    return Message(**{**fields, **changes})


def over_the_wire(message: Message) -> Message:
    """The message as the server reads it back (empty fields dropped, status from the return code)."""
    return Message.from_mapping(message.to_dict(), status=message.status)


def signed(signer: UpdateSigner, message: Message, *, site: str = "site-1", answer_to: str | None = TASK_3,
           task: str = P.TASK_TRAIN, job_id: str = "job-1") -> Message:
    return over_the_wire(sign_answer(signer, job_id=job_id, task=task, site=site, answer=message,
                                     answer_to=answer_to))


def verify(verifier: UpdateVerifier, message: Message, *, site: str = "site-1", sent_task: str = TASK_3,
           task: str = P.TASK_TRAIN) -> None:
    verify_answer(verifier, job_id="job-1", task=task, site=site, answer=message, sent_task=sent_task)


def screen(verifier: UpdateVerifier, message: Message, *, site: str = "site-1") -> Message:
    return screen_answer(verifier, job_id="job-1", task=P.TASK_TRAIN, site=site, answer=message, sent_task=TASK_3)


def test_a_signed_answer_passes_after_the_wire(project):
    # Prepare
    signers, verifier, _ = project

    # Execute / Assert: an answer, a refusal and an error (empty fields dropped on the way) all check out
    verify(verifier, signed(signers["site-1"], answer()))
    verify(verifier, signed(signers["site-1"], Message(refusal="over its privacy budget", audit_log=b"log")))
    verify(verifier, signed(signers["site-1"], Message(status=P.STATUS_ERROR, attest={},
                                                       error={"kind": "DataError", "message": "line 3"})))


@pytest.mark.parametrize("change", [
    lambda m: m.header.__setitem__(P.H_EVAL_LOSS, 0.125),  # a flattered metric
    lambda m: m.header[P.H_DP_SPENT].__setitem__("epsilon", 0.5),  # less privacy spent than the site did
    lambda m: m.header.__setitem__(P.H_NUM_EXAMPLES, 10**6),  # more weight
    lambda m: setattr(m, "payload", b"another update"),
    lambda m: setattr(m, "audit_log", b""),  # the site's log emptied
    lambda m: setattr(m, "refusal", "the site refused"),  # a refusal invented
    lambda m: setattr(m, "status", P.STATUS_ERROR),
    lambda m: m.header.__setitem__(P.H_ANSWER_TO, "4" * 64),  # made to answer another task
], ids=["metric", "privacy-spent", "weight", "payload", "audit-log", "refusal", "status", "task-answered"])
def test_an_answer_changed_on_the_way_is_refused(project, change):
    # Prepare
    signers, verifier, _ = project
    message = signed(signers["site-1"], answer())

    # Execute
    change(message)

    # Assert
    with pytest.raises(AnswerAuthError, match="does not match what arrived: the answer was changed on the way"):
        verify(verifier, message)


@pytest.mark.parametrize("name", [f.name for f in dataclasses.fields(Message)])
def test_every_field_of_a_message_is_signed(project, name):
    # Prepare: a field added to Message later must not travel unsigned
    signers, verifier, _ = project
    message = signed(signers["site-1"], answer())
    values = {"header": {**message.header, "extra": 1}, "payload": b"x", "refusal": "no", "attest": {"n": 1},
              "server_evidence": {"n": 1}, "audit_log": b"y", "error": {"kind": "E"}, "status": P.STATUS_ABORTED}

    # Execute
    setattr(message, name, values[name])

    # Assert
    with pytest.raises(AnswerAuthError, match="does not match what arrived"):
        verify(verifier, message)


@pytest.mark.parametrize(("signer", "task", "job_id", "reason"), [
    ("site-2", P.TASK_TRAIN, "job-1", "signed with the certificate of 'site-2'"),
    ("foreign", P.TASK_TRAIN, "job-1", "not issued by this project's root CA"),
    ("site-1", P.TASK_EVALUATE, "job-1", "does not match what arrived"),  # signed as another task
    ("site-1", P.TASK_TRAIN, "job-2", "does not match what arrived"),  # signed for another job
], ids=["another-site", "foreign-project", "another-task-name", "another-job"])
def test_an_answer_signed_by_another_or_for_another_task_or_job_is_refused(project, signer, task, job_id, reason):
    # Prepare
    signers, verifier, _ = project

    # Execute / Assert
    with pytest.raises(AnswerAuthError, match=reason):
        verify(verifier, signed(signers[signer], answer(), task=task, job_id=job_id))


def test_an_earlier_answer_replayed_is_refused_but_what_it_said_is_quoted(project):
    # Prepare: site-1's genuine answer to an earlier task (a refusal), delivered as the answer to this one
    signers, verifier, _ = project
    old = signed(signers["site-1"], Message(refusal="the job's base model is not allowed here\n"), answer_to="2" * 64)

    # Execute
    with pytest.raises(AnswerToAnotherTask, match="answered another zenfed_train task than the one the server"):
        verify(verifier, old)
    result = screen(verifier, old)

    # Assert: the server's own error, which carries nothing of the answer; the site's reason, checked, is quoted
    assert result.status == P.STATUS_ERROR and result.payload is None and result.audit_log is None
    assert result.error["kind"] == "AnswerToAnotherTask" and result.error[P.ERROR_ORIGIN] == P.ORIGIN_SERVER
    assert result.error["message"].endswith("(it said: the job's base model is not allowed here?)")
    assert P.answer_error(result).startswith("the server refused the site's answer: AnswerToAnotherTask: ")


def test_an_answer_to_a_task_that_failed_its_check_matches_no_task(project):
    # Prepare: a relay forged a task; the site refused it and signed its refusal, naming no verified task.
    # Kept by the relay, that signed refusal must not pass as the answer to the server's real task.
    signers, verifier, _ = project
    kept = signed(signers["site-1"], Message(status=P.STATUS_ERROR, audit_log=b"an older log",
                                             error={"kind": "TaskAuthError", "message": "not signed"}),
                  answer_to=None)

    # Execute / Assert
    with pytest.raises(AnswerToAnotherTask, match="answered a zenfed_train task it could not verify"):
        verify(verifier, kept)
    for forged in (True, 1, 3.0, TASK_3.upper()):  # nothing but the very digest names the task
        with pytest.raises(AnswerAuthError):
            verify(verifier, signed(signers["site-1"], answer(), answer_to=forged))


def test_an_unsigned_answer_is_not_acted_on_and_its_reason_is_marked_unchecked(project):
    # Prepare
    _, verifier, _ = project
    unsigned = over_the_wire(Message(status=P.STATUS_ERROR, error={"kind": "SigningKeyError",
                                                                   "message": "client.key is not readable"}))

    # Execute
    result = screen(verifier, unsigned)

    # Assert
    assert result.status == P.STATUS_ERROR and "is not signed" in result.error["message"]
    assert "(it said, unchecked: SigningKeyError: client.key is not readable)" in result.error["message"]
    with pytest.raises(AnswerAuthError, match="is not signed"):
        verify(verifier, over_the_wire(answer()))
    with pytest.raises(AnswerAuthError, match="is not signed"):  # an empty OK is no report of the carrier
        verify(verifier, Message())
    assert screen(verifier, Message()).status == P.STATUS_ERROR


def test_only_a_bare_return_code_passes_as_the_carriers_own_report(project):
    # Prepare: FLARE's own report of a task that failed on the way carries a return code and nothing else
    _, verifier, _ = project
    carrier = Message(status=P.STATUS_ABORTED)

    # Execute / Assert
    assert screen(verifier, carrier) is carrier
    for forged in (Message(status="TASK ABORTED\nsite-1 was never asked"), Message(status=P.STATUS_ERROR,
                                                                                  refusal="made up")):
        assert screen(verifier, forged).error[P.ERROR_ORIGIN] == P.ORIGIN_SERVER


def test_the_site_signs_what_it_cannot_encode_as_a_signed_error_and_a_bad_key_leaves_it_unsigned(project,
                                                                                                 tmp_path):
    # Prepare
    signers, verifier, kits = project
    site = SiteAnswerSigner(kits["site-1"], site="site-1", job_id="job-1")
    odd = answer(header={P.H_EVAL_LOSS: b"bytes have no JSON form"})
    broken = tmp_path / "startup"
    broken.mkdir(mode=0o700)
    for name in os.listdir(kits["site-1"]):
        (broken / name).write_bytes((kits["site-1"] / name).read_bytes())
    (broken / "client.key").write_bytes((kits["site-2"] / "client.key").read_bytes())  # not its certificate's

    # Execute
    replaced = over_the_wire(site.sign(P.TASK_TRAIN, odd, answer_to=TASK_3))
    unsigned = SiteAnswerSigner(broken, site="site-1", job_id="job-1").sign(P.TASK_TRAIN, answer(),
                                                                           answer_to=TASK_3)

    # Assert: a signed error naming the defect, with the site's log; the other goes out unsigned and is refused
    verify(verifier, replaced)
    assert replaced.error["kind"] == "AnswerAuthError" and "could not sign its answer" in replaced.error["message"]
    assert replaced.audit_log == odd.audit_log and replaced.payload is None
    assert P.H_ANSWER_SIGNATURE not in unsigned.header
    assert "is not signed" in screen(verifier, unsigned).error["message"]


def test_the_signing_transport_checks_each_answer_against_the_task_it_sent(project):
    # Prepare: site-1 answers properly (twice: a duplicate delivery); site-2 answers with an earlier answer
    signers, verifier, _ = project
    earlier = sign_answer(signers["site-2"], job_id="job-1", task=P.TASK_TRAIN, site="site-2", answer=answer(),
                          answer_to="1" * 64)

    def site_1(task: str, message: Message) -> Message:
        sent = sha256_hex(task_statement(job_id="job-1", task=task, message=message))
        return sign_answer(signers["site-1"], job_id="job-1", task=task, site="site-1", answer=answer(),
                           answer_to=sent)

    class Duplicating(InProcessTransport):
        def broadcast(self, *, on_result, **kwargs) -> bool:
            def twice(site: str, message: Message) -> None:
                on_result(site, message)
                if site == "site-1":
                    on_result(site, message)
            return super().broadcast(on_result=twice, **kwargs)

    transport = SigningTransport(Duplicating({"site-1": site_1, "site-2": lambda task, message: earlier}),
                                 signer=signers["server"], job_id="job-1", verifier=verifier)
    received: list[tuple[str, Message]] = []

    # Execute
    transport.broadcast(task=P.TASK_TRAIN, message=Message(header={P.H_ROUND: 2}), targets=["site-1", "site-2"],
                        min_responses=2, timeout_s=1, wait_after_min_s=0,
                        on_result=lambda site, message: received.append((site, message)))

    # Assert: the first copy of site-1's answer is taken, the second is not; site-2's old answer is refused
    (_, first), (_, second), (_, site_2) = received
    assert first.payload == b"the site's update" and first.status == P.STATUS_OK
    assert second.payload is None and "a second answer of site-1 to the same zenfed_train task" in second.error[
        "message"]
    assert site_2.payload is None and "answered another zenfed_train task" in site_2.error["message"]


def test_defence_in_depth_a_profile_signed_for_another_job_inside_a_genuine_answer_is_refused(project):
    # Prepare: the answer is site-1's own, but the profile's own signature is for another job
    signers, verifier, _ = project
    profile = {"records": 60}

    def site_1(task: str, message: Message) -> Message:
        header = {P.H_PROFILE: profile, **signers["site-1"].sign(
            enrollment_statement(job_id="another-job", site="site-1", profile=profile))}
        sent = sha256_hex(task_statement(job_id="job-1", task=task, message=message))
        return sign_answer(signers["site-1"], job_id="job-1", task=task, site="site-1", answer=Message(header=header),
                           answer_to=sent)

    spec = JobSpec.model_validate({"name": "job", "model": {"base": "tiny"}})
    enrollment = Enrollment(spec=spec, job_id="job-1")
    enrollment.open(AuditSink(None), verifier)
    transport = SigningTransport(InProcessTransport({"site-1": site_1}), signer=signers["server"], job_id="job-1",
                                 verifier=verifier)

    # Execute
    enrollment.collect(transport, sites=["site-1"], evidence=None, keep_log=lambda site, message: None)

    # Assert
    assert enrollment.profiles == {}


def test_a_server_without_the_root_ca_hands_answers_on_unchecked(project):
    # Prepare: as with updates, a kit without rootCA.pem (the simulator's) checks no signature
    signers, _, _ = project
    plain = answer()
    inner = InProcessTransport({"site-1": lambda task, message: plain})
    transport = SigningTransport(inner, signer=signers["server"], job_id="job-1")
    received = []

    # Execute
    transport.broadcast(task=P.TASK_TRAIN, message=Message(), targets=["site-1"], min_responses=1, timeout_s=1,
                        wait_after_min_s=0, on_result=lambda site, message: received.append(message))

    # Assert
    assert received == [plain] and dataclasses.asdict(received[0]) == dataclasses.asdict(answer())
