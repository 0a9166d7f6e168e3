"""The round protocol shared by the controller and the executor: task names and message keys.

Both sides import this core module, so a header name is spelled in one place.
Messages are FLARE Shareables holding plain data only: a header dict of
strings and numbers, and the payload bytes (an encoded adapter).
"""

from __future__ import annotations

TASK_TRAIN = "zenfed_train"
TASK_EVALUATE = "zenfed_evaluate"
TASK_ATTEST = "zenfed_attest"  # fresh, nonce-bound TEE evidence before model data moves
TASK_RELEASE = "zenfed_release"  # one site returns the decrypted final adapter, if all sites allow it

# Keys inside the Shareable.
KEY_HEADER = "zenfed_header"
KEY_PAYLOAD = "zenfed_payload"
KEY_REFUSAL = "zenfed_refusal"
KEY_ATTEST = "zenfed_attest"  # challenge (server -> site) or answer (site -> server)
KEY_SERVER_EVIDENCE = "zenfed_server_evidence"  # the server's evidence, per site nonce
KEY_AUDIT_LOG = "zenfed_audit_log"  # a site's own signed log, attached to its final answer

# Header fields, task data (server -> site).
H_JOB_ID = "job_id"
H_ROUND = "round"
H_SPEC_HASH = "spec_hash"
H_PAYLOAD_SHA256 = "payload_sha256"
H_PAYLOAD_BYTES = "payload_bytes"
H_HAS_GLOBAL = "has_global"
H_ENCRYPTED = "encrypted"  # the payload is a CKKS sum (sites decrypt and divide)
H_TOTAL_WEIGHT = "total_weight"

# Header fields, task result (site -> server).
H_SITE = "site"
H_NUM_EXAMPLES = "num_examples"
H_TRAIN_LOSS = "train_loss"
H_EVAL_LOSS = "eval_loss"
H_EVAL_ACCURACY = "eval_accuracy"
H_EVAL_EXAMPLES = "eval_examples"
H_EVAL_ROUND = "eval_round"
H_STEPS = "steps"
H_BASE_MODEL_SHA256 = "base_model_sha256"
H_ENGINE = "engine"  # which engine trained this site's update
H_WEIGHT = "weight"  # the weight a site applied before encrypting
H_RELEASE_OK = "release_ok"  # the site's policy allows releasing the final adapter in the clear
H_PRIVACY = "privacy"  # differential privacy spent so far (epsilon, delta, ...)

UPDATE_KIND = "adapter_update"  # what leaves a site: LoRA adapter weights, never records
