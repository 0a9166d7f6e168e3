"""The site's privacy ledger: signed, restart-safe, tamper-evident, and it enforces budgets."""

import json
import os
import shutil
import stat
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from zenfed.privacy.dp import (
    LedgerError,
    LedgerTamperedError,
    PrivacyAccountant,
    PrivacyBudgetError,
    PrivacyLedger,
)


def _write_key(path: Path) -> Path:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.TraditionalOpenSSL,  # what NVFlare kits hold
            serialization.NoEncryption(),
        )
    )
    path.chmod(0o600)
    return path


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    root = tmp_path_factory.mktemp("keys")
    return _write_key(root / "client.key"), _write_key(root / "other.key")


@pytest.fixture
def ledger_path(tmp_path):
    return tmp_path / "ledger" / "privacy_ledger.json"


def test_spend_survives_a_restart(keys, ledger_path):
    # Prepare
    ledger = PrivacyLedger(ledger_path, signing_key_path=keys[0])
    acct = PrivacyAccountant()
    acct.step(noise_multiplier=1.0, sample_rate=0.05, num_steps=10)

    # Execute: two rounds of job-a, one of job-b, then a "restart".
    ledger.record_spend(dataset="notes", job="job-a", round=0, epsilon=1.5, delta=1e-5)
    ledger.record_spend(
        dataset="notes",
        job="job-a",
        round=1,
        epsilon=2.25,
        delta=1e-5,
        accountant_state=acct.state_dict(),
    )
    ledger.record_spend(dataset="notes", job="job-b", round=0, epsilon=1.0, delta=1e-5)
    ledger.record_spend(dataset="claims", job="job-a", round=0, epsilon=4.0, delta=1e-5)
    reopened = PrivacyLedger(ledger_path, signing_key_path=keys[0])

    # Assert: a job spends its largest cumulative epsilon; a dataset sums its jobs.
    assert reopened.job_spent(dataset="notes", job="job-a") == 2.25
    assert reopened.spent(dataset="notes") == pytest.approx(3.25)
    assert reopened.spent(dataset="claims") == 4.0
    assert reopened.spent(dataset="unused") == 0.0
    assert [r.round for r in reopened.records(dataset="notes", job="job-a")] == [0, 1]
    restored = PrivacyAccountant.from_state_dict(
        reopened.accountant_state(dataset="notes", job="job-a")
    )
    assert restored.get_epsilon(1e-5) == acct.get_epsilon(1e-5)
    assert reopened.head_hash() == ledger.head_hash()


def test_file_is_private_and_written_atomically(keys, ledger_path):
    ledger = PrivacyLedger(ledger_path, signing_key_path=keys[0])

    for r in range(3):
        ledger.record_spend(dataset="notes", job="j", round=r, epsilon=float(r), delta=1e-5)

    assert stat.S_IMODE(os.stat(ledger_path).st_mode) == 0o600
    assert sorted(p.name for p in ledger_path.parent.iterdir()) == [
        "privacy_ledger.json",
        "privacy_ledger.json.lock",
    ]  # no temporary files left behind
    assert json.loads(ledger_path.read_text())["sequence"] == 3


@pytest.mark.parametrize(
    "tamper",
    [
        lambda d: d["entries"][0].update(epsilon=0.1),  # lower the spend
        lambda d: d["entries"].pop(),  # drop a round
        lambda d: d.update(sequence=0),
        lambda d: d["signature"].update(value=d["signature"]["value"][:-8] + "AAAAAAA="),
    ],
)
def test_edited_ledger_is_detected(keys, ledger_path, tamper):
    # Prepare
    ledger = PrivacyLedger(ledger_path, signing_key_path=keys[0])
    ledger.record_spend(dataset="notes", job="j", round=0, epsilon=3.0, delta=1e-5)
    ledger.record_spend(dataset="notes", job="j", round=1, epsilon=5.0, delta=1e-5)
    data = json.loads(ledger_path.read_text())

    # Execute
    tamper(data)
    ledger_path.write_text(json.dumps(data))

    # Assert: on restart and on the next read by the running site.
    with pytest.raises(LedgerTamperedError, match="signature"):
        PrivacyLedger(ledger_path, signing_key_path=keys[0])
    with pytest.raises(LedgerTamperedError):
        ledger.spent(dataset="notes")


def test_corrupted_file_is_a_tamper_error(keys, ledger_path):
    ledger = PrivacyLedger(ledger_path, signing_key_path=keys[0])
    ledger.record_spend(dataset="notes", job="j", round=0, epsilon=3.0, delta=1e-5)

    ledger_path.write_text(ledger_path.read_text()[:40])

    with pytest.raises(LedgerTamperedError, match="not a signed ledger"):
        PrivacyLedger(ledger_path, signing_key_path=keys[0])


