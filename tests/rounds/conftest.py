"""Shared fixtures of the whole-job tests."""

from __future__ import annotations

from pathlib import Path

import pytest

from zenfed.data import make_builtin


@pytest.fixture(scope="module")
def three_site_data(tmp_path_factory) -> Path:
    """The built-in non-IID data for three sites, small."""
    out = tmp_path_factory.mktemp("data3")
    make_builtin(out, sites=3, train_per_site=40, valid_per_site=8, test_per_task=4, seed=0)
    return out
