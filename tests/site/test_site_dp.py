"""The site's privacy stage: refusals, exact accounting, mid-job exhaustion, restart, client DP."""

from __future__ import annotations

import datetime
import math

import dp_accounting
import pytest
import torch
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID
from dp_accounting.pld import PLDAccountant
from dp_accounting.rdp import RdpAccountant

from zenfed.data.jsonl import load_jsonl
from zenfed.engines.peft import PeftEngine
from zenfed.errors import PolicyError
from zenfed.privacy.dp import (
    BudgetExhausted,
    DPRequiredError,
    PrivacyBudgetError,
    PrivacyLedger,
)
from zenfed.site.dp import SiteDP
from zenfed.spec import SitePolicy

SIGMA = 1.2


@pytest.fixture(scope="module")
def kit(tmp_path_factory):
    """A site kit's startup/ (RSA client.key + matching client.crt) and an empty local/."""
    root = tmp_path_factory.mktemp("kit")
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "site-1")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name)
        .public_key(key.public_key()).serial_number(1)
        .not_valid_before(now).not_valid_after(now + datetime.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    (root / "startup").mkdir()
    (root / "startup" / "client.key").write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    ))
    (root / "startup" / "client.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return root


@pytest.fixture
def local_dir(kit, tmp_path):
    return tmp_path / "local"


@pytest.fixture(scope="module")
def train(small_builtin_data):
    return load_jsonl(small_builtin_data / "site-1" / "train.jsonl")


@pytest.fixture(scope="module")
def engine(tiny_job_spec, tiny_model_dir):
    spec = tiny_job_spec()
    return PeftEngine(model_dir=tiny_model_dir, lora=spec.lora, training=spec.training, threads=1)


def _spec(tiny_job_spec, name="dp-job", **privacy):
    return tiny_job_spec(name, privacy={"level": "record", "noise_multiplier": SIGMA, **privacy})


def _policy(**privacy):
    return SitePolicy(site="site-1", privacy=privacy)


def _stage(spec, policy, kit, local_dir, *, job_id="job-1", num_records=60, num_sites=2):
    return SiteDP.from_kit(
        spec=spec, policy=policy, startup_dir=kit / "startup", local_dir=local_dir,
        job_id=job_id, num_records=num_records, num_sites=num_sites,
    )


def _run_round(stage, engine, train, rnd, adapter):
    dp = stage.for_round(rnd)
    result = engine.train(adapter=adapter, examples=train, steps=4, seed=rnd, dp=dp)
    return result.adapter, stage.after_round(rnd)


def test_admit_refuses_a_job_above_the_per_job_maximum(tiny_job_spec, kit, local_dir):
    # Prepare: 2 rounds x 4 steps at sigma 0.6 costs far more than epsilon 1.
    stage = _stage(_spec(tiny_job_spec, noise_multiplier=0.6), _policy(max_epsilon_per_job=1.0),
                   kit, local_dir)

    # Execute / Assert
    with pytest.raises(PrivacyBudgetError, match="maximum per job of 1") as caught:
        stage.admit()
    assert caught.value.decision["code"] == "max_epsilon_per_job"
    assert isinstance(caught.value, PolicyError)


def test_admit_refuses_a_job_without_dp_at_a_site_that_requires_it(tiny_job_spec, kit, local_dir):
    # Prepare
    stage = _stage(tiny_job_spec(), _policy(require_dp=True), kit, local_dir)
    unlimited = _stage(tiny_job_spec(), _policy(), kit, local_dir)

    # Execute / Assert
    with pytest.raises(DPRequiredError, match="requires differential privacy"):
        stage.admit()
    assert unlimited.admit()["level"] == "none" and unlimited.for_round(1) is None


def test_admit_solves_sigma_for_a_target_epsilon_at_the_policy_delta(tiny_job_spec, kit, local_dir):
    # Prepare
    spec = tiny_job_spec("target", privacy={"level": "record", "target_epsilon": 3.0})
    stage = _stage(spec, _policy(delta=1e-4, max_epsilon_per_job=3.0), kit, local_dir)

    # Execute
    plan = stage.admit()

    # Assert: epsilon of the whole job (2 rounds x 4 steps at q = 4/60) is just under the target.
    assert plan["delta"] == 1e-4 and plan["sample_rate"] == pytest.approx(4 / 60)
    assert 2.9 < plan["planned_epsilon"] <= 3.0
    assert plan["decision"]["allowed"]


def test_epsilon_equals_a_direct_dp_accounting_computation(
    tiny_job_spec, kit, local_dir, engine, train
):
    # Prepare
    stage = _stage(_spec(tiny_job_spec), _policy(), kit, local_dir)
    stage.admit()
    adapter = engine.initial_adapter()

    # Execute: two rounds of real DP-SGD training with the engine.
    adapter, first = _run_round(stage, engine, train, 1, adapter)
    adapter, second = _run_round(stage, engine, train, 2, adapter)

    # Assert: 8 Poisson-subsampled Gaussian steps at q = 4/60, delta = 1/(10 n).
    direct = PLDAccountant(value_discretization_interval=1e-3)
    event = dp_accounting.PoissonSampledDpEvent(4 / 60, dp_accounting.GaussianDpEvent(SIGMA))
    direct.compose(event, 8)
    assert second["epsilon"] == pytest.approx(direct.get_epsilon(1 / 600), rel=1e-9)
    assert second["delta"] == 1 / 600 and second["noise_multiplier"] == SIGMA
    assert second["epsilon_round"] == pytest.approx(second["epsilon"] - first["epsilon"])
    assert 0 < first["epsilon"] < second["epsilon"]
    ledger = PrivacyLedger(local_dir / "privacy_ledger.json",
                           signing_key_path=kit / "startup" / "client.key")
    assert ledger.job_spent(dataset="builtin", job="job-1") == second["epsilon"]


def test_rdp_accounting_equals_a_direct_computation(tiny_job_spec, kit, local_dir):
    # Prepare: the accountant steps as the engine does, once per DP-SGD step.
    stage = _stage(_spec(tiny_job_spec, accounting="rdp"), _policy(), kit, local_dir)
    stage.admit()

    # Execute
    dp = stage.for_round(1)
    dp.accountant.step(noise_multiplier=dp.noise_multiplier, sample_rate=dp.sample_rate,
                       num_steps=4)
    metrics = stage.after_round(1)

    # Assert
    direct = RdpAccountant()
    direct.compose(dp_accounting.PoissonSampledDpEvent(
        4 / 60, dp_accounting.GaussianDpEvent(SIGMA)), 4)
    assert metrics["epsilon"] == pytest.approx(direct.get_epsilon(1 / 600), rel=1e-9)


def test_a_site_stops_contributing_when_its_lifetime_budget_runs_out_mid_job(
    tiny_job_spec, kit, local_dir, engine, train
):
    # Prepare: each job alone fits the lifetime budget, and both are admitted before either
    # spends; then both train a round on the same dataset.
    spec = _spec(tiny_job_spec)
    planned = _stage(spec, _policy(), kit, local_dir).admit()["planned_epsilon"]
    policy = _policy(lifetime_epsilon=planned * 1.5)
    job1 = _stage(spec, policy, kit, local_dir, job_id="job-1")
    job2 = _stage(spec, policy, kit, local_dir, job_id="job-2")
    job1.admit()
    job2.admit()
    _run_round(job1, engine, train, 1, engine.initial_adapter())
    _run_round(job2, engine, train, 1, engine.initial_adapter())

    # Execute / Assert: job-1's next round would exceed the lifetime budget.
    with pytest.raises(BudgetExhausted, match="stops contributing") as caught:
        job1.for_round(2)
    assert caught.value.decision["code"] == "lifetime_budget"
    assert isinstance(caught.value, PolicyError)


def test_the_ledger_resumes_the_accountant_after_a_restart(
    tiny_job_spec, kit, local_dir, engine, train
):
    # Prepare: one round, then the site restarts (a new stage on the same ledger).
    spec = _spec(tiny_job_spec)
    before = _stage(spec, _policy(), kit, local_dir)
    before.admit()
    adapter, round1 = _run_round(before, engine, train, 1, engine.initial_adapter())

    # Execute
    after = _stage(spec, _policy(), kit, local_dir)
    after.admit()
    _, round2 = _run_round(after, engine, train, 2, adapter)

    # Assert: the restarted site counts round 1; the total equals both rounds' 8 steps.
    assert after.accountant.total_steps == 8
    assert round2["epsilon_round"] == pytest.approx(round2["epsilon"] - round1["epsilon"])
    assert round2["epsilon"] == pytest.approx(
        _stage(spec, _policy(), kit, local_dir / "fresh").admit()["planned_epsilon"], rel=1e-9)


@pytest.mark.parametrize(("mode", "sites", "expected_std"), [
    ("local", 4, SIGMA * 0.5), ("distributed", 4, SIGMA * 0.5 / 2),
])
def test_client_level_update_is_clipped_and_noised(
    tiny_job_spec, kit, local_dir, mode, sites, expected_std
):
    # Prepare: a large update, clip_norm 0.5.
    spec = tiny_job_spec(
        "client", privacy={"level": "client", "noise_multiplier": SIGMA, "clip_norm": 0.5,
                           "client_mode": mode},
        federation={"min_sites": sites, "weighting": "uniform"}, encryption={"enabled": True},
    )
    stage = _stage(spec, _policy(), kit, local_dir, num_sites=sites)
    stage.admit()
    global_adapter = {"a": torch.zeros(200, 500), "b": torch.ones(300)}
    local = {"a": torch.full((200, 500), 3.0), "b": torch.ones(300) * 5}

    # Execute
    assert stage.for_round(1) is None
    out = stage.privatize_update(global_adapter=global_adapter, local_adapter=local)
    metrics = stage.after_round(1)

    # Assert: noise std of 100k draws is sigma*C (local) or sigma*C/sqrt(k) (distributed);
    # the clipped signal is 0.5 spread over 100k entries, invisible next to it.
    noise = torch.cat([(out[k] - global_adapter[k]).flatten() for k in out]).double()
    assert noise.std().item() == pytest.approx(expected_std, rel=0.02)
    assert out["a"].dtype == torch.float32
    direct = PLDAccountant(value_discretization_interval=1e-3)
    direct.compose(dp_accounting.GaussianDpEvent(SIGMA), 1)
    assert metrics["epsilon"] == pytest.approx(direct.get_epsilon(1e-5), rel=1e-9)


def test_distributed_client_dp_without_encryption_is_refused(tiny_job_spec, kit, local_dir):
    spec = tiny_job_spec("dist", privacy={"level": "client", "noise_multiplier": 1.0,
                                          "client_mode": "distributed"},
                         federation={"weighting": "uniform"})
    with pytest.raises(DPRequiredError, match="encryption.enabled"):
        _stage(spec, _policy(), kit, local_dir).admit()


def test_a_kit_without_a_key_accounts_but_refuses_a_lifetime_budget(tiny_job_spec, tmp_path):
    # Prepare: the simulator's kits carry no client.key.
    spec = _spec(tiny_job_spec)
    args = {"startup_dir": tmp_path / "startup", "local_dir": tmp_path / "local",
            "job_id": "sim", "num_records": 60, "num_sites": 2}

    # Execute
    plain = SiteDP.from_kit(spec=spec, policy=_policy(max_epsilon_per_job=50.0), **args)
    plain.admit()
    limited = SiteDP.from_kit(spec=spec, policy=_policy(lifetime_epsilon=50.0), **args)

    # Assert
    assert plain.ledger is None and plain.for_round(1) is not None
    assert math.isfinite(plain.after_round(1)["epsilon"])
    with pytest.raises(DPRequiredError, match="lifetime_epsilon"):
        limited.admit()


def _two_stage(tiny_job_spec, name="dpo-job", **privacy):
    return tiny_job_spec(name, objective="dpo", dpo={"sft_rounds": 1}, federation={"rounds": 3},
                         privacy={"level": "record", **privacy})


def test_a_two_stage_job_composes_both_stages_each_at_its_own_rate(tiny_job_spec, kit, local_dir):
    # Prepare: 60 SFT records, 40 preference pairs, batch 4, 4 steps a round; round 1 SFT, rounds 2-3 DPO.
    spec = _two_stage(tiny_job_spec, target_epsilon=6.0)
    stage = SiteDP.from_kit(spec=spec, policy=_policy(), startup_dir=kit / "startup", local_dir=local_dir,
                            job_id="job-1", num_records=60, num_sites=2, num_pairs=40)

    # Execute
    plan = stage.admit()
    rates = [stage.for_round(r).sample_rate for r in (1, 2, 3)]

    # Assert: one sigma; epsilon is 4 steps at q=4/60 composed with 8 steps at q=4/40, at delta 1/(10*60).
    assert plan["stage_sample_rates"] == {"sft": 4 / 60, "dpo": 4 / 40} and rates == [4 / 60, 4 / 40, 4 / 40]
    direct = PLDAccountant(value_discretization_interval=1e-3)
    gaussian = dp_accounting.GaussianDpEvent(plan["noise_multiplier"])
    direct.compose(dp_accounting.PoissonSampledDpEvent(4 / 60, gaussian), 4)
    direct.compose(dp_accounting.PoissonSampledDpEvent(4 / 40, gaussian), 8)
    assert plan["planned_epsilon"] == pytest.approx(direct.get_epsilon(1 / 600), rel=1e-6)
    assert 5.9 < plan["planned_epsilon"] <= 6.0 and plan["delta"] == 1 / 600
    assert "preference pair" in plan["unit"]


def test_a_two_stage_jobs_spend_counts_against_both_datasets_budgets(tiny_job_spec, kit, local_dir):
    # Prepare: an earlier DPO-only job spent part of the preference set's budget;
    # the lifetime budget fits the new job alone, but not on top of that spend.
    spec = _two_stage(tiny_job_spec, noise_multiplier=SIGMA)
    planned = SiteDP.from_kit(spec=spec, policy=_policy(), startup_dir=None, local_dir=None, job_id="plan",
                              num_records=60, num_sites=2, num_pairs=40).admit()["planned_epsilon"]
    earlier = SiteDP.from_kit(spec=tiny_job_spec("prefs-only", objective="dpo", federation={"rounds": 1},
                                                 data={"dataset": "other"},
                                                 privacy={"level": "record", "noise_multiplier": SIGMA}),
                              policy=_policy(), startup_dir=kit / "startup", local_dir=local_dir, job_id="job-0",
                              num_records=60, num_sites=2, num_pairs=40)
    earlier.admit()
    earlier.accountant.step(noise_multiplier=SIGMA, sample_rate=0.1, num_steps=4)
    spent = earlier.after_round(1)["epsilon"]
    stage = SiteDP.from_kit(spec=spec, policy=_policy(lifetime_epsilon=planned + spent / 2),
                            startup_dir=kit / "startup", local_dir=local_dir, job_id="job-1", num_records=60,
                            num_sites=2, num_pairs=40)

    # Execute / Assert: the job fits the SFT dataset's budget but not the preference set's.
    with pytest.raises(PrivacyBudgetError) as caught:
        stage.admit()
    assert caught.value.decision["code"] == "lifetime_budget" and spent > 0
    ledger = PrivacyLedger(local_dir / "privacy_ledger.json", signing_key_path=kit / "startup" / "client.key")
    # A DPO-only job trains on its preference set alone: its SFT dataset's budget is untouched.
    assert ledger.spent(dataset="builtin-preferences") == spent and ledger.spent(dataset="other") == 0
    assert ledger.spent(dataset="builtin") == 0
