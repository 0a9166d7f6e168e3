"""Site side of a federated LoRA job: policy check, evaluate, train, answer.

The executor runs the installed ``zenfed`` package; the job folder carries
configuration only. Data paths come from the site's own policy, never from
the job. Only the adapter update (and metrics) leaves the site: in the clear,
or weighted and encrypted under the site's secret CKKS key.
"""

from __future__ import annotations

import random
import zlib
from pathlib import Path
from typing import Any

from nvflare.apis.executor import Executor
from nvflare.apis.fl_constant import ReturnCode
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import Shareable, make_reply
from nvflare.apis.signal import Signal

from zenfed import protocol as P
from zenfed.audit import events as E
from zenfed.audit.sink import AuditSink
from zenfed.data.jsonl import Example, load_jsonl
from zenfed.engines import make_engine
from zenfed.engines.base import Engine
from zenfed.engines.base_model import model_fingerprint, resolve_base_model
from zenfed.errors import PolicyError, ZenfedError
from zenfed.executors.attestation_check import SiteAttestation
from zenfed.executors.encryption import SiteEncryption, find_site_context
from zenfed.executors.privacy_stage import SitePrivacy
from zenfed.executors.site_policy import check_job_allowed, load_policy_for
from zenfed.spec import JobSpec, SitePolicy, parse_model
from zenfed.types import AdapterState
from zenfed.wire import decode_adapter, encode_adapter, sha256_hex

_TASKS = (P.TASK_ATTEST, P.TASK_TRAIN, P.TASK_EVALUATE, P.TASK_RELEASE)


