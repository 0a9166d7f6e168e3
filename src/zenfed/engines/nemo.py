"""The NeMo engine: LoRA fine-tuning with NVIDIA NeMo 2.x (``nemo.collections.llm``).

Training goes through NeMo's own fine-tuning entry point, ``llm.api.finetune``,
with ``llm.HFAutoModelForCausalLM`` (a Lightning module around a Hugging Face
causal LM), ``llm.peft.LoRA`` and a NeMo ``Trainer``. What this engine adds:

* The model is built once and reused across rounds: NeMo rebuilds it from disk
  on every ``fit`` (and prints a deprecation notice that sleeps 2 s on every
  construction), so ``_ReusableHFModel`` skips ``configure_model`` once built.
* Adapters enter and leave in HF PEFT naming (``nemo_keys``), so NeMo and PEFT
  sites aggregate together. LoRA scale is ``alpha / rank`` in both, and dropout
  is applied to the layer input as PEFT does.
* Batches come from the same tokenisation and seeded plan as the PEFT engine
  (``nemo_data``).
* Hardware is the site's choice, from its policy (``hardware``, ``nemo_runtime``).
"""

from __future__ import annotations

import copy
import logging
import math
import os
import shutil
import tempfile
import time
import weakref
from collections.abc import Callable, Collection, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch

from zenfed.data.jsonl import Example, exact_match
from zenfed.data.tokenize import tokenize_all
from zenfed.engines.architectures import resolve_target_modules
from zenfed.engines.base import (
    EvalResult,
    TrainResult,
    before_step_hook,
    frozen_tensors,
    site_optimizer,
)
from zenfed.engines.dp_training import train_dp
from zenfed.engines.dpo import PreferenceMethods
from zenfed.engines.generation import EVAL_BATCH, greedy_generate
from zenfed.engines.hardware import Hardware, HardwareError
from zenfed.engines.lora_init import check_layers, deterministic_init, nemo_target_patterns
from zenfed.engines.nemo_data import PlannedDataModule, batch_plan, nemo_batch
from zenfed.engines.nemo_keys import is_nemo_lora_name, nemo_to_peft_name, nemo_to_peft_state, peft_to_nemo_state
from zenfed.engines.nemo_runtime import NemoRuntime
from zenfed.errors import DataError, ModelError
from zenfed.spec import LoraSpec, TrainingSpec
from zenfed.types import AdapterState, LossTerm, RecordDP, check_compatible

# NeMo logs INFO to stdout by default; a site process's stdout may be machine-read (CLI --json),
# so send NeMo's logs to stderr unless the site chose otherwise. Effective if set before NeMo loads.
os.environ.setdefault("NEMO_REDIRECT_LOGS_TO_STDERR", "1")


