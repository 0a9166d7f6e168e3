"""Site side of the per-job attestation gate: answer the server, and check it before any task.

The site session drives it (no FLARE types cross this API)::

    check = SiteAttestation(workspace_root=kit, site=site, policy=policy, audit=audit,
                            mode=spec.attestation.mode)
    result_dict = check.answer(challenge_dict)        # the attestation task
    check.check_server(evidence=server_evidence)      # first thing in every other task

``check_server`` raises ``ServerNotAttested`` (a ``PolicyError``) when the server
failed this site's check and the site requires an attested server: the site then
refuses the task, so that server gets no update from it.

When is a server required to attest? If the site's own policy says so
(``require_attested_server``, whatever the job says), or if the job's
``attestation.mode`` is ``required`` (mutual attestation). With ``preferred`` the
site checks the server and records a failure without refusing; with ``off`` and
no site requirement it checks nothing.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from zenfed.attestation.exchange import Answer, Challenge, audit_fields, evidence_nonce
from zenfed.attestation.records import (
    AttestationError,
    AttestationResult,
    EvidenceRejected,
)
from zenfed.attestation.service import AttestationService
from zenfed.audit import events as E
from zenfed.audit.sink import AuditSink
from zenfed.errors import PolicyError
from zenfed.spec import SitePolicy

CLIENT_CONFIG = "fed_client.json"


class ServerNotAttested(PolicyError):
    """The server has not proven its TEE to this site for this job, and the site requires it."""


class SiteAttestation:
    """One site's side of the per-job attestation, for one job.

    Args:
        workspace_root: The site's kit folder (holding ``startup/`` and ``local/``).
        site: This site's provisioned name.
        policy: This site's policy (``require_attested_server``).
        audit: Where the site records its checks of the server.
        mode: The job's ``attestation.mode``: required, preferred or off.
        server: The server's provisioned name; read from ``startup/fed_client.json`` if None.
        package_dir: Package folder to measure for this site's evidence; the installed
            zenfed if None (tests point it elsewhere).
        clock: Returns the current time in seconds.

    """

    def __init__(
        self,
        *,
        workspace_root: str | Path,
        site: str,
        policy: SitePolicy,
        audit: AuditSink,
        mode: str,
        server: str | None = None,
        package_dir: Path | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if mode not in ("required", "preferred", "off"):
            raise AttestationError(
                f"attestation mode {mode!r} is unknown; use required|preferred|off"
            )
        self.site = site
        self.mode = mode
        self._root = Path(workspace_root)
        self._policy = policy
        self._audit = audit
        self._server = server
        self._package_dir = package_dir
        self._clock = clock
        self._service: AttestationService | None = None
        self._pending: str | None = None  # nonce issued for the server, not yet answered
        self._status: AttestationResult | None = None

    @property
    def server_required(self) -> bool:
        """True if a failed or missing server attestation makes this site refuse tasks."""
        return self._policy.require_attested_server or self.mode == "required"

    @property
    def checking(self) -> bool:
        """True if this site checks the server at all for this job."""
        return self._policy.require_attested_server or self.mode != "off"

    @property
    def server(self) -> str:
        """The server's provisioned name (the peer this site attests)."""
        if self._server is None:
            self._server = read_server_name(self._root)
        return self._server

    def answer(self, challenge: Mapping[str, Any]) -> dict[str, Any]:
        """Return this site's answer to the server's challenge (JSON-able task result).

        The answer carries this site's evidence for the nonce the server issued to it
        and a fresh nonce the server must answer in the next task (once).

        Raises:
            AttestationError: If the challenge is malformed or has no nonce for this
                site, or this kit cannot attest (no attestation policy or key).

        """
        try:
            parsed = Challenge.from_dict(challenge)
        except EvidenceRejected as err:
            raise AttestationError(str(err)) from None
        nonce = parsed.nonces.get(self.site)
        if nonce is None:
            raise AttestationError(
                f"the attestation challenge of round {parsed.round} holds no nonce for "
                f"{self.site!r}; the server does not count this site among the job's sites"
            )
        service = self._require_service()
        evidence = service.evidence_for(nonce)
        self._pending = service.issue_nonce(self.server)
        return Answer(site=self.site, evidence=evidence, server_nonce=self._pending).to_dict()

    def check_server(
        self, evidence: str | Mapping[str, str] | None = None
    ) -> AttestationResult | None:
        """Check the server before accepting a task; call it first in every task.

        If this site issued a nonce in its last answer, ``evidence`` must answer it
        (checked once, and recorded). Otherwise the last check stands: a server that
        passed stays accepted until the next challenge, one that never attested or
        failed stays refused.

        Args:
            evidence: The server's evidence text for this site, or the server's whole
                ``{site: evidence}`` dict (this site picks its own), or None.

        Returns:
            The result in force (None if this site does not check the server for this job).

        Raises:
            ServerNotAttested: If the result is a failure and the server is required to
                attest; the message is the reason (already recorded in the audit log).

        """
        if not self.checking:
            return None
        text = evidence.get(self.site) if isinstance(evidence, Mapping) else evidence
        if self._pending is not None:
            nonce, self._pending = self._pending, None
            self._status = self._verify(nonce, text)
            self._record(self._status)
        elif self._status is None:
            reason = (
                "the server has not attested to this site for this job (no attestation "
                "challenge reached this site); run the job with attestation: required or "
                "preferred"
            )
            self._status = self._fail(reason, nonce="")
            self._record(self._status)
        if not self._status.passed and self.server_required:
            raise ServerNotAttested(
                f"{self.site} refuses tasks from server {self.server!r}, which failed "
                f"attestation: {self._status.reason}"
            )
        return self._status

    # -- steps ----------------------------------------------------------------------------
    def _verify(self, nonce: str, text: str | None) -> AttestationResult:
        if not text:
            return self._fail(
                "the server sent no evidence for the nonce this site issued; it did not attest",
                nonce=nonce,
            )
        raw = text.encode("utf-8")
        try:
            claimed = evidence_nonce(raw)
        except EvidenceRejected as err:
            return self._fail(str(err), nonce=nonce)
        if claimed != nonce:
            return self._fail(
                f"the server's evidence answers nonce {claimed[:16]}..., not the one this site "
                "issued: replayed or stale evidence is refused",
                nonce=nonce,
            )
        return self._require_service().verify_peer(self.server, raw)

    def _record(self, result: AttestationResult) -> None:
        if result.passed:
            decision = "accepted"
        else:
            decision = "refused" if self.server_required else "recorded"
        fields = audit_fields(result, mode=self.mode, required=self.server_required)
        self._audit.record(E.ATTESTATION, decision=decision, **fields)

    def _fail(self, reason: str, *, nonce: str) -> AttestationResult:
        kinds = self._service.required_kinds(self.server) if self._service is not None else ()
        return AttestationResult.failed(participant=self.server, kinds=kinds, reason=reason, nonce=nonce,
                                        at=self._clock(), verifier=self.site)

    def _require_service(self) -> AttestationService:
        if self._service is None:
            self._service = AttestationService.from_workspace(
                self._root, clock=self._clock, package_dir=self._package_dir
            )
        return self._service


def read_server_name(workspace_root: str | Path) -> str:
    """Return the server's provisioned name from a client kit's ``startup/fed_client.json``.

    Raises:
        AttestationError: If the file is missing or names no server identity.

    """
    path = Path(workspace_root) / "startup" / CLIENT_CONFIG
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
        servers = config["servers"]
        name = servers[0]["identity"]
    except (OSError, ValueError, KeyError, IndexError, TypeError, AttributeError):
        raise AttestationError(
            f"cannot read the server's name from {path}: a provisioned site kit names it there "
            "(servers[0].identity); restore the kit's startup/ folder, or re-provision the site"
        ) from None
    if not isinstance(name, str) or not name:
        raise AttestationError(f"{path} names no server identity")
    return name


__all__ = ["ServerNotAttested", "SiteAttestation", "read_server_name"]
