"""Which checkpoint `kubrick serve` serves when none is named, and the embedded default model.

The embedded default is a tiny gpt-oss with random weights (the real vocabulary and chat format), created once
in the cache folder so that the whole path, server to chat, works on any machine without a download.
"""

from __future__ import annotations

import os
from pathlib import Path

from kubrick.errors import KubrickError

DEFAULT_CHECKPOINT = Path("models") / "gpt-oss-20b"  # where the README's download command puts real weights
EMBEDDED_NAME = "default-model-tiny-v1"  # bump the suffix when the tiny model's format changes

RANDOM_MODEL_NOTE = (
    "This is the embedded default model: a tiny gpt-oss with RANDOM weights, so its replies are gibberish.\n"
    "To serve real weights: huggingface-cli download openai/gpt-oss-20b --local-dir ./models/gpt-oss-20b\n"
    "then: kubrick serve --checkpoint ./models/gpt-oss-20b (on a GPU)"
)


def cache_dir() -> Path:
    """$KUBRICK_CACHE, else $XDG_CACHE_HOME/kubrick, else ~/.cache/kubrick."""
    if os.environ.get("KUBRICK_CACHE"):
        return Path(os.environ["KUBRICK_CACHE"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "kubrick"


def is_checkpoint(folder: Path) -> bool:
    """A gpt-oss checkpoint folder in either layout (Hugging Face's config.json or original/config.json)."""
    return (folder / "config.json").is_file() or (folder / "original" / "config.json").is_file()


def embedded_default_path() -> Path:
    return cache_dir() / EMBEDDED_NAME


def ensure_embedded_default() -> tuple[Path, bool]:
    """The embedded default checkpoint, created on first use; returns (path, created_now)."""
    path = embedded_default_path()
    if is_checkpoint(path):
        return path, False
    from kubrick.engine.make_checkpoint import make_checkpoint  # torch: only when it must be built

    try:
        make_checkpoint(path, layout="original", preset="tiny", seed=0)
    except KubrickError:
        if is_checkpoint(path):  # another `kubrick serve` made it at the same moment
            return path, False
        raise
    return path, True


def resolve_checkpoint(flag: Path | None) -> tuple[Path | None, str]:
    """The checkpoint to serve and where that choice came from; None means: the embedded default.

    Order: --checkpoint > $TRITON_CHECKPOINT > $TRITON_MODEL (when it names a folder) > ./models/gpt-oss-20b.
    """
    if flag is not None:
        return _must_exist(Path(flag).expanduser(), "--checkpoint"), "--checkpoint"
    for name in ("TRITON_CHECKPOINT", "TRITON_MODEL"):
        value = os.environ.get(name)
        if value:
            return _must_exist(Path(value).expanduser(), f"${name}"), f"${name}"
    if is_checkpoint(DEFAULT_CHECKPOINT):
        return DEFAULT_CHECKPOINT.resolve(), f"default location ./{DEFAULT_CHECKPOINT}"
    return None, "embedded default"


def _must_exist(path: Path, source: str) -> Path:
    if not path.exists():
        raise KubrickError(f"checkpoint {path} (from {source}) does not exist; check the path")
    if not path.is_dir() or not is_checkpoint(path):
        raise KubrickError(
            f"{path} (from {source}) is not a gpt-oss checkpoint folder: it needs config.json or original/config.json"
        )
    return path.resolve()
