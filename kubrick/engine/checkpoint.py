"""Load gpt-oss checkpoints in either published layout into one set of tensors named as gpt-oss names them.

Layouts (as `huggingface-cli download openai/gpt-oss-20b` lays them out):
  original: original/config.json + *.safetensors with block.N.attn.qkv.weight, block.N.mlp.mlp1_weight.blocks, …
  hf:       config.json (model_type gpt_oss) + model-*.safetensors with model.layers.N.self_attn.q_proj.weight, …
Either the top folder or original/ may be given. Experts stay MXFP4 (uint8 blocks + scales) after loading.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from kubrick.engine.api import EngineError
from kubrick.engine.config import ConfigError, ModelConfig
from kubrick.errors import KubrickError

UINT8 = "uint8"
FLOAT = "float"


class CheckpointError(EngineError, KubrickError):
    """A checkpoint folder that cannot be loaded; the message names the folder or tensor at fault."""


def original_tensors(c: ModelConfig) -> dict[str, tuple[tuple[int, ...], str]]:
    """Every tensor of the original layout: name -> (shape, kind)."""
    H, I, E, d = c.hidden_size, c.intermediate_size, c.num_experts, c.head_dim
    qkv = (c.num_attention_heads + 2 * c.num_key_value_heads) * d
    spec: dict[str, tuple[tuple[int, ...], str]] = {"embedding.weight": ((c.vocab_size, H), FLOAT)}
    for n in range(c.num_hidden_layers):
        b = f"block.{n}"
        spec.update({
            f"{b}.attn.norm.scale": ((H,), FLOAT),
            f"{b}.attn.qkv.weight": ((qkv, H), FLOAT),
            f"{b}.attn.qkv.bias": ((qkv,), FLOAT),
            f"{b}.attn.sinks": ((c.num_attention_heads,), FLOAT),
            f"{b}.attn.out.weight": ((H, c.num_attention_heads * d), FLOAT),
            f"{b}.attn.out.bias": ((H,), FLOAT),
            f"{b}.mlp.norm.scale": ((H,), FLOAT),
            f"{b}.mlp.gate.weight": ((E, H), FLOAT),
            f"{b}.mlp.gate.bias": ((E,), FLOAT),
            f"{b}.mlp.mlp1_weight.blocks": ((E, 2 * I, H // 32, 16), UINT8),
            f"{b}.mlp.mlp1_weight.scales": ((E, 2 * I, H // 32), UINT8),
            f"{b}.mlp.mlp1_bias": ((E, 2 * I), FLOAT),
            f"{b}.mlp.mlp2_weight.blocks": ((E, H, I // 32, 16), UINT8),
            f"{b}.mlp.mlp2_weight.scales": ((E, H, I // 32), UINT8),
            f"{b}.mlp.mlp2_bias": ((E, H), FLOAT),
        })  # fmt: skip
    spec["norm.scale"] = ((H,), FLOAT)
    spec["unembedding.weight"] = ((c.vocab_size, H), FLOAT)
    return spec


# original name suffix -> Hugging Face name suffix, per layer (q/k/v are split out of qkv separately)
_HF_LAYER = {
    "attn.norm.scale": "input_layernorm.weight",
    "attn.sinks": "self_attn.sinks",
    "attn.out.weight": "self_attn.o_proj.weight",
    "attn.out.bias": "self_attn.o_proj.bias",
    "mlp.norm.scale": "post_attention_layernorm.weight",
    "mlp.gate.weight": "mlp.router.weight",
    "mlp.gate.bias": "mlp.router.bias",
    "mlp.mlp1_weight.blocks": "mlp.experts.gate_up_proj_blocks",
    "mlp.mlp1_weight.scales": "mlp.experts.gate_up_proj_scales",
    "mlp.mlp1_bias": "mlp.experts.gate_up_proj_bias",
    "mlp.mlp2_weight.blocks": "mlp.experts.down_proj_blocks",
    "mlp.mlp2_weight.scales": "mlp.experts.down_proj_scales",
    "mlp.mlp2_bias": "mlp.experts.down_proj_bias",
}
_HF_GLOBAL = {"embedding.weight": "model.embed_tokens.weight", "norm.scale": "model.norm.weight", "unembedding.weight": "lm_head.weight"}


def _qkv_sizes(c: ModelConfig) -> list[int]:
    d = c.head_dim
    return [c.num_attention_heads * d, c.num_key_value_heads * d, c.num_key_value_heads * d]


def hf_tensors(c: ModelConfig) -> dict[str, tuple[tuple[int, ...], str]]:
    """Every tensor of the Hugging Face layout: name -> (shape, kind)."""
    spec = {}
    for name, (shape, kind) in original_tensors(c).items():
        if name in _HF_GLOBAL:
            spec[_HF_GLOBAL[name]] = (shape, kind)
            continue
        _, n, suffix = name.split(".", 2)
        prefix = f"model.layers.{n}."
        if suffix.startswith("attn.qkv."):
            part = suffix.rsplit(".", 1)[1]
            for proj, size in zip("qkv", _qkv_sizes(c)):
                spec[f"{prefix}self_attn.{proj}_proj.{part}"] = ((size, *shape[1:]), kind)
        else:
            spec[prefix + _HF_LAYER[suffix]] = (shape, kind)
    return spec


def original_to_hf(c: ModelConfig, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for name, t in tensors.items():
        if name in _HF_GLOBAL:
            out[_HF_GLOBAL[name]] = t
            continue
        _, n, suffix = name.split(".", 2)
        prefix = f"model.layers.{n}."
        if suffix.startswith("attn.qkv."):
            part = suffix.rsplit(".", 1)[1]
            for proj, piece in zip("qkv", torch.split(t, _qkv_sizes(c), dim=0)):
                out[f"{prefix}self_attn.{proj}_proj.{part}"] = piece.contiguous()
        else:
            out[prefix + _HF_LAYER[suffix]] = t
    return out


def hf_to_original(c: ModelConfig, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    back_global = {v: k for k, v in _HF_GLOBAL.items()}
    back_layer = {v: k for k, v in _HF_LAYER.items()}
    out = {}
    for name, t in tensors.items():
        if name in back_global:
            out[back_global[name]] = t
            continue
        _, _, n, suffix = name.split(".", 3)
        if suffix.startswith("self_attn.") and suffix.split(".")[1] in ("q_proj", "k_proj", "v_proj"):
            continue  # joined below
        out[f"block.{n}.{back_layer[suffix]}"] = t
    for n in range(c.num_hidden_layers):
        for part in ("weight", "bias"):
            pieces = [tensors.pop(f"model.layers.{n}.self_attn.{p}_proj.{part}") for p in "qkv"]
            out[f"block.{n}.attn.qkv.{part}"] = torch.cat(pieces, dim=0)
    return out


def find_layout(folder: Path) -> tuple[str, Path]:
    """('original'|'hf', the folder holding config.json and the safetensors) for a checkpoint folder."""
    folder = Path(folder).expanduser()
    if not folder.exists():
        raise CheckpointError(f"checkpoint folder {folder} does not exist")
    if not folder.is_dir():
        raise CheckpointError(f"checkpoint {folder} is not a folder")
    candidates = [folder, folder / "original"]
    for place in candidates:
        config = place / "config.json"
        if config.is_file() and any(place.glob("*.safetensors")):
            try:
                data = json.loads(config.read_text())
            except (OSError, json.JSONDecodeError) as err:
                raise CheckpointError(f"cannot read {config}: {err}") from None
            hf = isinstance(data, dict) and ("model_type" in data or "num_local_experts" in data)
            return ("hf" if hf else "original"), place
    raise CheckpointError(
        f"{folder} holds no gpt-oss checkpoint: expected config.json and *.safetensors there or in {folder / 'original'}"
        " (make one with `kubrick make-checkpoint`)"
    )


def load_config(folder: Path) -> ModelConfig:
    _, place = find_layout(folder)
    try:
        return ModelConfig.from_file(place / "config.json")
    except ConfigError as err:
        raise CheckpointError(str(err)) from None


def load_checkpoint(folder: Path, device: str | torch.device = "cpu") -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """Read a checkpoint onto `device`: (config, tensors under original names). Floats become bf16 (norm
    scales and sinks fp32), MXFP4 stays uint8. Every problem names the file and the tensor."""
    from safetensors import safe_open

    layout, place = find_layout(folder)
    config = load_config(place)
    spec = original_tensors(config) if layout == "original" else hf_tensors(config)
    files = sorted(place.glob("*.safetensors"))
    where: dict[str, Path] = {}
    for file in files:
        try:
            with safe_open(str(file), framework="pt") as f:
                for name in f.keys():
                    if name in where:
                        raise CheckpointError(f"tensor {name} appears in both {where[name].name} and {file.name}")
                    where[name] = file
        except CheckpointError:
            raise
        except Exception as err:  # safetensors raises its own types for damaged files
            raise CheckpointError(f"cannot read {file}: {err}") from None
    missing = [n for n in spec if n not in where]
    extra = [n for n in where if n not in spec]
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise CheckpointError(f"checkpoint {place} lacks tensor {missing[0]}{more} ({layout} layout, {config.num_hidden_layers} layers per its config.json)")
    if extra:
        more = f" and {len(extra) - 1} more" if len(extra) > 1 else ""
        raise CheckpointError(f"checkpoint {place} has unexpected tensor {extra[0]}{more} (in {where[extra[0]].name}); does config.json match the weights?")
    # Shapes first, in the model's own order and before reading any data: the first complaint is the useful one.
    for name, (shape, _) in spec.items():
        with safe_open(str(where[name]), framework="pt") as f:
            actual = tuple(f.get_slice(name).get_shape())
        if actual != shape:
            raise CheckpointError(
                f"tensor {name} in {where[name].name} has shape {list(actual)}, config.json implies {list(shape)}"
            )
    tensors: dict[str, torch.Tensor] = {}
    for file in files:
        with safe_open(str(file), framework="pt", device="cpu") as f:
            for name in f.keys():
                t = f.get_tensor(name)
                kind = spec[name][1]
                if kind == UINT8 and t.dtype != torch.uint8:
                    raise CheckpointError(f"tensor {name} in {file.name} is {t.dtype}, expected uint8 MXFP4 data")
                if kind == FLOAT and not t.is_floating_point():
                    raise CheckpointError(f"tensor {name} in {file.name} is {t.dtype}, expected floating point")
                tensors[name] = t.to(device)
    if layout == "hf":
        tensors = hf_to_original(config, tensors)
    for name, t in tensors.items():
        if t.is_floating_point():
            keep_fp32 = name.endswith(".scale") or name.endswith(".sinks")
            tensors[name] = t.to(torch.float32 if keep_fp32 else torch.bfloat16)
    return config, tensors
