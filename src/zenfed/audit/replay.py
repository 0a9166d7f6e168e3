"""``zenfed audit replay``: re-add every kept encrypted sum and check it against what the sites and server signed.

An encrypted job's result keeps every accepted ciphertext (``updates/round-NNNN/SITE.bin``,
each the envelope the site signed and sent) and the server's public CKKS context. Replay
needs no secret key. For each round the server's signed log summed (``aggregated``):

1. every kept envelope's SHA-256 is one the server received from that site
   (``update_received``) and, where the site's own signed log is in the result, one that
   site sent (``update_sent``): a dropped, substituted or re-used update is named;
2. the kept hashes are exactly the inputs the server says it summed;
3. opening each envelope for this job, round and site, and adding the ciphertexts (with
   the survivors' mask corrections of a round where a site dropped, each one the server
   recorded and its site's log sent), gives the sum whose hash the server recorded as the
   round's output.

Size: an update is about 0.95 bytes per float32 byte of the adapter, times sites and
rounds (the demo keeps 3 sites x 4 rounds).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from zenfed.audit import events
from zenfed.audit.errors import AuditError
from zenfed.audit.log import read_records
from zenfed.digest import sha256_hex
from zenfed.errors import ZenfedError

UPDATES_DIR = "updates"  # the kept ciphertexts of an encrypted job, one folder per round
REPLAY_CONTEXT = "server_public.context"  # beside them: the public CKKS parameters
CORRECTIONS_DIR = "corrections"  # in a round's folder: survivors' pairwise-mask corrections, if a site dropped


def kept_update_path(out_dir: Path, round_index: int, site: str, *, correction: bool = False) -> Path:
    """Where a job result keeps one site's encrypted update (or mask correction) of one round."""
    folder = out_dir / UPDATES_DIR / f"round-{round_index:04d}"
    return (folder / CORRECTIONS_DIR if correction else folder) / f"{site}.bin"


@dataclass
class ReplayVerdict:
    """What replaying a result's sums found."""

    rounds_checked: list[int] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True if every round's sum was re-added and matched."""
        return bool(self.rounds_checked) and not self.problems

    @property
    def first_bad_round(self) -> int | None:
        """The first round with a problem, if any."""
        bad = [int(p.split(":")[0].split()[-1]) for p in self.problems if p.startswith("round ")]
        return min(bad) if bad else None


