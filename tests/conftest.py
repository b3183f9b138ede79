"""Fixtures shared across the test suite (named for what they give)."""

from __future__ import annotations

import pytest


@pytest.fixture
def kubrick_home(tmp_path, monkeypatch):
    """A fresh ~/.kubrick for one test (config, history, conversations), via KUBRICK_HOME."""
    home = tmp_path / "kubrick-home"
    home.mkdir()
    monkeypatch.setenv("KUBRICK_HOME", str(home))
    for name in ("TRITON_URL", "TRITON_MODEL_NAME", "KUBRICK_TEMPERATURE", "KUBRICK_TOP_P", "KUBRICK_MAX_TOKENS",
                 "KUBRICK_SEED", "KUBRICK_REASONING_EFFORT", "KUBRICK_SYSTEM_PROMPT", "KUBRICK_HIDE_REASONING"):
        monkeypatch.delenv(name, raising=False)
    return home
