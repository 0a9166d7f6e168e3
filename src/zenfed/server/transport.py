"""What the server's round logic needs from whatever carries its tasks to the sites.

FLARE's controller implements :class:`Transport` with ``broadcast_and_wait``
(``zenfed.controllers.round_controller``); :class:`InProcessTransport` calls
each site's :class:`~zenfed.site.session.SiteSession` in the same process.
:class:`SigningTransport` wraps either, signs every task (``zenfed.task_auth``) and checks
every answer (``zenfed.answer_auth``).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping, Sequence
from typing import Protocol

from zenfed.answer_auth import AnswerAuthError, from_the_carrier, refused, screen_answer
from zenfed.protocol import Message
from zenfed.task_auth import sign_task_with_digest
from zenfed.update_auth import UpdateSigner, UpdateVerifier

# Called once per site answer, as it arrives: (site name, its message).
ResultCallback = Callable[[str, Message], None]


class Transport(Protocol):
    """Sends one task to sites and hands each answer to a callback."""

    def sites(self) -> list[str]:
        """Return the names of the sites connected now."""
        ...

    def broadcast(self, *, task: str, message: Message, targets: Sequence[str], min_responses: int,
                  timeout_s: float, wait_after_min_s: float, on_result: ResultCallback) -> bool:
        """Send ``message`` as ``task`` to ``targets`` and wait for their answers.

        Args:
            task: The task name (``zenfed.protocol.TASK_*``).
            message: The task data.
            targets: The sites to send it to.
            min_responses: Answers to wait for before the ``wait_after_min_s`` grace period starts.
            timeout_s: How long a site may take.
            wait_after_min_s: How long to wait for more answers once ``min_responses`` arrived.
            on_result: Called with each answer as it arrives.

        Returns:
            False if the job was aborted while waiting, else True.
        """
        ...

    def lost(self) -> dict[str, str]:
        """Return the sites the carrier has given up on (their job process is gone), with why."""
        ...

    def stop(self, reason: str) -> None:
        """Stop the job: it cannot go on (too few sites, attestation quorum missed)."""
        ...


# A site as the in-process transport sees it: (task name, task data) -> answer.
SiteHandler = Callable[[str, Message], Message]


class InProcessTransport:
    """Carries tasks to site handlers in this process, one after another: a job without FLARE.

    Used to run a whole job in one process (tests, development). Each site gets
    its own copy of the task, as it would over a network, so no site can change
    what another receives.

    Args:
        handlers: Site name -> its handler (``SiteSession.handle``).
        unreachable: Sites that are connected but never answer (a crashed site).
    """

    def __init__(self, handlers: Mapping[str, SiteHandler], *, unreachable: Sequence[str] = ()) -> None:
        self.handlers = dict(handlers)
        self.unreachable = set(unreachable)
        self.stopped: str | None = None
        self.answers: list[tuple[str, str, Message]] = []  # (task, site, answer), in arrival order
        self.lost_sites: dict[str, str] = {}  # what a test declares lost, as FLARE's dead-job report would

    def sites(self) -> list[str]:
        """Every site with a handler, less those declared lost."""
        return sorted(set(self.handlers) - set(self.lost_sites))

    def broadcast(self, *, task: str, message: Message, targets: Sequence[str], min_responses: int,
                  timeout_s: float, wait_after_min_s: float, on_result: ResultCallback) -> bool:
        """Hand a copy of the task to each target site and pass its answer on; False once stopped."""
        for site in targets:
            if self.stopped is not None:
                break
            if site in self.unreachable:
                continue
            answer = self.handlers[site](task, copy.deepcopy(message))
            self.answers.append((task, site, answer))
            on_result(site, answer)
        return self.stopped is None

    def lost(self) -> dict[str, str]:
        """The sites declared lost (none unless a test says so)."""
        return dict(self.lost_sites)

    def stop(self, reason: str) -> None:
        """Remember why the job stopped; later broadcasts send nothing."""
        self.stopped = reason


class SigningTransport:
    """Numbers and signs every task the server sends, and checks every answer, around the transport it wraps.

    Args:
        transport: What carries the tasks (FLARE, or in process).
        signer: The server's provisioned key and certificate.
        job_id: The job the tasks belong to (named in every signed statement).
        verifier: The project's root CA: each answer must be signed by its site, for the task it was sent.
            An answer that fails reaches the round logic as an error that says why. None: not checked.
    """

    def __init__(self, transport: Transport, *, signer: UpdateSigner, job_id: str,
                 verifier: UpdateVerifier | None = None) -> None:
        self.transport = transport
        self.signer = signer
        self.job_id = job_id
        self.verifier = verifier
        self.seq = 0  # tasks sent in this job so far

    def sites(self) -> list[str]:
        """The sites connected now, as the wrapped transport sees them."""
        return self.transport.sites()

    def lost(self) -> dict[str, str]:
        """The sites the wrapped transport gave up on."""
        return self.transport.lost()

    def stop(self, reason: str) -> None:
        """Stop the job on the wrapped transport."""
        self.transport.stop(reason)

    def broadcast(self, *, task: str, message: Message, targets: Sequence[str], min_responses: int,
                  timeout_s: float, wait_after_min_s: float, on_result: ResultCallback) -> bool:
        """Send a numbered, signed copy of ``message``; check each answer (see :meth:`Transport.broadcast`)."""
        self.seq += 1
        signed, sent = sign_task_with_digest(self.signer, job_id=self.job_id, task=task, message=message,
                                             seq=self.seq, targets=targets)
        verifier = self.verifier
        if verifier is None:
            screened = on_result
        else:
            answered: set[str] = set()

            def screened(site: str, answer: Message) -> None:
                checked = screen_answer(verifier, job_id=self.job_id, task=task, site=site, answer=answer,
                                        sent_task=sent)
                if checked is answer and not from_the_carrier(answer):
                    if site in answered:  # the same genuine answer again, delivered twice on the way
                        checked = refused(AnswerAuthError(
                            f"a second answer of {site} to the same {task} task (the first was taken)"))
                    answered.add(site)
                on_result(site, checked)
        return self.transport.broadcast(task=task, message=signed, targets=targets, min_responses=min_responses,
                                        timeout_s=timeout_s, wait_after_min_s=wait_after_min_s, on_result=screened)
