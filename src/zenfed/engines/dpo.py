"""Direct preference optimisation (DPO) of the LoRA weights, shared by every engine.

DPO (Rafailov et al., 2023) trains the policy pi on pairs (prompt x, chosen y_c,
rejected y_r) with the loss ``-log sigmoid(beta * ((log pi(y_c|x) - log ref(y_c|x)) -
(log pi(y_r|x) - log ref(y_r|x))))``. The reference is the same model with another
LoRA adapter (the one the DPO stage started from), so there is no second model in
memory: the reference adapter is loaded into the LoRA layers for one no-grad pass
over the site's pairs, its log-probabilities are kept (two floats a pair), and the
training adapter is loaded back. An adapter whose B matrices are zero is the base
model exactly (a LoRA layer adds ``B·A·x``), which is the reference of evaluation.

Under record-level DP the privacy unit is one preference pair: both of its rows
are in one Poisson draw, and the sum of their gradients is clipped
(``zenfed.privacy.dp.UnitLoss``).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from zenfed.data.preference import PreferencePair
from zenfed.data.tokenize import TokenizedExample, collate, tokenize_example
from zenfed.engines.base import TrainResult, before_step_hook, frozen_tensors, optimizer_step, site_optimizer
from zenfed.engines.dp_training import MAX_DP_MICRO_BATCH, train_dp
from zenfed.engines.hardware import Hardware
from zenfed.errors import DataError
from zenfed.spec import TrainingSpec
from zenfed.types import AdapterState, LossTerm, RecordDP
from zenfed.wire import encode_adapter, sha256_hex

# Pairs per forward and backward pass (two rows each), as MICRO_BATCH bounds supervised training.
MICRO_PAIRS = 8


@dataclass(frozen=True)
class TokenizedPair:
    """A preference pair as two tokenized rows with the same prompt."""

    chosen: TokenizedExample
    rejected: TokenizedExample


@dataclass(frozen=True)
class PreferenceEval:
    """Preference accuracy and reward margin on held-out pairs.

    The implicit reward of an answer is ``beta * (log pi(y|x) - log base(y|x))``: the policy
    against the base model without any adapter, the same reference for every adapter scored,
    so the base model itself scores 0.5 (every pair a tie) and each stage's gain is comparable.
    """

    accuracy: float  # share of pairs whose chosen answer gets the higher reward (a tie counts one half)
    reward_margin: float  # mean of reward(chosen) - reward(rejected)
    num_pairs: int


def _cut_prompt(row: TokenizedExample, prompt_len: int) -> TokenizedExample:
    """Drop the first tokens of ``row``'s prompt so that ``prompt_len`` of them are left."""
    drop = row.prompt_len - prompt_len
    return TokenizedExample(row.input_ids[drop:], row.labels[drop:], prompt_len)


def tokenize_pairs(tokenizer: Any, pairs: Sequence[PreferencePair], *, max_len: int) -> list[TokenizedPair]:
    """Tokenise both answers of every pair (see ``tokenize_example``), after the same prompt.

    Where a prompt is cut from the left to fit ``max_len``, both rows keep the part the longer answer
    leaves room for: DPO compares two answers to one prompt.
    """
    out = []
    for pair in pairs:
        chosen = tokenize_example(tokenizer, pair.chosen_example(), max_len=max_len)
        rejected = tokenize_example(tokenizer, pair.rejected_example(), max_len=max_len)
        shared = min(chosen.prompt_len, rejected.prompt_len)
        out.append(TokenizedPair(_cut_prompt(chosen, shared), _cut_prompt(rejected, shared)))
    return out


def collate_pairs(batch: Sequence[TokenizedPair], *, pad_id: int) -> dict[str, torch.Tensor]:
    """Collate pairs as rows chosen_0, rejected_0, chosen_1, ...: unit i is rows 2i and 2i+1."""
    if not batch:
        empty = torch.zeros((0, 1), dtype=torch.long)
        return {"input_ids": empty, "attention_mask": empty.clone(), "labels": empty.clone()}
    return collate([row for pair in batch for row in (pair.chosen, pair.rejected)], pad_id=pad_id)


