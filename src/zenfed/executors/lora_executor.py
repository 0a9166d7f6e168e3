"""Site side of a federated LoRA job: policy check, evaluate, train, answer.

The executor runs the installed ``zenfed`` package; the job folder carries
configuration only. Data paths come from the site's own policy, never from
the job. Only the adapter (and metrics) leave the site.
"""

from __future__ import annotations

import random
from typing import Any

from nvflare.apis.executor import Executor
from nvflare.apis.fl_constant import ReturnCode
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import Shareable, make_reply
from nvflare.apis.signal import Signal

from zenfed import protocol as P
from zenfed.data.jsonl import Example, load_jsonl
from zenfed.engines import make_engine
from zenfed.engines.base import AdapterState, Engine
from zenfed.engines.base_model import resolve_base_model
from zenfed.errors import PolicyError, ZenfedError
from zenfed.executors.site_policy import check_job_allowed, load_policy_for
from zenfed.spec import JobSpec, SitePolicy, parse_model
from zenfed.wire import decode_adapter, encode_adapter, sha256_hex


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
        self._train: list[Example] = []
        self._valid: list[Example] = []

    def execute(
        self, task_name: str, shareable: Shareable, fl_ctx: FLContext, abort_signal: Signal
    ) -> Shareable:
        """Run one zenfed task; a policy refusal is answered, not raised."""
        if task_name not in (P.TASK_TRAIN, P.TASK_EVALUATE):
            return make_reply(ReturnCode.TASK_UNKNOWN)
        site = fl_ctx.get_identity_name()
        try:
            spec, policy = self._prepare(site, fl_ctx)
            header = shareable.get(P.KEY_HEADER)
            if not isinstance(header, dict) or header.get(P.H_SPEC_HASH) != spec.spec_hash():
                raise PolicyError("the task does not carry this job's spec hash; refusing it")
            adapter = self._incoming_adapter(shareable, header)
            return self._run(task_name, spec, header, adapter, site, abort_signal)
        except PolicyError as err:
            self.log_warning(fl_ctx, f"{site} refused {task_name}: {err}")
            reply = make_reply(ReturnCode.OK)
            reply[P.KEY_REFUSAL] = str(err)
            return reply
        except ZenfedError as err:
            self.log_error(fl_ctx, f"{site} failed {task_name}: {err}")
            return make_reply(ReturnCode.EXECUTION_EXCEPTION)

    # -- steps ----------------------------------------------------------------------------
    def _prepare(self, site: str, fl_ctx: FLContext) -> tuple[JobSpec, SitePolicy]:
        """Load the spec, the site policy, the data and the engine, once per job."""
        if self._spec is not None and self._policy is not None:
            return self._spec, self._policy
        spec = parse_model(
            JobSpec, self._spec_data, kind="job spec", source="the job's site config"
        )
        workspace = fl_ctx.get_engine().get_workspace()
        policy = load_policy_for(site=site, site_config_dir=workspace.get_site_config_dir())
        check_job_allowed(policy, spec)
        location = policy.dataset(spec.data.dataset)
        self._train = load_jsonl(location.path / location.train)
        valid = load_jsonl(location.path / location.valid)
        # A fixed, seeded subset keeps per-round evaluation cheap and comparable across rounds.
        random.Random(spec.training.seed).shuffle(valid)
        self._valid = valid[: spec.evaluation.max_examples]
        model_dir = resolve_base_model(spec.model.base)
        self._engine = make_engine(spec, model_dir=model_dir, threads=policy.torch_threads)
        self._spec, self._policy = spec, policy
        return spec, policy

    def _incoming_adapter(self, shareable: Shareable, header: dict[str, Any]) -> AdapterState:
        engine = self._require_engine()
        if not header.get(P.H_HAS_GLOBAL):
            return engine.initial_adapter()
        payload = shareable.get(P.KEY_PAYLOAD)
        if not isinstance(payload, bytes) or sha256_hex(payload) != header.get(P.H_PAYLOAD_SHA256):
            raise PolicyError(
                "the global adapter does not match the SHA-256 in its header; refusing it"
            )
        return decode_adapter(payload)

    def _run(
        self,
        task_name: str,
        spec: JobSpec,
        header: dict[str, Any],
        adapter: AdapterState,
        site: str,
        abort_signal: Signal,
    ) -> Shareable:
        engine = self._require_engine()
        rnd = int(header[P.H_ROUND])
        evaluation = engine.evaluate(
            adapter=adapter, examples=self._valid, max_new_tokens=spec.evaluation.max_new_tokens
        )
        out: dict[str, Any] = {
            P.H_JOB_ID: header[P.H_JOB_ID],
            P.H_ROUND: rnd,
            P.H_SITE: site,
            P.H_EVAL_LOSS: evaluation.loss,
            P.H_EVAL_ACCURACY: evaluation.accuracy,
            P.H_EVAL_EXAMPLES: evaluation.num_examples,
        }
        reply = make_reply(ReturnCode.OK)
        if task_name == P.TASK_TRAIN:
            if abort_signal.triggered:
                return make_reply(ReturnCode.TASK_ABORTED)
            # Each site and round draws its own batches, reproducibly.
            seed = spec.training.seed * 1_000_003 + rnd * 7919 + sum(site.encode())
            trained = engine.train(
                adapter=adapter, examples=self._train, steps=spec.training.local_steps, seed=seed
            )
            payload = encode_adapter(trained.adapter)
            out.update(
                {
                    P.H_NUM_EXAMPLES: trained.num_examples,
                    P.H_TRAIN_LOSS: trained.train_loss,
                    P.H_STEPS: trained.steps,
                    P.H_PAYLOAD_SHA256: sha256_hex(payload),
                    P.H_PAYLOAD_BYTES: len(payload),
                }
            )
            reply[P.KEY_PAYLOAD] = payload
        reply[P.KEY_HEADER] = out
        return reply

    def _require_engine(self) -> Engine:
        if self._engine is None:
            raise ZenfedError("engine used before the job was prepared")
        return self._engine
