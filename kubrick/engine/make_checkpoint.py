"""Write a random gpt-oss checkpoint (valid MXFP4 experts, sensible scales) for tests, demos and benchmarks.

The weights are noise scaled so activations stay near unit size through every layer; the model "speaks"
random tokens of the real vocabulary. Written into a temporary folder beside OUT, then renamed: OUT is either
complete or absent.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable

from kubrick.engine.config import ConfigError, ModelConfig, preset as preset_config
from kubrick.errors import KubrickError

LAYOUTS = ("original", "hf")
SHARD_BYTES = 2 << 30  # split files at ~2 GiB so no step holds the whole model in memory twice
FP4_RMS = math.sqrt(sum(v * v for v in (0, 0.5, 1, 1.5, 2, 3, 4, 6)) / 8)  # RMS of uniformly random E2M1 codes


def _random_tensor(name: str, shape: tuple[int, ...], kind: str, config: ModelConfig, gen):
    import torch

    from kubrick.engine.checkpoint import UINT8

    if kind == UINT8:
        if name.endswith(".blocks"):  # uniformly random E2M1 codes, two per byte
            words = torch.randint(-(2**63), 2**63 - 1, (math.prod(shape) // 8,), dtype=torch.int64, generator=gen)
            return words.view(torch.uint8).reshape(shape)  # 8 random bytes per draw: 3x faster for 20b's 10 GB
        fan_in = config.hidden_size if "mlp1" in name else config.intermediate_size
        exponent = round(math.log2(1 / math.sqrt(fan_in) / FP4_RMS))  # block RMS ≈ 1/sqrt(fan_in)
        jitter = torch.randint(-1, 2, shape, generator=gen)  # blocks differ in scale, as real ones do
        return (jitter + exponent + 127).to(torch.uint8)
    if name.endswith(".scale"):  # RMSNorm gains near 1
        std, mean = 0.1, 1.0
    elif name.endswith(".sinks"):  # learned sink logits: some heads lean on the sink, some do not
        std, mean = 1.0, 0.0
    elif name.endswith(".bias"):
        std, mean = (1.0 if ".gate." in name else 0.1), 0.0
    elif name == "embedding.weight":
        std, mean = 1.0, 0.0
    else:  # projections: unit-size outputs for unit-size inputs
        std, mean = 1 / math.sqrt(shape[-1]), 0.0
    return (torch.randn(shape, generator=gen) * std + mean).to(torch.bfloat16)


def _shards(spec: dict[str, tuple[tuple[int, ...], str]]) -> list[list[str]]:
    shards, current, size = [], [], 0
    for name, (shape, kind) in spec.items():
        nbytes = math.prod(shape) * (1 if kind == "uint8" else 2)
        if current and size + nbytes > SHARD_BYTES:
            shards.append(current)
            current, size = [], 0
        current.append(name)
        size += nbytes
    shards.append(current)
    return shards


def checkpoint_bytes(config: ModelConfig) -> int:
    """Bytes the checkpoint's tensors take on disk (bf16 weights, packed MXFP4 experts)."""
    from kubrick.engine.checkpoint import original_tensors

    return sum(math.prod(shape) * (1 if kind == "uint8" else 2) for shape, kind in original_tensors(config).values())


def _check_free_space(folder: Path, needed: int, what: str) -> None:
    """Refuse before writing anything: a full disk halfway through a 60 GB write helps nobody."""
    free = shutil.disk_usage(folder).free
    if needed + (4 << 20) > free:  # a little room to spare for config files and the filesystem
        raise KubrickError(
            f"{what} needs about {_size(needed)} but {folder} has {_size(free)} free; "
            "choose another place or a smaller preset"
        )


def _size(nbytes: int) -> str:
    return f"{nbytes / 1e9:.1f} GB" if nbytes >= 1e9 else f"{nbytes / 1e6:.0f} MB"


def _write(folder: Path, layout: str, config: ModelConfig, seed: int) -> None:
    import torch
    from safetensors.torch import save_file

    from kubrick.engine.checkpoint import hf_tensors, original_to_hf, original_tensors

    spec = original_tensors(config)
    gen = torch.Generator().manual_seed(seed)
    if layout == "original":
        place = folder / "original"
        place.mkdir()
        (place / "config.json").write_text(json.dumps(config.to_original_json(), indent=2) + "\n")
    else:
        place = folder
        (place / "config.json").write_text(json.dumps(config.to_hf_json(), indent=2) + "\n")
    shards = _shards(spec)
    weight_map, total = {}, 0
    for i, names in enumerate(shards, 1):
        tensors = {name: _random_tensor(name, *spec[name], config, gen) for name in names}
        if layout == "hf":
            tensors = original_to_hf(config, tensors)
        if len(shards) == 1:
            file = "model.safetensors"
        else:
            file = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(tensors, str(place / file), metadata={"format": "pt"})
        total += sum(t.numel() * t.element_size() for t in tensors.values())
        weight_map.update({name: file for name in tensors})
        del tensors
    if layout == "hf":
        assert set(weight_map) == set(hf_tensors(config))
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (place / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        generation = {"bos_token_id": 199998, "eos_token_id": [200002, 199999, 200012], "pad_token_id": 199999}
        (place / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    (folder / "KUBRICK_RANDOM_CHECKPOINT").write_text(
        f"random weights written by `kubrick make-checkpoint` (layout {layout}, seed {seed}); not a trained model\n"
    )


def make_checkpoint(
    out: Path,
    layout: str = "original",
    preset: str = "tiny",
    config_file: Path | None = None,
    seed: int = 0,
    on_start: Callable[[int], None] | None = None,
) -> Path:
    """Write a random checkpoint into `out` (absent or an empty folder) and return `out`.

    on_start(bytes) is called once the checks have passed, before the (possibly long) write.
    """
    out = Path(out).expanduser()
    if layout not in LAYOUTS:
        raise KubrickError(f"unknown layout {layout!r}; use original or hf")
    try:
        config = ModelConfig.from_file(config_file) if config_file else preset_config(preset)
    except ConfigError as err:
        raise KubrickError(str(err)) from None
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise KubrickError(f"{out} already exists and is not an empty folder; choose a new path or empty it first")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
        umask = os.umask(0)
        os.umask(umask)
        tmp.chmod(0o777 & ~umask)  # mkdtemp makes it private; the finished folder should look like any other
    except OSError as err:
        raise KubrickError(f"cannot write into {out.parent}: {err.strerror or err}") from None
    try:
        needed = checkpoint_bytes(config)
        _check_free_space(out.parent, needed, f"the {config_file or preset} checkpoint")
        if on_start is not None:
            on_start(needed)
        _write(tmp, layout, config, seed)
        if out.exists():
            out.rmdir()  # empty, checked above
        os.replace(tmp, out)
    except OSError as err:
        shutil.rmtree(tmp, ignore_errors=True)
        raise KubrickError(f"could not write checkpoint {out}: {err.strerror or err}") from None
    except BaseException:  # a KubrickError (no room), Ctrl-C, anything: leave nothing behind
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
