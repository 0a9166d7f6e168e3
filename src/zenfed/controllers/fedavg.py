"""Server side of a federated LoRA job: rounds, FedAvg, federated evaluation, checkpoints.

Each round broadcasts ``zenfed_train`` with the current global adapter (none in
round 1: every site starts from the same deterministic initialisation). A site
first evaluates the adapter it received on its validation split, then trains,
and answers with its new adapter and both sets of metrics. Results are folded
into a running weighted sum as they arrive. After the last round a
``zenfed_evaluate`` task scores the final adapter.
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
from nvflare.apis.job_def import JobMetaKey
from nvflare.apis.impl.controller import Controller
from nvflare.apis.shareable import Shareable
from nvflare.apis.signal import Signal
from nvflare.widgets.info_collector import GroupInfoCollector, InfoCollector

from zenfed import protocol as P
from zenfed.audit import events as E
from zenfed.audit.sink import AuditSink
from zenfed.controllers.aggregators import WeightedMean
from zenfed.controllers.checkpoint import CheckpointStore, RunState
from zenfed.engines.export import write_peft_adapter
from zenfed.errors import ZenfedError
from zenfed.spec import JobSpec, parse_model
from zenfed.wire import decode_adapter, encode_adapter, sha256_hex

RESULT_FILE = "zenfed_result.json"


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
        self._aggregator = WeightedMean()
        self._round_sites: dict[str, dict[str, Any]] = {}
        self._last_eval: dict[str, float] = {}
        self._out_dir: Path | None = None
        self._checkpoints: CheckpointStore | None = None
        self._job_id = ""
        self._audit = AuditSink(None)
        self._update_hashes: list[str] = []
        self._base_model_sha256: str | None = None

    # -- FLARE lifecycle -------------------------------------------------------------------
    def start_controller(self, fl_ctx: FLContext) -> None:
        """Validate the spec and find the run and checkpoint folders."""
        self.spec = parse_model(JobSpec, self._spec_data, kind="job spec", source="the job's server config")
        self._job_id = fl_ctx.get_job_id()
        workspace = fl_ctx.get_engine().get_workspace()
        self._out_dir = Path(workspace.get_run_dir(self._job_id)) / "zenfed"
        self._out_dir.mkdir(parents=True, exist_ok=True)
        key = f"{self.spec.name}-{self.spec.spec_hash()[:16]}"
        self._checkpoints = CheckpointStore(Path(workspace.get_root_dir()) / "zenfed-checkpoints" / key)
        self._audit = AuditSink.for_participant(
            startup_dir=workspace.get_startup_kit_dir(), participant=fl_ctx.get_identity_name(),
            log_path=self._out_dir / "audit" / f"{fl_ctx.get_identity_name()}.jsonl",
        )
        meta = fl_ctx.get_prop(FLContextKey.JOB_META) or {}
        sites = sorted(c.name for c in fl_ctx.get_engine().get_clients())
        self._audit.record(
            E.JOB_SUBMITTED, job=self.spec.name, job_id=self._job_id,
            submitter=str(meta.get(JobMetaKey.SUBMITTER_NAME.value, "unknown")),
            spec_sha256=self.spec.spec_hash(),
        )
        self._audit.record(E.JOB_DEPLOYED, job_id=self._job_id, sites=sites)
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
        rounds = self.spec.federation.rounds if self.spec else 0
        return {
            "phase": self._phase, "round": self._round, "rounds": rounds,
            "sites_answered": self._aggregator.count, "eval_loss": self._last_eval.get("eval_loss"),
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
        for rnd in range(state.completed_round + 1, spec.federation.rounds + 1):
            self._round, self._phase = rnd, "train"
            started = time.time()
            new_global = self._run_round(P.TASK_TRAIN, state.global_adapter, fl_ctx, abort_signal)
            if abort_signal.triggered or new_global is None:
                return
            entry = self._round_record(rnd, started, new_global)
            state.history.append(entry)
            state.global_adapter, state.completed_round = new_global, rnd
            store.save(state)
            self.log_info(fl_ctx, f"round {rnd}/{spec.federation.rounds} done: {self._summary(entry)}")
        self._round, self._phase = spec.federation.rounds, "evaluate"
        self._run_round(P.TASK_EVALUATE, state.global_adapter, fl_ctx, abort_signal)
        if abort_signal.triggered:
            return
        final_eval = self._weighted_eval()
        state.finished = True
        store.save(state)
        self._write_result(state, final_eval)
        self._phase = "done"

    def _require_started(self) -> tuple[JobSpec, CheckpointStore]:
        if self.spec is None or self._checkpoints is None:
            raise ZenfedError("controller used before start_controller")
        return self.spec, self._checkpoints

    def _run_round(self, task_name: str, global_adapter: Any, fl_ctx: FLContext, abort_signal: Signal) -> Any:
        """Broadcast one task; return the aggregated adapter (train) or True (evaluate)."""
        spec, _ = self._require_started()
        data = Shareable()
        header: dict[str, Any] = {
            P.H_JOB_ID: self._job_id, P.H_ROUND: self._round, P.H_SPEC_HASH: spec.spec_hash(),
            P.H_HAS_GLOBAL: global_adapter is not None,
        }
        if global_adapter is not None:
            payload = encode_adapter(global_adapter)
            header[P.H_PAYLOAD_SHA256] = sha256_hex(payload)
            header[P.H_PAYLOAD_BYTES] = len(payload)
            data[P.KEY_PAYLOAD] = payload
        data[P.KEY_HEADER] = header
        self._aggregator = WeightedMean()
        self._round_sites = {}
        self._update_hashes = []
        targets = [c.name for c in fl_ctx.get_engine().get_clients()]
        self._audit.record(E.ROUND_STARTED, round=self._round, task=task_name, sites=sorted(targets))
        task = Task(
            name=task_name, data=data, timeout=spec.federation.task_timeout_s,
            result_received_cb=self._on_result,
        )
        self.broadcast_and_wait(
            task=task, fl_ctx=fl_ctx, targets=targets, min_responses=spec.federation.min_sites,
            wait_time_after_min_received=spec.federation.task_timeout_s, abort_signal=abort_signal,
        )
        if abort_signal.triggered:
            return None
        answered = len(self._round_sites) if task_name == P.TASK_EVALUATE else self._aggregator.count
        if answered < spec.federation.min_sites:
            self._audit.record(
                E.ERROR, kind="too_few_sites", round=self._round,
                message=f"{answered} site(s) contributed; federation.min_sites={spec.federation.min_sites}",
            )
            self.system_panic(
                f"round {self._round}: only {answered} site(s) contributed, fewer than "
                f"federation.min_sites={spec.federation.min_sites}; stopping the job", fl_ctx,
            )
            abort_signal.trigger("too few sites")
            return None
        self._last_eval = self._weighted_eval()
        evaluated_round = self._round - 1 if task_name == P.TASK_TRAIN else self._round
        self._audit.record(
            E.EVALUATED, round=evaluated_round, scope="federated",
            metrics={k: float(v) for k, v in self._last_eval.items()},
        )
        if task_name == P.TASK_EVALUATE:
            self._audit.record(E.ROUND_ENDED, round=self._round, task=task_name)
            return True
        new_global = self._aggregator.result()
        self._audit.record(
            E.AGGREGATED, round=self._round, inputs=sorted(self._update_hashes),
            output=sha256_hex(encode_adapter(new_global)), method="fedavg",
            total_weight=self._aggregator.total_weight,
        )
        self._audit.record(E.ROUND_ENDED, round=self._round, task=task_name,
                           contributors=sorted(self._aggregator.contributors))
        return new_global

    def _on_result(self, client_task: ClientTask, fl_ctx: FLContext) -> None:
        """Validate one site's result and fold it into the sum; reject bad ones, never abort."""
        site = client_task.client.name
        result: Shareable = client_task.result
        client_task.result = None  # Folded in below; do not keep per-site copies.
        try:
            self._accept(site, result, client_task.task.name)
        except (ZenfedError, ValueError, TypeError, KeyError) as err:
            self.log_error(fl_ctx, f"round {self._round}: rejected the result of {site}: {err}")
            self._audit.record(E.ERROR, kind="result_rejected", site=site, round=self._round, message=str(err)[:500])

    def _accept(self, site: str, result: Shareable, task_name: str) -> None:
        spec, _ = self._require_started()
        refusal = result.get(P.KEY_REFUSAL)
        if refusal:
            raise ZenfedError(f"the site refused the task: {refusal}")
        rc = result.get_return_code()
        if rc != "OK":
            raise ZenfedError(f"the site returned {rc}")
        header = result.get(P.KEY_HEADER)
        if not isinstance(header, dict):
            raise ZenfedError("result has no zenfed header")
        if header.get(P.H_ROUND) != self._round or header.get(P.H_JOB_ID) != self._job_id:
            raise ZenfedError(
                f"result is for job {header.get(P.H_JOB_ID)} round {header.get(P.H_ROUND)}, "
                f"expected round {self._round} (a replay or a stale result)"
            )
        metrics = {
            "eval_loss": float(header[P.H_EVAL_LOSS]), "accuracy": float(header[P.H_EVAL_ACCURACY]),
            "eval_examples": int(header[P.H_EVAL_EXAMPLES]),
        }
        if task_name == P.TASK_TRAIN:
            payload = result.get(P.KEY_PAYLOAD)
            if not isinstance(payload, bytes):
                raise ZenfedError("training result carries no adapter payload")
            digest = sha256_hex(payload)
            if digest != header.get(P.H_PAYLOAD_SHA256) or len(payload) != header.get(P.H_PAYLOAD_BYTES):
                raise ZenfedError("payload does not match the SHA-256/size in its header")
            num_examples = int(header[P.H_NUM_EXAMPLES])
            weight = float(num_examples) if spec.federation.weighting == "samples" else 1.0
            self._aggregator.add(site, decode_adapter(payload), weight=weight)
            self._update_hashes.append(digest)
            self._audit.record(
                E.UPDATE_RECEIVED, site=site, round=self._round, sha256=digest, size=len(payload),
                kind=P.UPDATE_KIND,
            )
            metrics.update(
                train_loss=float(header[P.H_TRAIN_LOSS]), num_examples=num_examples, weight=weight,
                update_sha256=digest, update_bytes=len(payload),
            )
        if header.get(P.H_BASE_MODEL_SHA256):
            self._base_model_sha256 = str(header[P.H_BASE_MODEL_SHA256])
        log_bytes = result.get(P.KEY_AUDIT_LOG)
        if task_name == P.TASK_EVALUATE and isinstance(log_bytes, bytes):
            self._store_site_log(site, log_bytes)
        self._round_sites[site] = metrics

    def _store_site_log(self, site: str, data: bytes) -> None:
        """Keep a site's signed log in the job result and pin its head in the server's log."""
        if self._out_dir is None or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}", site):
            raise ZenfedError(f"cannot store the audit log of site {site!r}")
        lines = data.rstrip(b"\n").split(b"\n")
        head = json.loads(lines[-1])
        (self._out_dir / "audit" / f"{site}.jsonl").write_bytes(data)
        self._audit.record(E.LOG_ANCHORED, participant=site, seq=int(head["seq"]), sha256=sha256_hex(lines[-1]))

    # -- records ---------------------------------------------------------------------------
    def _weighted_eval(self) -> dict[str, float]:
        sites = self._round_sites.values()
        total = sum(m["eval_examples"] for m in sites)
        if not total:
            return {}
        return {
            "eval_loss": sum(m["eval_loss"] * m["eval_examples"] for m in sites) / total,
            "accuracy": sum(m["accuracy"] * m["eval_examples"] for m in sites) / total,
        }

    def _round_record(self, rnd: int, started: float, new: Any) -> dict[str, Any]:
        """One row of the history. Sites evaluated the adapter they received: the previous global."""
        evaluated = self._weighted_eval()
        return {
            "round": rnd, "seconds": round(time.time() - started, 3),
            "evaluated_round": rnd - 1,
            "eval_loss": evaluated.get("eval_loss"), "accuracy": evaluated.get("accuracy"),
            "train_loss": self._mean_of("train_loss"),
            "contributors": list(self._aggregator.contributors),
            "total_weight": self._aggregator.total_weight,
            "global_adapter_sha256": sha256_hex(encode_adapter(new)),
            "sites": dict(self._round_sites),
        }

    def _mean_of(self, key: str) -> float | None:
        values = [m[key] for m in self._round_sites.values() if key in m]
        return sum(values) / len(values) if values else None

    @staticmethod
    def _summary(entry: dict[str, Any]) -> str:
        return (
            f"{len(entry['contributors'])} sites, train loss {entry['train_loss']:.4f}, "
            f"eval loss of round {entry['evaluated_round']} {entry['eval_loss']:.4f}"
        )

    def _write_result(self, state: RunState, final_eval: dict[str, float]) -> None:
        """Write the final adapter (a PEFT folder) and ``zenfed_result.json`` into the run folder."""
        spec, _ = self._require_started()
        if self._out_dir is None or state.global_adapter is None:
            raise ZenfedError("no global adapter to write")
        adapter_dir = write_peft_adapter(
            self._out_dir / spec.output.adapter_dir, state.global_adapter,
            lora=spec.lora, base_model=spec.model.base,
        )
        rounds = _shift_evaluations(state.history, final_eval, dict(self._round_sites))
        baseline = state.history[0] if state.history else {}
        result = {
            "job": {"name": spec.name, "job_id": self._job_id, "spec_hash": spec.spec_hash(),
                    "spec": spec.model_dump(mode="json")},
            "base_model": {"name": spec.model.base, "sha256": self._base_model_sha256},
            "baseline": {"eval_loss": baseline.get("eval_loss"), "accuracy": baseline.get("accuracy")},
            "rounds": rounds,
            "final": {"adapter_dir": str(adapter_dir.relative_to(self._out_dir)),
                      "adapter_sha256": sha256_hex(encode_adapter(state.global_adapter)),
                      "eval_loss": final_eval.get("eval_loss"), "accuracy": final_eval.get("accuracy"),
                      "sites": dict(self._round_sites)},
        }
        (self._out_dir / RESULT_FILE).write_text(json.dumps(result, indent=2) + "\n")
        self._audit.record(
            E.MODEL_RELEASED, adapter_sha256=result["final"]["adapter_sha256"],
            released_to="job result (adapter/)", decided_by="job spec: plaintext FedAvg",
        )


_EVAL_KEYS = ("eval_loss", "accuracy", "eval_examples")


def _shift_evaluations(
    history: list[dict[str, Any]], final_eval: dict[str, float], final_sites: dict[str, dict[str, Any]]
) -> list[dict[str, Any]]:
    """Return the rounds with each round's evaluation of the adapter it produced.

    Sites evaluate the adapter they receive, so round r+1's answers (or the
    final evaluation) score round r's adapter; training figures stay put.
    """
    rounds = []
    for index, entry in enumerate(history):
        later = history[index + 1] if index + 1 < len(history) else None
        global_eval = later if later else final_eval
        site_evals = later["sites"] if later else final_sites
        sites = {}
        for name, metrics in entry["sites"].items():
            shifted = {k: v for k, v in metrics.items() if k not in _EVAL_KEYS}
            shifted.update({k: site_evals[name][k] for k in _EVAL_KEYS if k in site_evals.get(name, {})})
            sites[name] = shifted
        rounds.append({**entry, "eval_loss": global_eval.get("eval_loss"), "accuracy": global_eval.get("accuracy"),
                       "evaluated_round": entry["round"], "sites": sites})
    return rounds
