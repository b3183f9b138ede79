"""The o200k_base vocabulary, offline: unpacked from the bpe-openai wheel into a cache folder Harmony reads.

`python -m kubrick.engine.vocab install` puts it there (scripts/setup runs it); `ensure_vocabulary()` points
TIKTOKEN_ENCODINGS_BASE at it before Harmony loads, or raises one clear error saying how to get it.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import os
import sys
import tempfile
from pathlib import Path

from kubrick.engine.api import EngineError

FILE_NAME = "o200k_base.tiktoken"
SHA256 = "446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d"  # the hash tiktoken expects


class VocabularyMissing(EngineError):
    """The o200k_base vocabulary is not where Harmony can find it."""


def cache_dir() -> Path:
    """Where the vocabulary lives: $KUBRICK_VOCAB_DIR, else ~/.cache/kubrick/tiktoken (XDG_CACHE_HOME honoured)."""
    if os.environ.get("KUBRICK_VOCAB_DIR"):
        return Path(os.environ["KUBRICK_VOCAB_DIR"])
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "kubrick" / "tiktoken"


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def install(target: Path | None = None) -> Path:
    """Unpack o200k_base.tiktoken from the bpe-openai wheel into `target`, check its hash, return its path."""
    target = Path(target or cache_dir())
    dest = target / FILE_NAME
    if dest.is_file() and _sha256(dest) == SHA256:
        return dest
    try:  # locate the package without importing it (its import loads every vocabulary it ships)
        spec = importlib.util.find_spec("bpe_openai")
    except (ImportError, ValueError):
        spec = None
    if spec is None or spec.origin is None:
        raise VocabularyMissing("the o200k_base vocabulary needs the bpe-openai package: pip install bpe-openai==0.1.4")
    source = Path(spec.origin).parent / "data" / f"{FILE_NAME}.gz"
    if not source.is_file():
        raise VocabularyMissing(f"{source} is missing from the bpe-openai package; reinstall bpe-openai==0.1.4")
    data = gzip.decompress(source.read_bytes())
    digest = hashlib.sha256(data).hexdigest()
    if digest != SHA256:
        raise VocabularyMissing(f"{source} unpacks to sha256 {digest}, expected {SHA256}; reinstall bpe-openai==0.1.4")
    target.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target, prefix=f".{FILE_NAME}.")
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, dest)  # atomic: a reader never sees half a vocabulary
    return dest


def ensure_vocabulary() -> Path:
    """Point TIKTOKEN_ENCODINGS_BASE at a folder holding a verified vocabulary (installing it if we can)."""
    configured = os.environ.get("TIKTOKEN_ENCODINGS_BASE")
    if configured and (Path(configured) / FILE_NAME).is_file():
        return Path(configured) / FILE_NAME
    try:
        path = install()
    except (VocabularyMissing, OSError) as err:
        raise VocabularyMissing(
            f"the o200k_base vocabulary is missing ({err}); run `python -m kubrick.engine.vocab install` "
            f"(scripts/setup does) or set TIKTOKEN_ENCODINGS_BASE to a folder holding {FILE_NAME}"
        ) from None
    os.environ["TIKTOKEN_ENCODINGS_BASE"] = str(path.parent)
    return path


def main(argv: list[str]) -> int:
    if argv[:1] != ["install"]:
        print("usage: python -m kubrick.engine.vocab install [FOLDER]", file=sys.stderr)
        return 2
    try:
        path = install(Path(argv[1]) if len(argv) > 1 else None)
    except (VocabularyMissing, OSError) as err:
        print(f"vocab: error: {err}", file=sys.stderr)
        return 1
    print(f"vocab: {path} (sha256 verified)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
