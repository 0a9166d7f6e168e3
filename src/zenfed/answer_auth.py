"""Every answer is signed by its site: the statement both ends compute, the site's signing, the server's check.

A site's answer carries what the server acts on and reports: the update and
its weight, the validation metrics, the privacy spent, the enrollment profile,
the attestation answer, a refusal or an error and its reason, and the site's
own audit log. Mutual TLS authenticates only the hop (a FLARE relay terminates
it), so the site signs the whole answer with its provisioned key
(``startup/client.key``), bound to the job, the task name, the number of the
task it answers (``zenfed.task_auth``) and its own name. The server checks each
answer as it arrives (:class:`~zenfed.server.transport.SigningTransport`):
issued by the project's root CA to that site, the signature over what arrived,
and the number of the task the server sent that site. An answer that fails is
replaced by an error that says why, so the round logic treats it as a failed
site and never acts on what it carried; the unchecked reason it gave, if any,
is quoted as such.

The narrower signatures inside an answer (the update's, the release's, the
enrollment profile's) stay: they are kept with what they sign, so an auditor can
check each later without the answer that carried it.

Kits without keys (the FLARE simulator) neither sign nor check.
"""

from __future__ import annotations

import datetime as dt
import logging
from dataclasses import replace
from pathlib import Path
from typing import Any

from zenfed import protocol as P
from zenfed.digest import CanonicalJSONError, canonical_json, sha256_hex
from zenfed.errors import ZenfedError
from zenfed.protocol import Message
from zenfed.update_auth import UpdateAuthError, UpdateSigner, UpdateVerifier

STATEMENT_FORMAT = "zenfed-answer-signature/1"
AUTH_ERROR_KIND = "AnswerAuthError"
_QUOTE_CHARS = 300  # how much of an unchecked answer's reason the server's error quotes

_log = logging.getLogger(__name__)


class AnswerAuthError(UpdateAuthError):
    """An answer is unsigned, answers another task, or its signature or certificate does not check out."""


class AnswerToAnotherTask(AnswerAuthError):
    """A genuine answer of the site, but to another task than the one the server sent it (a replay)."""


def answer_statement(*, job_id: str, task: str, site: str, answer: Message) -> bytes:
    """Return the bytes a site signs for one answer: all of it, bound to the job, the task and the site.

    Raises:
        CanonicalJSONError: If a field has no canonical JSON form.
        TypeError: If the payload or the audit log is not bytes.
    """
    for name, value in (("payload", answer.payload), ("audit log", answer.audit_log)):
        if value is not None and not isinstance(value, bytes):
            raise TypeError(f"the {name} is {type(value).__name__}, not bytes")
    header = {k: v for k, v in answer.header.items() if k != P.H_ANSWER_SIGNATURE}
    return canonical_json({
        "format": STATEMENT_FORMAT, "job": job_id, "task": task, "site": site, "status": answer.status,
        "header": header,
        "payload_sha256": None if answer.payload is None else sha256_hex(answer.payload),
        "audit_log_sha256": None if answer.audit_log is None else sha256_hex(answer.audit_log),
        # As on the wire: Message.to_dict leaves out an empty field, so it arrives as None.
        "refusal": answer.refusal, "attest": _as_sent(answer.attest), "error": _as_sent(answer.error),
    })


def _as_sent(value: Any) -> Any:
    return None if value is None or value == {} else value


def sign_answer(signer: UpdateSigner, *, job_id: str, task: str, site: str, answer: Message,
                answer_to: Any) -> Message:
    """Return a copy of ``answer`` naming the task number it answers, signed by the site's ``signer``.

    Args:
        signer: The site's provisioned key and certificate.
        job_id: The site's job.
        task: The task name.
        site: The site's name.
        answer: What the site answers.
        answer_to: The number of the task it answers, as it arrived (``None`` if it carried none).
    """
    header = {k: v for k, v in answer.header.items() if k != P.H_ANSWER_SIGNATURE}
    header[P.H_ANSWER_TO] = answer_to
    header[P.H_SITE_CERT] = signer.cert_pem
    signed = replace(answer, header=header)
    header[P.H_ANSWER_SIGNATURE] = signer.signature(answer_statement(job_id=job_id, task=task, site=site,
                                                                     answer=signed))
    return signed


