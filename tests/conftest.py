"""Fixtures shared by the test modules."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import pytest

from tests.megatron_lm import TREES, checkout, skip_reason


@pytest.fixture(scope="session")
def patched_checkout(tmp_path_factory) -> Callable[[str], Path]:
    """``patched_checkout(name)``: one patched copy of a Megatron-LM tree (tests/megatron_lm.py)
    for the whole session, made on first use (a copy takes ~25 s). Tests run in it and write
    their outputs elsewhere."""
    copies: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in copies:
            copies[name] = checkout(tmp_path_factory.mktemp("megatron-lm"), name)
        return copies[name]

    return get


@pytest.fixture(scope="module", params=TREES)
def tree(request, patched_checkout) -> Path:
    """The patched copy of each Megatron-LM tree; skipped, saying why, where this environment
    cannot run it."""
    if reason := skip_reason(request.param):
        pytest.skip(reason)
    return patched_checkout(request.param)
