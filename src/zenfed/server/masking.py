"""The server's side of pairwise masks: the sites' signed key announcements, forwarded as they came.

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
                raise ZenfedError(answer.refusal or f"the site returned {answer.status}: {answer.error}")
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
