"""A site's optimizer moments survive a crash: kept per round at the site, read back for the next round."""

from __future__ import annotations

import os
import stat

import pytest
import torch

from zenfed.errors import PolicyError
from zenfed.site.state import SiteStateStore
from zenfed.spec import JobSpec


def _trained_optimizer(steps: int) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.01, weight_decay=0.0)
    for _ in range(steps):
        optimizer.zero_grad()
        model(torch.randn(8, 4)).pow(2).mean().backward()
        optimizer.step()
    return model, optimizer


def test_the_moments_after_a_round_come_back_for_the_next_round(tmp_path):
    # Prepare: moments after rounds 1, 2 and 3
    store = SiteStateStore(root=tmp_path, spec=JobSpec(name="j"))
    _, optimizer = _trained_optimizer(3)
    for rnd in (1, 2, 3):
        store.keep_optimizer(rnd, optimizer.state_dict())

    # Execute: a new process resumes round 3 (the server's checkpoint holds round 2)
    state = store.optimizer_before(3)

    # Assert: the moments are those kept, they load into AdamW and it steps; only the last two rounds are kept
    model, fresh = _trained_optimizer(0)
    fresh.load_state_dict(state)
    for index, moments in optimizer.state_dict()["state"].items():
        for name, value in moments.items():
            assert torch.equal(torch.as_tensor(fresh.state_dict()["state"][index][name]), torch.as_tensor(value))
    fresh.zero_grad()
    model(torch.randn(2, 4)).sum().backward()
    fresh.step()
    kept = sorted(p.name for p in store.folder.glob("optimizer-*"))
    assert kept == ["optimizer-after-round-0002.safetensors", "optimizer-after-round-0003.safetensors"]
    assert all(stat.S_IMODE(os.stat(store.folder / name).st_mode) == 0o600 for name in kept)
    assert stat.S_IMODE(os.stat(store.folder).st_mode) == 0o700


def test_nothing_before_the_first_round_and_a_fresh_job_forgets_them(tmp_path):
    store = SiteStateStore(root=tmp_path, spec=JobSpec(name="j"))
    assert store.optimizer_before(1) is None
    store.keep_optimizer(1, _trained_optimizer(1)[1].state_dict())
    store.clear()
    assert store.optimizer_before(5) is None


def test_an_unreadable_file_names_itself(tmp_path):
    store = SiteStateStore(root=tmp_path, spec=JobSpec(name="j"))
    store.keep_optimizer(1, _trained_optimizer(1)[1].state_dict())
    (store.folder / "optimizer-after-round-0001.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(PolicyError, match="optimizer-after-round-0001.safetensors cannot be read"):
        store.optimizer_before(2)
