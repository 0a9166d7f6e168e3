"""Server side of a federated LoRA job: rounds, FedAvg, federated evaluation, checkpoints.

Each round broadcasts ``zenfed_train`` with the current global state (none in
round 1: every site starts from the same deterministic initialisation). A site
first evaluates the adapter it received on its validation split, then trains,
and answers with its update and both sets of metrics. Updates are folded into
one running sum as they arrive: in the clear (``PlainFedAvg``) or as CKKS
ciphertexts the server cannot read (``EncryptedFedAvg``). After the last round
``zenfed_evaluate`` scores the final adapter; under encryption it is released
in the clear only if every site's policy allows it.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Any

from nvflare.apis.client import Client
from nvflare.apis.controller_spec import ClientTask, Task
from nvflare.apis.fl_constant import FLContextKey
from nvflare.apis.fl_context import FLContext
from nvflare.apis.impl.controller import Controller
from nvflare.apis.job_def import JobMetaKey
from nvflare.apis.shareable import Shareable
from nvflare.apis.signal import Signal
from nvflare.widgets.info_collector import GroupInfoCollector, InfoCollector

from zenfed import protocol as P
from zenfed.audit import events as E
from zenfed.audit.sink import AuditSink
from zenfed.controllers.aggregators import Aggregation, PlainFedAvg
from zenfed.controllers.attestation_gate import AttestationQuorumError, ServerAttestationGate
from zenfed.controllers.checkpoint import CheckpointStore, RunState
from zenfed.controllers.result import build_result, round_record, round_summary, weighted_eval
from zenfed.errors import ZenfedError
from zenfed.spec import JobSpec, parse_model
from zenfed.wire import decode_adapter, sha256_hex

_SITE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}")


class FedLoRAController(Controller):
    """FedAvg of LoRA adapters with per-round federated evaluation and checkpoints."""

    def __init__(self, spec: dict[str, Any], task_check_period: float = 0.5):
        """Create the controller.

        Args:
            spec: The job spec as a dict (``JobSpec.model_dump(mode="json")``).
            task_check_period: Seconds between task status checks.
        """
        super().__init__(task_check_period=task_check_period)
        self._spec_data = spec
        self.spec: JobSpec | None = None
        self._round = 0
        self._phase = "init"
        self._aggregation: Aggregation = PlainFedAvg()
        self._round_sites: dict[str, dict[str, Any]] = {}
        self._last_eval: dict[str, float] = {}
        self._out_dir: Path | None = None
        self._checkpoints: CheckpointStore | None = None
        self._job_id = ""
        self._audit = AuditSink(None)
        self._update_hashes: list[str] = []
        self._base_model_sha256: str | None = None
        self._released: Any = None
        self._gate: ServerAttestationGate | None = None
        self._server_evidence: dict[str, str] = {}
        self._attest_answers: dict[str, Any] = {}

    # -- FLARE lifecycle -------------------------------------------------------------------
    def start_controller(self, fl_ctx: FLContext) -> None:
        """Validate the spec, find the folders, open the audit log, pick the aggregation."""
        spec = parse_model(JobSpec, self._spec_data, kind="job spec", source="the job's server config")
        self.spec = spec
        self._job_id = fl_ctx.get_job_id()
        workspace = fl_ctx.get_engine().get_workspace()
        self._out_dir = Path(workspace.get_run_dir(self._job_id)) / "zenfed"
        self._out_dir.mkdir(parents=True, exist_ok=True)
        key = f"{spec.name}-{spec.spec_hash()[:16]}"
        self._checkpoints = CheckpointStore(Path(workspace.get_root_dir()) / "zenfed-checkpoints" / key)
        identity = fl_ctx.get_identity_name()
        self._audit = AuditSink.for_participant(
            startup_dir=workspace.get_startup_kit_dir(), participant=identity,
            log_path=self._out_dir / "audit" / f"{identity}.jsonl",
        )
        if spec.encryption.enabled:
            from zenfed.controllers.encrypted import EncryptedFedAvg, find_server_context

            context = find_server_context(workspace.get_startup_kit_dir(), workspace.get_site_config_dir())
            self._aggregation = EncryptedFedAvg(context_path=context, encryption=spec.encryption, job_id=self._job_id)
        self._gate = ServerAttestationGate(spec=spec, workspace_root=workspace.get_root_dir(), audit=self._audit)
        meta = fl_ctx.get_prop(FLContextKey.JOB_META) or {}
        self._audit.record(
            E.JOB_SUBMITTED, job=spec.name, job_id=self._job_id,
            submitter=str(meta.get(JobMetaKey.SUBMITTER_NAME.value, "unknown")), spec_sha256=spec.spec_hash(),
        )
        sites = sorted(c.name for c in fl_ctx.get_engine().get_clients())
        self._audit.record(E.JOB_DEPLOYED, job_id=self._job_id, sites=sites, aggregation=self._aggregation.method)
        self._audit.record(E.JOB_STARTED, job_id=self._job_id)

    def stop_controller(self, fl_ctx: FLContext) -> None:
        """Mark the workflow finished and close the audit log."""
        self._phase = "finished"
        self._audit.close()

    def process_result_of_unknown_task(
        self, client: Client, task_name: str, client_task_id: str, result: Shareable, fl_ctx: FLContext
    ) -> None:
        """Ignore late results of tasks that already ended."""
        self.log_warning(fl_ctx, f"ignored a late result for {task_name} from {client.name}")

    def handle_event(self, event_type: str, fl_ctx: FLContext) -> None:
        """Report progress to ``show_stats`` (used by ``zenfed submit``'s progress bar)."""
        super().handle_event(event_type, fl_ctx)
        if event_type == InfoCollector.EVENT_TYPE_GET_STATS:
            collector = fl_ctx.get_prop(InfoCollector.CTX_KEY_STATS_COLLECTOR, None)
            if isinstance(collector, GroupInfoCollector):
                collector.add_info(group_name="zenfed", info=self.progress())

    def progress(self) -> dict[str, Any]:
        """Return the job's progress as plain data."""
        return {
            "phase": self._phase, "round": self._round, "rounds": self.spec.federation.rounds if self.spec else 0,
            "sites_answered": len(self._round_sites), "eval_loss": self._last_eval.get("eval_loss"),
            "accuracy": self._last_eval.get("accuracy"),
        }

    # -- the workflow ----------------------------------------------------------------------
    def control_flow(self, abort_signal: Signal, fl_ctx: FLContext) -> None:
        """Run the rounds, resuming from a checkpoint if one exists."""
        spec, store = self._require_started()
        state = store.load() or RunState()
        if state.finished:
            state = RunState()  # A finished run of the same spec starts afresh.
        elif state.completed_round:
            self.log_info(fl_ctx, f"resuming {spec.name} after round {state.completed_round}")
        global_state = (
            self._aggregation.from_checkpoint(state.global_payload, state.global_meta)
            if state.global_payload is not None else None
        )
        for rnd in range(state.completed_round + 1, spec.federation.rounds + 1):
            self._round, self._phase = rnd, "train"
            started = time.time()
            if not self._attest(rnd, fl_ctx, abort_signal):
                return
            new_global = self._run_round(P.TASK_TRAIN, global_state, fl_ctx, abort_signal)
            if abort_signal.triggered or new_global is None:
                return
            state.history.append(round_record(rnd, started, self._aggregation, self._round_sites, new_global))
            global_state = new_global
            state.global_payload, state.global_meta = self._aggregation.to_checkpoint(new_global)
            state.completed_round = rnd
            store.save(state)
            self.log_info(fl_ctx, f"round {rnd}/{spec.federation.rounds} done: {round_summary(state.history[-1])}")
        self._round, self._phase = spec.federation.rounds, "evaluate"
        if self._run_round(P.TASK_EVALUATE, global_state, fl_ctx, abort_signal) is None:
            return
        final_eval, final_sites = weighted_eval(self._round_sites), dict(self._round_sites)
        released = self._release(global_state, final_sites, fl_ctx, abort_signal)
        state.finished = True
        store.save(state)
        self._write_result(state, global_state, released, final_eval, final_sites)
        self._phase = "done"

    def _attest(self, rnd: int, fl_ctx: FLContext, abort_signal: Signal) -> bool:
        """Collect fresh evidence from every site when the gate asks for it; False if the job must stop."""
        gate = self._gate
        if gate is None or not gate.needed(rnd):
            return True
        self._phase = "attest"
        sites = sorted(c.name for c in fl_ctx.get_engine().get_clients())
        data = Shareable()
        data[P.KEY_ATTEST] = gate.challenge(sites=sites, round=rnd)
        self._attest_answers = {}
        task = Task(name=P.TASK_ATTEST, data=data, timeout=gate.timeout_s, result_received_cb=self._on_attest)
        self.broadcast_and_wait(task=task, fl_ctx=fl_ctx, targets=sites, min_responses=len(sites),
                                wait_time_after_min_received=0, abort_signal=abort_signal)
        if abort_signal.triggered:
            return False
        admitted, _ = gate.verify(dict(self._attest_answers))
        try:
            gate.enforce_quorum(admitted)
        except AttestationQuorumError as err:
            self.system_panic(f"attestation: {err}", fl_ctx)
            abort_signal.trigger("attestation quorum not met")
            return False
        self._server_evidence = gate.server_evidence()
        excluded = sorted(set(sites) - set(admitted))
        if excluded:
            self.log_warning(fl_ctx, f"round {rnd}: excluded by attestation: {', '.join(excluded)}")
        self._phase = "train"
        return True

    def _on_attest(self, client_task: ClientTask, fl_ctx: FLContext) -> None:
        """Keep a site's attestation answer (or its refusal) for the gate to verify."""
        result: Shareable = client_task.result
        client_task.result = None
        site = client_task.client.name
        if result.get_return_code() != "OK":
            self._attest_answers[site] = f"returned {result.get_return_code()}"
            return
        self._attest_answers[site] = result.get(P.KEY_ATTEST) or result.get(P.KEY_REFUSAL)
        self._keep_site_log(site, result, fl_ctx)

    def _require_started(self) -> tuple[JobSpec, CheckpointStore]:
        if self.spec is None or self._checkpoints is None:
            raise ZenfedError("controller used before start_controller")
        return self.spec, self._checkpoints

    def _run_round(self, task_name: str, global_state: Any, fl_ctx: FLContext, abort_signal: Signal,
                   targets: list[str] | None = None, min_sites: int | None = None) -> Any:
        """Broadcast one task; return the new global state (train), True (others), or None on failure."""
        spec, _ = self._require_started()
        header, payload = self._aggregation.task_payload(global_state)
        header.update({P.H_JOB_ID: self._job_id, P.H_ROUND: self._round, P.H_SPEC_HASH: spec.spec_hash(),
                       P.H_HAS_GLOBAL: global_state is not None})
        data = Shareable()
        if payload is not None:
            header[P.H_PAYLOAD_SHA256], header[P.H_PAYLOAD_BYTES] = sha256_hex(payload), len(payload)
            data[P.KEY_PAYLOAD] = payload
        data[P.KEY_HEADER] = header
        if self._server_evidence:
            data[P.KEY_SERVER_EVIDENCE] = self._server_evidence
        self._aggregation.begin(round_index=self._round)
        self._round_sites, self._update_hashes = {}, []
        everyone = sorted(c.name for c in fl_ctx.get_engine().get_clients())
        targets = targets or (self._gate.eligible(everyone) if self._gate else everyone)
        needed = spec.federation.min_sites if min_sites is None else min_sites
        self._audit.record(E.ROUND_STARTED, round=self._round, task=task_name, sites=targets)
        task = Task(name=task_name, data=data, timeout=spec.federation.task_timeout_s,
                    result_received_cb=self._on_result)
        self.broadcast_and_wait(
            task=task, fl_ctx=fl_ctx, targets=targets, min_responses=min(needed, len(targets)),
            wait_time_after_min_received=spec.federation.task_timeout_s, abort_signal=abort_signal,
        )
        if abort_signal.triggered:
            return None
        answered = {P.TASK_TRAIN: self._aggregation.count, P.TASK_RELEASE: int(self._released is not None)}.get(
            task_name, len(self._round_sites))
        if answered < needed:
            message = f"round {self._round}: only {answered} site(s) answered {task_name}, fewer than {needed}"
            self._audit.record(E.ERROR, kind="too_few_sites", round=self._round, message=message)
            self.system_panic(f"{message}; stopping the job", fl_ctx)
            abort_signal.trigger("too few sites")
            return None
        if task_name == P.TASK_RELEASE:
            return True
        self._last_eval = weighted_eval(self._round_sites)
        self._audit.record(E.EVALUATED, round=self._round - 1 if task_name == P.TASK_TRAIN else self._round,
                           scope="federated", metrics={k: float(v) for k, v in self._last_eval.items()})
        if task_name == P.TASK_EVALUATE:
            self._audit.record(E.ROUND_ENDED, round=self._round, task=task_name)
            return True
        new_global = self._aggregation.result()
        self._audit.record(
            E.AGGREGATED, round=self._round, inputs=sorted(self._update_hashes),
            output=self._aggregation.digest(new_global), method=self._aggregation.method,
            total_weight=self._aggregation.total_weight,
        )
        self._audit.record(E.ROUND_ENDED, round=self._round, task=task_name,
                           contributors=sorted(self._aggregation.contributors))
        return new_global

    def _on_result(self, client_task: ClientTask, fl_ctx: FLContext) -> None:
        """Validate one site's result and fold it in; reject bad ones with a logged reason, never abort."""
        site = client_task.client.name
        result: Shareable = client_task.result
        client_task.result = None  # Folded in below; do not keep per-site copies.
        self._keep_site_log(site, result, fl_ctx)
        try:
            self._accept(site, result, client_task.task.name)
        except (ZenfedError, ValueError, TypeError, KeyError) as err:
            self.log_error(fl_ctx, f"round {self._round}: rejected the result of {site}: {err}")
            self._audit.record(E.ERROR, kind="result_rejected", site=site, round=self._round,
                               message=str(err)[:500])

    def _accept(self, site: str, result: Shareable, task_name: str) -> None:
        spec, _ = self._require_started()
        if result.get(P.KEY_REFUSAL):
            raise ZenfedError(f"the site refused the task: {result.get(P.KEY_REFUSAL)}")
        if result.get_return_code() != "OK":
            raise ZenfedError(f"the site returned {result.get_return_code()}")
        header = result.get(P.KEY_HEADER)
        if not isinstance(header, dict):
            raise ZenfedError("result has no zenfed header")
        if header.get(P.H_ROUND) != self._round or header.get(P.H_JOB_ID) != self._job_id:
            raise ZenfedError(
                f"result is for job {header.get(P.H_JOB_ID)} round {header.get(P.H_ROUND)}, "
                f"expected round {self._round} (a replay or a stale result)"
            )
        payload = result.get(P.KEY_PAYLOAD)
        if payload is not None and (not isinstance(payload, bytes) or sha256_hex(payload) != header.get(
                P.H_PAYLOAD_SHA256) or len(payload) != header.get(P.H_PAYLOAD_BYTES)):
            raise ZenfedError("payload does not match the SHA-256/size in its header")
        if task_name == P.TASK_RELEASE:
            if payload is None:
                raise ZenfedError("release answer carries no adapter")
            self._released = decode_adapter(payload)
            return
        metrics: dict[str, Any] = {
            "eval_loss": float(header[P.H_EVAL_LOSS]), "accuracy": float(header[P.H_EVAL_ACCURACY]),
            "eval_examples": int(header[P.H_EVAL_EXAMPLES]), "release_ok": header.get(P.H_RELEASE_OK) is True,
            "engine": str(header.get(P.H_ENGINE, "unknown")),
        }
        if isinstance(header.get(P.H_PRIVACY), dict):
            metrics["privacy"] = dict(header[P.H_PRIVACY])
        if task_name == P.TASK_TRAIN:
            if payload is None:
                raise ZenfedError("training result carries no update payload")
            weight = self._aggregation.add(site=site, header=header, payload=payload,
                                           weighting=spec.federation.weighting)
            digest = sha256_hex(payload)
            self._update_hashes.append(digest)
            self._audit.record(E.UPDATE_RECEIVED, site=site, round=self._round, sha256=digest, size=len(payload),
                               kind=P.UPDATE_KIND, encrypted=self._aggregation.encrypted)
            metrics.update(num_examples=int(header[P.H_NUM_EXAMPLES]), weight=weight, update_sha256=digest,
                           update_bytes=len(payload))
            if header.get(P.H_TRAIN_LOSS) is not None:  # A site under DP withholds it.
                metrics["train_loss"] = float(header[P.H_TRAIN_LOSS])
        if header.get(P.H_BASE_MODEL_SHA256):
            self._base_model_sha256 = str(header[P.H_BASE_MODEL_SHA256])
        self._round_sites[site] = metrics

    def _keep_site_log(self, site: str, result: Shareable, fl_ctx: FLContext) -> None:
        """Keep the signed log a site attached to its answer (the latest copy wins)."""
        data = result.get(P.KEY_AUDIT_LOG)
        if not isinstance(data, bytes):
            return
        try:
            self._store_site_log(site, data)
        except (ZenfedError, ValueError, KeyError) as err:
            self.log_error(fl_ctx, f"could not keep the audit log of {site}: {err}")

    def _store_site_log(self, site: str, data: bytes) -> None:
        """Keep a site's signed log in the job result and pin its head in the server's log."""
        if self._out_dir is None or not _SITE_NAME.fullmatch(site):
            raise ZenfedError(f"cannot store the audit log of site {site!r}")
        last = data.rstrip(b"\n").split(b"\n")[-1]
        (self._out_dir / "audit" / f"{site}.jsonl").write_bytes(data)
        self._audit.record(E.LOG_ANCHORED, participant=site, seq=int(json.loads(last)["seq"]),
                           sha256=sha256_hex(last))

    def _release(self, global_state: Any, final_sites: dict[str, dict[str, Any]], fl_ctx: FLContext,
                 abort_signal: Signal) -> Any:
        """Return the final adapter in the clear, if allowed; under encryption ask one site to decrypt it."""
        if not self._aggregation.encrypted:
            return global_state
        refusing = sorted(s for s, m in final_sites.items() if not m.get("release_ok"))
        if refusing or not final_sites:
            self._audit.record(E.POLICY_DECISION, decision="refused", subject="plaintext release",
                               reason=f"site policies of {', '.join(refusing) or 'no site'} do not allow it")
            return None
        self._phase, chosen = "release", sorted(final_sites)[0]
        self._released = None
        self._run_round(P.TASK_RELEASE, global_state, fl_ctx, abort_signal, targets=[chosen], min_sites=1)
        if self._released is not None:
            self._audit.record(E.POLICY_DECISION, decision="accepted", subject="plaintext release",
                               reason=f"all {len(final_sites)} site policies allow it; decrypted by {chosen}")
        return self._released

    # -- records ---------------------------------------------------------------------------
    def _write_result(self, state: RunState, global_state: Any, released: Any, final_eval: dict[str, float],
                      final_sites: dict[str, dict[str, Any]]) -> None:
        """Write ``zenfed_result.json`` and, if released, the final adapter as a PEFT folder."""
        spec, _ = self._require_started()
        if self._out_dir is None:
            raise ZenfedError("no output folder")
        result = build_result(
            spec=spec, job_id=self._job_id, out_dir=self._out_dir, history=state.history,
            final_eval=final_eval, final_sites=final_sites, released=released,
            global_sha256=self._aggregation.digest(global_state), aggregation=self._aggregation.method,
            base_model_sha256=self._base_model_sha256,
        )
        if released is not None:
            self._audit.record(
                E.MODEL_RELEASED, adapter_sha256=result["final"]["adapter_sha256"], released_to="job result (adapter/)",
                decided_by="site policies (all allow)" if self._aggregation.encrypted else "job spec: plaintext FedAvg",
            )
