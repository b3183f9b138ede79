"""The chat client (`kubrick -p` and the REPL in tmux) talking to the real tritonserver and engine."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow


def _load_tmux_helper():
    """The CLI tests' tmux driver (tests/repl/tmux_kubrick.py), loaded by path: one helper for both suites."""
    path = Path(__file__).resolve().parents[1] / "repl" / "tmux_kubrick.py"
    spec = importlib.util.spec_from_file_location("tmux_kubrick_for_server_tests", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


tmux = _load_tmux_helper()


def kubrick(*args: str, home: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*tmux.kubrick_command(), *args], capture_output=True, text=True, timeout=300,
        env={"PATH": str(Path(sys.executable).parent) + ":/usr/bin:/bin", "KUBRICK_HOME": str(home)},
    )


def test_kubrick_p_prints_the_answer_the_engine_streamed(triton_server, tmp_path):
    question = ("-p", "Say hello.", "--triton-url", triton_server.url, "--temperature", "0", "--max-tokens", "16")
    as_json = kubrick(*question, "--json", home=tmp_path)
    assert as_json.returncode == 0, as_json.stderr
    events = [json.loads(line) for line in as_json.stdout.splitlines() if line.strip()]
    assert events[-1]["type"] == "complete" and 0 < events[-1]["usage"]["completion_tokens"] <= 16
    text = "".join(e["content"] for e in events if e["type"] == "chunk")
    assert text.strip()
    plain = kubrick(*question, home=tmp_path)
    assert plain.returncode == 0, plain.stderr
    assert text.strip() in plain.stdout  # greedy: the same answer, shown as text


@pytest.mark.skipif(not tmux.tmux_available(), reason="needs tmux")
def test_repl_asks_the_real_server_and_shows_the_reply(triton_server, tmp_path):
    with tmux.KubrickInTmux(triton_server.url, tmp_path / "home", args=("--max-tokens", "24")) as k:
        k.wait_for("›")
        k.type("What is Kubrick?")
        k.keys("Enter")
        screen = k.wait_for("tokens", after="What is Kubrick?", timeout=300)  # the usage line after a finished reply
        # The footer's rate is the engine's own (the engine holds text back and sends it in bursts, so a
        # client-side count over the streaming time once read as thousands of tokens a second)
        (saved,) = (tmp_path / "home" / "conversations").glob("*.json")
        usage = json.loads(saved.read_text())["messages"][-1]["usage"]
        footer = next(line for line in reversed(screen.splitlines()) if "tokens ·" in line)
        assert footer.startswith(f"{usage['completion_tokens']} tokens · first token ")
        if usage["completion_tokens"] > 1:
            assert f"{usage['tokens_per_s']:.1f} tok/s" in footer
        k.type("/exit")
        k.keys("Enter")
        assert k.exit_status() == 0
