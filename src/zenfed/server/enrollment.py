"""Enrollment and matching on the server: each site's declared profile, once per job, and who may train.

Before round 1 the server asks every site for its enrollment profile
(``zenfed.site.enrollment``), records what came back (``sites_enrolled``) and,
when the job sets ``federation.cohort_requirements``, keeps for training only
the sites whose profile meets them; each excluded site is recorded with why
(``cohort_matched``). Matching uses only what sites chose to disclose: a site
that withholds a field a requirement needs is not picked.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from zenfed import protocol as P
from zenfed.audit import events as E
from zenfed.audit.sink import AuditSink
from zenfed.digest import CanonicalJSONError
from zenfed.protocol import Message, answer_error
from zenfed.server.transport import Transport
from zenfed.spec import CohortRequirements, JobSpec
from zenfed.update_auth import UpdateAuthError, UpdateVerifier, enrollment_statement

# Seconds the enrollment task waits for sites at most (it is answered from the policy file, at once).
ENROLL_TIMEOUT_S = 120


def why_not_matched(profile: dict[str, Any] | None, required: CohortRequirements) -> str | None:
    """The reason a site's profile fails ``required``, or None if it meets every requirement."""
    if profile is None:
        return "it sent no enrollment profile"
    if profile.get("withheld"):
        return "its policy withholds its enrollment profile"
    if required.min_records is not None:
        records = profile.get("records")
        if not isinstance(records, int):
            return f"it does not disclose its record count (min_records {required.min_records})"
        if records < required.min_records:
            return f"{records} training records, fewer than min_records {required.min_records}"
    missing = sorted(set(required.domain_tags) - set(profile.get("domain_tags") or ()))
    if missing:
        return f"it does not declare the domain tag(s) {', '.join(missing)}"
    if required.min_steps_per_minute is not None:
        speed = profile.get("steps_per_minute")
        if not isinstance(speed, (int, float)):
            return "it declares no measured speed (run `zenfed site probe` at the site)"
        if speed < required.min_steps_per_minute:
            return f"{speed:.1f} steps per minute, slower than min_steps_per_minute {required.min_steps_per_minute}"
    if required.device is not None and profile.get("device") != required.device:
        return f"it trains on {profile.get('device') or 'an undeclared device'}, not {required.device}"
    return None


class Enrollment:
    """The sites' profiles for one run of a job, and the training cohort they allow."""

    def __init__(self, *, spec: JobSpec, job_id: str) -> None:
        """Create it for ``spec``; the server's audit log comes with :meth:`open`."""
        self.spec, self.job_id, self._audit = spec, job_id, AuditSink(None)
        self._verifier: UpdateVerifier | None = None
        self.profiles: dict[str, dict[str, Any]] = {}
        self.collected = False
        self._matched: dict[str, str | None] = {}  # site -> why it is excluded (None: eligible)

    def open(self, audit: AuditSink, verifier: UpdateVerifier | None = None) -> None:
        """Take the server's audit log, and the project's root CA to check profiles where kits have keys."""
        self._audit, self._verifier = audit, verifier

    def collect(self, transport: Transport, *, sites: list[str], evidence: dict[str, Any] | None,
                keep_log: Callable[[str, Message], None]) -> bool:
        """Ask every site for its profile once; record them. False if the job was aborted meanwhile."""
        header = {P.H_JOB_ID: self.job_id, P.H_ROUND: 0, P.H_SPEC_HASH: self.spec.spec_hash()}

        def accept(site: str, answer: Message) -> None:
            keep_log(site, answer)
            profile = answer.header.get(P.H_PROFILE)
            why = answer.refusal or answer_error(answer)
            if answer.status == P.STATUS_OK and answer.refusal is None and isinstance(profile, dict):
                try:
                    if self._verifier is not None:
                        self._verifier.check_signed(
                            site=site, header=answer.header, what="enrollment profile",
                            statement=enrollment_statement(job_id=self.job_id, site=site, profile=profile),
                            changed="the profile was changed on the way")
                    self.profiles[site] = _plain(profile)
                    return
                except (UpdateAuthError, CanonicalJSONError) as err:
                    why = str(err)
            self._audit.record(E.ERROR, kind="result_rejected", site=site, round=0, task=P.TASK_ENROLL,
                               message=f"{site} sent no enrollment profile: {why}"[:500])

        if not transport.broadcast(task=P.TASK_ENROLL, message=Message(header=header, server_evidence=evidence or None),
                                   targets=sites, min_responses=len(sites),
                                   timeout_s=min(self.spec.federation.task_timeout_s, ENROLL_TIMEOUT_S),
                                   wait_after_min_s=0, on_result=accept):
            return False
        self._audit.record(E.SITES_ENROLLED, profiles=dict(sorted(self.profiles.items())),
                           silent=sorted(set(sites) - set(self.profiles)))
        self.collected = True
        return True

    def match(self, sites: list[str]) -> list[str]:
        """The sites of ``sites`` that may train under the job's cohort requirements (all if it sets none).

        Each site's verdict is recorded once per run (``cohort_matched``), when it is first seen.
        """
        required = self.spec.federation.cohort_requirements
        if required is None:
            return list(sites)
        new = [site for site in sites if site not in self._matched]
        for site in new:
            self._matched[site] = why_not_matched(self.profiles.get(site), required)
        if new:
            self._audit.record(
                E.COHORT_MATCHED, requirements=required.model_dump(mode="json"),
                eligible=sorted(s for s in new if self._matched[s] is None),
                excluded={s: self._matched[s] for s in sorted(new) if self._matched[s] is not None},
            )
        return [site for site in sites if self._matched[site] is None]

    def excluded(self) -> dict[str, str]:
        """Sites the requirements excluded so far, with why."""
        return {site: why for site, why in sorted(self._matched.items()) if why is not None}


def _plain(profile: dict[str, Any]) -> dict[str, Any]:
    """Keep only plain JSON values of a profile (it came over the network)."""
    allowed = (str, int, float, bool, type(None))
    out: dict[str, Any] = {}
    for key, value in profile.items():
        if isinstance(value, allowed):
            out[str(key)] = value
        elif isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
            out[str(key)] = [str(v) for v in value][:64]
    return out
