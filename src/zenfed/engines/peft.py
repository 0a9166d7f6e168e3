"""The reference engine: LoRA with Hugging Face PEFT on a transformers causal LM."""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Collection, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from zenfed.data.jsonl import Example, exact_match
from zenfed.data.tokenize import (
    TokenizedExample,
    collate,
    tokenize_all,
)
from zenfed.engines.architectures import resolve_target_modules
from zenfed.engines.base import (
    EvalResult,
    TrainResult,
    before_step_hook,
    frozen_tensors,
    optimizer_step,
    site_optimizer,
    to_wire,
)
from zenfed.engines.dp_training import train_dp
from zenfed.engines.dpo import PreferenceMethods
from zenfed.engines.generation import EVAL_BATCH, greedy_generate
from zenfed.engines.hardware import Hardware, quantization_config
from zenfed.engines.lora_init import check_layers, deterministic_init
from zenfed.errors import DataError, ModelError
from zenfed.spec import LoraSpec, TrainingSpec
from zenfed.types import AdapterState, LossTerm, RecordDP, check_compatible

# Examples per forward and backward pass: larger batches are split and their gradients
# accumulated, because 128 SmolLM2 examples at once took more than 24 GB.
MICRO_BATCH = 16


def lora_config(lora: LoraSpec, *, base_model_name: str | None = None,
                target_modules: Sequence[str] | None = None) -> Any:
    """Return the PEFT ``LoraConfig`` for a spec's LoRA section (``target_modules``: resolved names)."""
    from peft import LoraConfig

    return LoraConfig(
        # PEFT types lora_alpha as int, but scales by alpha / r and takes a float fine.
        r=lora.rank, lora_alpha=lora.alpha,  # type: ignore[arg-type]
        lora_dropout=lora.dropout,
        target_modules=list(target_modules or lora.target_modules), bias="none", task_type="CAUSAL_LM",
        layers_to_transform=list(lora.layers) if lora.layers else None,
        base_model_name_or_path=base_model_name,
    )


