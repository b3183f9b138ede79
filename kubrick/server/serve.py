"""`kubrick serve`: start a real Triton Inference Server on the Kubrick engine, show its progress, stop it cleanly.

The steps: find tritonserver, choose checkpoint and device, check the ports, start the server with the Python
backend stub of this environment, wait for /v2/health/ready and the model's ready endpoint, print the URL,
then supervise it until Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import errno
import os
import signal
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from kubrick.errors import KubrickError
from kubrick.server.default_model import RANDOM_MODEL_NOTE, cache_dir, ensure_embedded_default, resolve_checkpoint
from kubrick.server.process import MODEL_NAME, ServerConfig, ServerFailed, TritonServer


@dataclass
class ServeOptions:
    checkpoint: Path | None = None
    device: str | None = None
    context_length: int | None = None
    http_port: int = 8000
    grpc_port: int = 8001
    metrics_port: int = 8002
    host: str = "127.0.0.1"
    model_repository: Path | None = None
    kv_cache_memory: str | None = None
    max_batch: int | None = None
    step_tokens: int | None = None


KV_CACHE_FORMS = "a fraction of free GPU memory after the weights and CUDA graphs (0 < f <= 1, such as 0.9) or a size (such as 512MiB or 8GiB)"


class _Stop(Exception):
    """SIGTERM arrived: shut down as for Ctrl-C."""


def shipped_model_repository() -> Path:
    """The Triton model repository that comes with kubrick: the source tree's, else the installed copy."""
    package = Path(__file__).resolve().parent.parent  # …/kubrick
    in_tree = package.parent / "triton" / "repository"
    if (in_tree / MODEL_NAME / "config.pbtxt").is_file():
        return in_tree
    installed = package / "triton_repository"  # package data of a non-editable install (pyproject.toml)
    if (installed / MODEL_NAME / "config.pbtxt").is_file():
        return installed
    raise KubrickError("the Triton model repository that ships with kubrick is missing; reinstall kubrick")


def resolve_device(flag: str | None) -> str:
    """--device > $TRITON_DEVICE > cuda:0 when torch sees a GPU > cpu."""
    device = flag or os.environ.get("TRITON_DEVICE")
    if device:
        origin = "--device" if flag else "$TRITON_DEVICE"
        device = device.strip().lower()
        if device == "cuda":
            device = "cuda:0"
        if device != "cpu" and not (device.startswith("cuda:") and device[5:].isdigit()):
            raise KubrickError(f"unknown device {device!r} (from {origin}); use cpu, cuda or cuda:N")
        if device != "cpu":
            _check_gpu_visible(device)
        return device
    import torch  # only here: the server side has torch, the chat does not need it

    return "cuda:0" if torch.cuda.is_available() else "cpu"


def _check_gpu_visible(device: str) -> None:
    """Refuse a GPU torch cannot see here, before starting Triton (whose own refusal is buried in its log)."""
    import torch

    index = int(device.split(":", 1)[1])
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if index >= count:
        seen = f"torch sees {count} GPU{'s' if count != 1 else ''}" if count else "torch sees no CUDA GPU here"
        raise KubrickError(f"cannot serve on {device}: {seen}; use --device cpu" + (f" or cuda:0…cuda:{count - 1}" if count else ""))


def device_settings(device: str) -> tuple[str | None, dict[str, str]]:
    """The model config to load and the environment for a device: cuda:N runs as GPU 0 of CUDA_VISIBLE_DEVICES=N."""
    if device == "cpu":
        return None, {"TRITON_DEVICE": "cpu"}
    index = int(device.split(":", 1)[1])
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible:
        ids = [v.strip() for v in visible.split(",") if v.strip()]
        if index >= len(ids):
            raise KubrickError(f"{device} is not among CUDA_VISIBLE_DEVICES={visible}")
        physical = ids[index]
    else:
        physical = str(index)
    return "gpu", {"TRITON_DEVICE": "cuda:0", "CUDA_VISIBLE_DEVICES": physical}