class SiteAnswerSigner:
    """A site's signing of every answer, with its kit key (``startup/client.key``).

    The key is loaded on the first answer, apart from the job's other set-up, so that an answer
    saying why the job could not be opened is signed too.

    Args:
        startup: The site kit's ``startup/`` folder (None: no kit, nothing signed).
        site: The site's name.
        job_id: The site's job.
    """

    def __init__(self, startup: Path | None, *, site: str, job_id: str) -> None:
        self.startup, self.site, self.job_id = startup, site, job_id
        self._signer: UpdateSigner | None = None

    def sign(self, task: str, message: Message, answer: Message) -> Message:
        """Return ``answer`` to the task ``message`` signed; unchanged where the kit has no key (simulator).

        An answer without a canonical form (a defect) is replaced by a signed error that says so.
        """
        if self._signer is None:
            try:
                self._signer = UpdateSigner.from_kit(self.startup)
            except ZenfedError as err:  # the server reports the answer as unsigned, quoting its reason
                _log.error("%s cannot sign its answers: %s", self.site, err)
                return answer
            if self._signer is None:
                return answer
        # The number of the task answered binds the answer to it: an old answer cannot stand in for a new one.
        answer_to = message.header.get(P.H_TASK_SEQ)
        try:
            return sign_answer(self._signer, job_id=self.job_id, task=task, site=self.site, answer=answer,
                               answer_to=answer_to)
        except (CanonicalJSONError, TypeError) as err:
            _log.error("%s cannot sign its answer to %s: %s", self.site, task, err)
            failed = Message(status=P.STATUS_ERROR, error={"kind": AUTH_ERROR_KIND, "message": (
                f"the site could not sign its answer ({err}); this is a defect of the site's version")})
            return sign_answer(self._signer, job_id=self.job_id, task=task, site=self.site, answer=failed,
                               answer_to=answer_to if isinstance(answer_to, int) else None)


def from_the_carrier(answer: Message) -> bool:
    """Whether the transport made this answer itself (a task that failed on the way): nothing from the site."""
    return answer.status != P.STATUS_OK and not answer.to_dict()


def check_answer(verifier: UpdateVerifier, *, job_id: str, task: str, site: str, answer: Message, sent_seq: int,
                 now: dt.datetime | None = None) -> None:
    """Check that ``site`` signed exactly this answer, to the task numbered ``sent_seq`` the server sent it.

    Raises:
        AnswerAuthError: With the reason.
    """
    signature_b64, cert_pem = answer.header.get(P.H_ANSWER_SIGNATURE), answer.header.get(P.H_SITE_CERT)
    if not isinstance(signature_b64, str) or not isinstance(cert_pem, str):
        raise AnswerAuthError(f"the answer of {site} to the {task} task is not signed; a provisioned site signs "
                              "every answer (is the site provisioned by this project, or was the answer altered "
                              "on the way?)")
    try:
        statement = answer_statement(job_id=job_id, task=task, site=site, answer=answer)
    except (CanonicalJSONError, TypeError) as err:
        raise AnswerAuthError(f"the answer of {site} to the {task} task cannot be checked: {err}; it was "
                              "altered on the way, or the site runs another version") from None
    try:
        cert = verifier.certificate(holder=site, cert_pem=cert_pem, what=f"answer to the {task} task", now=now)
        verifier.check_signature(cert, statement=statement, signature_b64=signature_b64,
                                 signed=f"the signature on the answer of {site} to the {task} task",
                                 changed="the answer was changed on the way")
    except UpdateAuthError as err:
        raise AnswerAuthError(str(err)) from None
    answered = answer.header.get(P.H_ANSWER_TO)
    if answered != sent_seq:
        raise AnswerToAnotherTask(f"{site} answered task number {answered}, not number {sent_seq} that the server "
                              f"sent it as the {task} task: an earlier answer replayed, or the task's number "
                              "changed on the way")


def checked_answer(verifier: UpdateVerifier, *, job_id: str, task: str, site: str, answer: Message,
                   sent_seq: int) -> Message:
    """Return ``answer`` if it checks out, else an error answer that says why (the round logic needs no more).

    An answer the transport made itself (it carries nothing from the site) passes as it is.
    """
    if from_the_carrier(answer):
        return answer
    try:
        check_answer(verifier, job_id=job_id, task=task, site=site, answer=answer, sent_seq=sent_seq)
    except AnswerAuthError as err:
        said = _reason(answer)
        checked = isinstance(err, AnswerToAnotherTask)  # signed by the site, only not an answer to this task
        message = f"{err}; the server does not act on it" + (
            f" (it said{'' if checked else ', unchecked'}: {said})" if said else "")
        return Message(status=P.STATUS_ERROR, error={"kind": AUTH_ERROR_KIND, "message": message})
    return answer


def _reason(answer: Message) -> str:
    """The refusal or error an answer gave, quoted for the operator (a mis-provisioned site still says why)."""
    if isinstance(answer.refusal, str) and answer.refusal:
        return answer.refusal[:_QUOTE_CHARS]
    if isinstance(answer.error, dict) and answer.error:
        return f"{answer.error.get('kind', 'error')}: {answer.error.get('message', '')}"[:_QUOTE_CHARS]
    return ""