def replay_result(result_dir: Path) -> ReplayVerdict:
    """Re-add every kept encrypted sum of a job result and check it against the signed logs.

    Raises:
        AuditError: If the result is not an encrypted job's, or keeps no ciphertexts or context.
    """
    from zenfed.privacy.he import EncryptedSum, HEError, load_context, open_update, packing_for
    from zenfed.spec import EncryptionSpec

    result_dir = Path(result_dir)
    try:
        result = json.loads((result_dir / "zenfed_result.json").read_text())
        spec = result["job"]["spec"]
        job_id = str(result["job"]["job_id"])
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise AuditError(f"{result_dir} holds no readable zenfed_result.json ({err}); pass a job result") from None
    encryption = EncryptionSpec.model_validate(spec.get("encryption", {}))
    if not encryption.enabled:
        raise AuditError("the job ran in the clear: no ciphertexts are kept; `zenfed audit verify` checks its hashes")
    kept = result_dir / UPDATES_DIR
    if not (kept / REPLAY_CONTEXT).is_file():
        raise AuditError(f"{kept / REPLAY_CONTEXT} is missing: this result keeps no public context to re-add with")
    context = load_context(kept / REPLAY_CONTEXT, require_secret=False)
    packing = packing_for(encryption)

    logs = {p.stem: read_records(p) for p in sorted((result_dir / "audit").glob("*.jsonl"))}
    server = next((n for n, recs in logs.items() if any(r.get("event") == events.AGGREGATED for r in recs)), None)
    if server is None:
        raise AuditError("no server log with aggregated records in audit/; pass a downloaded job result")
    received = _hashes(logs[server], events.UPDATE_RECEIVED, site_field=True)
    sent = {(site, rnd, sha) for site, recs in logs.items() if site != server
            for (_, rnd, sha) in _hashes(recs, events.UPDATE_SENT, site_name=site)}
    corrected = {(site, rnd, sha) for site, recs in logs.items() if site != server
                 for (_, rnd, sha) in _hashes(recs, events.MASKS_CORRECTED, site_name=site)}
    sites_with_logs = {site for site in logs if site != server}

    verdict = ReplayVerdict()
    for record in logs[server]:
        if record.get("event") != events.AGGREGATED:
            continue
        fields = record.get("fields") or {}
        rnd, inputs, output = fields.get("round"), sorted(fields.get("inputs") or []), fields.get("output")
        if not isinstance(rnd, int):
            continue
        verdict.rounds_checked.append(rnd)
        folder = kept / f"round-{rnd:04d}"
        files = sorted(folder.glob("*.bin")) if folder.is_dir() else []
        if not files:
            verdict.problems.append(f"round {rnd}: no kept ciphertexts in {folder}")
            continue
        hashes = {f.stem: sha256_hex(f.read_bytes()) for f in files}
        for site, sha in sorted(hashes.items()):
            if (site, rnd, sha) not in received:
                verdict.problems.append(f"round {rnd}: the kept update of {site} ({sha[:16]}...) is not one the "
                                        "server recorded receiving from it (substituted or re-used)")
            elif site in sites_with_logs and (site, rnd, sha) not in sent:
                verdict.problems.append(f"round {rnd}: {site}'s own log never sent the update {sha[:16]}... "
                                        "the server summed for it")
        if sorted(hashes.values()) != inputs:
            verdict.problems.append(f"round {rnd}: the kept updates are not the {len(inputs)} inputs the server "
                                    "recorded summing (one dropped, added or swapped)")
        corrections = sorted((folder / CORRECTIONS_DIR).glob("*.bin"))
        verdict.problems += _check_corrections(rnd, corrections, sorted(fields.get("corrections") or []),
                                               corrected, sites_with_logs)
        total = EncryptedSum(context=context)
        try:
            for path in [*files, *corrections]:
                _, ciphertext = open_update(path.read_bytes(), context=context, packing=packing, job=job_id,
                                            round=rnd, site=path.stem)
                total.add(ciphertext)
            if sha256_hex(total.to_bytes()) != output:
                verdict.problems.append(f"round {rnd}: the kept ciphertexts do not add up to the sum the server "
                                        "recorded as the round's output")
        except (HEError, ZenfedError) as err:
            verdict.problems.append(f"round {rnd}: a kept update does not open for this job, round and site: {err}")
    return verdict


def _check_corrections(rnd: int, files: list[Path], recorded: list[str], corrected: set[tuple[str, Any, Any]],
                       sites_with_logs: set[str]) -> list[str]:
    """Problems with a round's kept mask corrections: each one recorded by the server and sent by its site."""
    problems = []
    hashes = {f.stem: sha256_hex(f.read_bytes()) for f in files}
    if sorted(hashes.values()) != recorded:
        problems.append(f"round {rnd}: the kept mask corrections are not the {len(recorded)} the server recorded "
                        "adding (one dropped, added or swapped)")
    for site, sha in sorted(hashes.items()):
        if site in sites_with_logs and (site, rnd, sha) not in corrected:
            problems.append(f"round {rnd}: {site}'s own log never sent the mask correction {sha[:16]}...")
    return problems


def _hashes(records: Iterable[dict[str, Any]], event: str, *, site_field: bool = False,
            site_name: str = "") -> set[tuple[str, Any, Any]]:
    out = set()
    for record in records:
        if record.get("event") == event:
            fields = record.get("fields") or {}
            out.add((str(fields.get("site")) if site_field else site_name, fields.get("round"), fields.get("sha256")))
    return out


def main_replay(path: Path, *, out: TextIO | None = None) -> int:
    """Print what replay found; return 0 if every round re-adds and matches, else 1."""
    out = out or sys.stdout
    verdict = replay_result(path)
    for problem in verdict.problems:
        print(f"PROBLEM: {problem}", file=out)
    if verdict.ok:
        print(f"REPLAYED: {len(verdict.rounds_checked)} round(s) re-added from the kept ciphertexts; every sum "
              "matches what the server recorded and what the sites sent", file=out)
        return 0
    print(f"NOT REPLAYED: the first bad round is {verdict.first_bad_round}", file=out)
    return 1
