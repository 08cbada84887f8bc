"""Fixtures shared by the test modules."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.megatron_lm import TREES, checkout, skip_reason


@pytest.fixture(scope="module", params=TREES)
def tree(request, tmp_path_factory) -> Path:
    """A patched copy of each Megatron-LM tree (tests/megatron_lm.py), once per test module;
    skipped, saying why, where this environment cannot run it."""
    if reason := skip_reason(request.param):
        pytest.skip(reason)
    return checkout(tmp_path_factory.mktemp("megatron-lm"), request.param)
