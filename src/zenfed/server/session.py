"""The server's part of one job, without FLARE: rounds, attestation gate, aggregation, checkpoints, result.

Each round sends ``zenfed_train`` with the current global state (none in
round 1: every site starts from the same deterministic initialisation). A
site first evaluates the adapter it received on its validation split, then
trains, and answers with its update and both sets of metrics. Updates are
folded into one running sum as they arrive: in the clear or as CKKS
ciphertexts the server cannot read (``zenfed.server.aggregation``, chosen by
the job's strategy). After the last round ``zenfed_evaluate`` scores the
final adapter; under encryption it is released in the clear only if every
site's policy allows it.

The FLARE controller (``zenfed.controllers.round_controller``) only carries
tasks: it implements :class:`~zenfed.server.transport.Transport`.
"""

from __future__ import annotations

import logging
import math
import random
import shutil
import time
from pathlib import Path
from typing import Any

from zenfed import protocol as P
from zenfed.audit import events as E
from zenfed.audit.replay import REPLAY_CONTEXT, UPDATES_DIR
from zenfed.audit.sink import AuditSink
from zenfed.digest import sha256_hex
from zenfed.errors import ZenfedError
from zenfed.kit_files import KitFolders, find_kit_file
from zenfed.privacy.he import SERVER_CONTEXT_FILE
from zenfed.protocol import Message
from zenfed.server.aggregation import Aggregation, make_aggregation
from zenfed.server.attestation_gate import AttestationQuorumError, ServerAttestationGate
from zenfed.server.checkpoint import CheckpointStore, RunState
from zenfed.server.enrollment import Enrollment
from zenfed.server.intake import RoundIntake
from zenfed.server.masking import MaskedRounds
from zenfed.server.result import (
    RESULT_FILE,
    build_result,
    dpo_reference,
    round_record,
    round_summary,
    weighted_eval,
)
from zenfed.server.transport import SigningTransport, Transport
from zenfed.spec import JobSpec, parse_model
from zenfed.strategies import make_strategy
from zenfed.update_auth import ROOT_CA, UpdateSigner, UpdateVerifier

_log = logging.getLogger(__name__)


def find_server_context(folders: KitFolders) -> Path:
    """The server's public context: in its kit's startup/, or local/ in the simulator.

    Raises:
        ZenfedError: If there is none (the project was provisioned without encryption).
    """
    return find_kit_file(folders, startup=[SERVER_CONTEXT_FILE], local=[SERVER_CONTEXT_FILE],
                         what=f"the server's {SERVER_CONTEXT_FILE}",
                         hint="encryption is on; provision the project with encryption (ProjectSpec.encryption: true)")


