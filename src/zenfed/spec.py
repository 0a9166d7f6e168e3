"""Job specs, site policies and project specs: pydantic v2 models loaded from YAML.

A ``JobSpec`` is what a data scientist writes; it goes to the server and to
every site, so it names datasets only by a logical name. A ``SitePolicy`` is
what a site's IT writes; it never leaves the site and maps dataset names to
local paths. A ``ProjectSpec`` describes a federation for provisioning.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from zenfed.digest import canonical_json, sha256_hex
from zenfed.errors import SpecError

DEFAULT_BASE_MODEL = "default"
_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$"
_ORG_PATTERN = r"^[A-Za-z0-9_]+$"  # FLARE's rule for organisation names
_NOT_LORA_TARGETS = frozenset({"lm_head", "embed_tokens", "wte", "wpe"})


class _Strict(BaseModel):
    """Base for all spec models: unknown keys are errors, not silently ignored."""

    # Infinity is no number a spec means, and it has no canonical JSON (the spec hash).
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class ModelSpec(_Strict):
    """Which base model to fine-tune and with which engine."""

    base: str = Field(
        DEFAULT_BASE_MODEL,
        description="'default' (SmolLM2-135M-Instruct from `zenfed models prepare`) or a path "
        "to a Hugging Face model folder (Llama, Mistral, Qwen2 families) that exists at every site",
    )
    base_sha256: str | None = Field(
        None, pattern=r"^[0-9a-f]{64}$",
        description="the SHA-256 of the base model folder's content (`zenfed models hash FOLDER`); every site "
        "refuses a copy that differs. Required to export a job whose base is a folder",
    )
    engine: Literal["peft", "nemo"] = Field(
        "peft", description="training engine: 'peft' (reference) or 'nemo'"
    )


class LoraSpec(_Strict):
    """LoRA adapter shape."""

    rank: int = Field(8, ge=1, le=256, description="LoRA rank r, an integer from 1 to 256")
    alpha: float = Field(16.0, gt=0, description="LoRA alpha, a positive number (often 2*rank)")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="LoRA dropout in [0, 1)")
    target_modules: tuple[str, ...] = Field(
        ("q_proj", "k_proj", "v_proj", "o_proj"),
        min_length=1,
        description="module names to adapt, e.g. [q_proj, k_proj, v_proj, o_proj], or the groups attention "
        "and mlp, resolved for the base model's architecture",
    )
    layers: tuple[int, ...] | None = Field(
        None,
        min_length=1,
        description="0-based decoder layers to adapt, e.g. [26, 27, 28, 29]; omit for every layer",
    )
    personal_layers: tuple[int, ...] = Field(
        (), description="0-based decoder layers whose LoRA stays at each site, never sent (personalisation)"
    )

    @field_validator("target_modules")
    @classmethod
    def _known_modules(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if len(set(value)) != len(value):
            raise ValueError("lists a module twice; list each module once")
        for name in value:
            if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
                raise ValueError(f"{name!r} is not a module name; use names like 'q_proj'")
            if name in _NOT_LORA_TARGETS:
                raise ValueError(
                    f"{name!r} is an embedding or output layer; PEFT would train it in full, not as "
                    f"LoRA, and such weights cannot be averaged as adapters; target linear projections"
                )
        return value

    @field_validator("layers", "personal_layers")
    @classmethod
    def _distinct_layers(cls, value: tuple[int, ...] | None) -> tuple[int, ...] | None:
        if value is None:
            return None
        if any(index < 0 for index in value):
            raise ValueError("layer indices start at 0; remove the negative ones")
        if len(set(value)) != len(value):
            raise ValueError("lists a layer twice; list each layer once")
        return tuple(sorted(value))


    @model_validator(mode="after")
    def _personal_layers_are_adapted(self) -> LoraSpec:
        if self.layers is not None and not set(self.personal_layers) <= set(self.layers):
            extra = sorted(set(self.personal_layers) - set(self.layers))
            raise ValueError(f"personal_layers {extra} are not adapted; list them in layers too")
        if self.layers is not None and set(self.layers) <= set(self.personal_layers):
            raise ValueError("every adapted layer is personal: nothing would be federated; keep one shared")
        return self


class TrainingSpec(_Strict):
    """Local training per round."""

    local_steps: int = Field(10, ge=1, le=100_000, description="optimizer steps per site per round")
    batch_size: int = Field(4, ge=1, le=4096, description="examples per step, at least 1")
    seq_len: int = Field(256, ge=16, le=32_768, description="max tokens per example, 16 or more")
    learning_rate: float = Field(
        2e-4, gt=0, le=1.0, description="AdamW learning rate, e.g. 2e-4"
    )
    seed: int = Field(0, ge=0, description="seed for LoRA initialisation and data order")


# Strategies whose sites step their own state with every round's sum: each site must see every round.
SITE_STATE_STRATEGIES = ("fedavgm", "fedadam", "fedyogi", "scaffold")


class ServerOptimizerSpec(_Strict):
    """FedOpt's server optimizer, which the sites run on the decrypted mean (see strategies/fedopt.py)."""

    learning_rate: float | None = Field(
        None, gt=0, description="server learning rate eta; default 1.0 (FedAvgM) or 1e-2 (FedAdam, FedYogi)"
    )
    momentum: float = Field(0.9, ge=0, lt=1, description="FedAvgM: momentum beta")
    beta1: float = Field(0.9, ge=0, lt=1, description="FedAdam/FedYogi: first-moment decay")
    beta2: float = Field(0.99, ge=0, lt=1, description="FedAdam/FedYogi: second-moment decay")
    tau: float = Field(1e-3, gt=0, description="FedAdam/FedYogi: adaptivity tau (added to sqrt(v))")


