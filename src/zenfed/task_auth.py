"""Every task is signed by the server: the statement both ends compute, the signing, each site's check.

A task carries what a site acts on: the global sum it decrypts and trains
from, the round's cohort and peer keys, the sites whose masks to cancel, the
adapter to release. Mutual TLS authenticates only the hop, and a FLARE relay
terminates it, so the server also signs each task with its provisioned key
(``startup/server.key``; :class:`~zenfed.server.transport.SigningTransport`).
The statement names the job, the task, a sequence number the server counts up
for every task of the job, the sites the task is for, and the task's whole
content (header, payload hash, attestation fields). A site checks that the
certificate that came with it (``startup/server.crt``) was issued by the
project's root CA to the server its kit names, that the signature covers what
arrived, that the task is addressed to it, and that the sequence number is
higher than any it took before: a changed, forged, misdirected or replayed task
is refused with the reason, before the site acts on it. FLARE itself sends a
task again when it did not receive the answer; the site recognises that copy
(the same number and the same statement) and declines it without alarm, since
running a task twice would spend its privacy budget twice.

Kits without keys (the FLARE simulator) neither sign nor check.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import replace
from typing import Any, Protocol

from zenfed import protocol as P
from zenfed.digest import CanonicalJSONError, canonical_json, sha256_hex
from zenfed.errors import PolicyError
from zenfed.protocol import Message, as_sent
from zenfed.update_auth import UpdateAuthError, UpdateSigner, UpdateVerifier

STATEMENT_FORMAT = "zenfed-task-signature/1"
SIGNATURE_FIELDS = (P.H_SERVER_SIGNATURE, P.H_SERVER_CERT)
LAST_SEQ = "last_task_seq"  # the site's run-state key: the highest sequence number it took
LAST_STATEMENT = "last_task_sha256"  # and the SHA-256 of that task's statement (to recognise FLARE's resend)


class TaskAuthError(UpdateAuthError):
    """A task is unsigned, replayed, or its signature or certificate does not check out."""


class TaskResent(PolicyError):
    """FLARE sent a task again that this site already took: declined, as running it twice would spend twice."""


class FactStore(Protocol):
    """Where a site keeps facts that outlive its process (``zenfed.site.run_state.SiteRunState``)."""

    def get(self, key: str, default: Any = None) -> Any:
        """The fact ``key``, or ``default``."""
        ...

    def set(self, **facts: Any) -> None:
        """Record ``facts`` durably."""
        ...


def task_statement(*, job_id: str, task: str, message: Message) -> bytes:
    """Return the bytes the server signs for one task: all of it, bound to the job and the task name.

    Raises:
        CanonicalJSONError: If a field has no canonical JSON form.
        TypeError: If the payload is not bytes.
    """
    header = {k: v for k, v in message.header.items() if k not in SIGNATURE_FIELDS}
    if message.payload is not None and not isinstance(message.payload, bytes):
        raise TypeError(f"the payload is {type(message.payload).__name__}, not bytes")
    return canonical_json({
        "format": STATEMENT_FORMAT, "job": job_id, "task": task, "header": header,
        "payload_sha256": None if message.payload is None else sha256_hex(message.payload),
        "attest": as_sent(message.attest), "server_evidence": as_sent(message.server_evidence),
    })


def sign_task(signer: UpdateSigner, *, job_id: str, task: str, message: Message, seq: int,
              targets: Sequence[str]) -> Message:
    """Return a copy of ``message`` numbered ``seq``, addressed to ``targets`` and signed by ``signer``.

    The original is unchanged.
    """
    return sign_task_with_digest(signer, job_id=job_id, task=task, message=message, seq=seq, targets=targets)[0]


def sign_task_with_digest(signer: UpdateSigner, *, job_id: str, task: str, message: Message, seq: int,
                          targets: Sequence[str]) -> tuple[Message, str]:
    """Like :func:`sign_task`, and the SHA-256 of the signed statement, which the sites' answers name."""
    header = {k: v for k, v in message.header.items() if k not in SIGNATURE_FIELDS}
    header[P.H_TASK_SEQ] = seq
    header[P.H_TARGETS] = sorted(targets)
    signed = replace(message, header=header)
    statement = task_statement(job_id=job_id, task=task, message=signed)
    header[P.H_SERVER_SIGNATURE] = signer.signature(statement)
    header[P.H_SERVER_CERT] = signer.cert_pem
    return signed, sha256_hex(statement)


