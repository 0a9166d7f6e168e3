"""A site's part of one job, without FLARE: policy, attestation, engine, DP, encryption, release, audit.

The FLARE executor (``zenfed.executors.lora_executor``) only translates: it
turns each task into a :class:`~zenfed.protocol.Message`, calls
:meth:`SiteSession.handle`, and sends the answer back. Everything a site
decides happens here, and a test can drive it in one process.

A task's path at a site::

    open (once)   policy allows the job? attestation and audit opened
    check         server attested (where required), spec hash matches
    load (once)   data, privacy budget admitted, base model and engine
    incoming      global bytes -> update chain, reversed -> strategy.after_decrypt
    evaluate      the received adapter on the local validation split (and held-out pairs, DPO jobs)
    train         budget for this round -> strategy.prepare_global -> engine.train (DPO rounds:
                  engine.train_preferences against the stage's reference, site/alignment.py)
    outgoing      local - global -> update chain -> payload bytes, audited
"""

from __future__ import annotations

import logging
import random
import zlib
from collections.abc import Callable
from typing import Any, TypeVar

import torch

from zenfed import protocol as P
from zenfed.answer_auth import SiteAnswerSigner
from zenfed.atomic import atomic_write_bytes
from zenfed.audit import events as E
from zenfed.audit.sink import AuditSink
from zenfed.data.jsonl import Example, load_jsonl
from zenfed.digest import sha256_hex
from zenfed.engines import make_engine
from zenfed.engines.base import Engine
from zenfed.engines.base_model import model_fingerprint, resolve_base_model
from zenfed.errors import PolicyError, ZenfedError
from zenfed.kit_files import KitFolders
from zenfed.protocol import Message
from zenfed.site.alignment import SitePreferences
from zenfed.site.attestation import SiteAttestation, read_server_name
from zenfed.site.chain import IncomingGlobal, OutgoingUpdate, RoundInfo, UpdateChain
from zenfed.site.dp import SiteDP
from zenfed.site.encryption import SiteEncryption, find_site_context
from zenfed.site.enrollment import enrollment_profile
from zenfed.site.masking import SiteMasking
from zenfed.site.personal import PersonalLayers
from zenfed.site.policy import check_base_model, check_job_allowed, load_policy_for, site_hardware
from zenfed.site.ranks import RankCap
from zenfed.site.run_state import SiteRunState
from zenfed.site.stages import build_update_chain
from zenfed.site.state import SiteStateStore
from zenfed.spec import JobSpec, SitePolicy, parse_model
from zenfed.strategies import Strategy, make_strategy
from zenfed.task_auth import TaskVerifier
from zenfed.types import AdapterState, check_compatible
from zenfed.update_auth import (
    UpdateSigner,
    UpdateVerifier,
    enrollment_statement,
    release_statement,
)
from zenfed.wire import encode_adapter

TASKS = P.SITE_TASKS
_log = logging.getLogger(__name__)
_T = TypeVar("_T")


def round_seed(*, job_seed: int, round_index: int, site: str) -> int:
    """Return the seed of one site's batches in one round: reproducible, and different per site and round."""
    return job_seed * 1_000_003 + round_index * 7919 + zlib.crc32(site.encode())