class CohortRequirements(_Strict):
    """What a site must declare in its enrollment profile to be picked for training (matched cohorts).

    A site that withholds a field a requirement needs is not picked; the reason is recorded.
    """

    min_records: int | None = Field(None, ge=1, description="training records of the job's dataset, at least")
    domain_tags: tuple[str, ...] = Field((), description="tags a site must have declared, all of them")
    min_steps_per_minute: float | None = Field(
        None, gt=0, description="training speed `zenfed site probe` measured, at least"
    )
    device: Literal["cpu", "cuda"] | None = Field(None, description="the device kind a site trains on")


class FederationSpec(_Strict):
    """Rounds and how site updates are combined."""

    rounds: int = Field(3, ge=1, le=10_000, description="federated rounds, at least 1")
    min_sites: int = Field(2, ge=1, description="sites that must answer each round")
    weighting: Literal["samples", "uniform"] = Field(
        "samples", description="'samples' (weight by training examples) or 'uniform'"
    )
    strategy: Literal["fedavg", "fedprox", "fedavgm", "fedadam", "fedyogi", "ffa_lora", "scaffold", "flexlora"] = Field(
        "fedavg", description="the federated algorithm (one class per file in zenfed/strategies/)"
    )
    proximal_mu: float = Field(
        0.01, gt=0, description="FedProx: weight mu of the proximal term mu/2 ||w - w_global||^2"
    )
    server_optimizer: ServerOptimizerSpec = ServerOptimizerSpec()
    cohort_fraction: float = Field(
        1.0, gt=0, le=1, description="share of the eligible sites that train each round, drawn from the job's seed"
    )
    over_selection: int = Field(
        0, ge=0, description="ask this many more sites than the round needs and keep the first answers "
        "(stragglers' updates are not used)",
    )
    cohort_requirements: CohortRequirements | None = Field(
        None, description="train only sites whose declared enrollment profile meets these (matched cohorts)"
    )
    task_timeout_s: int = Field(
        3600, ge=10, description="seconds a round waits for sites before going on without them"
    )
    straggler_grace_s: int | None = Field(
        None, ge=0,
        description="once min_sites have answered a task, seconds to wait for the others before going on without "
                    "them (stragglers, hung or cut-off sites); default: task_timeout_s",
    )
    lost_site_grace_s: int = Field(
        20, ge=1, le=3600,
        description="seconds a site whose job process is gone (crashed, killed) may take to come back before "
                    "rounds go on without it",
    )


