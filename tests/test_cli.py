"""The `kubrick` program's own surface: help texts that say everything, and bad flags answered in one line."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest


def run_kubrick(*args):
    env = {**os.environ, "COLUMNS": "200", "TERM": "dumb"}
    return subprocess.run([sys.executable, "-m", "kubrick.cli", *args], capture_output=True, text=True, env=env,
                          timeout=60)


def test_serve_help_shows_the_environment_variables_and_defaults():
    # rich reads "[env …]" as markup and silently drops it unless escaped
    text = run_kubrick("serve", "--help").stdout
    for hint in ("[env TRITON_CHECKPOINT;", "[env TRITON_DEVICE;", "[env TRITON_CONTEXT_LENGTH; default 8192]"):
        assert hint in text
    assert "<bool>" not in text and "<int>" not in text


def test_serve_help_shows_the_engine_batching_settings():
    text = re.sub(r"[│\s]+", " ", run_kubrick("serve", "--help").stdout)  # rows may wrap inside the box
    assert "--kv-cache-memory FRACTION|SIZE" in text
    assert "a fraction of free GPU memory after the weights and CUDA graphs, such as 0.9, or a size, such as 8GiB" in text
    assert "[env KUBRICK_KV_CACHE_MEMORY; default 0.9 on a GPU, 256MiB on a CPU]" in text
    assert "--max-batch N" in text and "[env KUBRICK_MAX_BATCH; default 64]" in text
    assert "--step-tokens N" in text and "[env KUBRICK_STEP_TOKENS; default 512]" in text


def test_chat_help_shows_the_environment_variables_and_value_names():
    text = run_kubrick("--help").stdout
    assert "[env TRITON_URL; default http://localhost:8000]" in text
    assert "[env TRITON_MODEL_NAME; default llm_decoupled]" in text
    assert "low|medium|high" in text
    # a flag takes no value, so the help must not suggest one
    assert "<bool>" not in text


def test_make_checkpoint_help_names_the_choices():
    text = run_kubrick("make-checkpoint", "--help").stdout
    assert "original|hf" in text and "tiny|20b|120b" in text and "OUT" in text
    assert "<bool>" not in text


@pytest.mark.parametrize("args,expected", [
    (["--temperature", "abc", "-p", "hi"], "'--temperature'"),
    (["--no-such-flag"], "No such option: --no-such-flag"),
    (["serve", "--http-port", "eighty"], "'--http-port'"),
    (["make-checkpoint"], "Missing argument 'OUT'"),
])
def test_bad_flags_get_one_line_and_no_traceback(args, expected):
    result = run_kubrick(*args)
    assert result.returncode == 2
    assert result.stderr.startswith("kubrick: error: ") and expected in result.stderr
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr


def test_make_checkpoint_says_what_it_wrote_and_how_to_serve_it(tmp_path):
    out = tmp_path / "tiny"
    result = run_kubrick("make-checkpoint", str(out), "--layout", "hf")
    assert result.returncode == 0, result.stderr
    assert f"(the tiny preset, hf layout, seed 0) to {out}" in result.stdout
    assert f"kubrick serve --checkpoint {out}" in result.stdout
    assert (out / "config.json").is_file()


def test_make_checkpoint_into_a_folder_with_files_changes_nothing(tmp_path):
    (tmp_path / "keep.txt").write_text("mine")
    result = run_kubrick("make-checkpoint", str(tmp_path))
    assert result.returncode == 1 and result.stderr.count("\n") == 1
    assert "already exists and is not an empty folder" in result.stderr
    assert [p.name for p in tmp_path.iterdir()] == ["keep.txt"]


def test_make_checkpoint_refuses_a_disk_without_room_before_writing(tmp_path, monkeypatch):
    # A small disk cannot be mounted here without root, so the free space is what shutil reports, lowered
    import shutil as real_shutil

    from kubrick.engine import make_checkpoint as module
    from kubrick.errors import KubrickError

    usage = real_shutil.disk_usage(tmp_path)
    monkeypatch.setattr(module.shutil, "disk_usage", lambda path: usage._replace(free=20_000_000))
    with pytest.raises(KubrickError) as caught:
        module.make_checkpoint(tmp_path / "ckpt", preset="20b")
    assert str(caught.value) == (f"the 20b checkpoint needs about 13.8 GB but {tmp_path} has 20 MB free; "
                                 "choose another place or a smaller preset")
    assert list(tmp_path.iterdir()) == []  # not even the temporary folder is left
