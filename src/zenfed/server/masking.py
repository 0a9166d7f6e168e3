"""The server's side of pairwise masks: signed key announcements, fixed cohorts, recovery from a dropout.

The server cannot make or change a key: each announcement carries the site's
signature and certificate, which every other site checks against the project's
root CA before it masks. The server checks them too, so that a site whose
announcement would be refused is left out of the cohorts with a recorded
reason instead of failing a round. A site without a key takes no part in a
masked round.
"""

from __future__ import annotations

import logging
from typing import Any

from zenfed import protocol as P
from zenfed.audit import events as E
from zenfed.audit.sink import AuditSink
from zenfed.errors import ZenfedError
from zenfed.privacy.pairwise import key_fingerprint, key_statement, parse_public_key
from zenfed.protocol import Message
from zenfed.server.intake import RoundIntake
from zenfed.server.transport import Transport
from zenfed.spec import JobSpec
from zenfed.update_auth import UpdateVerifier

_log = logging.getLogger(__name__)


class KeyDirectory:
    """The pairwise keys the sites announced for one job.

    Args:
        job_id: The job (a key announced for another job does not verify).
        verifier: The project's root CA; None in the simulator (keys then travel unsigned).
        audit: The server's audit log.
    """

    def __init__(self, *, job_id: str, verifier: UpdateVerifier | None, audit: AuditSink) -> None:
        self.job_id = job_id
        self.verifier = verifier
        self.audit = audit
        self._entries: dict[str, dict[str, Any]] = {}
        self._refused: dict[str, str] = {}

    @property
    def sites(self) -> set[str]:
        """Sites with an accepted key."""
        return set(self._entries)

    def accept(self, site: str, answer: Message) -> None:
        """Keep one site's announcement, or record why it was refused; never raise."""
        try:
            header = answer.header or {}
            if answer.status != P.STATUS_OK or answer.refusal:
                raise ZenfedError(answer.refusal or P.answer_error(answer))
            text = header.get(P.H_PAIRWISE_KEY)
            parse_public_key(text, site=site)
            entry = {P.H_PAIRWISE_KEY: str(text)}
            if self.verifier is not None:
                self.verifier.check_signed(site=site, statement=key_statement(
                    job_id=self.job_id, site=site, public_key=str(text)), header=header, what="pairwise key")
                entry.update({P.H_SIGNATURE: header[P.H_SIGNATURE], P.H_SITE_CERT: header[P.H_SITE_CERT]})
            self._entries[site] = entry
        except ZenfedError as err:
            _log.error("pairwise key of %s refused: %s", site, err)
            self._refused[site] = str(err)[:500]

    def record(self) -> None:
        """Write the directory (key fingerprints) and the refusals to the audit log."""
        self.audit.record(E.PAIRWISE_KEYS, announced={s: key_fingerprint(e[P.H_PAIRWISE_KEY])
                                                 for s, e in sorted(self._entries.items())},
                          refused=dict(sorted(self._refused.items())))

    def announcements(self, cohort: list[str]) -> dict[str, dict[str, Any]]:
        """The cohort's announcements, as each site signed them."""
        return {site: dict(self._entries[site]) for site in cohort}


