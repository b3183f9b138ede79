"""The README's first command, `scripts/demo`, as a person uses it: ask, stop a reply with Ctrl-C, ask again, leave.

It sets everything up (quickly when .venv is there), starts a real tritonserver on the embedded default model and
opens the chat, all in one terminal: Ctrl-C there must stop the reply, not the server as well.
"""

from __future__ import annotations

import os
import signal
import socket
import time
from pathlib import Path

import httpx
import pytest

from kubrick.server.process import free_port
from tmux_kubrick import KubrickInTmux, tmux_available

pytestmark = pytest.mark.skipif(not tmux_available(), reason="needs tmux")

DEMO = Path(__file__).resolve().parents[2] / "scripts" / "demo"


def three_free_ports() -> int:
    """A port p with p + 1 and p + 2 free too (the demo's HTTP, gRPC and metrics ports)."""
    for _ in range(50):
        port = free_port()
        try:
            for p in (port + 1, port + 2):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", p))
            return port
        except OSError:
            continue
    raise RuntimeError("no three free ports in a row")


def stop_servers_on(port: int) -> None:
    """SIGTERM any `kubrick serve` still holding this HTTP port (the demo's own exit trap should have stopped it)."""
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            args = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"serve" in args and b"--http-port" in args and str(port).encode() in args:
            os.kill(int(pid), signal.SIGTERM)


def test_ctrl_c_in_the_demo_stops_the_reply_and_keeps_the_server(tmp_path):
    port = three_free_ports()
    try:
        run_the_demo(port, tmp_path)
    finally:
        stop_servers_on(port)  # even when the test failed half-way


def run_the_demo(port: int, tmp_path: Path) -> None:
    with KubrickInTmux("", tmp_path / "home", width=120, command=[str(DEMO), "--max-tokens", "3000"],
                       env={"KUBRICK_DEMO_PORT": str(port)}) as k:
        k.wait_for("Ctrl-D to exit", timeout=500)  # setup, then the server's start (a first one makes the model)
        for ask in ("Tell me a long story.", "And another one."):
            k.type(ask)
            k.keys("Enter")
            time.sleep(4)  # well into a 3,000-token reply of the tiny model
            k.keys("C-c")
            screen = k.wait_for("stopped", timeout=60, after=ask)
            assert "cannot reach" not in screen.rsplit(ask, 1)[-1], screen  # the server is still there
        k.type("/exit")
        k.keys("Enter")
        assert k.exit_status(timeout=60) == 0
        with pytest.raises(httpx.ConnectError):  # and gone once the chat ended
            httpx.get(f"http://127.0.0.1:{port}/v2/health/ready", timeout=5)