def test_ledger_of_another_key_is_refused(keys, ledger_path):
    PrivacyLedger(ledger_path, signing_key_path=keys[0]).record_spend(
        dataset="notes", job="j", round=0, epsilon=1.0, delta=1e-5
    )

    with pytest.raises(LedgerError, match="another key"):
        PrivacyLedger(ledger_path, signing_key_path=keys[1])


def test_cumulative_epsilon_cannot_go_down(keys, ledger_path):
    ledger = PrivacyLedger(ledger_path, signing_key_path=keys[0])
    ledger.record_spend(dataset="notes", job="j", round=0, epsilon=3.0, delta=1e-5)

    with pytest.raises(LedgerError, match="accountant was reset"):
        ledger.record_spend(dataset="notes", job="j", round=1, epsilon=1.0, delta=1e-5)
    assert ledger.job_spent(dataset="notes", job="j") == 3.0


def test_budget_refusals_name_the_limit_and_the_numbers(keys, ledger_path):
    # Prepare: 6.0 already spent on "notes" by an earlier job.
    ledger = PrivacyLedger(ledger_path, signing_key_path=keys[0])
    ledger.record_spend(dataset="notes", job="old", round=4, epsilon=6.0, delta=1e-5)
    limits = {"max_epsilon_per_job": 8.0, "lifetime_budget": 10.0}

    # Execute
    too_big = ledger.check_job(planned_epsilon=9.0, dataset="notes", job="new", **limits)
    over_life = ledger.check_job(planned_epsilon=5.0, dataset="notes", job="new", **limits)
    fits = ledger.check_job(planned_epsilon=4.0, dataset="notes", job="new", **limits)
    other_dataset = ledger.check_job(planned_epsilon=8.0, dataset="claims", **limits)
    unlimited = ledger.check_job(
        planned_epsilon=50.0, dataset="notes", max_epsilon_per_job=None, lifetime_budget=None
    )

    # Assert
    assert (too_big.allowed, too_big.code) == (False, "max_epsilon_per_job")
    assert "epsilon=9.0000" in too_big.reason and "maximum per job of 8" in too_big.reason
    assert (over_life.allowed, over_life.code) == (False, "lifetime_budget")
    assert "only 4.0000 of its lifetime budget 10" in over_life.reason
    assert over_life.spent_epsilon == 6.0
    assert fits.allowed and fits.code == "ok"
    assert other_dataset.allowed and unlimited.allowed
    with pytest.raises(PrivacyBudgetError, match="lifetime budget"):
        over_life.raise_if_refused()
    assert json.loads(json.dumps(over_life.to_dict()))["code"] == "lifetime_budget"


def test_site_stops_mid_job_when_the_budget_runs_out(keys, ledger_path):
    # Prepare: a job whose full plan exceeds the lifetime budget left on the dataset.
    ledger = PrivacyLedger(ledger_path, signing_key_path=keys[0])
    ledger.record_spend(dataset="notes", job="old", round=0, epsilon=1.0, delta=1e-4)
    limits = {"max_epsilon_per_job": None, "lifetime_budget": 6.0}
    acct = PrivacyAccountant(method="rdp")
    step = {"noise_multiplier": 1.0, "sample_rate": 0.1, "num_steps": 10}

    # Execute: the training loop's per-round check and record.
    contributed, refusal = [], None
    for rnd in range(20):
        after = acct.projected_epsilon(delta=1e-4, **step)
        decision = ledger.can_spend(dataset="notes", job="new", epsilon_after=after, **limits)
        if not decision.allowed:
            refusal = decision
            break
        acct.step(**step)
        ledger.record_spend(
            dataset="notes",
            job="new",
            round=rnd,
            epsilon=acct.get_epsilon(1e-4),
            delta=1e-4,
            accountant_state=acct.state_dict(),
        )
        contributed.append(rnd)

    # Assert
    assert 0 < len(contributed) < 20
    assert refusal is not None and refusal.code == "lifetime_budget"
    assert "next round of job 'new'" in refusal.reason
    assert ledger.spent(dataset="notes") <= 6.0
    assert ledger.job_spent(dataset="notes", job="new") == pytest.approx(acct.get_epsilon(1e-4))