def check_ports_free(host: str, ports: dict[str, int]) -> None:
    """Fail early, with the flag to change, when a port is taken (Triton's own message is buried in its log)."""
    for flag, port in ports.items():
        if not 1 <= port <= 65535:
            raise KubrickError(f"{flag} {port} is not a port; use a number from 1 to 65535")
    if len(set(ports.values())) != len(ports):
        raise KubrickError(f"the HTTP, gRPC and metrics ports must differ ({', '.join(f'{k} {v}' for k, v in ports.items())})")
    for flag, port in ports.items():
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind((host, port))
            except socket.gaierror as err:  # the address, not the port, is the problem
                raise KubrickError(f"cannot listen on {host} ({err.strerror or err}); check --host") from None
            except OSError as err:
                if err.errno == errno.EADDRNOTAVAIL:
                    raise KubrickError(f"cannot listen on {host}: no network interface here has that address; check --host") from None
                raise KubrickError(
                    f"cannot listen on {host}:{port} ({err.strerror or err}); free it or choose another with {flag}"
                ) from None


def engine_settings(options: ServeOptions) -> dict[str, str]:
    """The engine's batching settings for the server's environment: each flag wins over its variable. Checked
    here, with the engine's own parser, so a bad value fails before tritonserver starts."""
    from kubrick.engine.api import EngineError
    from kubrick.engine.engine import DEFAULT_MAX_BATCH, DEFAULT_STEP_TOKENS, parse_kv_cache_memory
    from kubrick.engine.paged_cache import DEFAULT_BLOCK_SIZE

    def chosen(flag: str, value, name: str) -> tuple[str | None, str]:
        if value is not None:
            return str(value).strip(), flag
        return os.environ.get(name) or None, f"${name}"

    env: dict[str, str] = {}
    raw, origin = chosen("--kv-cache-memory", options.kv_cache_memory, "KUBRICK_KV_CACHE_MEMORY")
    if raw is not None:
        try:
            parse_kv_cache_memory(raw)
        except EngineError:
            raise KubrickError(f"{origin} must be {KV_CACHE_FORMS}, not {raw!r}") from None
        env["KUBRICK_KV_CACHE_MEMORY"] = raw
    numbers: list[tuple[int, str]] = []  # (value, where it came from) for max batch, step tokens, block size
    for flag, value, name, default in (
        ("--max-batch", options.max_batch, "KUBRICK_MAX_BATCH", DEFAULT_MAX_BATCH),
        ("--step-tokens", options.step_tokens, "KUBRICK_STEP_TOKENS", DEFAULT_STEP_TOKENS),
        (None, None, "KUBRICK_KV_BLOCK_SIZE", DEFAULT_BLOCK_SIZE),
    ):
        raw, origin = chosen(flag, value, name)
        if raw is None:
            numbers.append((default, f"{flag or '$' + name} ({default}, the default)"))
            continue
        try:
            number = int(raw)
        except ValueError:
            raise KubrickError(f"{origin} must be a whole number, not {raw!r}") from None
        if number < 1:
            raise KubrickError(f"{origin} must be at least 1, not {number}")
        numbers.append((number, f"{origin} ({number})"))
        if flag:
            env[name] = str(number)
    (batch, batch_shown), (step, step_shown), (block, _) = numbers
    if step < batch + block:  # the engine's own rule: room for every decode plus one prefill block
        raise KubrickError(
            f"{step_shown} must be at least {batch_shown} + the KV block size ({block}), "
            "so prompts keep moving while every sequence decodes; raise --step-tokens or lower --max-batch"
        )
    return env