class ServerSession:
    """The server's state for one job: started once, then :meth:`run` drives every round.

    Args:
        spec_data: The job spec as a dict (``JobSpec.model_dump(mode="json")``).
        job_id: The job's id.
        identity: The server's provisioned name (its audit log is named after it).
        folders: The server's kit folders and this job's run folder (the job result goes there).
        submitter: Who submitted the job, for the audit log.
    """

    def __init__(self, *, spec_data: dict[str, Any], job_id: str, identity: str, folders: KitFolders,
                 submitter: str = "unknown") -> None:
        self.spec: JobSpec = parse_model(JobSpec, spec_data, kind="job spec", source="the job's server config")
        self.job_id = job_id
        self.folders = folders
        self._identity = identity
        self._submitter = submitter
        self._round = 0
        self._global_round = 0  # rounds aggregated into the global that tasks carry
        self._dpo_reference: str | None = None  # SHA-256 of the global the DPO stage started from
        self._phase = "init"
        self._last_eval: dict[str, float] = {}
        self._audit = AuditSink(None)
        self._intake: RoundIntake | None = None
        self._server_evidence: dict[str, str] = {}
        self._attest_answers: dict[str, Any] = {}
        key = f"{self.spec.name}-{self.spec.spec_hash()[:16]}"
        self._checkpoints = CheckpointStore(folders.root / "zenfed-checkpoints" / key)
        self._strategy = make_strategy(self.spec)
        context = find_server_context(folders) if self.spec.encryption.enabled else None
        self.aggregation: Aggregation = make_aggregation(self._strategy, job_id=job_id, server_context=context)
        self._public_context = context
        self._gate: ServerAttestationGate | None = None
        pairwise = self.spec.encryption.secure_aggregation == "pairwise"
        self._masks = MaskedRounds(spec=self.spec, job_id=job_id) if pairwise else None
        self._enrollment = Enrollment(spec=self.spec, job_id=job_id)
        self._verifier: UpdateVerifier | None = None
        self._task_signer: UpdateSigner | None = None
        # Where the sites, not the server, hold the global (a site-side optimizer, personal layers),
        # the final adapter comes from a site even in a job in the clear.
        self._global_at_sites = self._strategy.global_at_sites or bool(self.spec.lora.personal_layers)

    def start(self, *, sites: list[str]) -> None:
        """Open the audit log and the attestation gate; record the job's start."""
        out_dir = self.folders.run
        out_dir.mkdir(parents=True, exist_ok=True)
        self._audit = AuditSink.for_participant(
            startup_dir=self.folders.startup, participant=self._identity,
            log_path=out_dir / "audit" / f"{self._identity}.jsonl",
        )
        self._gate = ServerAttestationGate(spec=self.spec, workspace_root=self.folders.root, audit=self._audit)
        if self._public_context is not None:  # public parameters, so that anyone can re-add the kept updates
            kept = out_dir / UPDATES_DIR
            kept.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(self._public_context, kept / REPLAY_CONTEXT)
        verifier = self._verifier = UpdateVerifier.from_kit(self.folders.startup)
        if self._masks is not None:
            self._masks.open(verifier=verifier, audit=self._audit)
        if verifier is None:
            _log.warning("no %s in the server kit (simulator?): site signatures are not checked", ROOT_CA)
        self._task_signer = UpdateSigner.from_kit(self.folders.startup, stem="server")
        if self._task_signer is None:
            _log.warning("no server.key in the server kit (simulator?): tasks go to the sites unsigned")
        self._enrollment.open(self._audit, verifier)
        self._intake = RoundIntake(spec=self.spec, job_id=self.job_id, out_dir=out_dir, audit=self._audit,
                                   aggregation=self.aggregation, verifier=verifier)
        self._audit.record(E.JOB_SUBMITTED, job=self.spec.name, job_id=self.job_id, submitter=self._submitter,
                           spec_sha256=self.spec.spec_hash())
        self._audit.record(E.JOB_DEPLOYED, job_id=self.job_id, sites=sorted(sites), aggregation=self.aggregation.method)
        self._audit.record(E.JOB_STARTED, job_id=self.job_id)

    def close(self) -> None:
        """Mark the workflow finished and close the audit log."""
        self._phase = "finished"
        self._audit.close()

    def progress(self) -> dict[str, Any]:
        """Return the job's progress as plain data (``zenfed submit`` draws its progress bar from it)."""
        answered = len(self._intake.sites) if self._intake else 0
        return {
            "phase": self._phase, "round": self._round, "rounds": self.spec.federation.rounds,
            "sites_answered": answered, "eval_loss": self._last_eval.get("eval_loss"),
            "accuracy": self._last_eval.get("accuracy"),
        }

    def site_lost(self, site: str, reason: str, *, remaining: int) -> None:
        """Record, once, that a site's job process is gone: later rounds go on without it.

        If fewer than ``min_sites`` remain, also record that the job stops (the carrier stops it;
        the checkpoint of the last finished round is kept).

        Args:
            site: The site.
            reason: What the carrier saw (e.g. FLARE's dead-job report and its grace period).
            remaining: Sites still in the job.
        """
        _log.warning("site lost in round %d: %s", self._round, reason)
        if self._phase == "finished":  # after the job: its audit log is closed
            return
        self._audit.record(E.ERROR, kind="site_lost", site=site, round=self._round, message=reason)
        needed = self.spec.federation.min_sites
        if remaining < needed:
            text = (f"round {self._round}: {site} was lost and only {remaining} site(s) remain, fewer than "
                    f"min_sites={needed}; the job stops, keeping the checkpoint after round {self._global_round}")
            self._audit.record(E.ERROR, kind="too_few_sites", round=self._round, message=text)

    # -- the workflow --------------------------------------------------------------------------
    def run(self, transport: Transport) -> None:
        """Run the rounds, resuming from a checkpoint if one exists, then evaluate, release, write the result."""
        spec, store = self.spec, self._checkpoints
        if self._task_signer is not None:  # every task from here on is numbered and signed, every answer checked
            transport = SigningTransport(transport, signer=self._task_signer, job_id=self.job_id,
                                         verifier=self._verifier)
        state = store.load() or RunState()
        if state.finished:
            state = RunState()  # A finished run of the same spec starts afresh.
        elif state.completed_round:
            _log.info("resuming %s after round %d", spec.name, state.completed_round)
            self._keep_previous_logs(state)
        global_state = (
            self.aggregation.from_checkpoint(state.global_payload, state.global_meta)
            if state.global_payload is not None else None
        )
        self._global_round = state.completed_round
        self._dpo_reference = dpo_reference(spec, state.history)  # a resumed job's DPO stage keeps its reference
        for rnd in range(state.completed_round + 1, spec.federation.rounds + 1):
            self._round, self._phase = rnd, "train"
            started = time.time()
            if not self._attest(rnd, transport):
                return
            if not self._enrollment.collected and not self._enrollment.collect(
                    transport, sites=self._eligible(transport), evidence=self._server_evidence,
                    keep_log=self._require_intake().keep_site_log):
                return
            if self._masks is not None and not self._masks.keys_collected and not self._masks.collect_keys(
                    transport, sites=self._eligible(transport), round_index=rnd, evidence=self._server_evidence):
                return
            new_global = self._run_round(P.TASK_TRAIN, global_state, transport)
            if new_global is None:
                return
            intake = self._require_intake()
            state.history.append(round_record(rnd, started, self.aggregation, intake.sites, new_global,
                                              objective=spec.objective_for_round(rnd)))
            global_state = new_global
            self._dpo_reference = dpo_reference(spec, state.history)
            state.global_payload, state.global_meta = self.aggregation.to_checkpoint(new_global)
            state.completed_round = self._global_round = rnd
            own_audit = str(self.folders.run / "audit")
            if own_audit not in state.audit_dirs:
                state.audit_dirs.append(own_audit)
            store.save(state)
            _log.info("round %d/%d done: %s", rnd, spec.federation.rounds, round_summary(state.history[-1]))
        self._round, self._phase = spec.federation.rounds, "evaluate"
        if self._run_round(P.TASK_EVALUATE, global_state, transport) is None:
            return
        intake = self._require_intake()
        final_eval, final_sites = weighted_eval(intake.sites), dict(intake.sites)
        released = self._release(global_state, final_sites, transport)
        state.finished = True
        store.save(state)
        self._write_result(state, global_state, released, final_eval, final_sites)
        self._phase = "done"

    def _keep_previous_logs(self, state: RunState) -> None:
        """Copy the audit logs of the runs whose rounds this one resumes into ``audit/previous/``; pin their heads.

        A resumed job's result then holds its whole audit trail from round 1, and its log links to the
        earlier server logs by the hash of their last records.
        """
        previous = []
        for index, folder in enumerate(Path(d) for d in state.audit_dirs):
            if folder == self.folders.run / "audit" or not folder.is_dir():
                continue
            job = folder.parent.parent.name  # RUN_ROOT/JOB_ID/zenfed/audit
            target = self.folders.run / "audit" / "previous" / f"{index:02d}-{job}"
            target.mkdir(parents=True, exist_ok=True)
            for log in sorted(folder.glob("*.jsonl")):
                shutil.copyfile(log, target / log.name)
            server_log = folder / f"{self._identity}.jsonl"
            lines = server_log.read_bytes().rstrip(b"\n").split(b"\n") if server_log.is_file() else []
            if lines and lines[0]:
                previous.append({"job": job, "file": f"previous/{target.name}/{server_log.name}",
                                 "seq": len(lines) - 1, "sha256": sha256_hex(lines[-1])})
        self._audit.record(E.JOB_RESUMED, after_round=state.completed_round, previous=previous)

    def _attest(self, rnd: int, transport: Transport) -> bool:
        """Collect fresh evidence from every site when the gate asks for it; False if the job must stop."""
        gate = self._gate
        if gate is None or not gate.needed(rnd):
            return True
        self._phase = "attest"
        sites = sorted(transport.sites())
        self._attest_answers = {}
        challenge = Message(attest=gate.challenge(sites=sites, round=rnd))
        if not transport.broadcast(task=P.TASK_ATTEST, message=challenge, targets=sites, min_responses=len(sites),
                                   timeout_s=gate.timeout_s, wait_after_min_s=0, on_result=self._on_attest):
            return False
        admitted, _ = gate.verify(dict(self._attest_answers))
        try:
            gate.enforce_quorum(admitted)
        except AttestationQuorumError as err:
            transport.stop(f"attestation: {err}")
            return False
        self._server_evidence = gate.server_evidence()
        excluded = sorted(set(sites) - set(admitted))
        if excluded:
            _log.warning("round %d: excluded by attestation: %s", rnd, ", ".join(excluded))
        self._phase = "train"
        return True

    def _eligible(self, transport: Transport) -> list[str]:
        everyone = sorted(transport.sites())
        return self._gate.eligible(everyone) if self._gate else everyone

    def _on_attest(self, site: str, answer: Message) -> None:
        """Keep a site's attestation answer (or its refusal) for the gate to verify."""
        if answer.status != P.STATUS_OK:
            self._attest_answers[site] = P.answer_error(answer)
            self._require_intake().keep_site_log(site, answer)
            return
        self._attest_answers[site] = answer.attest or answer.refusal
        self._require_intake().keep_site_log(site, answer)

    def _run_round(self, task: str, global_state: Any, transport: Transport, targets: list[str] | None = None,
                   min_sites: int | None = None) -> Any:
        """Send one task; return the new global state (train), True (others), or None if the job stops."""
        spec, intake = self.spec, self._require_intake()
        header, payload = self.aggregation.task_payload(global_state)
        header.update({P.H_JOB_ID: self.job_id, P.H_ROUND: self._round, P.H_SPEC_HASH: spec.spec_hash(),
                       P.H_HAS_GLOBAL: global_state is not None, P.H_GLOBAL_ROUND: self._global_round,
                       P.H_OBJECTIVE: spec.objective_for_round(self._round)})
        if payload is not None:
            header[P.H_PAYLOAD_SHA256], header[P.H_PAYLOAD_BYTES] = sha256_hex(payload), len(payload)
        if header[P.H_OBJECTIVE] == "dpo" and self._dpo_reference is not None:
            header[P.H_DPO_REFERENCE] = self._dpo_reference  # sites check the reference they kept against it
        message = Message(header=header, payload=payload, server_evidence=self._server_evidence or None)
        intake.begin(task=task, round_index=self._round, sent_sha256=header.get(P.H_PAYLOAD_SHA256))
        targets = targets or self._eligible(transport)
        keep = None
        if task == P.TASK_TRAIN:
            targets, keep = self._cohort(targets)
            intake.keep_first = keep
            header[P.H_COHORT] = list(targets)  # announced to the sites (pairwise masks fix it further)
            if len(targets) < spec.federation.min_sites:
                excluded = "; ".join(f"{site}: {why}" for site, why in self._enrollment.excluded().items())
                text = (f"round {self._round}: only {len(targets)} site(s) meet the job's cohort requirements, "
                        f"fewer than min_sites {spec.federation.min_sites}"
                        + (f" (excluded: {excluded})" if excluded else ""))
                self._audit.record(E.ERROR, kind="too_few_sites", round=self._round, message=text[:3000])
                transport.stop(f"{text}; stopping the job")
                return None
            if self._masks is not None and not self._masks.fix_cohort(targets, header, round_index=self._round,
                                                                      transport=transport):
                return None
        needed = spec.federation.min_sites if min_sites is None else min_sites
        self._audit.record(E.ROUND_STARTED, round=self._round, task=task, sites=targets,
                           objective=header[P.H_OBJECTIVE])
        if not transport.broadcast(task=task, message=message, targets=targets,
                                   min_responses=keep or min(needed, len(targets)),
                                   timeout_s=spec.federation.task_timeout_s,
                                   wait_after_min_s=0 if keep else self._straggler_grace_s(), on_result=intake.accept):
            return None
        lost = transport.lost()
        for site in sorted(set(targets) - intake.responded):
            why = f": {lost[site]}" if site in lost else (
                f" among the first {keep} of the {len(targets)} over-selected sites") if keep else (
                f" (crashed, hung or cut off: not within {self._straggler_grace_s()} s after {needed} site(s) "
                f"answered, or the task timeout of {spec.federation.task_timeout_s} s)")
            reason = f"{site} did not answer {task} in round {self._round}{why}; the round went on without it"
            _log.warning(reason)
            self._audit.record(E.ERROR, kind="no_answer", site=site, round=self._round, task=task, message=reason)
        if intake.answered < needed:
            text = f"round {self._round}: only {intake.answered} site(s) answered {task}, fewer than {needed}"
            self._audit.record(E.ERROR, kind="too_few_sites", round=self._round, message=text)
            transport.stop(f"{text}; stopping the job")
            return None
        if task == P.TASK_RELEASE:
            return True
        dropped = sorted(set(targets) - set(self.aggregation.contributors))
        if task == P.TASK_TRAIN and self._masks is not None and dropped and not self._masks.recover(
                dropped, intake=intake, round_index=self._round, evidence=self._server_evidence, transport=transport):
            return None
        self._last_eval = weighted_eval(intake.sites)
        self._audit.record(E.EVALUATED, round=self._round - 1 if task == P.TASK_TRAIN else self._round,
                           scope="federated", metrics={k: float(v) for k, v in self._last_eval.items()})
        if task == P.TASK_EVALUATE:
            self._audit.record(E.ROUND_ENDED, round=self._round, task=task)
            return True
        new_global = self.aggregation.result()
        if not self.aggregation.encrypted:
            new_global = self._strategy.combine(new_global)
        self._audit.record(
            E.AGGREGATED, round=self._round, inputs=sorted(intake.update_hashes),
            output=self.aggregation.digest(new_global), method=self.aggregation.method,
            total_weight=self.aggregation.total_weight,
            **({"corrections": sorted(intake.correction_hashes)} if intake.correction_hashes else {}),
        )
        self._audit.record(E.ROUND_ENDED, round=self._round, task=task,
                           contributors=sorted(self.aggregation.contributors))
        return new_global

    def _straggler_grace_s(self) -> int:
        """Seconds a task waits for the rest once ``min_sites`` answered (``straggler_grace_s``)."""
        grace = self.spec.federation.straggler_grace_s
        return self.spec.federation.task_timeout_s if grace is None else min(grace, self.spec.federation.task_timeout_s)

    def _cohort(self, eligible: list[str]) -> tuple[list[str], int | None]:
        """The sites asked to train this round, and how many updates to keep (None: all).

        Those meeting the cohort requirements, or ``cohort_fraction`` of them (at least ``min_sites``),
        drawn from the job's seed and the round, so the same job picks the same cohorts; recorded in
        ``round_started``. With ``over_selection`` s, s more sites are asked than the round keeps
        (with a fraction of 1, the round keeps all but s answers, at least ``min_sites``): the first
        answers are used and the stragglers' are not. Sites outside the cohort get no task this round;
        the first DPO round of a ``dpo`` job asks every eligible site, so that each holds the stage's reference.
        """
        fed = self.spec.federation
        eligible = self._enrollment.match(eligible)
        # The first DPO round asks every site: each keeps the adapter it starts from as its DPO reference.
        if fed.cohort_fraction >= 1 or self._round == self.spec.dpo_start_round:
            keep = max(fed.min_sites, len(eligible) - fed.over_selection)
            return eligible, (keep if keep < len(eligible) else None)
        size = min(len(eligible), max(fed.min_sites, math.ceil(fed.cohort_fraction * len(eligible))))
        asked = min(len(eligible), size + fed.over_selection)
        draw = random.Random(f"zenfed-cohort:{self.spec.training.seed}:{self._round}")
        return sorted(draw.sample(sorted(eligible), asked)), (size if size < asked else None)

    def _release(self, global_state: Any, final_sites: dict[str, dict[str, Any]], transport: Transport) -> Any:
        """Return the final adapter in the clear, if allowed; under encryption ask one site to decrypt it."""
        if not self.aggregation.encrypted and not self._global_at_sites:
            return global_state
        refusing = sorted(s for s, m in final_sites.items() if not m.get("release_ok"))
        if refusing or not final_sites:
            self._audit.record(E.POLICY_DECISION, decision="refused", subject="plaintext release",
                               reason=f"site policies of {', '.join(refusing) or 'no site'} do not allow it")
            return None
        self._phase, chosen = "release", sorted(final_sites)[0]
        self._run_round(P.TASK_RELEASE, global_state, transport, targets=[chosen], min_sites=1)
        released = self._require_intake().released
        if released is not None:
            self._audit.record(E.POLICY_DECISION, decision="accepted", subject="plaintext release",
                               reason=f"all {len(final_sites)} site policies allow it; decrypted by {chosen}")
        return released

    def _write_result(self, state: RunState, global_state: Any, released: Any, final_eval: dict[str, float],
                      final_sites: dict[str, dict[str, Any]]) -> None:
        """Write ``zenfed_result.json`` and, if released, the final adapter as a PEFT folder."""
        result = build_result(
            spec=self.spec, job_id=self.job_id, out_dir=self.folders.run, history=state.history,
            final_eval=final_eval, final_sites=final_sites, released=released,
            global_sha256=self.aggregation.digest(global_state), aggregation=self.aggregation.method,
            base_model_sha256=self._require_intake().base_model_sha256,
        )
        if released is not None:
            self._audit.record(
                E.MODEL_RELEASED, adapter_sha256=result["final"]["adapter_sha256"], released_to="job result (adapter/)",
                decided_by="site policies (all allow)" if self.aggregation.encrypted or self._global_at_sites
                else "job spec: aggregation in the clear",
            )
        # The closing record: a log cut from its end loses it, and it pins the result file.
        result_bytes = (self.folders.run / RESULT_FILE).read_bytes()
        self._audit.record(E.JOB_FINISHED, job_id=self.job_id, rounds=len(state.history),
                           result_sha256=sha256_hex(result_bytes))

    def _require_intake(self) -> RoundIntake:
        if self._intake is None:
            raise ZenfedError("the server session was used before start()")
        return self._intake
