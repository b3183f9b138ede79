"""Run one real tritonserver process: command line, environment, log file, readiness, shutdown.

Used by `kubrick serve`, by the test fixture and by the serving benchmark, so all three start the server the
same way.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import httpx

from kubrick.errors import KubrickError
from kubrick.server.install import TritonInstall, check_stub_numpy, find_triton, prepare_backend_dir, server_env

MODEL_NAME = "llm_decoupled"
# Log lines a CPU-only machine always shows; they never explain a failure.
_HARMLESS = ("CudaDriverHelper", "pinned memory", "NVML", "DCGM", "CUDA memory pool")
# Engine errors meant for people (kubrick/engine: CheckpointError, ConfigError, VocabularyMissing, EngineError).
_EXPECTED_MODEL_ERROR = re.compile(r"\b(CheckpointError|ConfigError|VocabularyMissing|EngineError|KubrickError): (.+)")
_LOG_PREFIX = re.compile(r"^[IWE]\d{4} [\d:.]+ +\d+ [\w.]+:\d+\] ")  # I1122 20:05:15.643979 8762 server.cc:241]


@dataclass
class ServerConfig:
    """Everything that decides how tritonserver is started."""

    model_repository: Path
    http_port: int = 8000
    grpc_port: int = 8001
    metrics_port: int = 8002
    host: str = "127.0.0.1"
    model_config_name: str | None = None  # e.g. "gpu": llm_decoupled/configs/gpu.pbtxt
    env: dict[str, str] = field(default_factory=dict)  # extra environment (TRITON_CHECKPOINT …)
    log_verbose: int = 0
    extra_args: tuple[str, ...] = ()  # more tritonserver options, verbatim


class ServerFailed(KubrickError):
    """tritonserver exited or never became ready; the message carries the relevant log lines."""


class TritonServer:
    """One tritonserver child process and its work folder (backend dir + log), cleaned up by stop()."""

    def __init__(self, config: ServerConfig, install: TritonInstall | None = None, log_path: Path | None = None):
        self.config = config
        self.install = install or find_triton()
        self.workdir = Path(tempfile.mkdtemp(prefix="kubrick-triton-"))
        self.log_path = log_path or self.workdir / "tritonserver.log"  # one outside workdir outlives stop()
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        host = {"0.0.0.0": "127.0.0.1", "": "127.0.0.1", "::": "::1"}.get(self.config.host, self.config.host)
        if ":" in host:  # IPv6 literal
            host = f"[{host}]"
        return f"http://{host}:{self.config.http_port}"

    @property
    def metrics_url(self) -> str:
        return self.url.rsplit(":", 1)[0] + f":{self.config.metrics_port}/metrics"

    def command(self, backend_dir: Path) -> list[str]:
        c = self.config
        cmd = [
            str(self.install.binary),
            f"--model-repository={c.model_repository}",
            f"--backend-directory={backend_dir}",
            f"--http-address={c.host}",
            f"--http-port={c.http_port}",
            f"--grpc-address={c.host}",
            f"--grpc-port={c.grpc_port}",
            f"--metrics-address={c.host}",
            f"--metrics-port={c.metrics_port}",
            "--allow-metrics=true",
            "--exit-on-error=true",
            "--strict-readiness=true",
            "--exit-timeout-secs=10",
            f"--log-verbose={c.log_verbose}",
        ]
        if c.model_config_name:
            cmd.append(f"--model-config-name={c.model_config_name}")
        return cmd + list(c.extra_args)

    def start(self) -> None:
        check_stub_numpy(self.install)
        backend_dir = prepare_backend_dir(self.install, self.workdir / "backends")
        env = server_env(self.install)
        env.update(self.config.env)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "wb")
        try:
            self.process = subprocess.Popen(
                self.command(backend_dir),
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
                cwd=self.workdir,
                start_new_session=True,  # Ctrl-C reaches us, and we stop the server in order
            )
        finally:
            log.close()

    def wait_ready(
        self, timeout: float = 900.0, on_phase: Callable[[str], None] | None = None, model: str = MODEL_NAME
    ) -> None:
        """Wait until the server and the model answer ready; raise ServerFailed with log lines if not."""
        deadline = time.monotonic() + timeout
        phase = None
        with httpx.Client(timeout=2.0) as client:
            while True:
                if self.process is None or self.process.poll() is not None:
                    code = None if self.process is None else self.process.returncode
                    raise ServerFailed(f"tritonserver exited (code {code}) before it was ready:\n{self.log_excerpt()}")
                new_phase = self._phase(client, model)
                if new_phase == "ready":
                    return
                if new_phase != phase and on_phase is not None:
                    on_phase(new_phase)
                phase = new_phase
                if time.monotonic() > deadline:
                    raise ServerFailed(f"tritonserver was not ready after {timeout:.0f} s:\n{self.log_excerpt()}")
                time.sleep(0.2)

    def _phase(self, client: httpx.Client, model: str) -> str:
        try:
            if client.get(f"{self.url}/v2/health/live").status_code != 200:
                return "starting"
        except httpx.HTTPError:
            return "starting"
        try:
            model_ready = client.get(f"{self.url}/v2/models/{model}/ready").status_code == 200
            server_ready = client.get(f"{self.url}/v2/health/ready").status_code == 200
        except httpx.HTTPError:
            return "loading"
        return "ready" if model_ready and server_ready else "loading"

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def log_excerpt(self, lines: int = 20) -> str:
        """The log lines that explain a failure, each error once (Triton repeats the model's error at every
        layer), with the model's traceback the first time; else the tail of the log."""
        shown: list[str] = []
        out: list[str] = []
        for line in self.log_text().splitlines():
            if not (line.startswith(("E", "error:")) or "Failed to" in line) or any(n in line for n in _HARMLESS):
                continue
            message = _LOG_PREFIX.sub("", line).strip().strip('"')
            head, _, rest = message.replace("\\n", "\n").partition("\n")
            if any(old[-60:] in head for old in shown):
                continue
            shown.append(head)
            out.append(head)
            if not out[:-1]:  # the first error: keep its traceback ("At: file(line): function")
                out.extend(
                    "    " + t.strip()
                    for t in rest.splitlines()
                    if t.strip() and t.strip() not in ('"', "At:") and "<frozen importlib" not in t
                )
        if not out:
            out = self.log_text().splitlines()[-lines:]
        return "\n".join("  " + line for line in out[:lines]) or "  (the log is empty)"

    def model_error(self) -> str | None:
        """The model's own message when it failed on something a person can fix (a broken checkpoint, a missing
        vocabulary, a bad config): those errors are worded for people, so their traceback is left out."""
        found = _EXPECTED_MODEL_ERROR.search(self.log_text().replace("\\n", "\n"))
        return found.group(2).strip().strip('"').strip() if found else None

    def model_summary(self) -> str | None:
        """The line the model logs once loaded: its engine, device, context and KV-cache size."""
        for line in self.log_text().splitlines():
            message = _LOG_PREFIX.sub("", line).strip().strip('"')
            if line.startswith("I") and "KV cache: " in message:
                return message
        return None

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self, timeout: float = 30.0) -> int | None:
        """SIGTERM (Triton drains and unloads the model), SIGKILL if it hangs; then remove the work folder."""
        code = None
        if self.process is not None:
            if self.process.poll() is None:
                try:
                    self.process.send_signal(signal.SIGTERM)
                    code = self.process.wait(timeout)
                except subprocess.TimeoutExpired:
                    os.killpg(self.process.pid, signal.SIGKILL)
                    code = self.process.wait()
            else:
                code = self.process.returncode
            self._kill_leftover_stubs()
        shutil.rmtree(self.workdir, ignore_errors=True)
        return code

    def _kill_leftover_stubs(self) -> None:
        """The Python stub runs in the server's process group; make sure none outlives the server."""
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass

    def __enter__(self) -> "TritonServer":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def free_port(host: str = "127.0.0.1") -> int:
    """A port nobody listens on right now (the OS picks it)."""
    import socket

    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def start_local_server(
    checkpoint: Path,
    model_repository: Path,
    device: str = "cpu",
    context_length: int | None = None,
    timeout: float = 600.0,
) -> TritonServer:
    """A ready server on free loopback ports (tests and benchmarks); the caller stops it."""
    env = {"TRITON_CHECKPOINT": str(checkpoint), "TRITON_DEVICE": device}
    if context_length:
        env["TRITON_CONTEXT_LENGTH"] = str(context_length)
    config = ServerConfig(
        model_repository=model_repository,
        http_port=free_port(),
        grpc_port=free_port(),
        metrics_port=free_port(),
        model_config_name="gpu" if device.startswith("cuda") else None,
        env=env,
    )
    server = TritonServer(config)
    try:
        server.start()
        server.wait_ready(timeout=timeout)
    except BaseException:
        server.stop()
        raise
    return server
