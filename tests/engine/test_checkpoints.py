"""Checkpoints: both published layouts load, random ones are written safely, and a broken one says exactly
what is wrong (which folder, which tensor)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from kubrick.engine.checkpoint import CheckpointError, load_checkpoint
from kubrick.engine.config import PRESETS, ModelConfig
from kubrick.engine.make_checkpoint import make_checkpoint
from kubrick.errors import KubrickError


def test_both_layouts_load_to_the_same_tensors(tiny_original, tiny_hf):
    config_a, a = load_checkpoint(tiny_original)
    config_b, b = load_checkpoint(tiny_hf)
    assert config_a == config_b == PRESETS["tiny"]
    assert a.keys() == b.keys()
    assert all(torch.equal(a[name], b[name]) for name in a)


def test_the_original_folder_itself_loads_too(tiny_original):
    config, _ = load_checkpoint(tiny_original / "original")
    assert config == PRESETS["tiny"]


def test_experts_stay_packed_mxfp4_in_memory(tiny_original):
    _, tensors = load_checkpoint(tiny_original)
    c = PRESETS["tiny"]
    blocks = tensors["block.0.mlp.mlp1_weight.blocks"]
    assert blocks.dtype == torch.uint8
    assert blocks.shape == (c.num_experts, 2 * c.intermediate_size, c.hidden_size // 32, 16)
    assert tensors["block.0.attn.qkv.weight"].dtype == torch.bfloat16


def test_random_checkpoints_have_sensible_mxfp4_scales(tiny_original):
    from kubrick.engine import mxfp4

    _, tensors = load_checkpoint(tiny_original)
    w = mxfp4.dequantize(tensors["block.2.mlp.mlp1_weight.blocks"], tensors["block.2.mlp.mlp1_weight.scales"], torch.float32)
    rms = w.pow(2).mean().sqrt().item()
    assert 0.5 / 8 < rms < 2 / 8  # about 1/sqrt(hidden_size = 64): unit-size activations stay unit-size


def test_the_same_seed_writes_the_same_weights(tmp_path):
    a = make_checkpoint(tmp_path / "a", seed=3)
    b = make_checkpoint(tmp_path / "b", seed=3)
    c = make_checkpoint(tmp_path / "c", seed=4)
    read = lambda p: load_file(str(p / "original" / "model.safetensors"))  # noqa: E731
    ta, tb, tc = read(a), read(b), read(c)
    assert all(torch.equal(ta[k], tb[k]) for k in ta)
    assert not torch.equal(ta["embedding.weight"], tc["embedding.weight"])


def test_make_checkpoint_refuses_a_folder_that_holds_files(tmp_path):
    out = tmp_path / "busy"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(KubrickError, match="not an empty folder"):
        make_checkpoint(out)
    assert (out / "notes.txt").read_text() == "mine"
    assert [p.name for p in tmp_path.iterdir()] == ["busy"]  # no temporary folder left behind


def test_make_checkpoint_fills_an_empty_folder(tmp_path):
    out = tmp_path / "empty"
    out.mkdir()
    make_checkpoint(out, layout="hf")
    assert (out / "config.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty"]


def test_cli_make_checkpoint_writes_a_loadable_checkpoint_and_reports_bad_input_in_one_line(tmp_path):
    kubrick = [sys.executable, "-m", "kubrick.cli"]
    ok = subprocess.run([*kubrick, "make-checkpoint", str(tmp_path / "ck"), "--layout", "hf", "--seed", "2"], capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    assert load_checkpoint(tmp_path / "ck")[0] == PRESETS["tiny"]
    bad = subprocess.run([*kubrick, "make-checkpoint", str(tmp_path / "x"), "--preset", "7b"], capture_output=True, text=True)
    assert bad.returncode != 0
    assert bad.stderr.strip().splitlines() == ["kubrick: error: unknown preset '7b'; use one of tiny, 20b, 120b"]
    assert not (tmp_path / "x").exists()


def test_a_config_file_sets_the_shape(tmp_path):
    config = tmp_path / "shape.json"
    data = PRESETS["tiny"].to_original_json() | {"num_hidden_layers": 2, "num_experts": 8}
    config.write_text(json.dumps(data))
    out = make_checkpoint(tmp_path / "ck", config_file=config)
    loaded, tensors = load_checkpoint(out)
    assert (loaded.num_hidden_layers, loaded.num_experts) == (2, 8)
    assert tensors["block.1.mlp.gate.weight"].shape == (8, 64)


def test_a_bad_config_file_is_refused_with_the_reason(tmp_path):
    config = tmp_path / "shape.json"
    config.write_text(json.dumps(PRESETS["tiny"].to_original_json() | {"hidden_size": 100}))
    with pytest.raises(KubrickError, match="hidden_size \\(100\\) must be a multiple of 32"):
        make_checkpoint(tmp_path / "ck", config_file=config)
    assert not (tmp_path / "ck").exists()


# --- broken checkpoints ----------------------------------------------------------------------------------


@pytest.fixture
def broken(tmp_path):
    """A fresh tiny original-layout checkpoint to damage, and its weights file."""
    folder = make_checkpoint(tmp_path / "ck", preset="tiny", seed=1)
    return folder, folder / "original" / "model.safetensors"


def test_a_missing_folder_is_named(tmp_path):
    with pytest.raises(CheckpointError, match=f"checkpoint folder {tmp_path / 'nope'} does not exist"):
        load_checkpoint(tmp_path / "nope")


def test_a_folder_without_a_checkpoint_says_what_was_expected(tmp_path):
    with pytest.raises(CheckpointError, match="holds no gpt-oss checkpoint: expected config.json and \\*.safetensors"):
        load_checkpoint(tmp_path)


def test_a_missing_tensor_is_named(broken):
    folder, weights = broken
    tensors = load_file(str(weights))
    del tensors["block.3.attn.sinks"]
    save_file(tensors, str(weights))
    with pytest.raises(CheckpointError, match="lacks tensor block.3.attn.sinks"):
        load_checkpoint(folder)


def test_an_extra_tensor_is_named(broken):
    folder, weights = broken
    tensors = load_file(str(weights))
    tensors["block.9.attn.sinks"] = torch.zeros(4)
    save_file(tensors, str(weights))
    with pytest.raises(CheckpointError, match="unexpected tensor block.9.attn.sinks"):
        load_checkpoint(folder)


def test_a_wrong_shape_is_named(broken):
    folder, weights = broken
    tensors = load_file(str(weights))
    tensors["block.1.attn.out.bias"] = torch.zeros(65, dtype=torch.bfloat16)
    save_file(tensors, str(weights))
    with pytest.raises(CheckpointError, match="tensor block.1.attn.out.bias .* has shape \\[65\\], config.json implies \\[64\\]"):
        load_checkpoint(folder)


def test_a_config_that_does_not_match_the_weights_is_caught(broken):
    folder, _ = broken
    config = folder / "original" / "config.json"
    config.write_text(json.dumps(json.loads(config.read_text()) | {"num_experts": 8}))
    with pytest.raises(CheckpointError, match="tensor block.0.mlp.gate.weight .* has shape \\[4, 64\\], config.json implies \\[8, 64\\]"):
        load_checkpoint(folder)


def test_hf_config_json_reads_like_the_original(tiny_hf):
    hf = json.loads((tiny_hf / "config.json").read_text())
    assert ModelConfig.from_json(hf) == PRESETS["tiny"]
    assert ModelConfig.from_json(PRESETS["20b"].to_hf_json()) == PRESETS["20b"]


def test_gpt_oss_20b_holds_about_13_gb_of_weights_with_packed_experts():
    import math

    from kubrick.engine.checkpoint import original_tensors

    spec = original_tensors(PRESETS["20b"])
    nbytes = sum(math.prod(shape) * (1 if kind == "uint8" else 2) for shape, kind in spec.values())
    assert 13.0e9 < nbytes < 14.0e9  # 40 GB if the experts were bf16
    assert len(spec) == 3 + 24 * 15
