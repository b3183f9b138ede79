"""`kubrick serve` as a person runs it, and the parts it is built from (binary discovery, backend dir, settings)."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import zipfile
from pathlib import Path

import httpx
import pytest

from kubrick.errors import KubrickError
from kubrick.server import default_model
from kubrick.server.install import STUB, find_triton, prepare_backend_dir, python_version, server_env
from kubrick.server.process import free_port
from kubrick.server.serve import check_ports_free, device_settings, shipped_model_repository

from .conftest import messages, stream_events

REPO = Path(__file__).resolve().parents[2]


def kubrick_command() -> list[str]:
    script = Path(sys.executable).with_name("kubrick")
    return [str(script)] if script.exists() else [sys.executable, "-m", "kubrick.cli"]


@pytest.fixture
def clean_env(monkeypatch, tmp_path):
    """No checkpoint or device settings from the outside; a private cache; a working folder without ./models."""
    for name in ("TRITON_CHECKPOINT", "TRITON_MODEL", "TRITON_DEVICE", "TRITON_CONTEXT_LENGTH", "XDG_CACHE_HOME"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("KUBRICK_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    return tmp_path


# The parts


def test_the_wheel_tritonserver_and_a_stub_for_this_python_are_found():
    install = find_triton()
    assert install.binary.is_file() and os.access(install.binary, os.X_OK)
    if install.source == "nvidia-pytriton wheel":
        assert install.stub is not None and f"/{python_version()}/" in str(install.stub)
        assert any(p.name == "nvidia_pytriton.libs" for p in install.lib_dirs)


def test_backend_dir_holds_the_python_backend_and_the_stub(tmp_path):
    backends = prepare_backend_dir(find_triton(), tmp_path / "backends")
    names = {p.name for p in (backends / "python").iterdir()}
    assert {"libtriton_python.so", "triton_python_backend_utils.py", STUB} <= names


def test_server_environment_runs_the_stub_in_this_python_environment():
    env = server_env(find_triton(), base={"PATH": "/usr/bin", "LD_LIBRARY_PATH": "/opt/x"})
    assert env["PATH"].split(os.pathsep)[0] == str(Path(sys.executable).parent)
    assert env["LD_LIBRARY_PATH"].split(os.pathsep)[-1] == "/opt/x"  # the caller's libraries are kept


def test_cache_folder_follows_kubrick_cache_then_xdg_then_home(monkeypatch, tmp_path):
    monkeypatch.delenv("KUBRICK_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_model.cache_dir() == tmp_path / "xdg" / "kubrick"
    monkeypatch.setenv("KUBRICK_CACHE", str(tmp_path / "mine"))
    assert default_model.cache_dir() == tmp_path / "mine"
    monkeypatch.delenv("KUBRICK_CACHE")
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert default_model.cache_dir() == Path.home() / ".cache" / "kubrick"


def test_checkpoint_choice_flag_then_env_then_default_location_then_embedded(clean_env, monkeypatch, tiny_checkpoint):
    assert default_model.resolve_checkpoint(None) == (None, "embedded default")
    local = clean_env / "models" / "gpt-oss-20b" / "original"
    local.mkdir(parents=True)
    (local / "config.json").write_text("{}")
    assert default_model.resolve_checkpoint(None)[0] == (clean_env / "models" / "gpt-oss-20b").resolve()
    monkeypatch.setenv("TRITON_CHECKPOINT", str(tiny_checkpoint))
    assert default_model.resolve_checkpoint(None) == (tiny_checkpoint.resolve(), "$TRITON_CHECKPOINT")
    assert default_model.resolve_checkpoint(tiny_checkpoint)[1] == "--checkpoint"
    with pytest.raises(KubrickError, match="does not exist"):
        default_model.resolve_checkpoint(clean_env / "nowhere")
    with pytest.raises(KubrickError, match="not a gpt-oss checkpoint"):
        default_model.resolve_checkpoint(clean_env)


def test_embedded_default_is_created_once(clean_env):
    path, created = default_model.ensure_embedded_default()
    assert created and default_model.is_checkpoint(path) and path.is_relative_to(clean_env / "cache")
    assert (path / "KUBRICK_RANDOM_CHECKPOINT").exists()
    assert default_model.ensure_embedded_default() == (path, False)


def test_device_picks_the_model_config_and_gpu(monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert device_settings("cpu") == (None, {"TRITON_DEVICE": "cpu"})
    assert device_settings("cuda:1") == ("gpu", {"TRITON_DEVICE": "cuda:0", "CUDA_VISIBLE_DEVICES": "1"})
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5")
    assert device_settings("cuda:1")[1]["CUDA_VISIBLE_DEVICES"] == "5"
    with pytest.raises(KubrickError, match="CUDA_VISIBLE_DEVICES"):
        device_settings("cuda:2")


def test_cpu_and_gpu_model_configs_differ_only_in_instance_group():
    model = shipped_model_repository() / "llm_decoupled"

    def settings(path: Path) -> list[str]:
        return [line for line in path.read_text().splitlines() if line.strip() and not line.startswith("#")]

    cpu, gpu = settings(model / "config.pbtxt"), settings(model / "configs" / "gpu.pbtxt")
    assert [line for line in cpu if "instance_group" not in line] == [line for line in gpu if "instance_group" not in line]
    assert any("KIND_CPU" in line for line in cpu) and any("KIND_GPU" in line for line in gpu)
    assert not re.search(r'name:\s*"parameters"', (model / "config.pbtxt").read_text())


def test_host_binds_all_three_endpoints_and_the_url_stays_reachable():
    from kubrick.server.process import ServerConfig, TritonServer

    for host, url_host in (("127.0.0.1", "127.0.0.1"), ("0.0.0.0", "127.0.0.1")):
        server = TritonServer(ServerConfig(model_repository=shipped_model_repository(), host=host, http_port=9000))
        try:
            command = server.command(Path("/backends"))
            for endpoint in ("http", "grpc", "metrics"):
                assert f"--{endpoint}-address={host}" in command
            assert server.url == f"http://{url_host}:9000"
        finally:
            server.stop()


def test_a_taken_port_is_reported_with_the_flag_to_change():
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(KubrickError, match="--grpc-port"):
            check_ports_free("127.0.0.1", {"--http-port": free_port(), "--grpc-port": port})


@pytest.mark.slow
def test_a_built_wheel_carries_the_model_repository(tmp_path):
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", str(REPO), "-w", str(tmp_path)],
        check=True, capture_output=True, cwd=tmp_path, timeout=300,
    )
    (wheel,) = tmp_path.glob("kubrick-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for name in ("config.pbtxt", "configs/gpu.pbtxt", "1/model.py"):
        assert f"kubrick/triton_repository/llm_decoupled/{name}" in names


# The command


def run_kubrick(*args: str, env: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([*kubrick_command(), *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


def test_serve_with_a_missing_checkpoint_says_so_in_one_line(clean_env):
    result = run_kubrick("serve", "--checkpoint", str(clean_env / "missing"), "--http-port", str(free_port()))
    assert result.returncode == 1
    assert result.stderr.strip().startswith("kubrick: error: checkpoint")
    assert "does not exist" in result.stderr and "Traceback" not in result.stderr


class ServeProcess:
    """`kubrick serve` in the background, its output read line by line."""

    def __init__(self, *args: str, env: dict | None = None, cwd: Path | None = None, ignore_sigint: bool = False):
        self.ports = [free_port(), free_port(), free_port()]
        # ignore_sigint: started the way a non-interactive shell starts a background job (SIGINT ignored)
        sigint = signal.SIG_IGN if ignore_sigint else signal.SIG_DFL
        self.process = subprocess.Popen(
            [*kubrick_command(), "serve", "--http-port", str(self.ports[0]), "--grpc-port", str(self.ports[1]),
             "--metrics-port", str(self.ports[2]), *args],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=cwd, env={**os.environ, **(env or {})},
            preexec_fn=lambda: signal.signal(signal.SIGINT, sigint),
        )
        self.stdout: list[str] = []
        self.stderr: list[str] = []
        for stream, lines in ((self.process.stdout, self.stdout), (self.process.stderr, self.stderr)):
            threading.Thread(target=lambda s=stream, l=lines: [l.append(x) for x in s], daemon=True).start()

    def wait_for_url(self, timeout: float = 300) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.process.poll() is None:
            for line in self.stdout:
                if match := re.search(r"Triton is serving llm_decoupled at (\S+)", line):
                    return match.group(1)
            time.sleep(0.1)
        raise AssertionError(f"no URL; stdout: {''.join(self.stdout)} stderr: {''.join(self.stderr)}")

    def wait_stopped(self, timeout: float, signal_name: str) -> int:
        """Its exit code once stopped; if it hangs, fail with what it and tritonserver said."""
        try:
            return self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            logs = sorted((Path(os.environ.get("KUBRICK_CACHE", "")) / "logs").glob("tritonserver-*.log"))
            tail = logs[-1].read_text(errors="replace")[-3000:] if logs else "(no tritonserver log)"
            raise AssertionError(f"kubrick serve still running {timeout:.0f} s after {signal_name}; its stdout: "
                                 f"{''.join(self.stdout)[-2000:]} stderr: {''.join(self.stderr)[-2000:]} "
                                 f"tritonserver log: {tail}") from None

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()


@pytest.mark.slow
@pytest.mark.parametrize("stop_signal,ignore_sigint",
                         [(signal.SIGTERM, False), (signal.SIGINT, False), (signal.SIGINT, True)],
                         ids=["SIGTERM", "Ctrl-C", "Ctrl-C after a launcher ignored it"])
def test_serve_starts_the_embedded_default_answers_and_stops_cleanly(clean_env, stop_signal, ignore_sigint):
    serve = ServeProcess(cwd=clean_env, ignore_sigint=ignore_sigint)
    try:
        url = serve.wait_for_url()
        assert url == f"http://127.0.0.1:{serve.ports[0]}"
        stderr = "".join(serve.stderr)
        assert "RANDOM weights" in stderr and "kubrick serve --checkpoint" in stderr
        events = stream_events(url, messages("hello"), {"temperature": 0, "max_tokens": 8})
        assert events[-1]["type"] == "complete"
        serve.process.send_signal(stop_signal)
        assert serve.wait_stopped(60, stop_signal.name) == 0
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"{url}/v2/health/live", timeout=2)
    finally:
        serve.close()


@pytest.mark.slow
def test_serve_that_fails_to_start_shows_the_log_lines_and_exits_non_zero(clean_env):
    broken = clean_env / "broken" / "original"
    broken.mkdir(parents=True)
    (broken / "config.json").write_text('{"num_hidden_layers": 2}')
    (broken / "model.safetensors").write_bytes(b"not a safetensors file")
    serve = ServeProcess("--checkpoint", str(broken.parent), cwd=clean_env)
    try:
        assert serve.process.wait(timeout=300) == 1
    finally:
        serve.close()
    stderr = "".join(serve.stderr)
    # A broken checkpoint is the person's to fix: the engine's own sentence, on one line, without a traceback
    (error,) = [line for line in stderr.splitlines() if line.startswith("kubrick: error:")]
    assert error.startswith("kubrick: error: the model could not load: ") and str(broken) in error
    assert "full log:" in error
    assert stderr.endswith(error + "\n") and ".py(" not in stderr and "Traceback" not in stderr


@pytest.mark.parametrize("flag,port", [("--http-port", "99999"), ("--metrics-port", "0")])
def test_a_port_out_of_range_is_one_line(clean_env, flag, port):
    result = run_kubrick("serve", flag, port)
    assert result.returncode == 1
    assert result.stderr == f"kubrick: error: {flag} {port} is not a port; use a number from 1 to 65535\n"


def test_a_gpu_torch_cannot_see_is_refused_before_starting(clean_env):
    result = run_kubrick("serve", "--device", "cuda:99", "--http-port", str(free_port()),
                         "--grpc-port", str(free_port()), "--metrics-port", str(free_port()))
    assert result.returncode == 1
    assert result.stderr.startswith("kubrick: error: cannot serve on cuda:99: torch sees ")
    assert result.stderr.count("\n") == 1 and "use --device cpu" in result.stderr


def test_numpy_2_is_refused_with_the_fix(monkeypatch):
    import importlib.metadata

    from kubrick.server.install import check_stub_numpy

    install = find_triton()
    if install.source != "nvidia-pytriton wheel":
        pytest.skip("the check is for the wheel's Triton 2.51 Python backend")
    real_version = importlib.metadata.version
    monkeypatch.setattr(importlib.metadata, "version", lambda name: "2.1.0" if name == "numpy" else real_version(name))
    with pytest.raises(KubrickError, match=r"pip install 'numpy<2'"):
        check_stub_numpy(install)
    monkeypatch.setattr(importlib.metadata, "version", lambda name: "1.26.4" if name == "numpy" else real_version(name))
    check_stub_numpy(install)


@pytest.mark.parametrize("host,expected", [("nosuchhost.invalid", "cannot listen on nosuchhost.invalid ("),
                                           ("192.0.2.77", "no network interface here has that address")])
def test_an_address_that_cannot_be_bound_points_at_host_not_the_port(host, expected):
    with pytest.raises(KubrickError) as caught:
        check_ports_free(host, {"--http-port": free_port(), "--grpc-port": free_port()})
    assert expected in str(caught.value) and str(caught.value).endswith("check --host")


def test_a_bad_device_from_the_environment_names_the_variable(clean_env, monkeypatch):
    monkeypatch.setenv("TRITON_DEVICE", "tpu")
    result = run_kubrick("serve", "--http-port", str(free_port()))
    assert result.returncode == 1
    assert result.stderr == "kubrick: error: unknown device 'tpu' (from $TRITON_DEVICE); use cpu, cuda or cuda:N\n"


# The engine's batching settings: --kv-cache-memory, --max-batch, --step-tokens

KV_CACHE_FORMS = ("a fraction of free GPU memory after the weights and CUDA graphs (0 < f <= 1, such as 0.9) "
                  "or a size (such as 512MiB or 8GiB)")


@pytest.mark.parametrize("args,env,origin,value", [
    (["--kv-cache-memory", "lots"], {}, "--kv-cache-memory", "lots"),
    (["--kv-cache-memory", "1.5"], {}, "--kv-cache-memory", "1.5"),
    ([], {"KUBRICK_KV_CACHE_MEMORY": "4 bananas"}, "$KUBRICK_KV_CACHE_MEMORY", "4 bananas"),
], ids=["word", "fraction-above-1", "env"])
def test_a_bad_kv_cache_memory_is_one_line_and_starts_nothing(clean_env, args, env, origin, value):
    result = run_kubrick("serve", *args, "--http-port", str(free_port()), env=env)
    assert result.returncode == 1
    assert result.stderr == f"kubrick: error: {origin} must be {KV_CACHE_FORMS}, not {value!r}\n"
    assert result.stdout == ""
    # refused before anything else: no embedded model was made, no tritonserver log was opened
    assert not (clean_env / "cache").exists()


def test_a_step_too_small_for_the_batch_is_refused_before_starting(clean_env):
    result = run_kubrick("serve", "--max-batch", "600", "--http-port", str(free_port()))
    assert result.returncode == 1
    assert result.stderr == (
        "kubrick: error: --step-tokens (512, the default) must be at least --max-batch (600) + the KV block size "
        "(16), so prompts keep moving while every sequence decodes; raise --step-tokens or lower --max-batch\n"
    )
    assert not (clean_env / "cache").exists()


@pytest.mark.parametrize("flag", ["--max-batch", "--step-tokens"])
def test_a_batch_setting_below_one_is_one_line(clean_env, flag):
    result = run_kubrick("serve", flag, "0", "--http-port", str(free_port()))
    assert result.returncode == 1
    assert result.stderr == f"kubrick: error: {flag} must be at least 1, not 0\n"


@pytest.fixture
def serving():
    """Start `kubrick serve` with some arguments; always stopped (SIGTERM, so it stops its tritonserver)."""
    started: list[ServeProcess] = []

    def start(*args: str, **kwargs) -> ServeProcess:
        started.append(ServeProcess(*args, **kwargs))
        return started[-1]

    try:
        yield start
    finally:
        for serve in started:
            if serve.process.poll() is None:
                serve.process.send_signal(signal.SIGTERM)
                try:
                    serve.process.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    pass
            serve.close()


@pytest.mark.slow
def test_serve_reports_a_kv_cache_of_the_size_asked_for_and_the_flags_win(clean_env, serving):
    # the variables say otherwise; the flags win, and reach the engine inside tritonserver
    env = {"KUBRICK_KV_CACHE_MEMORY": "1GiB", "KUBRICK_MAX_BATCH": "32", "KUBRICK_STEP_TOKENS": "256"}
    serve = serving("--kv-cache-memory", "64MiB", "--max-batch", "8", "--step-tokens", "128", cwd=clean_env, env=env)
    url = serve.wait_for_url()
    stderr = "".join(serve.stderr)
    ready = stderr.index("ready in ")
    (line,) = [line for line in stderr[ready:].splitlines() if "KV cache: " in line]
    size = re.search(r"paged KV cache: \d+ tokens in \d+ blocks .*?, (\d+) MiB; batches of up to (\d+) sequences, "
                     r"(\d+) tokens a step", line)
    assert size, line
    assert 0 < int(size.group(1)) <= 64 and size.group(2, 3) == ("8", "128")
    events = stream_events(url, messages("hello"), {"temperature": 0, "max_tokens": 4})
    assert events[-1]["type"] == "complete"


@pytest.mark.slow
def test_the_step_trace_of_a_server_records_its_sends_and_the_summary_reads_them(clean_env, serving):
    # KUBRICK_STEP_TRACE inside tritonserver: the engine's steps and the response thread's sends to the clients,
    # so the time text waits between the engine and the client can be told apart from the engine's own gaps.
    trace = clean_env / "trace.jsonl"
    serve = serving("--max-batch", "4", cwd=clean_env, env={"KUBRICK_STEP_TRACE": str(trace)})
    url = serve.wait_for_url()
    replies = [stream_events(url, messages(text), {"temperature": 0, "max_tokens": 6}) for text in ("hello", "hi")]
    assert all(events[-1]["type"] == "complete" for events in replies)
    serve.process.send_signal(signal.SIGTERM)  # the trace is written when the scheduler stops
    serve.process.wait(timeout=60)
    lines = [json.loads(line) for line in trace.read_text().splitlines()]
    sends = [e for e in lines if e["ev"] == "respond"]
    assert sum(e["n"] for e in sends) >= sum(len(events) for events in replies)  # every event went out through it
    assert any(e["ev"] == "deliver" for e in lines)
    summary = subprocess.run([sys.executable, "scripts/step_trace.py", str(trace)], capture_output=True, text=True,
                             check=True, cwd=Path(__file__).parents[2]).stdout
    assert "respond (server)" in summary and "delivered -> sent" in summary