class MaskedRounds:
    """What a job under pairwise masks adds to the server's rounds: keys, fixed cohorts, dropout recovery.

    Args:
        spec: The job spec.
        job_id: The job.
    """

    def __init__(self, *, spec: JobSpec, job_id: str) -> None:
        self.spec = spec
        self.job_id = job_id
        self._verifier: UpdateVerifier | None = None
        self._audit = AuditSink(None)
        self._keys: KeyDirectory | None = None

    def open(self, *, verifier: UpdateVerifier | None, audit: AuditSink) -> None:
        """Take the server's root CA (None in the simulator) and audit log, once the job starts."""
        self._verifier, self._audit = verifier, audit

    @property
    def keys_collected(self) -> bool:
        """True once this run of the job holds the sites' keys."""
        return self._keys is not None

    def _header(self, round_index: int, **fields: Any) -> dict[str, Any]:
        return {P.H_JOB_ID: self.job_id, P.H_ROUND: round_index, P.H_SPEC_HASH: self.spec.spec_hash(), **fields}

    def collect_keys(self, transport: Transport, *, sites: list[str], round_index: int,
                     evidence: dict[str, Any] | None) -> bool:
        """Ask every eligible site for its signed pairwise key, once per run of the job; False if too few came."""
        directory = KeyDirectory(job_id=self.job_id, verifier=self._verifier, audit=self._audit)
        message = Message(header=self._header(round_index), server_evidence=evidence or None)
        if not transport.broadcast(task=P.TASK_KEYS, message=message, targets=sites, min_responses=len(sites),
                                   timeout_s=min(self.spec.federation.task_timeout_s, 300), wait_after_min_s=0,
                                   on_result=directory.accept):
            return False
        directory.record()
        if len(directory.sites) < self.spec.federation.min_sites:
            text = (f"only {len(directory.sites)} site(s) announced a valid pairwise key, fewer than min_sites "
                    f"{self.spec.federation.min_sites}")
            self._audit.record(E.ERROR, kind="too_few_sites", round=round_index, message=text)
            transport.stop(f"{text}; stopping the job")
            return False
        self._keys = directory
        return True

    def fix_cohort(self, cohort: list[str], header: dict[str, Any], *, round_index: int,
                   transport: Transport) -> bool:
        """Fix a masked round's cohort before any site masks: only sites with keys, at most ``max_sites``.

        The cohort (changed in place) and its signed keys go into the task header; False (job stopped)
        if it cannot be formed.
        """
        keys = self._keys
        if keys is None:
            raise ZenfedError("a masked round started before the pairwise keys were collected")
        without = sorted(set(cohort) - keys.sites)
        if without:
            _log.warning("round %d: left out of the masked cohort (no valid pairwise key): %s", round_index,
                         ", ".join(without))
        cohort[:] = [site for site in cohort if site in keys.sites]
        limit = self.spec.encryption.max_sites
        if len(cohort) > limit:
            text = (f"round {round_index}: {len(cohort)} sites would train, but the packing has headroom for "
                    f"encryption.max_sites={limit}; raise max_sites or set federation.cohort_fraction")
            self._audit.record(E.ERROR, kind="cohort_too_large", round=round_index, message=text)
            transport.stop(text)
            return False
        header[P.H_COHORT] = list(cohort)
        header[P.H_PEER_KEYS] = keys.announcements(cohort)
        return True

    def recover(self, dropped: list[str], *, intake: RoundIntake, round_index: int,
                evidence: dict[str, Any] | None, transport: Transport) -> bool:
        """Have every survivor cancel its masks with the dropped sites; False (job stopped) if one does not."""
        aggregation = intake.aggregation
        survivors = sorted(aggregation.contributors)
        _log.warning("round %d: %s dropped after the cohort was fixed; asking %d survivor(s) for mask "
                     "corrections", round_index, ", ".join(dropped), len(survivors))
        message = Message(header=self._header(round_index, **{P.H_DROPPED: dropped}), server_evidence=evidence or None)
        if not transport.broadcast(task=P.TASK_UNMASK, message=message, targets=survivors,
                                   min_responses=len(survivors), timeout_s=self.spec.federation.task_timeout_s,
                                   wait_after_min_s=0, on_result=intake.accept_correction):
            return False
        missing = sorted(set(survivors) - set(getattr(aggregation, "corrections", [])))
        if missing:
            text = (f"round {round_index}: {', '.join(missing)} sent no valid mask correction for the dropped "
                    f"{', '.join(dropped)}; the round's sum cannot be unmasked")
            self._audit.record(E.ERROR, kind="mask_recovery_failed", round=round_index, message=text)
            transport.stop(f"{text}; stopping the job (resubmit it to resume from the last round)")
            return False
        self._audit.record(E.MASKS_RECOVERED, round=round_index, dropped=dropped, survivors=survivors,
                           corrections=sorted(intake.correction_hashes))
        return True