class DataSpec(_Strict):
    """Which dataset each site trains on, by logical name only."""

    dataset: str = Field(
        "builtin",
        pattern=_NAME_PATTERN,
        description="a dataset name that each site maps to a local path in its site policy",
    )


class DPOSpec(_Strict):
    """Direct preference optimisation (``objective: dpo``; see docs/alignment.md)."""

    beta: float = Field(0.1, gt=0, le=10, description="DPO beta: how far the policy may move from the reference")
    sft_rounds: int = Field(
        0, ge=0, description="rounds of supervised fine-tuning on data.dataset before the DPO rounds (two-stage "
        "job); 0: DPO from the first round"
    )
    dataset: str = Field(
        "builtin-preferences", pattern=_NAME_PATTERN,
        description="the preference dataset (chosen/rejected pairs) each site maps to a local path in its policy",
    )


class EvaluationSpec(_Strict):
    """Federated evaluation after each round."""

    max_examples: int = Field(64, ge=1, description="validation examples per site per round")
    max_new_tokens: int = Field(16, ge=1, le=512, description="tokens generated for exact match")


class PrivacySpec(_Strict):
    """Differential privacy applied at every site (see docs/privacy.md)."""

    level: Literal["none", "record", "client"] = Field(
        "none", description="'none', 'record' (DP-SGD inside each site) or 'client' (clip+noise each update)"
    )
    target_epsilon: float | None = Field(
        None, gt=0, description="epsilon to reach over the whole job; sites solve for the noise"
    )
    noise_multiplier: float | None = Field(None, gt=0, description="sigma, instead of target_epsilon")
    clip_norm: float = Field(1.0, gt=0, description="clipping norm C (per example or per update)")
    client_mode: Literal["local", "distributed"] = Field(
        "local", description="client level: 'local' (sigma*C per site) or 'distributed' (with encryption)"
    )
    accounting: Literal["pld", "rdp"] = Field("pld", description="privacy accountant: 'pld' or 'rdp'")

    @model_validator(mode="after")
    def _one_noise_source(self) -> PrivacySpec:
        if self.level != "none" and (self.target_epsilon is None) == (self.noise_multiplier is None):
            raise ValueError("with privacy.level set, give exactly one of target_epsilon and noise_multiplier")
        return self


class EncryptionSpec(_Strict):
    """Homomorphic encryption of site updates (see docs/he.md)."""

    enabled: bool = Field(False, description="sum updates under CKKS so the server cannot read them")
    quant_bits: int | None = Field(
        16, ge=8, le=20, description="bits per value when packing (null: one real per slot)"
    )
    clip: float = Field(0.5, gt=0, description="values are clipped to [-clip, clip] before packing")
    max_sites: int = Field(64, ge=2, le=1024, description="most sites a sum must hold")
    weight_unit: int = Field(
        1000, ge=1, description="training examples that count as weight 1 (a site's weight is capped at 1)"
    )
    secure_aggregation: Literal["none", "pairwise"] = Field(
        "none", description="'pairwise': sites mask their updates so that only the round's sum decrypts "
        "(no key holder reads one site's update; weights travel inside the sum); 'none': CKKS alone"
    )

    @model_validator(mode="after")
    def _masks_need_quantised_values(self) -> EncryptionSpec:
        if self.secure_aggregation == "pairwise" and not self.enabled:
            raise ValueError("secure_aggregation 'pairwise' masks the encrypted sum; set enabled: true")
        if self.secure_aggregation == "pairwise" and self.quant_bits is None:
            raise ValueError("secure_aggregation 'pairwise' masks quantised integers; set quant_bits (e.g. 16)")
        return self