class TaskVerifier:
    """A site's check of every task: signed by its project's server, for this job and this site, and new.

    Args:
        verifier: The project's root CA.
        server: The server's provisioned name (``startup/fed_client.json``).
        site: This site's name (a task must be addressed to it).
        job_id: This site's job.
        facts: Where the highest sequence number taken is kept, so that it outlives the process.
    """

    def __init__(self, verifier: UpdateVerifier, *, server: str, site: str, job_id: str, facts: FactStore) -> None:
        self.verifier = verifier
        self.server = server
        self.site = site
        self.job_id = job_id
        self.facts = facts

    def check(self, task: str, message: Message, *, now: dt.datetime | None = None) -> str:
        """Check that the server signed exactly this task for this job and this site, and that it is new.

        Returns:
            The SHA-256 of the task's statement: the site's answer names it (``zenfed.answer_auth``).

        Raises:
            TaskAuthError: With the reason, before the site acts on the task.
            TaskResent: If it is FLARE's resend of the last task taken.
        """
        digest = self.authenticate(task, message, now=now)
        self.check_new(task, message, digest)
        return digest

    def authenticate(self, task: str, message: Message, *, now: dt.datetime | None = None) -> str:
        """Check that the server signed exactly this task, for this job and this site.

        Returns:
            The SHA-256 of the task's statement.

        Raises:
            TaskAuthError: With the reason.
        """
        header = message.header
        signature_b64, cert_pem = header.get(P.H_SERVER_SIGNATURE), header.get(P.H_SERVER_CERT)
        if not isinstance(signature_b64, str) or not isinstance(cert_pem, str):
            raise TaskAuthError(f"the {task} task is not signed by the server; a provisioned server signs every "
                                "task (does the server run this project's kit, or was the task altered on the way?)")
        try:
            statement = task_statement(job_id=self.job_id, task=task, message=message)
        except (CanonicalJSONError, TypeError) as err:
            raise TaskAuthError(f"the {task} task cannot be checked: {err}; it was altered on the way, or the "
                                "server runs another version") from None
        try:
            cert = self.verifier.certificate(holder=self.server, cert_pem=cert_pem, what=f"{task} task",
                                             now=now, role="server")
            self.verifier.check_signature(
                cert, statement=statement, signature_b64=signature_b64,
                signed=f"the server's signature on the {task} task",
                changed="the task was changed on the way, or was signed for another job")
        except UpdateAuthError as err:
            raise TaskAuthError(str(err)) from None
        targets = header.get(P.H_TARGETS)
        if not isinstance(targets, list) or self.site not in targets:
            raise TaskAuthError(f"the {task} task is addressed to {targets!r}, not to {self.site}: it was "
                                "redirected on the way; refusing it")
        return sha256_hex(statement)

    def check_new(self, task: str, message: Message, digest: str) -> None:
        """Check that an authentic task (``digest``: its statement's SHA-256) is not one this site took before.

        Raises:
            TaskAuthError: If its number is not above the last taken (a replay).
            TaskResent: If it is FLARE's resend of the last task taken.
        """
        seq = message.header.get(P.H_TASK_SEQ)
        if not isinstance(seq, int) or isinstance(seq, bool) or seq < 1:
            raise TaskAuthError(f"the {task} task carries no valid sequence number ({seq!r})")
        # FLARE hands a site's job process one task at a time, so this read and write do not race.
        last = int(self.facts.get(LAST_SEQ, 0))
        if seq == last and digest == self.facts.get(LAST_STATEMENT):
            raise TaskResent(f"the server sent the {task} task (number {seq}) again, which FLARE does when it "
                             "did not receive this site's answer; this site already took it and does not run "
                             "a task twice")
        if seq <= last:
            raise TaskAuthError(f"the {task} task is a replay: its sequence number {seq} is not above "
                                f"{last}, the last this site took in this job; refusing it")
        self.facts.set(**{LAST_SEQ: seq, LAST_STATEMENT: digest})