class PeftEngine(PreferenceMethods):
    """Trains and evaluates LoRA adapters with PEFT. Loads the model once and reuses it.

    The model, its batches, DP-SGD's per-example gradients, evaluation and generation all run
    on the site's device in its precision (``hardware``); the LoRA weights stay float32.
    """

    name = "peft"

    def __init__(self, *, model_dir: Path, lora: LoraSpec, training: TrainingSpec, threads: int = 0,
                 hardware: Hardware | None = None):
        self.model_dir = Path(model_dir)
        self.lora = lora
        self.training = training
        self.hardware = hardware or Hardware()
        self._scaler = self.hardware.grad_scaler()  # float16's loss scale carries over from round to round
        if threads > 0:
            torch.set_num_threads(threads)
        self._model: Any = None
        self._tokenizer: Any = None
        self._init: AdapterState | None = None

    # -- loading ---------------------------------------------------------------------------
    def _load(self) -> None:
        if self._model is not None:
            return
        from peft import get_peft_model
        from transformers import AutoModelForCausalLM, AutoTokenizer

        hardware = self.hardware
        load: dict[str, Any] = {"torch_dtype": hardware.base_dtype}
        quantized = quantization_config(hardware)
        if quantized is not None:  # bitsandbytes places the quantized weights itself
            load.update(quantization_config=quantized, device_map={"": str(hardware.device)})
        try:
            tokenizer = AutoTokenizer.from_pretrained(self.model_dir)
            base = AutoModelForCausalLM.from_pretrained(self.model_dir, **load)
        except (OSError, ValueError) as err:
            raise ModelError(f"cannot load base model from {self.model_dir}: {err}") from err
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        check_layers(self.lora, base.config, model_dir=self.model_dir)
        targets = resolve_target_modules(self.lora.target_modules, base.config, model_dir=self.model_dir)
        if quantized is not None:
            from peft import prepare_model_for_kbit_training

            base = prepare_model_for_kbit_training(base, use_gradient_checkpointing=False)
        if hardware.gradient_checkpointing:
            # Non-reentrant checkpointing needs no gradient on the (frozen) embeddings.
            base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            base.config.use_cache = False
        try:
            model = get_peft_model(base, lora_config(self.lora, base_model_name=str(self.model_dir),
                                                     target_modules=targets))
        except ValueError as err:
            raise ModelError(f"LoRA target modules {list(targets)} do not fit this model: {err}") from err
        if quantized is None:
            model.to(hardware.device)
        for name, param in model.named_parameters():
            if "lora_" in name:  # master weights: float32 whatever the base's precision
                param.data = param.data.float()
        self._tokenizer, self._model = tokenizer, model
        self._init = deterministic_init(self.adapter_state(), seed=self.training.seed)

    @property
    def tokenizer(self) -> Any:
        """The model's tokenizer."""
        self._load()
        return self._tokenizer

    @property
    def model(self) -> Any:
        """The PEFT-wrapped model."""
        self._load()
        return self._model

    def _preference_model(self) -> Any:
        return self.model

    def adapter_state(self) -> AdapterState:
        """Return the model's current adapter, as it travels on the wire."""
        from peft import get_peft_model_state_dict

        return to_wire(get_peft_model_state_dict(self._model))

    def load_adapter(self, adapter: AdapterState) -> None:
        """Load ``adapter`` into the model, after checking its names and shapes."""
        from peft import set_peft_model_state_dict

        self._load()
        check_compatible(self.adapter_state(), adapter, what="the global adapter")
        result = set_peft_model_state_dict(self._model, adapter)
        unexpected = getattr(result, "unexpected_keys", [])
        if unexpected:
            raise ModelError(f"adapter tensors not used by the model: {unexpected[:3]}")

    # -- the protocol ----------------------------------------------------------------------
    def initial_adapter(self) -> AdapterState:
        """Return the deterministic initial adapter (see ``lora_init``)."""
        self._load()
        if self._init is None:
            raise ModelError("the model loaded without an initial adapter; reload the engine")
        return {k: v.clone() for k, v in self._init.items()}

    def train(
        self, *, adapter: AdapterState, examples: Sequence[Example], steps: int, seed: int,
        dp: RecordDP | None = None, optimizer_state: Any = None, loss_term: LossTerm | None = None,
        frozen: Collection[str] = (),
    ) -> TrainResult:
        """Train ``steps`` AdamW steps from ``adapter`` on ``examples``.

        With ``dp`` set, every step is a DP-SGD step (see ``_train_dp``); ``seed`` is
        then not used, because a predictable batch or noise draw would void the privacy.
        ``loss_term`` adds its gradient before every optimizer step; ``frozen`` tensors keep their values.
        """
        if not examples:
            raise DataError("no training examples; check the site's dataset")
        self.load_adapter(adapter)
        params = self._lora_params()
        with frozen_tensors(params, frozen):
            return self._train(examples, steps=steps, seed=seed, dp=dp, optimizer_state=optimizer_state,
                               before_step=before_step_hook(params, loss_term=loss_term, frozen=frozen))

    def _train(self, examples: Sequence[Example], *, steps: int, seed: int, dp: RecordDP | None,
               optimizer_state: Any, before_step: Callable[[], None] | None) -> TrainResult:
        model, tokenizer = self._model, self._tokenizer
        data = tokenize_all(tokenizer, examples, max_len=self.training.seq_len)
        optimizer = site_optimizer(model, learning_rate=self.training.learning_rate, state=optimizer_state)
        if dp is not None:
            result = self._train_dp(data=data, optimizer=optimizer, steps=steps, dp=dp, before_step=before_step)
            return replace(result, optimizer_state=copy.deepcopy(optimizer.state_dict()))
        generator = torch.Generator().manual_seed(seed)
        scaler = self._scaler
        order: list[int] = []
        losses: list[float] = []
        model.train()
        for _ in range(steps):
            if len(order) < self.training.batch_size:
                order.extend(torch.randperm(len(data), generator=generator).tolist())
            batch_ids, order = order[: self.training.batch_size], order[self.training.batch_size:]
            optimizer.zero_grad(set_to_none=True)
            losses.append(self._accumulate_gradients([data[i] for i in batch_ids], scaler=scaler))
            optimizer_step(optimizer, scaler=scaler, before_step=before_step)
        model.eval()
        return TrainResult(
            adapter=self.adapter_state(), num_examples=len(examples), steps=steps,
            train_loss=sum(losses) / len(losses),
            metrics={"train_loss_last": losses[-1]}, optimizer_state=copy.deepcopy(optimizer.state_dict()),
        )

    def _lora_params(self) -> dict[str, torch.nn.Parameter]:
        """The LoRA parameters under their wire names (PEFT's state-dict names, without the adapter name)."""
        return {name.replace(".default.", "."): param for name, param in self._model.named_parameters()
                if "lora_" in name}

    def _accumulate_gradients(self, batch: list[TokenizedExample], *,
                              scaler: torch.amp.GradScaler | None = None) -> float:
        """Backpropagate the batch's token-mean loss in micro-batches; return that loss.

        Each micro-batch's mean is weighted by its share of the batch's label tokens, so the
        accumulated gradient is the whole batch's, while memory is bounded by ``MICRO_BATCH``.
        """
        micro = [batch[i:i + MICRO_BATCH] for i in range(0, len(batch), MICRO_BATCH)]
        collated = [collate(part, pad_id=self._tokenizer.pad_token_id) for part in micro]
        counts = [int((c["labels"][:, 1:] != -100).sum()) for c in collated]
        total = sum(counts)  # every count > 0: tokenize_example refuses examples with no response token
        loss_sum = 0.0
        for inputs, count in zip(collated, counts, strict=True):
            with self.hardware.autocast():
                loss = self._model(**self.hardware.to(inputs)).loss.float() * (count / total)
            (scaler.scale(loss) if scaler is not None else loss).backward()
            loss_sum += float(loss.detach())
        return loss_sum

    def _train_dp(
        self, *, data: list[TokenizedExample], optimizer: torch.optim.Optimizer, steps: int, dp: RecordDP,
        before_step: Callable[[], None] | None = None,
    ) -> TrainResult:
        """DP-SGD steps on the PEFT model (see ``engines/dp_training.py``)."""
        loss, metrics = train_dp(self._model, data=data, optimizer=optimizer, steps=steps, dp=dp,
                                 pad_id=self._tokenizer.pad_token_id, chunk_size=self.training.batch_size,
                                 before_step=before_step, hardware=self.hardware)
        return TrainResult(adapter=self.adapter_state(), num_examples=len(data), steps=steps, train_loss=loss,
                           metrics=metrics)

    @torch.no_grad()
    def evaluate(
        self, *, adapter: AdapterState, examples: Sequence[Example], max_new_tokens: int
    ) -> EvalResult:
        """Return token-weighted response loss and exact-match accuracy."""
        if not examples:
            raise DataError("no evaluation examples; check the site's validation file")
        self.load_adapter(adapter)
        model, tokenizer = self._model, self._tokenizer
        model.eval()
        data = tokenize_all(tokenizer, examples, max_len=self.training.seq_len)
        total, tokens = 0.0, 0
        for start in range(0, len(data), EVAL_BATCH):
            batch = collate(data[start:start + EVAL_BATCH], pad_id=tokenizer.pad_token_id)
            count = int((batch["labels"][:, 1:] != -100).sum())
            with self.hardware.autocast():
                total += float(model(**self.hardware.to(batch)).loss) * count
            tokens += count
        predictions = self._generate_loaded(examples, max_new_tokens)
        accuracy = exact_match(predictions, [e.response for e in examples])
        loss = total / tokens if tokens else math.nan
        return EvalResult(loss=loss, accuracy=accuracy, num_examples=len(examples))

    @torch.no_grad()
    def generate(self, *, adapter: AdapterState, prompts: Sequence[Example], max_new_tokens: int) -> list[str]:
        """Return greedy completions of ``prompts`` under ``adapter``."""
        self.load_adapter(adapter)
        return self._generate_loaded(prompts, max_new_tokens)

    def _generate_loaded(self, prompts: Sequence[Example], max_new_tokens: int) -> list[str]:
        return greedy_generate(self._model, self._tokenizer, prompts, max_new_tokens=max_new_tokens,
                               hardware=self.hardware)