class AttestationSpec(_Strict):
    """TEE attestation before model data moves (see docs/attestation.md)."""

    mode: Literal["required", "preferred", "off"] = Field(
        "off", description="'required' (abort if too few attested sites), 'preferred' (exclude failures), 'off'"
    )
    reattest_every_rounds: int = Field(0, ge=0, description="re-attest every R rounds (0: before round 1 only)")

    @field_validator("mode", mode="before")
    @classmethod
    def _yaml_off(cls, value: Any) -> Any:
        # YAML 1.1 reads an unquoted `off` as False: take it as the string the user wrote.
        return "off" if value is False else value


class OutputSpec(_Strict):
    """What the job leaves behind."""

    adapter_dir: str = Field(
        "adapter", pattern=_NAME_PATTERN, description="folder name of the final PEFT adapter"
    )


class JobSpec(_Strict):
    """A federated LoRA job, as written by a data scientist."""

    name: str = Field(pattern=_NAME_PATTERN, description="job name: letters, digits, . _ -")
    objective: Literal["sft", "dpo"] = Field(
        "sft", description="'sft' (supervised fine-tuning) or 'dpo' (preference pairs, after dpo.sft_rounds of SFT)"
    )
    dpo: DPOSpec = DPOSpec()
    model: ModelSpec = ModelSpec()
    lora: LoraSpec = LoraSpec()
    training: TrainingSpec = TrainingSpec()
    federation: FederationSpec = FederationSpec()
    data: DataSpec = DataSpec()
    evaluation: EvaluationSpec = EvaluationSpec()
    privacy: PrivacySpec = PrivacySpec()
    encryption: EncryptionSpec = EncryptionSpec()
    attestation: AttestationSpec = AttestationSpec()
    output: OutputSpec = OutputSpec()

    @model_validator(mode="after")
    def _consistent(self) -> JobSpec:
        if self.encryption.enabled and self.federation.min_sites > self.encryption.max_sites:
            raise ValueError("federation.min_sites exceeds encryption.max_sites")
        if self.federation.over_selection and self.federation.strategy in SITE_STATE_STRATEGIES:
            raise ValueError(f"federation.strategy {self.federation.strategy!r} keeps state at every site that a "
                             "site whose update is not used cannot follow; use over_selection 0 with it")
        if self.federation.cohort_fraction < 1 and self.federation.strategy in SITE_STATE_STRATEGIES:
            raise ValueError(f"federation.strategy {self.federation.strategy!r} keeps state at every site that a "
                             "site outside a round's cohort cannot follow; use cohort_fraction 1 with it")
        if self.federation.strategy == "scaffold" and self.lora.personal_layers:
            raise ValueError("scaffold does not combine with lora.personal_layers: the control variates of "
                             "personal layers would leave the sites; drop one of them")
        if self.federation.strategy == "flexlora":
            if self.encryption.enabled:
                raise ValueError("flexlora sends each site's full update B·A (d_out x d_in per adapted module), "
                                 "tens of times the adapter's size, which under encryption is too large; use "
                                 "ffa_lora for heterogeneous ranks with encryption.enabled: true")
            if self.lora.personal_layers or self.privacy.level == "client":
                raise ValueError("flexlora does not combine with lora.personal_layers or privacy.level 'client' "
                                 "yet; use privacy.level 'record', or another strategy")
        if self.federation.strategy == "scaffold" and self.privacy.level == "client":
            raise ValueError("scaffold does not combine with privacy.level 'client': the clipped, noised "
                             "control-variate changes are divided by local_steps * learning_rate, which "
                             "amplifies the noise; use privacy.level 'record'")
        if self.objective == "sft" and self.dpo != DPOSpec():  # a dump of a supervised spec holds the defaults
            changed = sorted(k for k, v in self.dpo.model_dump().items() if v != getattr(DPOSpec(), k))
            raise ValueError(f"the dpo section sets {changed} but objective is 'sft'; set objective: dpo, or "
                             "remove the dpo section")
        if self.objective == "dpo" and self.dpo.sft_rounds and self.federation.strategy in SITE_STATE_STRATEGIES:
            raise ValueError(f"federation.strategy {self.federation.strategy!r} keeps state estimated from the SFT "
                             "rounds' updates (control variates, server moments) that would steer the DPO rounds; "
                             "use fedavg, fedprox, ffa_lora or flexlora for a two-stage job, or set dpo.sft_rounds 0")
        if self.objective == "dpo" and self.dpo.sft_rounds >= self.federation.rounds:
            raise ValueError(f"dpo.sft_rounds {self.dpo.sft_rounds} leaves no DPO round in federation.rounds "
                             f"{self.federation.rounds}; raise federation.rounds or lower dpo.sft_rounds")
        return self

    @property
    def dpo_start_round(self) -> int | None:
        """The first DPO round (1-based), or None for a supervised job."""
        return self.dpo.sft_rounds + 1 if self.objective == "dpo" else None

    def objective_for_round(self, round_index: int) -> Literal["sft", "dpo"]:
        """Return what round ``round_index`` (1-based) trains: 'sft' or 'dpo'."""
        start = self.dpo_start_round
        return "dpo" if start is not None and round_index >= start else "sft"

    def privacy_unit(self) -> str | None:
        """What one unit of differential privacy is in this job, in words; None without DP."""
        if self.privacy.level == "none":
            return None
        if self.privacy.level == "client":
            return "a site's whole update in a round"
        if self.objective == "sft":
            return "one training record"
        if self.dpo.sft_rounds == 0:
            return "one preference pair (prompt, chosen and rejected answer)"
        sft = "round 1" if self.dpo.sft_rounds == 1 else f"rounds 1-{self.dpo.sft_rounds}"
        return (f"one training record in the SFT {sft} and one preference pair in the DPO rounds, composed in one "
                "epsilon (which also covers a person in both datasets)")

    def spec_hash(self) -> str:
        """Return the SHA-256 of the canonical JSON form of this spec."""
        return sha256_hex(canonical_json(self.model_dump(mode="json")))