class _StepRecorder(pl.Callback):
    """Records each optimizer step's loss and wall time inside NeMo's loop; runs a strategy's term before it."""

    def __init__(self, *, before_step: Callable[[], None] | None = None) -> None:
        super().__init__()
        self.losses: list[float] = []
        self.seconds: list[float] = []
        self._start = 0.0
        self._before_step = before_step

    def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
        if self._before_step is not None:
            self._before_step()

    def on_train_batch_start(
        self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int
    ) -> None:
        self._start = time.perf_counter()

    def on_train_batch_end(
        self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self.seconds.append(time.perf_counter() - self._start)
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        self.losses.append(float(loss.detach()))


def _reusable_model_class() -> type:
    from nemo.collections import llm

    class _ReusableHFModel(llm.HFAutoModelForCausalLM):  # type: ignore[misc, name-defined]
        """``HFAutoModelForCausalLM`` that keeps its (LoRA-wrapped) model across fits."""

        def configure_model(self) -> None:
            if self.model is None:
                super().configure_model()

    return _ReusableHFModel


def _drop_file_handlers(log_dir: Path) -> None:
    """Close the log files NeMoLogger opened under ``log_dir`` (it adds new ones every run)."""
    for name in ("nemo_logger", "megatron.core"):
        logger = logging.getLogger(name)
        for handler in list(logger.handlers):
            path = getattr(handler, "baseFilename", "")
            if path and Path(path).is_relative_to(log_dir):
                logger.removeHandler(handler)
                handler.close()


class NemoEngine(PreferenceMethods):
    """Trains and evaluates LoRA adapters with NeMo. Builds the model once and reuses it."""

    name = "nemo"

    def __init__(
        self,
        *,
        model_dir: Path,
        lora: LoraSpec,
        training: TrainingSpec,
        threads: int = 0,
        hardware: Hardware | None = None,
        runtime: NemoRuntime | None = None,
    ):
        """Create the engine; the model loads on first use.

        Args:
            model_dir: A Hugging Face model folder (config, weights, tokenizer).
            lora: The job's LoRA shape.
            training: The job's local-training settings.
            threads: CPU threads for torch (0 leaves torch's default).
            hardware: The site's device and precision (default: CPU, fp32).
            runtime: The Lightning settings; default ``NemoRuntime.for_site(hardware)``.

        Raises:
            HardwareError: For 8-bit loading, which NeMo's Hugging Face path does not offer.

        """
        self.model_dir = Path(model_dir)
        self.lora = lora
        self.training = training
        self.hardware = hardware or Hardware()
        if self.hardware.quantization == "8bit":
            raise HardwareError("the nemo engine loads a base model in 4 bits or in full, not in 8 bits; "
                                "set base_quantization: 4bit or none, or train this site with engine: peft")
        self.runtime = runtime if runtime is not None else NemoRuntime.for_site(self.hardware)
        if threads > 0:
            torch.set_num_threads(threads)
        self._module: Any = None
        self._peft: Any = None
        self._tokenizer: Any = None
        self._template: AdapterState = {}
        self._init: AdapterState | None = None
        self._log_dir = Path(tempfile.mkdtemp(prefix="zenfed-nemo-"))
        weakref.finalize(self, shutil.rmtree, self._log_dir, True)

    # -- loading ---------------------------------------------------------------------------
    def _trainer(self, **kwargs: Any) -> Any:
        from nemo import lightning as nl

        return nl.Trainer(
            **self.runtime.trainer_kwargs(), logger=False, enable_checkpointing=False,
            enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
            limit_val_batches=0, use_distributed_sampler=False, **kwargs,
        )

    def _load(self) -> None:
        if self._module is not None:
            return
        from nemo.collections import llm
        from transformers import AutoTokenizer

        if not (self.model_dir / "config.json").is_file():
            raise ModelError(f"cannot load base model from {self.model_dir}: no config.json there")
        try:
            tokenizer = AutoTokenizer.from_pretrained(self.model_dir)
        except (OSError, ValueError) as err:
            raise ModelError(f"cannot load the tokenizer from {self.model_dir}: {err}") from err
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        from transformers import AutoConfig

        try:
            model_config = AutoConfig.from_pretrained(self.model_dir)
        except (OSError, ValueError) as err:
            raise ModelError(f"cannot read the model config in {self.model_dir}: {err}") from err
        check_layers(self.lora, model_config, model_dir=self.model_dir)
        targets = resolve_target_modules(self.lora.target_modules, model_config, model_dir=self.model_dir)
        peft = llm.peft.LoRA(
            target_modules=nemo_target_patterns(self.lora, targets), dim=self.lora.rank,
            alpha=self.lora.alpha, dropout=self.lora.dropout, dropout_position="pre",
            lora_dtype=torch.float32,  # master weights, whatever the base is loaded in
        )
        peft._add_via_setattr = True  # what NeMo's PEFT callback sets for HF models
        module = _reusable_model_class()(
            # Lightning's mixed precision keeps float32 weights; 4-bit loading computes in bfloat16.
            model_name=str(self.model_dir),
            default_dtype=torch.bfloat16 if self.hardware.quantization == "4bit" else torch.float32,
            load_in_4bit=self.hardware.quantization == "4bit",
            use_linear_ce_loss=False, model_transform=peft,
        )
        # NeMo builds the model inside fit; build it now, once, with a trainer attached.
        module.trainer = self._trainer(max_steps=1)
        try:
            module.configure_model()
        except (OSError, ValueError) as err:
            raise ModelError(f"cannot load base model from {self.model_dir}: {err}") from err
        finally:
            module.trainer = None
        if self.hardware.gradient_checkpointing:
            # NeMo's own switch is reentrant checkpointing, under which LoRA weights inside a
            # checkpointed layer whose input needs no gradient would get none.
            module.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        lora_params = {n: p for n, p in module.named_parameters() if is_nemo_lora_name(n)}
        if not lora_params:
            raise ModelError(
                f"LoRA target modules {list(targets)} match no linear layer "
                f"of {self.model_dir}; use names like q_proj, v_proj"
            )
        for name, param in module.named_parameters():
            param.requires_grad_(name in lora_params)
        for sub in module.modules():
            if hasattr(sub, "lora_a"):
                sub.dropout_position = "pre"  # PEFT's placement: dropout on the layer input
        module.eval()
        self._tokenizer, self._peft, self._module = tokenizer, peft, module
        self._template = self.adapter_state()
        self._init = deterministic_init(self._template, seed=self.training.seed)

    @property
    def tokenizer(self) -> Any:
        """The model's tokenizer (Hugging Face)."""
        self._load()
        return self._tokenizer

    @property
    def module(self) -> Any:
        """The NeMo Lightning module (``HFAutoModelForCausalLM`` with LoRA)."""
        self._load()
        return self._module

    def _preference_model(self) -> Any:
        # DPO runs in zenfed's loop on the HF module NeMo wraps (as DP-SGD does): NeMo 2.5's
        # fine-tuning recipes have no preference objective for Hugging Face models.
        module = self.module
        module.to(self._device())
        return module.model

    def _lora_params(self) -> dict[str, torch.nn.Parameter]:
        """The LoRA parameters under their wire (HF PEFT) names."""
        return {nemo_to_peft_name(name): param for name, param in self._module.named_parameters()
                if is_nemo_lora_name(name)}

    def adapter_state(self) -> AdapterState:
        """Return the model's current adapter, as it travels on the wire (HF PEFT names)."""
        self._load()
        return nemo_to_peft_state(dict(self._module.named_parameters()))

    def load_adapter(self, adapter: AdapterState) -> None:
        """Load ``adapter`` (HF PEFT names) into the NeMo model, after checking names and shapes."""
        self._load()
        check_compatible(self._template, adapter, what="the global adapter")
        params = dict(self._module.named_parameters())
        with torch.no_grad():
            for name, tensor in peft_to_nemo_state(adapter).items():
                params[name].copy_(tensor)

    def _device(self) -> torch.device:
        return self.hardware.device

    # -- the protocol ----------------------------------------------------------------------
    def initial_adapter(self) -> AdapterState:
        """Return the deterministic initial adapter (see ``lora_init``), as the PEFT engine does."""
        self._load()
        if self._init is None:
            raise ModelError("the model loaded without an initial adapter; reload the engine")
        return {k: v.clone() for k, v in self._init.items()}

    def train(
        self, *, adapter: AdapterState, examples: Sequence[Example], steps: int, seed: int,
        dp: RecordDP | None = None, optimizer_state: Any = None, loss_term: LossTerm | None = None,
        frozen: Collection[str] = (),
    ) -> TrainResult:
        """Train ``steps`` AdamW steps from ``adapter`` on ``examples`` via ``llm.api.finetune``.

        With ``dp`` set, the steps are DP-SGD on the HF module NeMo wraps (its LoRA layers
        are NeMo's). A DP step needs a Poisson batch (of varying size, possibly empty) and
        its clipped, noised gradient in place before the optimizer steps; NeMo's data module
        and fit loop draw fixed-size shuffled batches, so DP steps run in zenfed's own loop
        on the same module, optimizer and data (see ``engines/dp_training.py``).

        ``optimizer_state`` carries the site's AdamW moments from round to round under DP,
        where zenfed's loop owns the optimizer, as the PEFT engine does. Plain training does
        not take it: NeMo's fit builds its optimizer each round, so it restarts AdamW.
        ``loss_term`` adds its gradient before every optimizer step, in either loop; ``frozen``
        tensors keep their values (their gradient is cleared before each step, whatever NeMo's
        PEFT transform does to ``requires_grad``).
        """
        if not examples:
            raise DataError("no training examples; check the site's dataset")
        if steps < 1:
            raise DataError(f"steps={steps}; train at least one step")
        self.load_adapter(adapter)
        params = self._lora_params()
        with frozen_tensors(params, frozen):
            return self._train(examples, steps=steps, seed=seed, dp=dp, optimizer_state=optimizer_state,
                               before_step=before_step_hook(params, loss_term=loss_term, frozen=frozen))

    def _train(self, examples: Sequence[Example], *, steps: int, seed: int, dp: RecordDP | None,
               optimizer_state: Any, before_step: Callable[[], None] | None) -> TrainResult:
        from nemo import lightning as nl
        from nemo.collections import llm
        from nemo.lightning.pytorch.optim import PytorchOptimizerModule

        data = tokenize_all(self._tokenizer, examples, max_len=self.training.seq_len)
        if dp is not None:
            hf_model = self._module.model
            hf_model.to(self._device())
            optimizer = site_optimizer(hf_model, learning_rate=self.training.learning_rate, state=optimizer_state)
            loss, metrics = train_dp(hf_model, data=data, optimizer=optimizer, steps=steps, dp=dp,
                                     pad_id=self._tokenizer.pad_token_id, chunk_size=self.training.batch_size,
                                     before_step=before_step, hardware=self.hardware)
            return TrainResult(adapter=self.adapter_state(), num_examples=len(examples), steps=steps,
                               train_loss=loss, metrics=metrics,
                               optimizer_state=copy.deepcopy(optimizer.state_dict()))
        plan = batch_plan(len(data), batch_size=self.training.batch_size, steps=steps, seed=seed)
        datamodule = PlannedDataModule(
            data=data, plan=plan, pad_id=self._tokenizer.pad_token_id, seq_len=self.training.seq_len
        )
        recorder = _StepRecorder(before_step=before_step)
        trainer = self._trainer(max_steps=steps, callbacks=[recorder])
        adamw = partial(torch.optim.AdamW, lr=self.training.learning_rate, weight_decay=0.0)
        optim = PytorchOptimizerModule(optimizer_fn=adamw)
        log = nl.NeMoLogger(
            log_dir=str(self._log_dir), name="train", use_datetime_version=False, ckpt=None,
            update_logger_directory=False,
        )
        try:
            llm.api.finetune(
                model=self._module, data=datamodule, trainer=trainer, log=log, optim=optim,
                peft=self._peft, tokenizer=None,
            )
        finally:
            _drop_file_handlers(self._log_dir)
            self._module.eval()
        if len(recorder.losses) != steps:
            raise ModelError(
                f"NeMo ran {len(recorder.losses)} of {steps} steps; see the NeMo log above"
            )
        losses = recorder.losses
        return TrainResult(
            adapter=self.adapter_state(), num_examples=len(examples), steps=steps,
            train_loss=sum(losses) / len(losses),
            metrics={
                "train_loss_last": losses[-1],
                "step_s_mean": sum(recorder.seconds) / len(recorder.seconds),
            },
        )

    @torch.no_grad()
    def evaluate(
        self, *, adapter: AdapterState, examples: Sequence[Example], max_new_tokens: int
    ) -> EvalResult:
        """Return token-weighted response loss (NeMo's loss function) and exact-match accuracy."""
        if not examples:
            raise DataError("no evaluation examples; check the site's validation file")
        self.load_adapter(adapter)
        module, tokenizer, device = self._module, self._tokenizer, self._device()
        module.to(device).eval()
        data = tokenize_all(tokenizer, examples, max_len=self.training.seq_len)
        total, tokens = 0.0, 0
        for start in range(0, len(data), EVAL_BATCH):
            chunk = nemo_batch(data[start:start + EVAL_BATCH], pad_id=tokenizer.pad_token_id)
            batch = {k: v.to(device) for k, v in chunk.items()}
            labels = batch.pop("labels")
            count = int((labels != -100).sum())
            if count == 0:
                continue
            with self.hardware.autocast():
                logits = module.forward(batch).logits.float()
            loss = module.loss_fn(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1))
            total += float(loss) * count
            tokens += count
        predictions = self._generate_loaded(examples, max_new_tokens)
        accuracy = exact_match(predictions, [e.response for e in examples])
        loss = total / tokens if tokens else math.nan
        return EvalResult(loss=loss, accuracy=accuracy, num_examples=len(examples))

    @torch.no_grad()
    def generate(
        self, *, adapter: AdapterState, prompts: Sequence[Example], max_new_tokens: int
    ) -> list[str]:
        """Return greedy completions of ``prompts`` under ``adapter``."""
        self.load_adapter(adapter)
        return self._generate_loaded(prompts, max_new_tokens)

    def _generate_loaded(self, prompts: Sequence[Example], max_new_tokens: int) -> list[str]:
        self._module.to(self._device())
        return greedy_generate(self._module.model, self._tokenizer, prompts, max_new_tokens=max_new_tokens,
                               hardware=self.hardware)