def serve(options: ServeOptions) -> int:
    from rich.console import Console

    console = Console(stderr=True, highlight=False, soft_wrap=True)
    out = Console(highlight=False, soft_wrap=True)
    if options.context_length is not None and options.context_length < 1:
        raise KubrickError(f"--context-length must be at least 1, not {options.context_length}")
    repository = (
        options.model_repository.expanduser().resolve() if options.model_repository else shipped_model_repository()
    )
    if not (repository / MODEL_NAME).is_dir():
        raise KubrickError(f"{repository} holds no {MODEL_NAME} model; point --model-repository at a Triton model repository")
    batching_env = engine_settings(options)
    ports = {"--http-port": options.http_port, "--grpc-port": options.grpc_port, "--metrics-port": options.metrics_port}
    check_ports_free(options.host, ports)

    server: TritonServer | None = None
    previous_term = signal.signal(signal.SIGTERM, _raise_stop)
    previous_int = signal.getsignal(signal.SIGINT)
    # Ctrl-C stops the server even when a launcher started us with SIGINT ignored (a background job of a
    # non-interactive shell, some CI runners), which Python would otherwise keep
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with console.status("preparing: finding tritonserver and the checkpoint …", spinner="dots") as status:
            device = resolve_device(options.device)  # before the embedded default: a bad device fails at once
            config_name, device_env = device_settings(device)
            checkpoint, source = resolve_checkpoint(options.checkpoint)
            random_model = checkpoint is None
            if random_model:
                status.update("preparing: the embedded default model (created once, a few seconds) …")
                checkpoint, created = ensure_embedded_default()
                if created:
                    console.print(f"created the embedded default model in {checkpoint}")
            env = {"TRITON_CHECKPOINT": str(checkpoint), **device_env, **batching_env}
            env.pop("TRITON_MODEL", None)
            if options.context_length is not None:
                env["TRITON_CONTEXT_LENGTH"] = str(options.context_length)
            config = ServerConfig(
                model_repository=repository,
                http_port=options.http_port,
                grpc_port=options.grpc_port,
                metrics_port=options.metrics_port,
                host=options.host,
                model_config_name=config_name,
                env=env,
            )
            log_path = cache_dir() / "logs" / f"tritonserver-{options.http_port}.log"
            server = TritonServer(config, log_path=log_path)
            console.print(
                f"serving {checkpoint} ({source}) on {device} with tritonserver from the {server.install.source}"
            )
            status.update("starting tritonserver …")
            server.start()
            started = time.monotonic()
            phases = {"starting": "starting tritonserver …", "loading": "loading weights into the engine …"}
            server.wait_ready(on_phase=lambda phase: status.update(phases.get(phase, phase)))
        console.print(f"[green]ready[/green] in {time.monotonic() - started:.1f} s (log: {server.log_path})")
        summary = server.model_summary()  # the engine, its context and the size of its KV cache
        if summary:
            console.print(summary, markup=False)
        if random_model:
            console.print(f"[yellow]{RANDOM_MODEL_NOTE}[/yellow]")
        if options.host in ("0.0.0.0", "::"):
            console.print("[yellow]the server listens on every network interface (--host); anyone who can reach it can use it[/yellow]")
        out.print(f"Triton is serving {MODEL_NAME} at {server.url}")
        out.print(f"Chat with it: kubrick --triton-url {server.url}    (Ctrl-C here stops the server)")
        sys.stdout.flush()
        while server.running():
            time.sleep(0.5)
        raise ServerFailed(f"tritonserver stopped unexpectedly (code {server.process.returncode}):\n{server.log_excerpt()}")
    except (KeyboardInterrupt, _Stop):
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not leave the server half-stopped
        if server is not None:
            with console.status("stopping tritonserver …", spinner="dots"):
                server.stop()
            console.print("stopped")
        return 0
    except ServerFailed as err:
        if server is not None:
            server.stop()
            model_error = server.model_error()
            if model_error:  # e.g. a broken checkpoint: its own one-line message says what to fix
                raise KubrickError(f"the model could not load: {model_error} (full log: {server.log_path})") from None
        raise KubrickError(f"{err}\nfull log: {server.log_path if server else '-'}") from None
    except BaseException:
        if server is not None:
            server.stop()
        raise
    finally:
        signal.signal(signal.SIGTERM, previous_term)
        signal.signal(signal.SIGINT, previous_int)


def _raise_stop(signum, frame) -> None:
    raise _Stop()