class DatasetLocation(_Strict):
    """Where one named dataset lives at a site."""

    path: Path = Field(description="folder holding train.jsonl and valid.jsonl")
    train: str = Field("train.jsonl", description="training file name inside the folder")
    valid: str = Field("valid.jsonl", description="validation file name inside the folder")


class SitePrivacyPolicy(_Strict):
    """A site's privacy budget; the site enforces it, never the server."""

    max_epsilon_per_job: float | None = Field(None, gt=0, description="most epsilon one job may spend")
    lifetime_epsilon: float | None = Field(
        None, gt=0, description="most epsilon all jobs together may spend on one dataset"
    )
    delta: float | None = Field(None, gt=0, lt=1, description="delta; default 1/(10 n) for n records")
    require_dp: bool = Field(False, description="refuse jobs that do not apply differential privacy")
    ledger: str = Field("privacy_ledger.json", description="spending ledger, in the kit's local/ folder")


class SiteEnrollment(_Strict):
    """What a site declares about itself once per job (compute, data, availability), as far as it chooses.

    The compute fields are written by ``zenfed site probe``; site IT writes the rest.
    """

    disclose: bool = Field(True, description="send this profile to the server, in the clear, once per job")
    disclose_record_counts: bool = Field(True, description="include the record count of the job's dataset")
    domain_tags: tuple[str, ...] = Field((), description="domain tags this site chooses to disclose")
    availability_utc: str | None = Field(
        None, pattern=r"^([01]\d|2[0-3]):[0-5]\d-([01]\d|2[0-3]):[0-5]\d$",
        description="the daily window (UTC, HH:MM-HH:MM) this site takes part in jobs",
    )
    device: Literal["cpu", "cuda"] | None = Field(None, description="the device this site trains on (probe)")
    device_count: int | None = Field(None, ge=1, description="how many of them (probe)")
    memory_gib: float | None = Field(None, gt=0, description="memory of one device, or of the machine (probe)")
    steps_per_minute: float | None = Field(None, gt=0, description="measured training steps per minute (probe)")
    probed_at: str | None = Field(None, description="when `zenfed site probe` measured the above")


