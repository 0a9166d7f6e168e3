"""Names of the audit events, as constants: a typo becomes an import error, not a silent gap.

Each constant is the ``event`` string of a record. ``fields`` conventions that
the verifier and the report rely on are listed beside the events that use them.
"""

from typing import Final

KIT_IDENTITY: Final = "kit_identity"
"""Written first in every log: certificate PEM and fingerprint, subject, role."""
JOB_SUBMITTED: Final = "job_submitted"
"""fields: job (name), job_id, submitter, spec_sha256."""
JOB_DEPLOYED: Final = "job_deployed"
"""fields: job_id, sites (list of site names)."""
JOB_STARTED: Final = "job_started"
"""fields: job_id."""
ROUND_STARTED: Final = "round_started"
"""fields: round, sites (optional list)."""
ROUND_ENDED: Final = "round_ended"
"""fields: round."""
UPDATE_SENT: Final = "update_sent"
"""Site side. fields: round, sha256, size (bytes), kind (e.g. 'encrypted_adapter_update')."""
UPDATE_RECEIVED: Final = "update_received"
"""Server side. fields: site, round, sha256, size (bytes), kind."""
AGGREGATED: Final = "aggregated"
"""fields: round, inputs (list of sha256), output (sha256)."""
EVALUATED: Final = "evaluated"
"""fields: round, metrics (dict of numbers)."""
POLICY_DECISION: Final = "policy_decision"
"""fields: decision ('accepted' or 'refused'), reason, and what was decided on."""
MODEL_RELEASED: Final = "model_released"
"""fields: adapter_sha256, released_to, decided_by."""
ERROR: Final = "error"
"""fields: kind, message."""
ATTESTATION: Final = "attestation"
"""fields: peer, tee_kind, verdict, nonce_sha256, reason."""
DP_SPENT: Final = "dp_spent"
"""fields: round, level, epsilon (the job's total so far), epsilon_round, delta, noise_multiplier,
clip_norm, ledger_head."""
STRATEGY_STATE: Final = "strategy_state"
"""Site side. fields: strategy, round (aggregations behind the global), sha256 (of the state:
the global and the server optimizer's moments). Equal at every site, or the sites drifted."""
LOG_ANCHORED: Final = "log_anchored"
"""Server side. fields: participant, seq, sha256 (of that participant's record line).

Pins the head of a site's log as the server saw it, so that records cut from the
end of that site's log are caught by ``verify_result``.
"""
GLOBAL_RECEIVED: Final = "global_received"
"""Site side, for every global a task carries. fields: round (of the task), global_round (rounds
aggregated into it), sha256 (of the bytes). It must be an output the server recorded
(``aggregated``): a server that sends sites different sums, or one site's own update, is caught."""
JOB_RESUMED: Final = "job_resumed"
"""Server side, when a job resumes another run's checkpoint. fields: after_round, previous (list of
{job, file, seq, sha256}: each earlier run's server log, kept under audit/previous/, and the hash of its
last record), so the rounds before a crash stay in the result and their log cannot be swapped."""
JOB_FINISHED: Final = "job_finished"
"""Server side, the last record of a finished job. fields: job_id, rounds, result_sha256 (of
zenfed_result.json). A server log of a finished job that does not end with it lost records
from its end; a result file whose hash differs was changed after the job."""
PAIRWISE_KEY: Final = "pairwise_key"
"""Site side, when it announces its X25519 key for pairwise masks. fields: public_sha256, signed."""
PAIRWISE_KEYS: Final = "pairwise_keys"
"""Server side, the key directory it forwards. fields: announced ({site: public key sha256}),
refused ({site: reason})."""
MASKS_APPLIED: Final = "masks_applied"
"""Site side, each masked round. fields: round, cohort, announced ({site: public key sha256} it masked with),
announcements_signed (checked against the root CA)."""
MASKS_CORRECTED: Final = "masks_corrected"
"""Site side, a correction it sent. fields: round, dropped, survivors."""
MASKS_RECOVERED: Final = "masks_recovered"
"""Server side, a round whose dropped sites' masks the survivors cancelled. fields: round, dropped,
survivors, corrections (list of sha256)."""
ENROLLMENT_SENT: Final = "enrollment_sent"
"""Site side, once per job. fields: profile (what it disclosed: compute, records, domain tags, availability;
{"withheld": true} if its policy keeps it)."""
SITES_ENROLLED: Final = "sites_enrolled"
"""Server side, once per job. fields: profiles ({site: profile}), silent (sites that did not answer)."""
COHORT_MATCHED: Final = "cohort_matched"
"""Server side, once per job with cohort requirements. fields: requirements, eligible (list), excluded
({site: reason})."""
LOG_RECOVERED: Final = "log_recovered"
"""Written on reopen after a crash: fields: moved_to, bytes, sha256 of the partial tail."""

ALL_EVENTS: Final = frozenset(
    {
        KIT_IDENTITY,
        JOB_SUBMITTED,
        JOB_DEPLOYED,
        JOB_STARTED,
        ROUND_STARTED,
        ROUND_ENDED,
        UPDATE_SENT,
        UPDATE_RECEIVED,
        AGGREGATED,
        EVALUATED,
        POLICY_DECISION,
        MODEL_RELEASED,
        ERROR,
        ATTESTATION,
        DP_SPENT,
        STRATEGY_STATE,
        LOG_ANCHORED,
        GLOBAL_RECEIVED,
        JOB_RESUMED,
        JOB_FINISHED,
        PAIRWISE_KEY,
        PAIRWISE_KEYS,
        MASKS_APPLIED,
        MASKS_CORRECTED,
        MASKS_RECOVERED,
        LOG_RECOVERED,
        ENROLLMENT_SENT,
        SITES_ENROLLED,
        COHORT_MATCHED,
    }
)
