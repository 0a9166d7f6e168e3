"""Every answer is signed by its site; the server refuses a changed, forged, foreign or replayed one, saying why."""

from __future__ import annotations

import dataclasses

import pytest

from _pki import make_ca, make_kit
from zenfed import protocol as P
from zenfed.answer_auth import AnswerAuthError, AnswerToAnotherTask, check_answer, checked_answer, sign_answer
from zenfed.audit.sink import AuditSink
from zenfed.protocol import Message
from zenfed.server.enrollment import Enrollment
from zenfed.server.transport import InProcessTransport, SigningTransport
from zenfed.spec import JobSpec
from zenfed.update_auth import UpdateSigner, UpdateVerifier, enrollment_statement


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
    return signers, UpdateVerifier.from_kit(kits["server"])


def answer(**changes) -> Message:
    """A train answer as a site sends it: update, metrics, privacy spent, its log."""
    fields = {"header": {P.H_ROUND: 2, P.H_NUM_EXAMPLES: 60, P.H_EVAL_LOSS: 1.25, P.H_TRAIN_LOSS: 1.5,
                         P.H_DP_SPENT: {"epsilon": 2.5, "delta": 1e-5}},
              "payload": b"the site's update", "audit_log": b'{"event": "trained"}\n'}
    return Message(**{**fields, **changes})


def over_the_wire(message: Message) -> Message:
    """The message as the server reads it back (empty fields dropped, status from the return code)."""
    return Message.from_mapping(message.to_dict(), status=message.status)


def signed(signer: UpdateSigner, message: Message, *, site: str = "site-1", answer_to: int = 3,
           task: str = P.TASK_TRAIN) -> Message:
    return over_the_wire(sign_answer(signer, job_id="job-1", task=task, site=site, answer=message,
                                     answer_to=answer_to))


def check(verifier: UpdateVerifier, message: Message, *, site: str = "site-1", sent_seq: int = 3,
          task: str = P.TASK_TRAIN) -> None:
    check_answer(verifier, job_id="job-1", task=task, site=site, answer=message, sent_seq=sent_seq)


def test_a_signed_answer_passes_after_the_wire(project):
    # Prepare
    signers, verifier = project

    # Execute / Assert: an answer, a refusal and an error (empty fields dropped on the way) all check out
    check(verifier, signed(signers["site-1"], answer()))
    check(verifier, signed(signers["site-1"], Message(refusal="over its privacy budget", audit_log=b"log")))
    check(verifier, signed(signers["site-1"], Message(status=P.STATUS_ERROR, attest={},
                                                      error={"kind": "DataError", "message": "line 3"})))


@pytest.mark.parametrize("change", [
    lambda m: m.header.__setitem__(P.H_EVAL_LOSS, 0.125),  # a flattered metric
    lambda m: m.header[P.H_DP_SPENT].__setitem__("epsilon", 0.5),  # less privacy spent than the site did
    lambda m: m.header.__setitem__(P.H_NUM_EXAMPLES, 10**6),  # more weight
    lambda m: setattr(m, "payload", b"another update"),
    lambda m: setattr(m, "audit_log", b""),  # the site's log emptied
    lambda m: setattr(m, "refusal", "the site refused"),  # a refusal invented
    lambda m: setattr(m, "status", P.STATUS_ERROR),
    lambda m: m.header.__setitem__(P.H_ANSWER_TO, 4),  # made to answer the next task
], ids=["metric", "privacy-spent", "weight", "payload", "audit-log", "refusal", "status", "task-number"])
def test_an_answer_changed_on_the_way_is_refused(project, change):
    # Prepare
    signers, verifier = project
    message = signed(signers["site-1"], answer())

    # Execute
    change(message)

    # Assert
    with pytest.raises(AnswerAuthError, match="does not match what arrived: the answer was changed on the way"):
        check(verifier, message)


@pytest.mark.parametrize(("signer", "task", "site", "reason"), [
    ("site-2", P.TASK_TRAIN, "site-1", "signed with the certificate of 'site-2'"),
    ("foreign", P.TASK_TRAIN, "site-1", "not issued by this project's root CA"),
    ("site-1", P.TASK_EVALUATE, "site-1", "does not match what arrived"),  # signed as another task
], ids=["another-site", "foreign-project", "another-task-name"])
def test_an_answer_signed_by_another_or_for_another_task_is_refused(project, signer, task, site, reason):
    # Prepare
    signers, verifier = project

    # Execute / Assert
    with pytest.raises(AnswerAuthError, match=reason):
        check(verifier, signed(signers[signer], answer(), task=task), site=site)