class SiteSession:
    """One site's state for one job, across all its tasks.

    Args:
        spec_data: The job spec as a dict (``JobSpec.model_dump(mode="json")``).
        site: This site's provisioned name.
        job_id: The job's id.
        folders: The site's kit folders and this job's run folder.
    """

    def __init__(self, *, spec_data: dict[str, Any], site: str, job_id: str, folders: KitFolders) -> None:
        self.site = site
        self.job_id = job_id
        self.folders = folders
        self._spec_data = spec_data
        self._spec: JobSpec | None = None
        self._policy: SitePolicy | None = None
        self._audit: AuditSink | None = None
        self._attestation: SiteAttestation | None = None
        self._encryption: SiteEncryption | None = None
        self._masking: SiteMasking | None = None
        self._run_state: SiteRunState | None = None
        self._strategy: Strategy | None = None
        self._engine: Engine | None = None
        self._dp: SiteDP | None = None
        self._chain: UpdateChain | None = None
        self._personal: PersonalLayers | None = None
        self._rank_cap: RankCap | None = None
        self._initial: AdapterState = {}
        self._signer: UpdateSigner | None = None
        self._task_verifier: TaskVerifier | None = None
        self._answers = SiteAnswerSigner(folders.startup, site=site, job_id=job_id)
        self._answering: str | None = None  # the SHA-256 of the statement of the task being answered, once verified
        self._started_fresh = False
        self._store: SiteStateStore | None = None
        self._train: list[Example] = []
        self._valid: list[Example] = []
        self._preferences: SitePreferences | None = None
        self._base_model_sha256: str | None = None
        self._optimizer_state: Any = None

    # -- the one entry point ------------------------------------------------------------------
    def handle(self, task: str, message: Message, *, should_abort: Callable[[], bool] = lambda: False) -> Message:
        """Run one task and sign the answer; a policy refusal is answered (and audited), an error reported."""
        self._answering = None  # set once this task is verified: the answer names it
        answer = self._answer(task, message, should_abort)
        return self._answers.sign(task, answer, answer_to=self._answering)

    def _answer(self, task: str, message: Message, should_abort: Callable[[], bool]) -> Message:
        if task not in TASKS:
            return Message(status=P.STATUS_UNKNOWN_TASK)
        try:
            self._open_log()
            self._check_task(task, message)  # before anything else: signed by the server, for us, and new
            spec, policy = self._open()
            if task == P.TASK_ATTEST:
                return self._answer_attestation(message)
            # No model data moves until the server has proven its TEE, where this site requires it.
            self._require(self._attestation).check_server(message.server_evidence)
            if message.header.get(P.H_SPEC_HASH) != spec.spec_hash():
                raise PolicyError("the task does not carry this job's spec hash; refusing it")
            if task == P.TASK_KEYS:
                return self._masking_for(task).announce(message.header)
            if task == P.TASK_ENROLL:
                profile = enrollment_profile(policy, spec)
                self._record(E.ENROLLMENT_SENT, profile=profile)
                header: dict[str, Any] = {P.H_PROFILE: profile}
                if self._signer is not None:  # the server picks cohorts on it: it checks who declared it
                    header.update(self._signer.sign(enrollment_statement(job_id=self.job_id, site=self.site,
                                                                         profile=profile)))
                return Message(header=header, audit_log=self._log_bytes())
            self._load(spec, policy)
            if task == P.TASK_RELEASE:
                return self._release(message)
            if task == P.TASK_UNMASK:
                return self._masking_for(task).correct(
                    self._round_info(message.header).round, message.header, encryption=self._require(self._encryption),
                    sent_values=int(self._require(self._run_state).get("last_sent_values", 0)))
            adapter = self._incoming_adapter(message)
            return self._run(task, spec, message.header, adapter, should_abort)
        except PolicyError as err:
            _log.warning("%s refused %s: %s", self.site, task, err)
            self._record(E.POLICY_DECISION, decision="refused", reason=str(err)[:500], task=task)
            # The refusal and its reason reach the job result, with this site's log.
            return Message(refusal=str(err), audit_log=self._log_bytes())
        except ZenfedError as err:
            _log.error("%s failed %s: %s", self.site, task, err)
            self._record(E.ERROR, kind=type(err).__name__, message=str(err)[:500], task=task)
            # The reason reaches the server (and its audit log and the report), not only this site's log.
            return Message(status=P.STATUS_ERROR, error={"kind": type(err).__name__, "message": str(err)[:500]},
                           audit_log=self._log_bytes())

    # -- once per job ---------------------------------------------------------------------------
    def _open_log(self) -> None:
        """Open this site's audit log for the job, and what an earlier process of this job run decided."""
        if self._audit is None:
            log_path = self.folders.run / "audit" / f"{self.site}.jsonl"
            continued = log_path.is_file()  # an earlier process of this job run started it
            self._audit = AuditSink.for_participant(startup_dir=self.folders.startup, participant=self.site,
                                                    log_path=log_path)
            self._audit.record(E.JOB_STARTED, job_id=self.job_id, **({"continued": True} if continued else {}))
        if self._run_state is None:
            self._run_state = SiteRunState(self.folders.run)

    def _check_task(self, task: str, message: Message) -> None:
        """Check the task's signature, addressee and number (kits with keys); remember which task it is."""
        if self._task_verifier is None:
            verifier = UpdateVerifier.from_kit(self.folders.startup)
            if verifier is None:  # the simulator's kits: nothing is signed
                return
            self._task_verifier = TaskVerifier(verifier, server=read_server_name(self.folders.root), site=self.site,
                                               job_id=self.job_id, facts=self._require(self._run_state))
        self._answering = self._task_verifier.authenticate(task, message)
        self._task_verifier.check_new(task, message, self._answering)

    def _open(self) -> tuple[JobSpec, SitePolicy]:
        """Read the spec and the site policy, decide: cheap, once per job."""
        if self._spec is not None and self._policy is not None:
            return self._spec, self._policy
        spec = parse_model(JobSpec, self._spec_data, kind="job spec", source="the job's site config")
        policy = load_policy_for(site=self.site, site_config_dir=self.folders.local)
        check_job_allowed(policy, spec)
        audit = self._require(self._audit)
        self._attestation = SiteAttestation(
            workspace_root=self.folders.root, site=self.site, policy=policy, audit=audit,
            mode=spec.attestation.mode,
        )
        if spec.encryption.enabled:
            self._encryption = SiteEncryption(spec=spec, context_path=find_site_context(self.folders))
        self._signer = self._answers.key()
        verifier = self._task_verifier.verifier if self._task_verifier is not None else None
        if spec.encryption.secure_aggregation == "pairwise":
            self._masking = SiteMasking(
                site=self.site, job_id=self.job_id, job_folder=self.folders.run, max_sites=spec.encryption.max_sites,
                min_sites=spec.federation.min_sites, signer=self._signer, verifier=verifier, audit=audit,
                run_state=self._run_state,
            )
        self._strategy = make_strategy(spec)
        self._spec, self._policy = spec, policy
        return spec, policy

    def _load(self, spec: JobSpec, policy: SitePolicy) -> None:
        """Load the data and the engine: slow, once per job, only after the checks passed."""
        if self._engine is not None:
            return
        location = policy.dataset(spec.data.dataset)
        self._train = load_jsonl(location.path / location.train)
        valid = load_jsonl(location.path / location.valid)
        # A fixed, seeded subset keeps per-round evaluation cheap and comparable across rounds.
        random.Random(spec.training.seed).shuffle(valid)
        self._valid = valid[: spec.evaluation.max_examples]
        self._preferences = SitePreferences.load(spec, policy, folder=SiteStateStore(root=self.folders.root,
                                                                                     spec=spec).folder)
        # The privacy budget is decided before any model is loaded: a refused job costs nothing.
        dp = SiteDP.from_kit(
            spec=spec, policy=policy, startup_dir=self.folders.startup, local_dir=self.folders.local,
            job_id=self.job_id, num_records=len(self._train), num_sites=spec.federation.min_sites,
            num_pairs=len(self._preferences.train) if self._preferences else None, run_state=self._run_state,
        )
        plan = dp.admit()
        self._record(E.POLICY_DECISION, decision="accepted", subject="privacy budget",
                     reason="the job's planned epsilon fits this site's limits", plan=plan)
        self._dp = dp
        model_dir = resolve_base_model(spec.model.base)
        self._base_model_sha256 = model_fingerprint(model_dir)
        check_base_model(policy, spec, fingerprint=self._base_model_sha256, model_dir=model_dir)
        hardware = site_hardware(policy)
        if spec.privacy.level == "record":
            hardware.check_dp()  # refused before any round, not in every one
        self._rank_cap = RankCap.for_site(spec, policy.max_lora_rank)
        engine_spec = self._rank_cap.engine_spec(spec) if self._rank_cap else spec
        self._engine = make_engine(engine_spec, model_dir=model_dir, threads=policy.torch_threads,
                                   engine=policy.engine, hardware=hardware)
        initial = self._engine.initial_adapter()
        if self._rank_cap is not None:  # the job's rank-r_max start, the same at every site
            initial = self._rank_cap.full_initial(initial, seed=spec.training.seed)
        self._initial = initial
        self._start_site_state(spec, fresh=False)  # resumes what an earlier run of this job left
        self._record(
            E.POLICY_DECISION, decision="accepted", job=spec.name, spec_sha256=spec.spec_hash(),
            dataset=spec.data.dataset, base_model_sha256=self._base_model_sha256, objective=spec.objective,
            **({"preference_dataset": spec.dpo.dataset, "dpo_from_round": spec.dpo_start_round}
               if spec.objective == "dpo" else {}),
            privacy_unit=spec.privacy_unit(),
            engine=policy.engine or spec.model.engine, encrypted=spec.encryption.enabled,
            hardware=hardware.describe(),
            reason="job, base model and dataset allowed by the site policy",
        )

    # -- tasks ----------------------------------------------------------------------------------
    def _answer_attestation(self, message: Message) -> Message:
        """Answer the server's challenge with fresh evidence and a nonce for the server."""
        reply = Message()
        try:
            reply.attest = self._require(self._attestation).answer(message.attest)
        except ZenfedError as err:
            reply.refusal = str(err)  # The server records why this site cannot attest.
        reply.audit_log = self._log_bytes()  # An excluded site's log still reaches the job result.
        return reply

    def _masking_for(self, task: str) -> SiteMasking:
        if self._masking is None:
            raise PolicyError(f"the server sent a {task} task, but this job does not use pairwise masks")
        return self._masking

    def _incoming_adapter(self, message: Message, *, release: bool = False) -> AdapterState:
        """The site's adapter for a task: the shared global with this site's personal layers.

        The shared global is the initial adapter in round 1, else the server's sum through the
        chain, reversed. To release, the personal layers are left at their initial values.
        """
        header = message.header
        if not header.get(P.H_HAS_GLOBAL):
            if not self._started_fresh:  # round 1 of a job that starts afresh: no earlier state applies
                self._start_site_state(self._require(self._spec), fresh=True)
            return self._require(self._personal).for_training(self._initial)
        personal = self._require(self._personal)
        payload = message.payload
        if not isinstance(payload, bytes) or sha256_hex(payload) != header.get(P.H_PAYLOAD_SHA256):
            raise PolicyError("the global adapter does not match the SHA-256 in its header; refusing it")
        if bool(header.get(P.H_ENCRYPTED)) != (self._encryption is not None):
            raise PolicyError("the task's encryption does not match the job spec; refusing it")
        self._record(E.GLOBAL_RECEIVED, round=int(header.get(P.H_ROUND, 0)),
                     global_round=int(header.get(P.H_GLOBAL_ROUND, 0)), sha256=sha256_hex(payload))
        strategy, global_round = self._require(self._strategy), int(header.get(P.H_GLOBAL_ROUND, 0))
        wire = strategy.wire_template(self._initial)
        template = {name: wire[name] for name in sorted(personal.shared(wire))}
        incoming = IncomingGlobal(payload=payload, header=header, template=template)
        mean = self._require(self._chain).incoming(incoming, self._round_info(header))
        check_compatible(template, mean, what="the global adapter the server sent")  # no tensor more or less
        shared = strategy.after_decrypt(mean, global_round=global_round)
        digest = self._require(self._store).keep(strategy)  # a restarted site resumes it
        if digest is not None:
            self._record(E.STRATEGY_STATE, strategy=strategy.name, round=global_round, sha256=digest)
        return personal.for_release(shared) if release else personal.for_training(shared)

    def _run(self, task: str, spec: JobSpec, header: dict[str, Any], adapter: AdapterState,
             should_abort: Callable[[], bool]) -> Message:
        engine, policy = self._require(self._engine), self._require(self._policy)
        rnd = int(header[P.H_ROUND])
        if header.get(P.H_OBJECTIVE, spec.objective_for_round(rnd)) != spec.objective_for_round(rnd):
            raise PolicyError(f"the task says round {rnd} trains {header.get(P.H_OBJECTIVE)!r}, but this job's spec "
                              f"says {spec.objective_for_round(rnd)!r}; refusing it")
        if task == P.TASK_TRAIN and self._preferences is not None:  # kept before anything slow can be cancelled
            start = self._for_engine(self._require(self._strategy).prepare_global(adapter))
            self._preferences.keep_reference(rnd, start, header=header)
        evaluation = engine.evaluate(adapter=self._for_engine(adapter), examples=self._valid,
                                     max_new_tokens=spec.evaluation.max_new_tokens)
        out: dict[str, Any] = {
            P.H_JOB_ID: header[P.H_JOB_ID], P.H_ROUND: rnd, P.H_SITE: self.site,
            # A site whose policy withholds metrics still says how many examples it scored.
            P.H_EVAL_LOSS: evaluation.loss if policy.report_metrics else None,
            P.H_EVAL_ACCURACY: evaluation.accuracy if policy.report_metrics else None,
            P.H_EVAL_EXAMPLES: evaluation.num_examples, P.H_BASE_MODEL_SHA256: self._base_model_sha256,
            P.H_RELEASE_OK: policy.allow_plaintext_release, P.H_ENGINE: policy.engine or spec.model.engine,
        }
        metrics: dict[str, Any] = {"eval_loss": evaluation.loss, "accuracy": evaluation.accuracy,
                                   "examples": evaluation.num_examples}
        if self._preferences is not None:
            fields, scored = self._preferences.evaluate(engine, self._for_engine(adapter),
                                                        report=policy.report_metrics)
            out.update(fields)
            metrics.update(scored)
        self._record(E.EVALUATED, round=rnd - 1 if task == P.TASK_TRAIN else rnd, scope="local validation",
                     metrics=metrics)
        if task != P.TASK_TRAIN:
            # The final evaluation names the one adapter this site may later release.
            self._require(self._run_state).set(final_global_sha256=header.get(P.H_PAYLOAD_SHA256))
            self._record(E.ROUND_ENDED, round=rnd, task=task)
            return Message(header=out, audit_log=self._log_bytes())
        if should_abort():
            return Message(status=P.STATUS_ABORTED)
        payload = self._train_and_send(spec, header, adapter, out)
        return Message(header=out, payload=payload)

    def _train_and_send(self, spec: JobSpec, header: dict[str, Any], adapter: AdapterState,
                        out: dict[str, Any]) -> bytes:
        """Train one round from ``adapter``, run the update chain, return the bytes that leave the site."""
        engine, dp, strategy = self._require(self._engine), self._require(self._dp), self._require(self._strategy)
        info = self._round_info(header)
        self._reload_budget(dp)
        record_dp = dp.for_round(info.round)  # Raises BudgetExhausted: this site stops contributing, and says so.
        start = strategy.prepare_global(adapter)
        engine_start = self._for_engine(start)
        store = self._require(self._store)
        if self._optimizer_state is None:  # a new process (a resumed job): the moments this site kept
            self._optimizer_state = store.optimizer_before(info.round)
        if not strategy.keeps_optimizer_moments or info.round == spec.dpo_start_round:
            self._optimizer_state = None  # moments of another objective's gradients do not carry over
        common: dict[str, Any] = {
            "adapter": engine_start, "steps": spec.training.local_steps, "dp": record_dp,
            "seed": round_seed(job_seed=spec.training.seed, round_index=info.round, site=self.site),
            "optimizer_state": self._optimizer_state, "frozen": strategy.frozen_names(start),
            "loss_term": strategy.loss_term(global_adapter=engine_start),
        }
        if spec.objective_for_round(info.round) == "dpo":
            preferences = self._require(self._preferences)
            reference = preferences.reference(info.round, header=header, initial=self._for_engine(self._initial))
            trained = engine.train_preferences(reference=reference, pairs=preferences.train, beta=preferences.beta,
                                               **common)
        else:
            trained = engine.train(examples=self._train, **common)
        self._optimizer_state = trained.optimizer_state  # Stays at the site for its next round.
        store.keep_optimizer(info.round, trained.optimizer_state)
        # A rank-capped site's trained ranks go back into the job's rank; the others keep the global's values.
        local = self._rank_cap.embed(trained.adapter, into=start) if self._rank_cap else trained.adapter
        personal = self._require(self._personal)
        personal.keep(local)
        every = strategy.update_to_send(global_adapter=start, local_adapter=local)
        sent = {name: every[name] for name in sorted(personal.shared(every))}  # personal layers stay here
        # A tensor a strategy sends beside the adapter (a control variate) travels as itself: its base is zero.
        base = {name: start[name] if name in start else torch.zeros_like(tensor) for name, tensor in sent.items()}
        update = OutgoingUpdate.from_training(global_adapter=base, local_adapter=sent,
                                              num_examples=trained.num_examples)
        if self._require(self._policy).report_metrics:
            update.header[P.H_TRAIN_LOSS] = trained.train_loss
        update = self._require(self._chain).outgoing(update, info)
        payload = update.payload
        if payload is None:
            raise ZenfedError("the update chain wrote no payload")
        out.update(update.header)
        digest = sha256_hex(payload)
        out.update({P.H_STEPS: trained.steps, P.H_PAYLOAD_SHA256: digest, P.H_PAYLOAD_BYTES: len(payload)})
        if update.mask is None:  # under pairwise masks the size of the site's data stays at the site
            out[P.H_NUM_EXAMPLES] = trained.num_examples
        self._require(self._run_state).set(last_sent_values=update.n_values)
        self._keep_sent(info.round, payload)
        self._record(E.UPDATE_SENT, round=info.round, sha256=digest, size=len(payload), kind=P.UPDATE_KIND,
                     encrypted=self._encryption is not None, stages=self._require(self._chain).names)
        return payload

    def _release(self, message: Message) -> Message:
        """Return the decrypted final adapter, if this site's policy allows a plaintext release.

        Only the adapter this site just scored in the final evaluation, and only once: a server
        cannot use release to have a site decrypt anything else (say, one site's update).
        """
        header = message.header
        if not self._require(self._policy).allow_plaintext_release:
            raise PolicyError("this site's policy does not allow releasing the adapter in the clear")
        run_state = self._require(self._run_state)
        final_sha256 = run_state.get("final_global_sha256")
        if run_state.get("released") or final_sha256 is None:
            raise PolicyError("release refused: it comes only once, after this site's final evaluation")
        if header.get(P.H_PAYLOAD_SHA256) != final_sha256:
            raise PolicyError("release refused: the payload is not the final adapter this site evaluated")
        run_state.set(released=True)
        payload = encode_adapter(self._incoming_adapter(message, release=True))
        self._record(E.MODEL_RELEASED, adapter_sha256=sha256_hex(payload), released_to="server (job result)",
                     decided_by="site policy allow_plaintext_release")
        out = {P.H_JOB_ID: header[P.H_JOB_ID], P.H_ROUND: header[P.H_ROUND],
               P.H_PAYLOAD_SHA256: sha256_hex(payload), P.H_PAYLOAD_BYTES: len(payload)}
        if self._signer is not None:  # the released adapter becomes the job's model: the server checks who sent it
            out.update(self._signer.sign(release_statement(job_id=self.job_id, round_index=int(header[P.H_ROUND]),
                                                           site=self.site, payload=payload,
                                                           source_sha256=final_sha256)))
        return Message(header=out, payload=payload, audit_log=self._log_bytes())

    # -- helpers --------------------------------------------------------------------------------
    def _for_engine(self, adapter: AdapterState) -> AdapterState:
        """The adapter as this site's engine holds it: cut to the site's rank where its policy caps it."""
        return self._rank_cap.cut(adapter) if self._rank_cap else adapter

    def _round_info(self, header: dict[str, Any]) -> RoundInfo:
        return RoundInfo(job_id=str(header[P.H_JOB_ID]), round=int(header[P.H_ROUND]), site=self.site, task=header)

    def _reload_budget(self, dp: SiteDP) -> None:
        """Budgets site IT edits in the site policy take effect from the next round."""
        try:
            current = load_policy_for(site=self.site, site_config_dir=self.folders.local)
        except ZenfedError as err:
            self._record(E.ERROR, kind="policy_reload", message=f"kept the budget in force: {err}"[:500])
            return
        if dp.update_limits(current.privacy):
            self._record(E.POLICY_DECISION, decision="accepted", subject="privacy budget",
                         reason="site IT changed the budget; the new limits apply from this round",
                         max_epsilon_per_job=current.privacy.max_epsilon_per_job,
                         lifetime_epsilon=current.privacy.lifetime_epsilon)

    def _start_site_state(self, spec: JobSpec, *, fresh: bool) -> None:
        """Build the strategy and the personal layers, resumed from the state folder or afresh; then the chain.

        Raises:
            PolicyError: If a kept state file cannot be read (it names the file and what to do).
        """
        store = SiteStateStore(root=self.folders.root, spec=spec)
        if fresh:
            store.clear()  # the DPO reference too
            if self._preferences is not None:
                self._preferences.forget()
            self._started_fresh = True
        strategy = make_strategy(spec)
        store.resume(strategy)
        strategy.begin(self._initial)
        self._store, self._strategy = store, strategy
        self._personal = PersonalLayers(layers=spec.lora.personal_layers, initial_adapter=self._initial,
                                        folder=store.folder)
        self._chain = build_update_chain(dp=self._require(self._dp), encryption=self._encryption, strategy=strategy,
                                         audit=self._require(self._audit), signer=self._signer,
                                         masking=self._masking)

    def _keep_sent(self, rnd: int, payload: bytes) -> None:
        """Keep the site's own copy of what left it, named by round (the site's record, not the server's)."""
        if not self._require(self._policy).keep_sent_updates:
            return
        sent_dir = self.folders.run / "sent"
        sent_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        atomic_write_bytes(sent_dir / f"round-{rnd:04d}.bin", payload)  # 0600: the site's own record

    def _record(self, event: str, **fields: Any) -> None:
        if self._audit is not None:
            self._audit.record(event, **fields)

    def _log_bytes(self) -> bytes | None:
        """This site's own signed log, which the server keeps in the job result."""
        if self._audit is not None and self._audit.path is not None:
            return self._audit.path.read_bytes()
        return None

    @staticmethod
    def _require(value: _T | None) -> _T:
        if value is None:
            raise ZenfedError("the site session was used before the job was opened")
        return value
