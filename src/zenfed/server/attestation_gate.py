"""Server side of the per-job attestation gate: challenge sites, verify, admit, prove itself.

The server session drives it around its rounds (no FLARE types cross this API)::

    gate = ServerAttestationGate(spec=spec, workspace_root=kit, audit=audit)
    if gate.needed(rnd):
        challenge = gate.challenge(sites=sites, round=rnd)      # task data, to every site
        answers = {site: result_dict, ...}                      # each site's SiteAttestation.answer
        admitted, records = gate.verify(answers)                # audited; failures excluded
        gate.enforce_quorum(admitted)                           # raises in 'required' mode
        server_evidence = gate.server_evidence()                # into the next task's data

Every verification is nonce-bound (the nonce issued for that site in this
challenge, accepted once) and written to the audit log as an ``attestation``
record with the decision taken.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
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
from zenfed.errors import ZenfedError
from zenfed.spec import JobSpec

# The attestation task must end well before the nonces it carries expire, and leave
# time for the next task to bring the server's evidence to each site's own nonce.
_TIMEOUT_SHARE = 0.5


class AttestationQuorumError(ZenfedError):
    """With ``attestation: required``, fewer sites passed attestation than the job needs."""


class ServerAttestationGate:
    """Per-job attestation of the sites by the server, and of the server for the sites.

    Args:
        spec: The job spec (``attestation.mode``, ``attestation.reattest_every_rounds``,
            ``federation.min_sites``).
        workspace_root: The server's kit folder (holding ``startup/attestation.json``).
        audit: Where each verification is recorded.
        package_dir: Package folder to measure for the server's own evidence; the
            installed zenfed if None (tests point it elsewhere).
        clock: Returns the current time in seconds.

    Raises:
        AttestationError: If attestation is on for this job but the kit has no
            attestation policy, key or root certificate (fails closed at job start).

    """

    def __init__(
        self,
        *,
        spec: JobSpec,
        workspace_root: str | Path,
        audit: AuditSink,
        package_dir: Path | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.mode = spec.attestation.mode
        self.every = spec.attestation.reattest_every_rounds
        self.min_sites = spec.federation.min_sites
        self._audit = audit
        self._clock = clock
        self._service: AttestationService | None = None
        if self.mode != "off":
            self._service = AttestationService.from_workspace(
                workspace_root, clock=clock, package_dir=package_dir
            )
        self._pending: Challenge | None = None
        self._server_nonces: dict[str, str] = {}
        self._last_round: int | None = None
        self.admitted: frozenset[str] = frozenset()
        self.reasons: dict[str, str] = {}

    @property
    def enabled(self) -> bool:
        """True unless the job's attestation mode is ``off``."""
        return self._service is not None

    @property
    def timeout_s(self) -> int:
        """Seconds the attestation task may wait for answers (before its nonces expire)."""
        ttl = self._service.nonce_ttl_s if self._service else 120.0
        return max(1, int(ttl * _TIMEOUT_SHARE))

    def needed(self, round: int) -> bool:
        """Return True if the sites must attest before ``round`` (1-based) starts.

        Before round 1, then every ``reattest_every_rounds`` rounds (rounds 1, 1+R,
        1+2R, ...), and before the first round this gate runs at all (a resumed job
        attests again). Never with ``attestation: off``.
        """
        if not self.enabled:
            return False
        if self._last_round is None or round == 1:
            return True
        return self.every > 0 and (round - 1) % self.every == 0

    def challenge(self, *, sites: Sequence[str], round: int) -> dict[str, Any]:
        """Issue a fresh nonce for each site and return the JSON-able task data.

        Every site can receive the same data: each picks its own nonce by name.
        A new challenge replaces any unanswered one.

        Raises:
            AttestationError: If attestation is off for this job, or ``sites`` is empty.

        """
        service = self._require_service()
        if not sites:
            raise AttestationError("no sites to attest; the job needs connected sites")
        nonces = {site: service.issue_nonce(site) for site in sorted(set(sites))}
        self._pending = Challenge(round=round, nonces=nonces)
        self._last_round = round
        return self._pending.to_dict()

    def verify(
        self, answers: Mapping[str, Mapping[str, Any] | str | None]
    ) -> tuple[set[str], list[dict[str, Any]]]:
        """Verify each challenged site's answer, audit every result, and decide who is admitted.

        A site is admitted only if its evidence answers the nonce issued for it in the
        pending challenge (once) and passes its policy. A challenged site without an
        answer, and an answer from a site that was not challenged, are refused. In
        every mode but ``off``, refused sites are excluded; see ``enforce_quorum``.

        Args:
            answers: Site name -> the dict its ``SiteAttestation.answer`` returned, or
                the text of its refusal or error (recorded as the reason), or None
                (or missing) if it did not answer.

        Returns:
            The admitted sites, and one audit record (a dict) per site in site order.

        Raises:
            AttestationError: If no challenge is pending (call ``challenge`` first).

        """
        service = self._require_service()
        challenge = self._pending
        if challenge is None:
            raise AttestationError("no attestation challenge is pending; call challenge() first")
        self._pending = None  # a challenge is answered once
        admitted: set[str] = set()
        records: list[dict[str, Any]] = []
        self._server_nonces = {}
        self.reasons = {}
        for site in sorted(set(challenge.nonces) | set(answers)):
            result, server_nonce = self._check_site(
                service, site, challenge.nonces.get(site), answers.get(site)
            )
            if result.passed:
                admitted.add(site)
                if server_nonce:
                    self._server_nonces[site] = server_nonce
            else:
                self.reasons[site] = result.reason
            decision = "admitted" if result.passed else "excluded"
            fields = audit_fields(result, round=challenge.round, mode=self.mode, decision=decision)
            self._audit.record(E.ATTESTATION, **fields)
            records.append(fields)
        self.admitted = frozenset(admitted)
        return admitted, records

    def eligible(self, sites: Sequence[str]) -> list[str]:
        """Return the sites that may receive this job's tasks now, in name order.

        All of ``sites`` when attestation is off; otherwise those admitted by the
        last ``verify`` (a site joining later waits for the next attestation).
        """
        if not self.enabled:
            return sorted(set(sites))
        return sorted(set(sites) & self.admitted)

    def quorum_met(self, admitted: set[str] | frozenset[str]) -> bool:
        """Return False only if the mode is ``required`` and fewer than min_sites were admitted."""
        return self.mode != "required" or len(admitted) >= self.min_sites

    def enforce_quorum(self, admitted: set[str] | frozenset[str]) -> None:
        """Abort rule of ``attestation: required``: enough admitted sites, or raise.

        With ``preferred``, refused sites are only excluded; the round's own
        ``federation.min_sites`` check then decides whether the job can go on.

        Raises:
            AttestationQuorumError: In ``required`` mode, if fewer than
                ``federation.min_sites`` sites passed; the message lists why each failed.
                The error is recorded in the audit log first.

        """
        if self.quorum_met(admitted):
            return
        why = "; ".join(f"{site}: {reason}" for site, reason in sorted(self.reasons.items()))
        message = (
            f"only {len(admitted)} site(s) passed attestation, fewer than "
            f"federation.min_sites={self.min_sites} (attestation: required); stopping the job. "
            f"Refused: {why or 'none'}"
        )
        self._audit.record(E.ERROR, kind="attestation_quorum", message=message[:3000])
        raise AttestationQuorumError(message)

    def server_evidence(self, site_nonces: Mapping[str, str] | None = None) -> dict[str, str]:
        """Return the server's evidence (JSON text) for each site's nonce.

        Args:
            site_nonces: Site -> the nonce it issued for the server; by default the
                nonces of the sites admitted by the last ``verify``.

        Returns:
            Site -> evidence text; put the whole dict in the next task's data (each
            site picks its own). Empty if the server is provisioned with no TEE kind:
            sites then record that the server did not attest.

        """
        service = self._require_service()
        nonces = self._server_nonces if site_nonces is None else dict(site_nonces)
        out: dict[str, str] = {}
        for site, nonce in sorted(nonces.items()):
            try:
                out[site] = service.evidence_for(nonce).decode("utf-8")
            except AttestationError as err:
                self._audit.record(E.ERROR, kind="attestation_evidence", message=str(err)[:3000])
                return {}
        return out

    def _check_site(
        self,
        service: AttestationService,
        site: str,
        issued: str | None,
        raw: Mapping[str, Any] | str | None,
    ) -> tuple[AttestationResult, str]:
        if issued is None:
            return self._refuse(site, "", f"{site} answered without being challenged"), ""
        if raw is None:
            reason = (
                f"{site} did not answer the attestation challenge in time "
                f"({self.timeout_s} s); it is excluded until it attests"
            )
            return self._refuse(site, issued, reason), ""
        if isinstance(raw, str):
            return self._refuse(site, issued, f"{site} could not attest: {raw[:1000]}"), ""
        try:
            answer = Answer.from_dict(raw)
            if answer.site != site:
                raise EvidenceRejected(f"the answer of {site} is signed off as {answer.site!r}")
            nonce = evidence_nonce(answer.evidence)
            if nonce != issued:
                raise EvidenceRejected(
                    f"the evidence of {site} answers nonce {nonce[:16]}..., not the one issued "
                    "to it for this challenge: replayed or stale evidence is refused"
                )
        except EvidenceRejected as err:
            return self._refuse(site, issued, str(err)), ""
        return service.verify_peer(site, answer.evidence), answer.server_nonce

    def _refuse(self, site: str, nonce: str, reason: str) -> AttestationResult:
        service = self._require_service()
        return AttestationResult.failed(participant=site, kinds=service.required_kinds(site), reason=reason,
                                        nonce=nonce, at=self._clock(), verifier=service.participant)

    def _require_service(self) -> AttestationService:
        if self._service is None:
            raise AttestationError("attestation is off for this job (attestation.mode: off)")
        return self._service


__all__ = ["AttestationQuorumError", "ServerAttestationGate"]