class LoRAExecutor(Executor):
    """Trains and evaluates the job's adapter on this site's data."""

    def __init__(self, spec: dict[str, Any]):
        """Create the executor.

        Args:
            spec: The job spec as a dict (``JobSpec.model_dump(mode="json")``).
        """
        super().__init__()
        self._spec_data = spec
        self._spec: JobSpec | None = None
        self._policy: SitePolicy | None = None
        self._engine: Engine | None = None
        self._encryption: SiteEncryption | None = None
        self._train: list[Example] = []
        self._valid: list[Example] = []
        self._sent_dir: Path | None = None
        self._audit: AuditSink | None = None
        self._base_model_sha256: str | None = None
        self._attestation: SiteAttestation | None = None
        self._run_dir = Path(".")
        self._final_global_sha256: str | None = None
        self._privacy: SitePrivacy | None = None
        self._optimizer_state: Any = None
        self._site_config_dir: str | None = None
        self._released = False

    def execute(self, task_name: str, shareable: Shareable, fl_ctx: FLContext, abort_signal: Signal) -> Shareable:
        """Run one zenfed task; a policy refusal is answered (and audited), not raised."""
        if task_name not in _TASKS:
            return make_reply(ReturnCode.TASK_UNKNOWN)
        site = fl_ctx.get_identity_name()
        try:
            spec, policy = self._open(site, fl_ctx)
            if task_name == P.TASK_ATTEST:
                return self._answer_attestation(shareable)
            # No model data moves until the server has proven its TEE, where this site requires it.
            self._require_attestation().check_server(shareable.get(P.KEY_SERVER_EVIDENCE))
            self._load(spec, policy, fl_ctx)
            header = shareable.get(P.KEY_HEADER)
            if not isinstance(header, dict) or header.get(P.H_SPEC_HASH) != spec.spec_hash():
                raise PolicyError("the task does not carry this job's spec hash; refusing it")
            if task_name == P.TASK_RELEASE:
                return self._release(header, shareable)
            adapter = self._incoming_adapter(shareable, header)
            return self._run(task_name, spec, header, adapter, site, abort_signal)
        except PolicyError as err:
            self.log_warning(fl_ctx, f"{site} refused {task_name}: {err}")
            self._record(E.POLICY_DECISION, decision="refused", reason=str(err)[:500], task=task_name)
            reply = make_reply(ReturnCode.OK)
            reply[P.KEY_REFUSAL] = str(err)
            self._attach_log(reply)  # The refusal and its reason reach the job result.
            return reply
        except ZenfedError as err:
            self.log_error(fl_ctx, f"{site} failed {task_name}: {err}")
            self._record(E.ERROR, kind=type(err).__name__, message=str(err)[:500], task=task_name)
            return make_reply(ReturnCode.EXECUTION_EXCEPTION)

    def _record(self, event: str, **fields: Any) -> None:
        if self._audit is not None:
            self._audit.record(event, **fields)

    # -- steps ----------------------------------------------------------------------------
    def _open(self, site: str, fl_ctx: FLContext) -> tuple[JobSpec, SitePolicy]:
        """Open the audit log, read the spec and the site policy, decide: cheap, once per job."""
        if self._spec is not None and self._policy is not None:
            return self._spec, self._policy
        workspace = fl_ctx.get_engine().get_workspace()
        job_id = fl_ctx.get_job_id()
        self._run_dir = Path(workspace.get_run_dir(job_id)) / "zenfed"
        if self._audit is None:
            self._audit = AuditSink.for_participant(
                startup_dir=workspace.get_startup_kit_dir(), participant=site,
                log_path=self._run_dir / "audit" / f"{site}.jsonl",
            )
            self._audit.record(E.JOB_STARTED, job_id=job_id)
        spec = parse_model(JobSpec, self._spec_data, kind="job spec", source="the job's site config")
        self._site_config_dir = workspace.get_site_config_dir()
        policy = load_policy_for(site=site, site_config_dir=self._site_config_dir)
        check_job_allowed(policy, spec)
        self._attestation = SiteAttestation(
            workspace_root=workspace.get_root_dir(), site=site, policy=policy, audit=self._audit,
            mode=spec.attestation.mode,
        )
        if spec.encryption.enabled:
            context = find_site_context(workspace.get_startup_kit_dir(), workspace.get_site_config_dir())
            self._encryption = SiteEncryption(spec=spec, context_path=context)
        self._spec, self._policy = spec, policy
        return spec, policy

    def _load(self, spec: JobSpec, policy: SitePolicy, fl_ctx: FLContext) -> None:
        """Load the data and the engine: slow, once per job, only after the checks passed."""
        if self._engine is not None:
            return
        location = policy.dataset(spec.data.dataset)
        self._train = load_jsonl(location.path / location.train)
        valid = load_jsonl(location.path / location.valid)
        # A fixed, seeded subset keeps per-round evaluation cheap and comparable across rounds.
        random.Random(spec.training.seed).shuffle(valid)
        self._valid = valid[: spec.evaluation.max_examples]
        # The privacy budget is decided before any model is loaded: a refused job costs nothing.
        workspace = fl_ctx.get_engine().get_workspace()
        privacy = SitePrivacy.from_kit(
            spec=spec, policy=policy, startup_dir=workspace.get_startup_kit_dir(),
            local_dir=workspace.get_site_config_dir(), job_id=fl_ctx.get_job_id(),
            num_records=len(self._train), num_sites=spec.federation.min_sites,
        )
        plan = privacy.admit()
        self._record(E.POLICY_DECISION, decision="accepted", subject="privacy budget",
                     reason="the job's planned epsilon fits this site's limits", plan=plan)
        self._privacy = privacy
        model_dir = resolve_base_model(spec.model.base)
        self._base_model_sha256 = model_fingerprint(model_dir)
        self._engine = make_engine(spec, model_dir=model_dir, threads=policy.torch_threads, engine=policy.engine)
        if policy.keep_sent_updates:
            self._sent_dir = self._run_dir / "sent"
        self._record(
            E.POLICY_DECISION, decision="accepted", job=spec.name, spec_sha256=spec.spec_hash(),
            dataset=spec.data.dataset, base_model_sha256=self._base_model_sha256,
            engine=policy.engine or spec.model.engine, encrypted=spec.encryption.enabled,
            reason="job, base model and dataset allowed by the site policy",
        )

    def _answer_attestation(self, shareable: Shareable) -> Shareable:
        """Answer the server's challenge with fresh evidence and a nonce for the server."""
        reply = make_reply(ReturnCode.OK)
        try:
            reply[P.KEY_ATTEST] = self._require_attestation().answer(shareable.get(P.KEY_ATTEST))
        except ZenfedError as err:
            reply[P.KEY_REFUSAL] = str(err)  # The server records why this site cannot attest.
        self._attach_log(reply)  # An excluded site's log still reaches the job result.
        return reply

    def _attach_log(self, reply: Shareable) -> None:
        """Carry this site's own signed log to the server, which keeps it in the job result."""
        if self._audit is not None and self._audit.path is not None:
            reply[P.KEY_AUDIT_LOG] = self._audit.path.read_bytes()

    def _require_attestation(self) -> SiteAttestation:
        if self._attestation is None:
            raise ZenfedError("attestation used before the job was opened")
        return self._attestation

    def _incoming_adapter(self, shareable: Shareable, header: dict[str, Any]) -> AdapterState:
        """The global adapter: the shared initialisation in round 1, else decoded or decrypted."""
        engine = self._require_engine()
        if not header.get(P.H_HAS_GLOBAL):
            return engine.initial_adapter()
        payload = shareable.get(P.KEY_PAYLOAD)
        if not isinstance(payload, bytes) or sha256_hex(payload) != header.get(P.H_PAYLOAD_SHA256):
            raise PolicyError("the global adapter does not match the SHA-256 in its header; refusing it")
        if bool(header.get(P.H_ENCRYPTED)) != (self._encryption is not None):
            raise PolicyError("the task's encryption does not match the job spec; refusing it")
        if self._encryption is None:
            return decode_adapter(payload)
        return self._encryption.decrypt_global(
            payload, template=engine.initial_adapter(), total_weight=float(header[P.H_TOTAL_WEIGHT])
        )

    def _run(self, task_name: str, spec: JobSpec, header: dict[str, Any], adapter: AdapterState, site: str,
             abort_signal: Signal) -> Shareable:
        engine, policy = self._require_engine(), self._require_policy()
        rnd = int(header[P.H_ROUND])
        evaluation = engine.evaluate(adapter=adapter, examples=self._valid,
                                     max_new_tokens=spec.evaluation.max_new_tokens)
        out: dict[str, Any] = {
            P.H_JOB_ID: header[P.H_JOB_ID], P.H_ROUND: rnd, P.H_SITE: site,
            P.H_EVAL_LOSS: evaluation.loss, P.H_EVAL_ACCURACY: evaluation.accuracy,
            P.H_EVAL_EXAMPLES: evaluation.num_examples, P.H_BASE_MODEL_SHA256: self._base_model_sha256,
            P.H_RELEASE_OK: policy.allow_plaintext_release, P.H_ENGINE: policy.engine or spec.model.engine,
        }
        self._record(
            E.EVALUATED, round=rnd - 1 if task_name == P.TASK_TRAIN else rnd, scope="local validation",
            metrics={"eval_loss": evaluation.loss, "accuracy": evaluation.accuracy,
                     "examples": evaluation.num_examples},
        )
        reply = make_reply(ReturnCode.OK)
        if task_name == P.TASK_TRAIN:
            if abort_signal.triggered:
                return make_reply(ReturnCode.TASK_ABORTED)
            # Each site and round draws its own batches, reproducibly.
            seed = spec.training.seed * 1_000_003 + rnd * 7919 + zlib.crc32(site.encode())
            privacy = self._require_privacy()
            self._reload_budget(privacy, site)
            dp = privacy.for_round(rnd)  # Raises BudgetExhausted: this site stops contributing, and says so.
            trained = engine.train(adapter=adapter, examples=self._train, steps=spec.training.local_steps,
                                   seed=seed, dp=dp, optimizer_state=self._optimizer_state)
            self._optimizer_state = trained.optimizer_state  # Stays at the site for its next round.
            update = privacy.privatize_update(global_adapter=adapter, local_adapter=trained.adapter)
            spent = privacy.after_round(rnd)  # In the signed ledger before anything leaves the site.
            if spent:
                out[P.H_PRIVACY] = spent
                self._record(E.DP_SPENT, round=rnd, level=spec.privacy.level, epsilon=spent["epsilon"],
                             epsilon_round=spent["epsilon_round"], delta=spent["delta"],
                             noise_multiplier=spent["noise_multiplier"], clip_norm=spent["clip_norm"],
                             ledger_head=privacy.ledger_head())
            payload = self._encode_update(update, trained.num_examples, header, out, site)
            out.update({
                P.H_NUM_EXAMPLES: trained.num_examples,
                P.H_STEPS: trained.steps, P.H_PAYLOAD_SHA256: sha256_hex(payload), P.H_PAYLOAD_BYTES: len(payload),
            })
            if privacy.level == "none":
                # Under DP the training loss stays here: it is computed from the training records
                # without noise, so epsilon would not cover it.
                out[P.H_TRAIN_LOSS] = trained.train_loss
            reply[P.KEY_PAYLOAD] = payload
            self._keep_sent(rnd, payload)
            self._record(E.UPDATE_SENT, round=rnd, sha256=sha256_hex(payload), size=len(payload),
                         kind=P.UPDATE_KIND, encrypted=self._encryption is not None)
        else:
            # The final evaluation names the one adapter this site may later release.
            self._final_global_sha256 = header.get(P.H_PAYLOAD_SHA256)
            self._record(E.ROUND_ENDED, round=rnd, task=task_name)
            self._attach_log(reply)
        reply[P.KEY_HEADER] = out
        return reply

    def _encode_update(self, adapter: AdapterState, num_examples: int, header: dict[str, Any],
                       out: dict[str, Any], site: str) -> bytes:
        """The bytes that leave the site: the adapter in the clear, or weighted and encrypted."""
        if self._encryption is None:
            return encode_adapter(adapter)
        weight = self._encryption.weight(num_examples)
        out[P.H_WEIGHT] = weight
        return self._encryption.encrypt_update(adapter, weight=weight, job_id=str(header[P.H_JOB_ID]),
                                               round_index=int(header[P.H_ROUND]), site=site)

    def _release(self, header: dict[str, Any], shareable: Shareable) -> Shareable:
        """Return the decrypted final adapter, if this site's policy allows a plaintext release.

        Only the adapter this site just scored in the final evaluation, and only once: a server
        cannot use release to have a site decrypt anything else (say, one site's update).
        """
        if not self._require_policy().allow_plaintext_release:
            raise PolicyError("this site's policy does not allow releasing the adapter in the clear")
        if self._released or self._final_global_sha256 is None:
            raise PolicyError("release refused: it comes only once, after this site's final evaluation")
        if header.get(P.H_PAYLOAD_SHA256) != self._final_global_sha256:
            raise PolicyError("release refused: the payload is not the final adapter this site evaluated")
        self._released = True
        adapter = self._incoming_adapter(shareable, header)
        payload = encode_adapter(adapter)
        self._record(E.MODEL_RELEASED, adapter_sha256=sha256_hex(payload), released_to="server (job result)",
                     decided_by="site policy allow_plaintext_release")
        reply = make_reply(ReturnCode.OK)
        reply[P.KEY_PAYLOAD] = payload
        self._attach_log(reply)
        reply[P.KEY_HEADER] = {P.H_JOB_ID: header[P.H_JOB_ID], P.H_ROUND: header[P.H_ROUND],
                               P.H_PAYLOAD_SHA256: sha256_hex(payload), P.H_PAYLOAD_BYTES: len(payload)}
        return reply

    def _keep_sent(self, rnd: int, payload: bytes) -> None:
        """Keep the site's own copy of what left it, named by round (the site's record, not the server's)."""
        if self._sent_dir is None:
            return
        self._sent_dir.mkdir(parents=True, exist_ok=True)
        (self._sent_dir / f"round-{rnd:04d}.bin").write_bytes(payload)

    def _require_engine(self) -> Engine:
        if self._engine is None:
            raise ZenfedError("engine used before the job was prepared")
        return self._engine

    def _reload_budget(self, privacy: SitePrivacy, site: str) -> None:
        """Budgets site IT edits in the site policy take effect from the next round."""
        try:
            current = load_policy_for(site=site, site_config_dir=self._site_config_dir)
        except ZenfedError as err:
            self._record(E.ERROR, kind="policy_reload", message=f"kept the budget in force: {err}"[:500])
            return
        if privacy.update_limits(current.privacy):
            self._record(E.POLICY_DECISION, decision="accepted", subject="privacy budget",
                         reason="site IT changed the budget; the new limits apply from this round",
                         max_epsilon_per_job=current.privacy.max_epsilon_per_job,
                         lifetime_epsilon=current.privacy.lifetime_epsilon)

    def _require_privacy(self) -> SitePrivacy:
        if self._privacy is None:
            raise ZenfedError("privacy used before the job was prepared")
        return self._privacy

    def _require_policy(self) -> SitePolicy:
        if self._policy is None:
            raise ZenfedError("policy used before the job was prepared")
        return self._policy
