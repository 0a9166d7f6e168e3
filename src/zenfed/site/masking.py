"""A site's side of pairwise masking: its key for the job, the peers' signed keys, and its corrections.

The site makes its X25519 key in its own job folder (0600 in 0700) and
announces the public half signed with its provisioned key. Before masking a
round it checks the cohort the server announced (it names this site and fits
the packing) and every peer's key announcement against the project's root CA:
a server cannot slip in a key of its own. It answers a correction request only
for the round it just masked, once, for sites of that round's cohort, and only
if the survivors still number at least ``min_sites``: a server cannot shrink a
sum to one site by declaring the others dropped. The round it masked (cohort,
checked peer keys, whether it was corrected) is kept in the job run's
:class:`~zenfed.site.run_state.SiteRunState`, so a later process of the same
run answers the correction as this one would.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from zenfed import protocol as P
from zenfed.audit import events as E
from zenfed.audit.sink import AuditSink
from zenfed.digest import sha256_hex
from zenfed.errors import PolicyError
from zenfed.privacy.pairwise import (
    PairwiseError,
    PairwiseMasker,
    check_cohort,
    key_fingerprint,
    key_statement,
    load_or_create_key,
    parse_public_key,
    public_key_text,
)
from zenfed.protocol import Message
from zenfed.site.encryption import SiteEncryption
from zenfed.site.run_state import SiteRunState
from zenfed.update_auth import UpdateAuthError, UpdateSigner, UpdateVerifier, correction_statement

KEY_FOLDER = "pairwise-key"  # inside the site's folder for the job


@dataclass
class _MaskedRound:
    round: int
    cohort: list[str]
    peers: dict[str, str]  # the checked public keys of the other cohort sites, as announced
    masker: PairwiseMasker
    corrected: bool = False


class SiteMasking:
    """One site's pairwise masks for one job.

    Args:
        site: This site's name.
        job_id: The job.
        job_folder: The site's folder for this job (its key is kept under it).
        max_sites: The packing's headroom (the largest cohort).
        min_sites: The fewest survivors a correction may leave.
        signer: This site's provisioned key; None in the simulator.
        verifier: The project's root CA, to check peers' keys; None in the simulator.
        run_state: Where the masked round is kept between tasks; None keeps it in memory only.
        audit: This site's audit log.
    """

    def __init__(self, *, site: str, job_id: str, job_folder: Path, max_sites: int, min_sites: int,
                 signer: UpdateSigner | None, verifier: UpdateVerifier | None, audit: AuditSink,
                 run_state: SiteRunState | None = None) -> None:
        self.site = site
        self.job_id = job_id
        self.max_sites = max_sites
        self.min_sites = min_sites
        self._key = load_or_create_key(job_folder / KEY_FOLDER)
        self._public = public_key_text(self._key)
        self._signer = signer
        self._verifier = verifier
        self._audit = audit
        self._run_state = run_state
        self._last: _MaskedRound | None = self._restore_last()

    def announce(self, task: Mapping[str, Any]) -> Message:
        """Answer the key task: this site's public key for the job, signed where the site has a key."""
        fields: dict[str, Any] = {P.H_JOB_ID: task.get(P.H_JOB_ID), P.H_SITE: self.site,
                                  P.H_PAIRWISE_KEY: self._public}
        if self._signer is not None:
            fields.update(self._signer.sign(key_statement(job_id=self.job_id, site=self.site,
                                                          public_key=self._public)))
        self._audit.record(E.PAIRWISE_KEY, public_sha256=key_fingerprint(self._public),
                           signed=self._signer is not None)
        return Message(header=fields)

    def masker_for(self, round_index: int, task: Mapping[str, Any]) -> PairwiseMasker:
        """Check the round's cohort and its keys, record them, and return this site's masker.

        Raises:
            PolicyError: If the cohort or any key announcement does not check out.
        """
        try:
            cohort = check_cohort(task.get(P.H_COHORT) or [], site=self.site, max_sites=self.max_sites)
        except PairwiseError as err:
            raise PolicyError(f"refusing to mask round {round_index}: {err}") from None
        announcements = task.get(P.H_PEER_KEYS)
        if not isinstance(announcements, Mapping) or sorted(announcements) != cohort:
            raise PolicyError(f"refusing to mask round {round_index}: the task's key announcements do not cover "
                              f"exactly the cohort {cohort}")
        own = announcements[self.site]
        if not isinstance(own, Mapping) or own.get(P.H_PAIRWISE_KEY) != self._public:
            raise PolicyError(f"refusing to mask round {round_index}: the task names another pairwise key for "
                              f"{self.site} than the one it announced (a substituted key)")
        peers = {peer: self._checked_key(peer, announcements[peer]) for peer in cohort if peer != self.site}
        masker = PairwiseMasker(key=self._key, site=self.site, peers=peers, job_id=self.job_id,
                                round_index=round_index)
        self._last = _MaskedRound(round=round_index, cohort=cohort, masker=masker,
                                  peers={peer: str(announcements[peer][P.H_PAIRWISE_KEY]) for peer in peers})
        self._keep_last()
        self._audit.record(E.MASKS_APPLIED, round=round_index, cohort=cohort,
                           announced={s: key_fingerprint(str(announcements[s][P.H_PAIRWISE_KEY])) for s in cohort},
                           announcements_signed=self._verifier is not None)
        return masker

    def correct(self, round_index: int, task: Mapping[str, Any], *, encryption: SiteEncryption,
                sent_values: int) -> Message:
        """Answer a correction request: the encrypted correction that cancels this site's masks with the dropped.

        Args:
            round_index: The round of the request.
            task: The request's header (names the dropped sites).
            encryption: This site's CKKS context (the correction is encrypted like an update).
            sent_values: How many values this site's masked update of that round held.

        Raises:
            PolicyError: If the request is not for the round this site just masked, comes twice,
                names a site outside its cohort, or would leave fewer than ``min_sites`` survivors.
        """
        last = self._last
        dropped = sorted(str(s) for s in task.get(P.H_DROPPED) or [])
        if last is None or last.round != round_index:
            raise PolicyError(f"refusing a mask correction for round {round_index}: this site did not mask "
                              "that round (or restarted since)")
        if last.corrected:
            raise PolicyError(f"refusing a second mask correction for round {round_index}")
        survivors = sorted(set(last.cohort) - set(dropped))
        if not dropped or not set(dropped) < set(last.cohort) or self.site in dropped:
            raise PolicyError(f"refusing a mask correction for round {round_index}: dropped sites {dropped} are "
                              f"not other sites of its cohort {last.cohort}")
        if len(survivors) < max(2, self.min_sites):
            raise PolicyError(f"refusing a mask correction for round {round_index}: it would leave "
                              f"{len(survivors)} site(s) in the sum, fewer than min_sites {self.min_sites}")
        ciphertext, n_values = encryption.encrypt_correction(sent_values, last.masker.correction(dropped))
        payload = encryption.envelope(ciphertext, n_values=n_values, job_id=self.job_id, round_index=round_index,
                                      site=self.site)
        last.corrected = True
        self._keep_last()
        digest = sha256_hex(payload)
        header: dict[str, Any] = {P.H_JOB_ID: self.job_id, P.H_ROUND: round_index, P.H_SITE: self.site,
                                  P.H_PAYLOAD_SHA256: digest, P.H_PAYLOAD_BYTES: len(payload)}
        if self._signer is not None:
            header.update(self._signer.sign(correction_statement(job_id=self.job_id, round_index=round_index,
                                                                 site=self.site, payload=payload)))
        self._audit.record(E.MASKS_CORRECTED, round=round_index, dropped=dropped, survivors=survivors, sha256=digest)
        return Message(header=header, payload=payload)

    def _keep_last(self) -> None:
        """Write the masked round to the run state, if there is one."""
        last = self._last
        if self._run_state is not None and last is not None:
            self._run_state.set(masked_round={"round": last.round, "cohort": last.cohort, "peers": last.peers,
                                              "corrected": last.corrected})

    def _restore_last(self) -> _MaskedRound | None:
        """The round an earlier process of this job run masked, rebuilt from its checked keys; or None."""
        if self._run_state is None or not self._run_state.get("masked_round"):
            return None
        kept = self._run_state.get("masked_round")
        try:
            texts = {str(peer): str(text) for peer, text in kept["peers"].items()}
            masker = PairwiseMasker(key=self._key, site=self.site, job_id=self.job_id, round_index=int(kept["round"]),
                                    peers={peer: parse_public_key(text, site=peer) for peer, text in texts.items()})
            return _MaskedRound(round=int(kept["round"]), cohort=[str(s) for s in kept["cohort"]], peers=texts,
                                masker=masker, corrected=bool(kept["corrected"]))
        except (KeyError, TypeError, ValueError, AttributeError, PairwiseError) as err:
            raise PolicyError(f"the masked round kept in {self._run_state.path} is malformed ({err}); this site "
                              "cannot correct its masks in this job run") from None

    def _checked_key(self, peer: str, announcement: Any) -> Any:
        if not isinstance(announcement, Mapping):
            raise PolicyError(f"the key announcement of {peer} is malformed")
        text = announcement.get(P.H_PAIRWISE_KEY)
        if self._verifier is not None:
            try:
                self._verifier.check_signed(site=peer, statement=key_statement(
                    job_id=self.job_id, site=peer, public_key=str(text)), header=dict(announcement),
                    what="pairwise key")
            except UpdateAuthError as err:
                raise PolicyError(f"refusing to mask with {peer}: {err}") from None
        try:
            return parse_public_key(text, site=peer)
        except PairwiseError as err:
            raise PolicyError(str(err)) from None
