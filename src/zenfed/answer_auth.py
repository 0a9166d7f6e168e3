"""Every answer is signed by its site: the statement both ends compute, the site's signing, the server's check.

A site's answer carries what the server acts on and reports: the update and
its weight, the validation metrics, the privacy spent, the enrollment profile,
the attestation answer, a refusal or an error and its reason, and the site's
own audit log. Mutual TLS authenticates only the hop (a FLARE relay terminates
it), so the site signs the whole answer with its provisioned key
(``startup/client.key``), bound to the job, the task name, its own name and the
task it answers: the SHA-256 of that task's signed statement
(``zenfed.task_auth``), named only once the site has verified the task. The
server checks each answer as it arrives
(:class:`~zenfed.server.transport.SigningTransport`): issued by the project's
root CA to that site, the signature over what arrived, and the task it names
being the one the server sent. An answer that fails is replaced by the server's
own error that says why, so the round logic treats the site as failed for that
task and never acts on what the answer carried; the reason it gave, if any, is
quoted, marked unchecked where its signature failed.

The narrower signatures inside an answer (the update's, the release's, the
enrollment profile's) stay: they are kept with what they sign, so an auditor can
check each later without the answer that carried it.

Kits without keys (the FLARE simulator) neither sign nor check.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
import re
from pathlib import Path
from typing import Any

from zenfed import protocol as P
from zenfed.digest import CanonicalJSONError, canonical_json, sha256_hex
from zenfed.errors import ZenfedError
from zenfed.protocol import Message, as_sent
from zenfed.update_auth import UpdateAuthError, UpdateSigner, UpdateVerifier

STATEMENT_FORMAT = "zenfed-answer-signature/1"
_HASHED = ("payload", "audit_log")  # signed by their SHA-256
_QUOTE_CHARS = 300  # how much of an answer's own reason the server's error quotes
_RETURN_CODE = re.compile(r"[A-Z][A-Z_]{0,39}")  # what a transport's own status looks like

_log = logging.getLogger(__name__)


class AnswerAuthError(UpdateAuthError):
    """An answer is unsigned, answers another task, or its signature or certificate does not check out."""


class AnswerToAnotherTask(AnswerAuthError):
    """A genuine answer of the site, but not to the task the server sent it (replayed, or the task was altered)."""


def answer_statement(*, job_id: str, task: str, site: str, answer: Message) -> bytes:
    """Return the bytes a site signs for one answer: every field of it, bound to the job, the task and the site.

    Args:
        job_id: The site's job.
        task: The task name.
        site: The site's name.
        answer: The answer, with ``H_ANSWER_TO`` in its header (its signature, if any, is left out).

    Returns:
        The canonical JSON of the statement.

    Raises:
        CanonicalJSONError: If a field has no canonical JSON form.
        TypeError: If the payload or the audit log is not bytes.
    """
    statement: dict[str, Any] = {"format": STATEMENT_FORMAT, "job": job_id, "task": task, "site": site,
                                 "status": answer.status}
    for field in dataclasses.fields(Message):  # every field, so that one added later cannot travel unsigned
        value = getattr(answer, field.name)
        if field.name == "header":
            statement["header"] = {k: v for k, v in value.items() if k != P.H_ANSWER_SIGNATURE}
        elif field.name in _HASHED:
            if value is not None and not isinstance(value, bytes):
                raise TypeError(f"the {field.name} is {type(value).__name__}, not bytes")
            statement[f"{field.name}_sha256"] = None if value is None else sha256_hex(value)
        elif field.name != "status":
            statement[field.name] = as_sent(value)
    return canonical_json(statement)


def sign_answer(signer: UpdateSigner, *, job_id: str, task: str, site: str, answer: Message,
                answer_to: str | None) -> Message:
    """Return a copy of ``answer`` that names the task it answers, signed by the site's ``signer``.

    Args:
        signer: The site's provisioned key and certificate.
        job_id: The site's job.
        task: The task name.
        site: The site's name.
        answer: What the site answers (left unchanged).
        answer_to: The SHA-256 of the statement of the task answered, once verified; None if the
            task failed its check (then the answer matches no task the server sent).

    Returns:
        The signed copy.

    Raises:
        CanonicalJSONError: If a field has no canonical JSON form.
        TypeError: If the payload or the audit log is not bytes.
    """
    header = {k: v for k, v in answer.header.items() if k != P.H_ANSWER_SIGNATURE}
    header[P.H_ANSWER_TO] = answer_to
    header[P.H_SITE_CERT] = signer.cert_pem
    signed = dataclasses.replace(answer, header=header)
    header[P.H_ANSWER_SIGNATURE] = signer.signature(answer_statement(job_id=job_id, task=task, site=site,
                                                                     answer=signed))
    return signed


class SiteAnswerSigner:
    """A site's key for its answers and updates (``startup/client.key``), loaded once, on first use.

    Loaded apart from the job's other set-up, so that an answer saying why the job could not be
    opened is signed too.

    Args:
        startup: The site kit's ``startup/`` folder (None: no kit, nothing signed).
        site: The site's name.
        job_id: The site's job.
    """

    def __init__(self, startup: Path | None, *, site: str, job_id: str) -> None:
        self.startup, self.site, self.job_id = startup, site, job_id
        self._key: UpdateSigner | None = None

    def key(self) -> UpdateSigner | None:
        """The site's key; None where the kit has none (the simulator).

        Raises:
            ZenfedError: If the kit's key cannot be read or does not match its certificate.
        """
        if self._key is None:
            self._key = UpdateSigner.from_kit(self.startup)
        return self._key

    def sign(self, task: str, answer: Message, *, answer_to: str | None) -> Message:
        """Return ``answer`` signed (see :func:`sign_answer`); unchanged where the kit has no key.

        An answer that cannot be signed (a field without a canonical form: a defect) is replaced by
        a signed error that names why, keeping the site's log. A key that cannot be loaded leaves
        the answer unsigned: the server then refuses it, quoting its reason as unchecked.
        """
        try:
            key = self.key()
        except ZenfedError as err:
            _log.error("%s cannot sign its answers: %s", self.site, err)
            return answer
        if key is None:
            return answer
        try:
            return sign_answer(key, job_id=self.job_id, task=task, site=self.site, answer=answer,
                               answer_to=answer_to)
        except (CanonicalJSONError, TypeError, ValueError) as err:
            _log.error("%s cannot sign its answer to %s: %s", self.site, task, err)
            failed = Message(status=P.STATUS_ERROR, audit_log=answer.audit_log, error={
                "kind": AnswerAuthError.__name__,
                "message": f"the site could not sign its answer ({type(err).__name__}: {err}); this is a defect "
                           "of the site's version"})
            return sign_answer(key, job_id=self.job_id, task=task, site=self.site, answer=failed,
                               answer_to=answer_to)


def from_the_carrier(answer: Message) -> bool:
    """Whether the transport made this answer itself (a task that failed on the way): a return code, nothing else.

    Such an answer is not authenticated, and says only that the site's answer did not arrive.
    """
    return (answer.status != P.STATUS_OK and _RETURN_CODE.fullmatch(str(answer.status)) is not None
            and not answer.to_dict())


def verify_answer(verifier: UpdateVerifier, *, job_id: str, task: str, site: str, answer: Message, sent_task: str,
                  now: dt.datetime | None = None) -> None:
    """Check that ``site`` signed exactly this answer, to the task the server sent it.

    Args:
        verifier: The project's root CA.
        job_id: The job.
        task: The task name.
        site: Who must have signed.
        answer: What arrived.
        sent_task: The SHA-256 of the statement of the task the server sent ``site``.
        now: The time to check the certificate's validity at (default: now).

    Raises:
        AnswerAuthError: With the reason; :class:`AnswerToAnotherTask` if only the task does not match.
    """
    signature_b64, cert_pem = answer.header.get(P.H_ANSWER_SIGNATURE), answer.header.get(P.H_SITE_CERT)
    if not isinstance(signature_b64, str) or not isinstance(cert_pem, str):
        raise AnswerAuthError(f"the answer of {site} to the {task} task is not signed; a provisioned site signs "
                              "every answer (is the site provisioned by this project, or was the answer altered "
                              "on the way?)")
    try:
        statement = answer_statement(job_id=job_id, task=task, site=site, answer=answer)
    except (CanonicalJSONError, TypeError, ValueError) as err:
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
    if answered is None:
        raise AnswerToAnotherTask(f"{site} answered a {task} task it could not verify, not one the server sent it: "
                                  "the task was altered or forged on the way, the site's kit cannot check the "
                                  "server's signature, or this answer was kept from such a task and replayed")
    if answered != sent_task:
        raise AnswerToAnotherTask(f"{site} answered another {task} task than the one the server sent it: an "
                                  "earlier answer replayed, or an earlier task replayed to the site")


def screen_answer(verifier: UpdateVerifier, *, job_id: str, task: str, site: str, answer: Message,
                  sent_task: str) -> Message:
    """Return ``answer`` if it checks out (see :func:`verify_answer`), else the server's error that says why.

    An answer the transport made itself (a return code, nothing from the site) passes as it is.

    Returns:
        The answer, or an error answer (origin ``server``) that carries nothing from the site.
    """
    if from_the_carrier(answer):
        return answer
    try:
        verify_answer(verifier, job_id=job_id, task=task, site=site, answer=answer, sent_task=sent_task)
    except AnswerAuthError as err:
        return refused(err, said=_reason(answer), checked=isinstance(err, AnswerToAnotherTask))
    return answer


def refused(err: AnswerAuthError, *, said: str = "", checked: bool = False) -> Message:
    """The server's error in place of an answer it does not act on, quoting what the answer said."""
    quote = f" (it said{'' if checked else ', unchecked'}: {said})" if said else ""
    return Message(status=P.STATUS_ERROR, error={
        "kind": type(err).__name__, "message": f"{err}; the server does not act on it{quote}",
        P.ERROR_ORIGIN: P.ORIGIN_SERVER})


def _reason(answer: Message) -> str:
    """The refusal or error an answer gave, printable and short (it may come from anyone on the way)."""
    said = ""
    if isinstance(answer.refusal, str) and answer.refusal:
        said = answer.refusal
    elif isinstance(answer.error, dict) and answer.error:
        said = f"{answer.error.get('kind', 'error')}: {answer.error.get('message', '')}"
    return "".join(c if c.isprintable() else "?" for c in said[:_QUOTE_CHARS])