def test_restarted_job_counts_what_it_already_spent(keys, ledger_path):
    ledger = PrivacyLedger(ledger_path, signing_key_path=keys[0])
    ledger.record_spend(dataset="notes", job="j", round=2, epsilon=7.0, delta=1e-5)

    decision = ledger.check_job(
        planned_epsilon=2.0,
        dataset="notes",
        job="j",
        max_epsilon_per_job=6.0,
        lifetime_budget=None,
    )

    assert not decision.allowed and decision.code == "max_epsilon_per_job"


@pytest.mark.skipif(
    shutil.which("nvflare", path=os.path.dirname(sys.executable)) is None,
    reason="nvflare CLI not installed",
)
def test_works_with_a_provisioned_flare_kit(tmp_path):
    # Prepare: a real kit from `nvflare provision`.
    (tmp_path / "project.yml").write_text(
        "api_version: 3\nname: dpkit\ndescription: ledger test\nparticipants:\n"
        "  - {name: server, type: server, org: z, fed_learn_port: 8002, admin_port: 8003}\n"
        "  - {name: site-1, type: client, org: z}\n"
        "  - {name: site-2, type: client, org: z}\n"
        "  - {name: admin@z.org, type: admin, org: z, role: project_admin}\n"
        "builders:\n"
        "  - path: nvflare.lighter.impl.workspace.WorkspaceBuilder\n"
        "  - path: nvflare.lighter.impl.cert.CertBuilder\n"
    )
    nvflare = os.path.join(os.path.dirname(sys.executable), "nvflare")
    subprocess.run(
        [nvflare, "provision", "-p", "project.yml", "-w", "ws"],
        cwd=tmp_path,
        check=True,
        capture_output=True,
    )
    site1 = next(tmp_path.glob("ws/dpkit/prod_*/site-1/startup"))
    site2 = next(tmp_path.glob("ws/dpkit/prod_*/site-2/startup"))

    # Execute
    ledger = PrivacyLedger(
        site1 / "privacy_ledger.json",
        signing_key_path=site1 / "client.key",
        certificate_path=site1 / "client.crt",
    )
    ledger.record_spend(dataset="notes", job="j", round=0, epsilon=2.0, delta=1e-5)

    # Assert
    assert (
        PrivacyLedger(site1 / "privacy_ledger.json", signing_key_path=site1 / "client.key").spent(
            dataset="notes"
        )
        == 2.0
    )
    with pytest.raises(LedgerError, match="does not match the certificate"):
        PrivacyLedger(
            site1 / "other.json",
            signing_key_path=site1 / "client.key",
            certificate_path=site2 / "client.crt",
        )


def test_concurrent_writers_lose_no_spend(keys, ledger_path):
    # Prepare: two jobs of one site, each with its own ledger object on the same file.
    writers = [PrivacyLedger(ledger_path, signing_key_path=keys[0]) for _ in range(2)]

    # Execute
    def spend(ledger, job):
        for r in range(8):
            ledger.record_spend(dataset="notes", job=job, round=r, epsilon=0.5 * (r + 1), delta=0)

    threads = [threading.Thread(target=spend, args=(w, f"job-{i}")) for i, w in enumerate(writers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()

    # Assert
    reopened = PrivacyLedger(ledger_path, signing_key_path=keys[0])
    assert len(reopened.records()) == 16
    assert reopened.spent(dataset="notes") == pytest.approx(8.0)


def test_a_non_finite_number_edited_in_is_a_tamper_error(keys, ledger_path):
    # Prepare: an edit that JSON can read but canonical JSON cannot encode.
    ledger = PrivacyLedger(ledger_path, signing_key_path=keys[0])
    ledger.record_spend(dataset="notes", job="j", round=0, epsilon=3.0, delta=1e-5)
    data = json.loads(ledger_path.read_text())
    data["entries"][0]["epsilon"] = float("nan")
    ledger_path.write_text(json.dumps(data))

    # Execute / Assert
    with pytest.raises(LedgerTamperedError, match="does not match its signature"):
        PrivacyLedger(ledger_path, signing_key_path=keys[0])


def test_a_key_that_is_not_rsa_is_a_ledger_error(tmp_path, ledger_path):
    # Prepare
    from cryptography.hazmat.primitives.asymmetric import ed25519

    key_path = tmp_path / "ed.key"
    key_path.write_bytes(
        ed25519.Ed25519PrivateKey.generate().private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )

    # Execute / Assert
    with pytest.raises(LedgerError, match="needs the kit's RSA startup/client.key"):
        PrivacyLedger(ledger_path, signing_key_path=key_path)
    with pytest.raises(LedgerError, match="does not exist"):
        PrivacyLedger(ledger_path, signing_key_path=tmp_path / "missing.key")
