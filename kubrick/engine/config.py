"""ModelConfig: the shape of a gpt-oss model, its presets, and reading/writing both config.json dialects."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

from kubrick.engine.api import EngineError
from kubrick.errors import KubrickError


class ConfigError(EngineError, KubrickError):
    """A model config that is missing, unreadable or inconsistent."""


@dataclass(frozen=True)
class ModelConfig:
    """Field names follow gpt-oss's original/config.json."""

    num_hidden_layers: int = 24
    num_experts: int = 32
    experts_per_token: int = 4
    vocab_size: int = 201088
    hidden_size: int = 2880
    intermediate_size: int = 2880
    swiglu_limit: float = 7.0
    swiglu_alpha: float = 1.702
    head_dim: int = 64
    num_attention_heads: int = 64
    num_key_value_heads: int = 8
    sliding_window: int = 128
    initial_context_length: int = 4096
    rope_theta: float = 150000.0
    rope_scaling_factor: float = 32.0
    rope_ntk_alpha: float = 1.0
    rope_ntk_beta: float = 32.0
    rms_norm_eps: float = 1e-5

    def is_sliding(self, layer: int) -> bool:
        """Even layers attend to a sliding window, odd layers to everything (as in gpt-oss)."""
        return layer % 2 == 0

    def check(self) -> "ModelConfig":
        """Raise ConfigError for a shape the model or MXFP4 cannot hold."""
        problems = []
        for f in fields(self):
            if getattr(self, f.name) is None or (isinstance(getattr(self, f.name), (int, float)) and getattr(self, f.name) <= 0):
                problems.append(f"{f.name} must be positive, not {getattr(self, f.name)!r}")
        if self.experts_per_token > self.num_experts:
            problems.append(f"experts_per_token ({self.experts_per_token}) exceeds num_experts ({self.num_experts})")
        if self.num_attention_heads % max(self.num_key_value_heads, 1):
            problems.append("num_attention_heads must be a multiple of num_key_value_heads")
        for name in ("hidden_size", "intermediate_size"):
            if getattr(self, name) % 32:
                problems.append(f"{name} ({getattr(self, name)}) must be a multiple of 32 (the MXFP4 block size)")
        if self.head_dim % 2:
            problems.append(f"head_dim ({self.head_dim}) must be even for rotary embeddings")
        if problems:
            raise ConfigError("bad model config: " + "; ".join(problems))
        return self

    # --- the two on-disk dialects -------------------------------------------------------------------------

    def to_original_json(self) -> dict:
        data = asdict(self)
        data.pop("swiglu_alpha")  # gpt-oss hard-codes 1.702; its config.json has no such key
        data.pop("rms_norm_eps")
        return data

    def to_hf_json(self) -> dict:
        return {
            "architectures": ["GptOssForCausalLM"],
            "model_type": "gpt_oss",
            "attention_bias": True,
            "attention_dropout": 0.0,
            "eos_token_id": 200002,
            "pad_token_id": 199999,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "hidden_size": self.hidden_size,
            "initial_context_length": self.initial_context_length,
            "initializer_range": 0.02,
            "intermediate_size": self.intermediate_size,
            "layer_types": [
                "sliding_attention" if self.is_sliding(i) else "full_attention" for i in range(self.num_hidden_layers)
            ],
            "max_position_embeddings": 131072,
            "num_attention_heads": self.num_attention_heads,
            "num_experts_per_tok": self.experts_per_token,
            "experts_per_token": self.experts_per_token,
            "num_hidden_layers": self.num_hidden_layers,
            "num_key_value_heads": self.num_key_value_heads,
            "num_local_experts": self.num_experts,
            "output_router_logits": False,
            "quantization_config": {
                "modules_to_not_convert": [
                    "model.layers.*.self_attn",
                    "model.layers.*.mlp.router",
                    "model.embed_tokens",
                    "lm_head",
                ],
                "quant_method": "mxfp4",
            },
            "rms_norm_eps": self.rms_norm_eps,
            "rope_scaling": {
                "beta_fast": self.rope_ntk_beta,
                "beta_slow": self.rope_ntk_alpha,
                "factor": self.rope_scaling_factor,
                "original_max_position_embeddings": self.initial_context_length,
                "rope_type": "yarn",
                "truncate": False,
            },
            "rope_theta": self.rope_theta,
            "router_aux_loss_coef": 0.9,
            "sliding_window": self.sliding_window,
            "swiglu_limit": self.swiglu_limit,
            "tie_word_embeddings": False,
            "torch_dtype": "bfloat16",
            "use_cache": True,
            "vocab_size": self.vocab_size,
        }

    @classmethod
    def from_json(cls, data: dict, source: str = "config") -> "ModelConfig":
        """Read either dialect: gpt-oss's original/config.json or Hugging Face's config.json."""
        if not isinstance(data, dict):
            raise ConfigError(f"{source} must hold a JSON object")
        if "model_type" in data or "num_local_experts" in data:
            rope = data.get("rope_scaling") or data.get("rope_parameters") or {}
            mapped = {
                "num_hidden_layers": data.get("num_hidden_layers"),
                "num_experts": data.get("num_local_experts"),
                "experts_per_token": data.get("num_experts_per_tok", data.get("experts_per_token")),
                "vocab_size": data.get("vocab_size"),
                "hidden_size": data.get("hidden_size"),
                "intermediate_size": data.get("intermediate_size"),
                "swiglu_limit": data.get("swiglu_limit", 7.0),
                "head_dim": data.get("head_dim"),
                "num_attention_heads": data.get("num_attention_heads"),
                "num_key_value_heads": data.get("num_key_value_heads"),
                "sliding_window": data.get("sliding_window"),
                "initial_context_length": rope.get("original_max_position_embeddings", data.get("initial_context_length", 4096)),
                "rope_theta": data.get("rope_theta", rope.get("rope_theta", 150000.0)),
                "rope_scaling_factor": rope.get("factor", 32.0),
                "rope_ntk_alpha": rope.get("beta_slow", 1.0),
                "rope_ntk_beta": rope.get("beta_fast", 32.0),
                "rms_norm_eps": data.get("rms_norm_eps", 1e-5),
            }
            missing = [k for k, v in mapped.items() if v is None]
            if missing:
                raise ConfigError(f"{source} lacks {', '.join(missing)} (Hugging Face gpt_oss config)")
            data = mapped
        known = {f.name: f for f in fields(cls)}
        values = {}
        for key, value in data.items():
            if key not in known:
                continue  # unknown keys (architectures, torch_dtype, …) are not ours to judge
            want = int if known[key].type == "int" else float
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ConfigError(f"{source}: {key} must be a number, not {value!r}")
            if want is int and isinstance(value, float) and not value.is_integer():
                raise ConfigError(f"{source}: {key} must be a whole number, not {value!r}")
            values[key] = want(value)
        return replace(cls(), **values).check()

    @classmethod
    def from_file(cls, path: Path) -> "ModelConfig":
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"model config {path} does not exist") from None
        except (OSError, json.JSONDecodeError) as err:
            raise ConfigError(f"cannot read model config {path}: {err}") from None
        return cls.from_json(data, source=str(path))


PRESETS: dict[str, ModelConfig] = {
    # Small enough for CPU tests, yet every feature is there: the real vocabulary (Harmony tokens work),
    # 4 layers (2 sliding, 2 full), GQA (4 query heads over 2 KV heads), sinks, 4 experts with top-2,
    # and a sliding window of 8 tokens, which every test prompt goes past.
    "tiny": ModelConfig(
        num_hidden_layers=4,
        num_experts=4,
        experts_per_token=2,
        hidden_size=64,
        intermediate_size=64,
        head_dim=64,
        num_attention_heads=4,
        num_key_value_heads=2,
        sliding_window=8,
    ),
    "20b": ModelConfig(),
    "120b": ModelConfig(num_hidden_layers=36, num_experts=128),
}


def preset(name: str) -> ModelConfig:
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; use one of {', '.join(PRESETS)}")
    return PRESETS[name]
