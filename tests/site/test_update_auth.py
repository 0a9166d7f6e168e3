"""Every update is signed by its site, and the server checks the signature against the project's root CA."""

from __future__ import annotations

from pathlib import Path

import pytest

from _pki import make_ca, make_kit
from zenfed import protocol as P
from zenfed.update_auth import (
    UpdateAuthError,
    UpdateSigner,
    UpdateVerifier,
    correction_statement,
    release_statement,
    update_statement,
)


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    root = tmp_path_factory.mktemp("kits")
    ca = make_ca()
    kits = {site: make_kit(root, site, ca) for site in ("site-1", "site-2")}
    foreign = make_kit(root / "other", "site-1", make_ca("other-ca"))
    return kits, foreign, UpdateVerifier.from_kit(kits["site-1"])


def signed(startup: Path, *, site: str = "site-1", payload: bytes = b"ciphertext bytes", weight: float = 0.4,
           round_index: int = 2) -> dict:
    header = {P.H_WEIGHT: weight, P.H_NUM_EXAMPLES: 400}
    signer = UpdateSigner.from_kit(startup)
    assert signer is not None
    statement = update_statement(job_id="job-1", round_index=round_index, site=site, payload=payload, header=header)
    header.update(signer.sign(statement))
    return header


def check(verifier, header, *, site="site-1", payload=b"ciphertext bytes", round_index=2):
    verifier.check(site=site, job_id="job-1", round_index=round_index, header=header, payload=payload)


def test_a_signed_update_passes(project):
    # Prepare
    kits, _, verifier = project

    # Execute / Assert: no error
    check(verifier, signed(kits["site-1"]))


def test_a_flipped_bit_with_a_recomputed_hash_is_caught(project):
    # Prepare: the attacker changes the bytes; every hash is recomputed from them, the signature cannot be
    kits, _, verifier = project
    header = signed(kits["site-1"])

    # Execute / Assert
    with pytest.raises(UpdateAuthError, match="does not match what arrived"):
        check(verifier, header, payload=b"ciphertext bytez")


@pytest.mark.parametrize(("field", "value"), [(P.H_WEIGHT, 1.0), (P.H_NUM_EXAMPLES, 4000)])
def test_a_changed_weight_is_caught(project, field, value):
    # Prepare
    kits, _, verifier = project
    header = signed(kits["site-1"])
    header[field] = value

    # Execute / Assert
    with pytest.raises(UpdateAuthError, match="does not match"):
        check(verifier, header)


def test_a_replay_into_another_round_is_caught(project):
    # Prepare
    kits, _, verifier = project

    # Execute / Assert
    with pytest.raises(UpdateAuthError, match="does not match"):
        check(verifier, signed(kits["site-1"], round_index=1), round_index=2)


def test_an_update_signed_by_another_site_is_refused(project):
    # Prepare: site-2 signs an update and sends it as site-1's
    kits, _, verifier = project
    header = signed(kits["site-2"], site="site-1")

    # Execute / Assert
    with pytest.raises(UpdateAuthError, match="certificate of 'site-2'"):
        check(verifier, header)


def test_a_foreign_projects_certificate_is_refused(project):
    # Prepare: a site of another project, with the same name
    _, foreign, verifier = project

    # Execute / Assert
    with pytest.raises(UpdateAuthError, match="not issued by this project's root CA"):
        check(verifier, signed(foreign))


def test_an_unsigned_update_is_refused(project):
    # Prepare
    _, _, verifier = project

    # Execute / Assert
    with pytest.raises(UpdateAuthError, match="not signed"):
        check(verifier, {P.H_WEIGHT: 0.4, P.H_NUM_EXAMPLES: 400})


def test_a_kit_without_keys_neither_signs_nor_checks(tmp_path):
    # Execute / Assert: the simulator's kits
    assert UpdateSigner.from_kit(None) is None and UpdateSigner.from_kit(tmp_path) is None
    assert UpdateVerifier.from_kit(None) is None and UpdateVerifier.from_kit(tmp_path) is None


def test_a_key_that_does_not_match_its_certificate_is_an_error(tmp_path, project):
    # Prepare: site-1's certificate with site-2's key
    kits, _, _ = project
    startup = tmp_path / "startup"
    startup.mkdir()
    (startup / "client.key").write_bytes((kits["site-2"] / "client.key").read_bytes())
    (startup / "client.crt").write_bytes((kits["site-1"] / "client.crt").read_bytes())

    # Execute / Assert
    with pytest.raises(UpdateAuthError, match="does not belong to"):
        UpdateSigner.from_kit(startup)


def test_no_signed_statement_stands_in_for_another_kind(project):
    # Prepare: the same payload, signed by site-1 as a mask correction
    kits, _, verifier = project
    payload = b"adapter bytes"
    header = UpdateSigner.from_kit(kits["site-1"]).sign(
        correction_statement(job_id="job-1", round_index=2, site="site-1", payload=payload))

    # Execute / Assert: it is not a release, nor an update
    with pytest.raises(UpdateAuthError, match="signature on the released adapter from site-1 does not match"):
        verifier.check_signed(site="site-1", header=header, what="released adapter",
                              statement=release_statement(job_id="job-1", round_index=2, site="site-1",
                                                          payload=payload, source_sha256="ab" * 32))
    with pytest.raises(UpdateAuthError, match="does not match"):
        check(verifier, {**header, P.H_WEIGHT: 0.4, P.H_NUM_EXAMPLES: 400}, payload=payload)


def test_a_release_decrypted_from_another_global_than_the_one_sent_is_refused(project):
    # Prepare: site-1 releases what it decrypted from global "aa…"; the server had sent global "bb…"
    kits, _, verifier = project
    payload = b"adapter bytes"
    header = UpdateSigner.from_kit(kits["site-1"]).sign(
        release_statement(job_id="job-1", round_index=2, site="site-1", payload=payload, source_sha256="aa" * 32))

    # Execute / Assert
    with pytest.raises(UpdateAuthError, match="does not match"):
        verifier.check_signed(site="site-1", header=header, what="released adapter",
                              statement=release_statement(job_id="job-1", round_index=2, site="site-1",
                                                          payload=payload, source_sha256="bb" * 32))