def dpo_losses(policy: torch.Tensor, reference: torch.Tensor, *, beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Return each pair's DPO loss and reward margin from ``(pairs, 2)`` log-probabilities (chosen, rejected)."""
    margins = beta * ((policy[:, 0] - reference[:, 0]) - (policy[:, 1] - reference[:, 1]))
    return -torch.nn.functional.logsigmoid(margins), margins


def base_adapter(adapter: AdapterState) -> AdapterState:
    """Return ``adapter`` with every LoRA B set to zero: the base model, through the same layers."""
    return {name: torch.zeros_like(t) if ".lora_B." in name else t for name, t in adapter.items()}


def _pair_accuracy(margins: torch.Tensor) -> float:
    wins = (margins > 0).double() + 0.5 * (margins == 0).double()
    return float(wins.mean()) if margins.numel() else math.nan


class PreferenceTrainer:
    """DPO training and preference evaluation on one engine's model.

    Args:
        model: the Hugging Face causal LM whose trainable parameters are the LoRA weights.
        tokenizer: its tokenizer.
        hardware: the site's device and precision.
        training: the job's training section (learning rate, batch size, sequence length).
        load_adapter: loads an adapter (wire names) into ``model``.
        adapter_state: returns ``model``'s adapter (wire names).
    """

    def __init__(self, *, model: Any, tokenizer: Any, hardware: Hardware, training: TrainingSpec,
                 load_adapter: Callable[[AdapterState], None], adapter_state: Callable[[], AdapterState]) -> None:
        from zenfed.privacy.dp.sgd import accepts_logits_to_keep

        self.model, self.tokenizer, self.hardware, self.training = model, tokenizer, hardware, training
        self._load_adapter, self._adapter_state = load_adapter, adapter_state
        self._keeps_logits = accepts_logits_to_keep(model)
        self._scaler = hardware.grad_scaler()  # float16's loss scale carries over from round to round
        self._reference_cache: dict[tuple[str, int], torch.Tensor] = {}

    # -- log-probabilities ------------------------------------------------------------------
    def _logps(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """Each row's summed log-probability of its answer tokens, ``(rows,)``, float32 on the device."""
        from zenfed.privacy.dp.sgd import label_logps

        with self.hardware.autocast():
            logps, _ = label_logps(self.model, **self.hardware.to(inputs), keeps_logits=self._keeps_logits)
        return logps.float()

    @torch.no_grad()
    def sequence_logps(self, adapter: AdapterState, data: Sequence[TokenizedPair]) -> torch.Tensor:
        """Return ``(pairs, 2)`` log-probabilities of (chosen, rejected) under ``adapter``, without dropout."""
        self._load_adapter(adapter)
        self.model.eval()
        parts = [self._logps(collate_pairs(data[i:i + MICRO_PAIRS], pad_id=self.tokenizer.pad_token_id)).view(-1, 2)
                 for i in range(0, len(data), MICRO_PAIRS)]
        return torch.cat(parts) if parts else torch.zeros((0, 2))

    def reference_logps(self, reference: AdapterState, data: Sequence[TokenizedPair], *,
                        name: str | None = None) -> torch.Tensor:
        """``sequence_logps`` under the reference adapter, computed once per reference (or ``name``) and data."""
        key = (name or sha256_hex(encode_adapter(reference)), hash(tuple(data)))
        if key not in self._reference_cache:
            self._reference_cache[key] = self.sequence_logps(reference, data)
        return self._reference_cache[key]

    # -- training ----------------------------------------------------------------------------
    def train(
        self, *, adapter: AdapterState, reference: AdapterState, pairs: Sequence[PreferencePair], steps: int,
        seed: int, beta: float, lora_params: dict[str, torch.nn.Parameter], dp: RecordDP | None = None,
        optimizer_state: Any = None, loss_term: LossTerm | None = None, frozen: Collection[str] = (),
    ) -> TrainResult:
        """Train ``steps`` AdamW steps of DPO from ``adapter`` against ``reference`` on ``pairs``.

        With ``dp`` set every step is DP-SGD with the pair as the unit; ``seed`` is then not used.
        ``lora_params`` are the model's LoRA parameters by wire name: ``frozen`` ones keep their
        values and ``loss_term`` (the strategy's) adds its gradient before every step, as in
        supervised training.

        Raises:
            DataError: If there are no pairs, or an answer does not fit ``training.seq_len``.
        """
        if not pairs:
            raise DataError("no preference pairs to train on; check the site's preference dataset")
        data = tokenize_pairs(self.tokenizer, pairs, max_len=self.training.seq_len)
        refs = self.reference_logps(reference, data)
        self._load_adapter(adapter)
        before_step = before_step_hook(lora_params, loss_term=loss_term, frozen=frozen)
        with frozen_tensors(lora_params, frozen):
            optimizer = site_optimizer(self.model, learning_rate=self.training.learning_rate, state=optimizer_state)
            if dp is not None:
                loss, metrics = self._train_dp(data, refs, steps=steps, beta=beta, dp=dp, optimizer=optimizer,
                                               before_step=before_step)
            else:
                loss, metrics = self._train_plain(data, refs, steps=steps, seed=seed, beta=beta,
                                                  optimizer=optimizer, before_step=before_step)
        return TrainResult(adapter=self._adapter_state(), num_examples=len(pairs), steps=steps, train_loss=loss,
                           metrics=metrics, optimizer_state=copy.deepcopy(optimizer.state_dict()))

    def _train_plain(self, data: list[TokenizedPair], refs: torch.Tensor, *, steps: int, seed: int, beta: float,
                     optimizer: torch.optim.Optimizer, before_step: Callable[[], None] | None,
                     ) -> tuple[float, dict[str, float]]:
        generator = torch.Generator().manual_seed(seed)
        scaler, batch_size = self._scaler, self.training.batch_size
        order: list[int] = []
        losses: list[float] = []
        margins: list[torch.Tensor] = []
        self.model.train()
        try:
            for _ in range(steps):
                if len(order) < batch_size:
                    order.extend(torch.randperm(len(data), generator=generator).tolist())
                batch, order = order[:batch_size], order[batch_size:]
                optimizer.zero_grad(set_to_none=True)
                step_loss = 0.0
                for start in range(0, len(batch), MICRO_PAIRS):
                    ids = batch[start:start + MICRO_PAIRS]
                    policy = self._logps(collate_pairs([data[i] for i in ids], pad_id=self.tokenizer.pad_token_id))
                    pair_losses, pair_margins = dpo_losses(policy.view(-1, 2), refs[ids].to(policy.device), beta=beta)
                    loss = pair_losses.sum() / len(batch)
                    (scaler.scale(loss) if scaler is not None else loss).backward()
                    step_loss += float(loss.detach())
                    margins.append(pair_margins.detach().cpu())
                losses.append(step_loss)
                optimizer_step(optimizer, scaler=scaler, before_step=before_step)
        finally:
            self.model.eval()
        seen = torch.cat(margins)
        return sum(losses) / len(losses), {"train_loss_last": losses[-1], "dpo_reward_margin": float(seen.mean()),
                                           "dpo_reward_accuracy": _pair_accuracy(seen)}

    def _train_dp(self, data: list[TokenizedPair], refs: torch.Tensor, *, steps: int, beta: float, dp: RecordDP,
                  optimizer: torch.optim.Optimizer, before_step: Callable[[], None] | None,
                  ) -> tuple[float, dict[str, float]]:
        from zenfed.privacy.dp import UnitLoss

        pad_id = self.tokenizer.pad_token_id

        def batch_for(indices: list[int]) -> tuple[dict[str, torch.Tensor], UnitLoss]:
            batch_refs = refs[indices]

            def pair_losses(logps: torch.Tensor, counts: torch.Tensor, first: int) -> torch.Tensor:
                del counts  # DPO compares summed log-probabilities: longer answers are not averaged
                ref = batch_refs[first:first + logps.shape[0]].to(logps.device)
                return dpo_losses(logps, ref, beta=beta)[0]

            return collate_pairs([data[i] for i in indices], pad_id=pad_id), UnitLoss(rows_per_unit=2,
                                                                                      loss=pair_losses)

        # A DP micro-batch of pairs holds twice the rows: half the units keep the memory bound.
        return train_dp(self.model, data=data, optimizer=optimizer, steps=steps, dp=dp, pad_id=pad_id,
                        chunk_size=max(1, min(self.training.batch_size, MAX_DP_MICRO_BATCH // 2)),
                        before_step=before_step, hardware=self.hardware, batch_for=batch_for)

    # -- evaluation --------------------------------------------------------------------------
    def evaluate(self, *, adapter: AdapterState, pairs: Sequence[PreferencePair], beta: float) -> PreferenceEval:
        """Score ``adapter`` on held-out ``pairs`` against the base model (see ``PreferenceEval``).

        Raises:
            DataError: If there are no pairs.
        """
        if not pairs:
            raise DataError("no held-out preference pairs; check the site's preference validation file")
        data = tokenize_pairs(self.tokenizer, pairs, max_len=self.training.seq_len)
        base = self.reference_logps(base_adapter(adapter), data, name="base")  # A does not matter when B is 0
        policy = self.sequence_logps(adapter, data)  # leaves ``adapter`` loaded, as evaluate does
        _, margins = dpo_losses(policy.cpu(), base.cpu(), beta=beta)
        return PreferenceEval(accuracy=_pair_accuracy(margins), reward_margin=float(margins.mean()),
                              num_pairs=len(pairs))


class _LoraEngine(Protocol):
    """What ``PreferenceMethods`` needs of the engine it is mixed into."""

    _preference_trainer: PreferenceTrainer | None
    hardware: Hardware
    training: TrainingSpec

    @property
    def tokenizer(self) -> Any: ...  # noqa: D102

    def _preference_model(self) -> Any: ...

    def load_adapter(self, adapter: AdapterState) -> None: ...  # noqa: D102

    def adapter_state(self) -> AdapterState: ...  # noqa: D102

    def _lora_params(self) -> dict[str, torch.nn.Parameter]: ...


class PreferenceMethods:
    """The engine protocol's DPO methods, mixed into an engine (see ``_LoraEngine``).

    The engine names its loaded LoRA model in ``_preference_model``; the trainer is built once,
    on first use, and keeps the reference log-probabilities for the rest of the job.
    """

    _preference_trainer: PreferenceTrainer | None = None

    def _preferences(self: _LoraEngine) -> PreferenceTrainer:
        model = self._preference_model()
        if self._preference_trainer is None:
            self._preference_trainer = PreferenceTrainer(
                model=model, tokenizer=self.tokenizer, hardware=self.hardware, training=self.training,
                load_adapter=self.load_adapter, adapter_state=self.adapter_state)
        self._preference_trainer.training = self.training  # an engine whose training section changed
        return self._preference_trainer

    def train_preferences(
        self: _LoraEngine, *, adapter: AdapterState, reference: AdapterState, pairs: Sequence[PreferencePair],
        steps: int, seed: int, beta: float, dp: RecordDP | None = None, optimizer_state: Any = None,
        loss_term: LossTerm | None = None, frozen: Collection[str] = (),
    ) -> TrainResult:
        """Train ``steps`` DPO steps from ``adapter`` against ``reference`` (see ``PreferenceTrainer.train``)."""
        trainer = PreferenceMethods._preferences(self)
        return trainer.train(adapter=adapter, reference=reference, pairs=pairs, steps=steps, seed=seed, beta=beta,
                             lora_params=self._lora_params(), dp=dp, optimizer_state=optimizer_state,
                             loss_term=loss_term, frozen=frozen)

    def evaluate_preferences(self: _LoraEngine, *, adapter: AdapterState, pairs: Sequence[PreferencePair],
                             beta: float) -> PreferenceEval:
        """Return the preference accuracy and reward margin of ``adapter`` on ``pairs``."""
        return PreferenceMethods._preferences(self).evaluate(adapter=adapter, pairs=pairs, beta=beta)
