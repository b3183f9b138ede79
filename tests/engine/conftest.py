"""Engine fixtures: one tiny random checkpoint per layout, written once per test session."""

from __future__ import annotations

import pytest

from kubrick.engine.make_checkpoint import make_checkpoint

SEED = 7


@pytest.fixture(scope="session")
def tiny_original(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny-original", layout="original", preset="tiny", seed=SEED)


@pytest.fixture(scope="session")
def tiny_hf(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny-hf", layout="hf", preset="tiny", seed=SEED)


@pytest.fixture(scope="session")
def engine(tiny_original):
    from kubrick.engine.engine import Engine

    return Engine(tiny_original, device="cpu", context_length=256)