class SiteRules(_Strict):
    """The rules of a site's policy, whether written in its kit (:class:`SitePolicy`) or in the project file."""

    datasets: dict[str, DatasetLocation] = Field(
        default_factory=dict, description="dataset name -> local location"
    )
    allowed_base_models: tuple[str, ...] = Field(
        (DEFAULT_BASE_MODEL,), description="base models this site agrees to train: 'default', a model folder "
        "as the job names it, 'sha256:HEX' (any folder whose content hashes to HEX, see `zenfed models hash`), "
        "or '*' for any",
    )
    allowed_jobs: tuple[str, ...] = Field(
        ("*",), description="job name patterns (fnmatch) this site accepts"
    )
    torch_threads: int = Field(0, ge=0, description="CPU threads for training, 0 for the default")
    device: str = Field(
        "auto", pattern=r"^(auto|cpu|cuda|cuda:\d+)$",
        description="where this site trains: auto (CUDA when present), cpu, cuda or cuda:N",
    )
    precision: Literal["fp32", "bf16", "fp16-mixed"] = Field(
        "fp32", description="number format of the base model and its matrix products: fp32, bf16 (CPU or CUDA) or "
        "fp16-mixed (CUDA, not with DP-SGD); LoRA weights, optimizer state and the update stay float32",
    )
    gradient_checkpointing: bool = Field(
        False, description="recompute activations in the backward pass to train longer sequences in less memory "
        "(slower; DP-SGD steps run without it)",
    )
    base_quantization: Literal["none", "8bit", "4bit"] = Field(
        "none", description="load the frozen base model in 8 or 4 bits (QLoRA style) through bitsandbytes on a "
        "CUDA device; refused where bitsandbytes or CUDA is missing",
    )
    keep_sent_updates: bool = Field(
        True, description="keep a copy of every update this site sent, in its own job folder"
    )
    privacy: SitePrivacyPolicy = SitePrivacyPolicy()
    require_attested_server: bool = Field(
        False, description="refuse tasks from a server that has not proven its TEE for this job"
    )
    max_lora_rank: int | None = Field(
        None, ge=1, description="train at most this LoRA rank (the leading ranks of the job's), to fit this hardware"
    )
    engine: Literal["peft", "nemo"] | None = Field(
        None, description="train with this engine whatever the job says (a site's standard stack)"
    )
    allow_plaintext_release: bool = Field(
        True, description="with encryption on, agree that the final adapter is released in the clear"
    )
    require_secure_aggregation: bool = Field(
        False, description="refuse jobs whose updates are not summed under encryption with pairwise masks "
        "(encryption.secure_aggregation: pairwise), so no key holder can read this site's update alone"
    )
    report_metrics: bool = Field(
        True, description="send validation loss and accuracy and the training loss to the server in the clear; "
        "false keeps them in this site's own log"
    )
    enrollment: SiteEnrollment = SiteEnrollment()

    @field_validator("allowed_base_models")
    @classmethod
    def _content_pins(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for entry in value:
            if entry.startswith("sha256:") and not re.fullmatch(r"sha256:[0-9a-f]{64}", entry):
                raise ValueError(f"{entry!r} is not sha256: and 64 lowercase hex digits (`zenfed models hash FOLDER`)")
        return value


class SitePolicy(SiteRules):
    """A site's own rules; lives in the site kit and never leaves the site."""

    site: str = Field(pattern=_NAME_PATTERN, description="the site's provisioned name")

    def dataset(self, name: str) -> DatasetLocation:
        """Return the location of dataset ``name``, or raise a PolicyError naming the fix."""
        from zenfed.errors import PolicyError

        if name not in self.datasets:
            known = ", ".join(sorted(self.datasets)) or "none"
            raise PolicyError(
                f"site {self.site!r} has no dataset named {name!r} (it has: {known}); "
                f"add it under 'datasets:' in the site policy"
            )
        return self.datasets[name]


class ServerSpec(_Strict):
    """The FLARE server of a project."""

    name: str = Field(
        "localhost", pattern=_NAME_PATTERN,
        description="the server's host name, which sites connect to and its certificate names",
    )
    fl_port: int = Field(8002, ge=1, le=65535, description="federated learning port")
    admin_port: int = Field(8003, ge=1, le=65535, description="admin port")


class RelaySpec(_Strict):
    """A FLARE relay: sites that name it connect to it, and it carries their traffic to the server."""

    name: str = Field(pattern=_NAME_PATTERN, description="relay name, e.g. 'relay-eu'")
    org: str = Field("zenfed", pattern=_ORG_PATTERN, description="organisation: letters, digits, _")
    port: int = Field(ge=1, le=65535, description="the port the relay listens on for its sites (mutual TLS)")


class SiteSpec(SiteRules):
    """One site of a project, with the policy written into its kit (every :class:`SiteRules` field)."""

    name: str = Field(pattern=_NAME_PATTERN, description="site name, e.g. 'hospital-a'")
    org: str = Field("zenfed", pattern=_ORG_PATTERN, description="organisation: letters, digits, _")
    relay: str | None = Field(None, description="the relay this site connects through (null: the server directly)")

    def policy(self) -> SitePolicy:
        """Return the site policy that provisioning writes into this site's kit."""
        fields = self.model_dump(exclude={"name", "org", "relay"})
        return SitePolicy(site=self.name, **fields)


class AdminSpec(_Strict):
    """A human admin of a project."""

    name: str = Field(pattern=r"^[^@\s]+@[^@\s]+$", description="admin e-mail, e.g. admin@org.org")
    org: str = Field("zenfed", pattern=_ORG_PATTERN, description="organisation: letters, digits, _")
    role: Literal["project_admin", "org_admin", "lead", "member"] = "project_admin"


class ProjectAttestation(_Strict):
    """What provisioning issues for attestation (see docs/attestation.md)."""

    kinds: dict[str, tuple[str, ...]] = Field(
        default_factory=lambda: {"default": tuple[str, ...](("emulated",))},
        description="participant (or 'default') -> TEE kinds it must prove",
    )
    accepted_measurements: dict[str, dict[str, tuple[str, ...]]] = Field(
        default_factory=dict, description="participant -> kind -> accepted measurements (empty: as provisioned)"
    )


class ProjectSpec(_Strict):
    """A federation to provision: one server, its sites and admins."""

    name: str = Field(pattern=_NAME_PATTERN, description="project name")
    server: ServerSpec = ServerSpec()
    sites: tuple[SiteSpec, ...] = Field(min_length=1, description="at least one site")
    relays: tuple[RelaySpec, ...] = Field((), description="FLARE relays between sites and the server")
    admins: tuple[AdminSpec, ...] = Field(min_length=1, description="at least one admin")
    encryption: bool = Field(True, description="issue CKKS contexts: secret to sites, public to the server")
    attestation: ProjectAttestation | None = Field(
        default_factory=ProjectAttestation, description="attestation keys and policy (null: none)"
    )

    @model_validator(mode="after")
    def _unique_names(self) -> ProjectSpec:
        names = [self.server.name, *(s.name for s in self.sites), *(r.name for r in self.relays),
                 *(a.name for a in self.admins)]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"participant names must be unique; repeated: {', '.join(dupes)}")
        if self.server.fl_port == self.server.admin_port:
            raise ValueError("server.fl_port and server.admin_port must differ")
        ports = [self.server.fl_port, self.server.admin_port, *(r.port for r in self.relays)]
        if len(set(ports)) != len(ports):
            raise ValueError("every relay's port must differ from the server's ports and from the other relays'")
        relays = {r.name for r in self.relays}
        for site in self.sites:
            if site.relay is not None and site.relay not in relays:
                raise ValueError(f"site {site.name} connects through relay {site.relay!r}, which is not among the "
                                 f"project's relays ({', '.join(sorted(relays)) or 'none'}); add it under 'relays:'")
        return self