def test_an_earlier_answer_replayed_is_refused_but_what_it_said_is_quoted(project):
    # Prepare: site-1's genuine answer to task 2 (a refusal), delivered as the answer to task 3
    signers, verifier = project
    old = signed(signers["site-1"], Message(refusal="the job's base model is not allowed here"), answer_to=2)

    # Execute
    with pytest.raises(AnswerToAnotherTask, match="answered task number 2, not number 3"):
        check(verifier, old)
    result = checked_answer(verifier, job_id="job-1", task=P.TASK_TRAIN, site="site-1", answer=old, sent_seq=3)

    # Assert: an error the round logic treats as a failed site; the site's reason, checked, is quoted
    assert result.status == P.STATUS_ERROR and result.payload is None and result.audit_log is None
    assert result.error["kind"] == "AnswerAuthError"
    assert result.error["message"].endswith("(it said: the job's base model is not allowed here)")


def test_an_unsigned_answer_is_not_acted_on_and_its_reason_is_marked_unchecked(project):
    # Prepare
    _, verifier = project
    unsigned = over_the_wire(Message(status=P.STATUS_ERROR, error={"kind": "SigningKeyError",
                                                                   "message": "client.key is not readable"}))

    # Execute
    result = checked_answer(verifier, job_id="job-1", task=P.TASK_TRAIN, site="site-1", answer=unsigned, sent_seq=3)

    # Assert
    assert result.status == P.STATUS_ERROR and "is not signed" in result.error["message"]
    assert "(it said, unchecked: SigningKeyError: client.key is not readable)" in result.error["message"]
    with pytest.raises(AnswerAuthError, match="is not signed"):
        check(verifier, over_the_wire(answer()))


def test_what_the_carrier_reports_itself_passes_as_it_is(project):
    # Prepare: FLARE's own report of a task that failed on the way carries nothing from the site
    _, verifier = project
    carrier = Message(status=P.STATUS_ABORTED)

    # Execute / Assert
    assert checked_answer(verifier, job_id="job-1", task=P.TASK_TRAIN, site="site-1", answer=carrier,
                          sent_seq=3) is carrier


def test_the_signing_transport_checks_each_answer_against_the_task_it_sent(project):
    # Prepare: site-1 answers properly; site-2 answers its task with an earlier answer
    signers, verifier = project
    earlier = sign_answer(signers["site-2"], job_id="job-1", task=P.TASK_TRAIN, site="site-2", answer=answer(),
                          answer_to=1)

    def site_1(task: str, message: Message) -> Message:
        return sign_answer(signers["site-1"], job_id="job-1", task=task, site="site-1", answer=answer(),
                           answer_to=message.header[P.H_TASK_SEQ])

    inner = InProcessTransport({"site-1": site_1, "site-2": lambda task, message: earlier})
    transport = SigningTransport(inner, signer=signers["server"], job_id="job-1", verifier=verifier)
    transport.seq = 1  # this is the job's second task
    received: dict[str, Message] = {}

    # Execute
    transport.broadcast(task=P.TASK_TRAIN, message=Message(header={P.H_ROUND: 2}), targets=["site-1", "site-2"],
                        min_responses=2, timeout_s=1, wait_after_min_s=0,
                        on_result=lambda site, message: received.__setitem__(site, message))

    # Assert
    assert received["site-1"].payload == b"the site's update" and received["site-1"].status == P.STATUS_OK
    assert received["site-2"].payload is None and "answered task number 1, not number 2" in received[
        "site-2"].error["message"]


def test_a_profile_signed_for_another_job_inside_a_genuine_answer_is_still_refused(project):
    # Prepare: defence in depth: the answer is site-1's, but the profile's own signature is for another job
    signers, verifier = project
    profile = {"records": 60}

    def site_1(task: str, message: Message) -> Message:
        header = {P.H_PROFILE: profile, **signers["site-1"].sign(
            enrollment_statement(job_id="another-job", site="site-1", profile=profile))}
        return sign_answer(signers["site-1"], job_id="job-1", task=task, site="site-1", answer=Message(header=header),
                           answer_to=message.header[P.H_TASK_SEQ])

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
    signers, _ = project
    plain = answer()
    inner = InProcessTransport({"site-1": lambda task, message: plain})
    transport = SigningTransport(inner, signer=signers["server"], job_id="job-1")
    received = []

    # Execute
    transport.broadcast(task=P.TASK_TRAIN, message=Message(), targets=["site-1"], min_responses=1, timeout_s=1,
                        wait_after_min_s=0, on_result=lambda site, message: received.append(message))

    # Assert
    assert received == [plain] and dataclasses.asdict(received[0]) == dataclasses.asdict(answer())
