"""The round protocol shared by the server and the sites: task names, message keys, :class:`Message`.

Both sides import this core module, so a header name is spelled in one place.
A :class:`Message` holds plain data only: a header dict of strings and
numbers, and the payload bytes (an encoded adapter or a ciphertext). The FLARE
adapters carry it as a Shareable (a dict) with :meth:`Message.to_dict` and
:meth:`Message.from_mapping`; nothing else about FLARE reaches the core.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

TASK_TRAIN = "zenfed_train"
TASK_EVALUATE = "zenfed_evaluate"
TASK_ATTEST = "zenfed_attest"  # fresh, nonce-bound TEE evidence before model data moves
TASK_RELEASE = "zenfed_release"  # one site returns the decrypted final adapter, if all sites allow it
TASK_KEYS = "zenfed_keys"  # pairwise masks: each site announces its X25519 public key, signed
TASK_UNMASK = "zenfed_unmask"  # pairwise masks: survivors cancel their masks with the round's dropped sites
TASK_ENROLL = "zenfed_enroll"  # once per job: each site's declared profile (compute, data, availability)
SITE_TASKS = (TASK_ATTEST, TASK_ENROLL, TASK_KEYS, TASK_TRAIN, TASK_UNMASK, TASK_EVALUATE, TASK_RELEASE)

# Keys zenfed adds to the FLARE meta of a job a server crash interrupted (``zenfed submit`` follows them).
META_INTERRUPTED = "zenfed_interrupted"  # why the job ended
META_RESUMED_AS = "zenfed_resumed_as"  # the job id that resumes it from its checkpoint
META_RESUMES = "zenfed_resumes"  # how many interruptions in a row the resumed job carries

# Keys inside the Shareable.
KEY_HEADER = "zenfed_header"
KEY_PAYLOAD = "zenfed_payload"
KEY_REFUSAL = "zenfed_refusal"
KEY_ATTEST = "zenfed_attest"  # challenge (server -> site) or answer (site -> server)
KEY_SERVER_EVIDENCE = "zenfed_server_evidence"  # the server's evidence, per site nonce
KEY_AUDIT_LOG = "zenfed_audit_log"  # a site's own signed log, attached to its final answer
KEY_ERROR = "zenfed_error"  # why a task failed at a site: {"kind": error class, "message": text}, no data

# Header fields, task data (server -> site).
H_JOB_ID = "job_id"
H_ROUND = "round"
H_SPEC_HASH = "spec_hash"
H_PAYLOAD_SHA256 = "payload_sha256"
H_PAYLOAD_BYTES = "payload_bytes"
H_HAS_GLOBAL = "has_global"
H_ENCRYPTED = "encrypted"  # the payload is a CKKS sum (sites decrypt and divide)
H_TOTAL_WEIGHT = "total_weight"
H_GLOBAL_ROUND = "global_round"  # how many rounds were aggregated into the global this task carries
H_CONTRIBUTORS = "contributors"  # how many updates the sum holds (a masked sum carries its own count)
H_COHORT = "cohort"  # the sites asked to train this round (with pairwise masks: fixed before any site masks)
H_PEER_KEYS = "peer_keys"  # pairwise masks: {site: signed key announcement} for the cohort
H_DROPPED = "dropped"  # pairwise masks: the cohort's sites whose masks the survivors must cancel
H_PAIRWISE_KEY = "pairwise_key"  # a site's announced X25519 public key (base64)
H_TASK_SEQ = "task_seq"  # the server's count of this job's tasks: a site refuses one it has passed (a replay)
H_TARGETS = "targets"  # the sites a task was sent to: a site refuses one addressed to others
H_SERVER_SIGNATURE = "server_signature"  # the server's signature over the task statement (base64)
H_SERVER_CERT = "server_cert"  # the server's provisioned certificate (PEM)

# Header fields, task result (site -> server).
H_SITE = "site"
H_NUM_EXAMPLES = "num_examples"
H_TRAIN_LOSS = "train_loss"
H_EVAL_LOSS = "eval_loss"
H_EVAL_ACCURACY = "eval_accuracy"
H_EVAL_EXAMPLES = "eval_examples"
H_EVAL_ROUND = "eval_round"
H_EVAL_PREFERENCE_ACCURACY = "eval_preference_accuracy"  # DPO jobs: share of held-out pairs whose chosen wins
H_EVAL_REWARD_MARGIN = "eval_reward_margin"  # DPO jobs: mean implicit-reward margin, chosen minus rejected
H_EVAL_PAIRS = "eval_pairs"  # DPO jobs: held-out pairs the site scored
H_OBJECTIVE = "objective"  # what the round trains: "sft" or "dpo" (from the spec; checked by the site)
H_DPO_REFERENCE = "dpo_reference_sha256"  # DPO rounds: SHA-256 of the global payload the DPO stage started from
H_STEPS = "steps"
H_BASE_MODEL_SHA256 = "base_model_sha256"
H_ENGINE = "engine"  # which engine trained this site's update
H_WEIGHT = "weight"  # the weight a site applied before encrypting
H_RELEASE_OK = "release_ok"  # the site's policy allows releasing the final adapter in the clear
H_DP_SPENT = "privacy"  # differential privacy spent so far (epsilon, delta, ...)
H_SIGNATURE = "signature"  # the site's signature over the update statement (base64)
H_SITE_CERT = "site_cert"  # the site's provisioned certificate (PEM)
H_ANSWER_TO = "answer_to"  # the number (H_TASK_SEQ) of the task an answer answers, as it arrived at the site
H_ANSWER_SIGNATURE = "answer_signature"  # the site's signature over its whole answer (zenfed.answer_auth)
H_PROFILE = "enrollment"  # a site's declared enrollment profile (dict), answering TASK_ENROLL

UPDATE_KIND = "adapter_update"  # what leaves a site: LoRA adapter weights, never records

# Outcome of a task at a site; the strings are FLARE's return codes, so the adapters pass them through.
STATUS_OK = "OK"
STATUS_ERROR = "EXECUTION_EXCEPTION"
STATUS_ABORTED = "TASK_ABORTED"
STATUS_UNKNOWN_TASK = "TASK_UNKNOWN"

_FIELDS = (
    ("header", KEY_HEADER), ("payload", KEY_PAYLOAD), ("refusal", KEY_REFUSAL), ("attest", KEY_ATTEST),
    ("server_evidence", KEY_SERVER_EVIDENCE), ("audit_log", KEY_AUDIT_LOG), ("error", KEY_ERROR),
)


@dataclass
class Message:
    """One task's data (server -> site) or one task's result (site -> server).

    Attributes:
        header: Plain fields (``H_*``): job, round, hashes, metrics.
        payload: The adapter or ciphertext bytes, if the message carries one.
        refusal: Why a site refused the task (a policy decision, not a crash).
        attest: An attestation challenge (to a site) or answer (from a site).
        server_evidence: The server's attestation evidence, per site nonce.
        audit_log: A site's own signed audit log, carried to the job result.
        error: Why the task failed at the site: its typed error class and message (never data).
        status: ``STATUS_OK``, or why the task did not complete.
    """

    header: dict[str, Any] = field(default_factory=dict)
    payload: bytes | None = None
    refusal: str | None = None
    attest: Any = None
    server_evidence: Any = None
    audit_log: bytes | None = None
    error: dict[str, str] | None = None
    status: str = STATUS_OK

    def to_dict(self) -> dict[str, Any]:
        """Return the message's fields under their wire keys; empty fields are left out."""
        out: dict[str, Any] = {}
        for attribute, key in _FIELDS:
            value = getattr(self, attribute)
            if value is not None and value != {}:
                out[key] = value
        return out

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any], *, status: str = STATUS_OK) -> Message:
        """Read a message from its wire keys; a header that is not a dict is dropped (checked later)."""
        header = data.get(KEY_HEADER)
        return cls(
            header=dict(header) if isinstance(header, dict) else {},
            payload=data.get(KEY_PAYLOAD), refusal=data.get(KEY_REFUSAL), attest=data.get(KEY_ATTEST),
            server_evidence=data.get(KEY_SERVER_EVIDENCE), audit_log=data.get(KEY_AUDIT_LOG),
            error=error if isinstance(error := data.get(KEY_ERROR), dict) else None, status=status,
        )


ERROR_ORIGIN = "origin"  # in an error: who wrote it, where not the site
ORIGIN_SERVER = "server"  # the server, in place of an answer it does not act on (zenfed.answer_auth)


def answer_error(answer: Message) -> str:
    """Why a site's answer failed, as one line: its status and, if it sent one, its typed error."""
    error = answer.error or {}
    detail = f"{error.get('kind', 'error')}: {error.get('message', '')}"
    if error.get(ERROR_ORIGIN) == ORIGIN_SERVER:
        return f"the server refused the site's answer: {detail}"
    return f"the site returned {answer.status}" + (f": {detail}" if error else "")


def as_sent(value: Any) -> Any:
    """A message field as it arrives from the wire: ``Message.to_dict`` leaves out an empty one (None or {})."""
    return None if value is None or value == {} else value