_M = TypeVar("_M", bound=BaseModel)


def _format_validation_error(kind: str, source: str, err: ValidationError, model: type[BaseModel]) -> str:
    errors = err.errors()
    locs = [tuple(item["loc"]) for item in errors]
    lines = [f"invalid {kind} in {source}:"]
    for item, loc_parts in zip(errors, locs, strict=True):
        if item["type"] == "too_short" and any(other[:len(loc_parts)] == loc_parts and other != loc_parts
                                               for other in locs):
            continue  # a list left empty only because its items failed: the items' errors say why
        loc = ".".join(str(p) for p in loc_parts) or "(top level)"
        msg = item["msg"]
        if item["type"] == "extra_forbidden":
            msg = "is not a known field; remove it or check its spelling"
        elif item["type"] == "missing":
            msg = "is required; add it"
        hint = _field_description(model, loc_parts)
        got = "" if item["type"] in ("missing",) else f" (got {_short(item.get('input'))})"
        lines.append(f"  - {loc}: {msg}{got}" + (f"; expected {hint}" if hint else ""))
    return "\n".join(lines)


def _short(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _field_description(model: type[BaseModel], loc: tuple[Any, ...]) -> str | None:
    """The description of the field at ``loc``, stepping into lists and dicts; None unless ``loc`` is a field."""
    current: Any = model
    description = None
    for part in loc:
        fields = getattr(current, "model_fields", None)
        if isinstance(part, int) or not fields:
            args = [a for a in getattr(current, "__args__", ()) if a is not Ellipsis]
            if not args:
                return None
            current, description = args[-1], None  # the item (or value) type
            if isinstance(part, int) or not getattr(current, "model_fields", None):
                continue
            fields = current.model_fields
        if part not in fields:
            return None
        info = fields[part]
        description = info.description
        current = info.annotation
    return description


def parse_model(model: type[_M], data: Any, *, kind: str, source: str) -> _M:
    """Validate ``data`` as ``model``, raising SpecError with a readable message.

    Args:
        model: The pydantic model class.
        data: Parsed YAML or JSON data.
        kind: What is being read, for the message (e.g. "job spec").
        source: Where it came from, for the message (e.g. a file path).

    Returns:
        The validated model.

    Raises:
        SpecError: If the data does not validate; the message names every bad field.
    """
    if not isinstance(data, dict):
        raise SpecError(f"invalid {kind} in {source}: expected a mapping of fields, got {type(data).__name__}")
    try:
        return model.model_validate(data)
    except ValidationError as err:
        raise SpecError(_format_validation_error(kind, source, err, model)) from None


def load_yaml_model(model: type[_M], path: str | Path, *, kind: str) -> _M:
    """Load a YAML file and validate it as ``model``.

    Raises:
        SpecError: If the file is missing, not YAML, or does not validate.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SpecError(f"{kind} file {path} does not exist; check the path") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise SpecError(f"{kind} file {path} is not valid YAML: {err}") from None
    return parse_model(model, data, kind=kind, source=str(path))


def load_job_spec(path: str | Path) -> JobSpec:
    """Load and validate a job spec YAML file."""
    return load_yaml_model(JobSpec, path, kind="job spec")


def load_site_policy(path: str | Path) -> SitePolicy:
    """Load and validate a site policy YAML file."""
    return load_yaml_model(SitePolicy, path, kind="site policy")


def load_project_spec(path: str | Path) -> ProjectSpec:
    """Load and validate a project YAML file."""
    return load_yaml_model(ProjectSpec, path, kind="project spec")
