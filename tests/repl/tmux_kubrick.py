"""Drive the real `kubrick` program in a tmux pane: type keys, read the screen.

Works against any server URL (the scripted loopback server in these tests, or a real tritonserver):

    with KubrickInTmux(url, home=tmp_path) as k:
        k.wait_for("›")
        k.type("hello"); k.keys("Enter")
        k.wait_for("You said")
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path


def tmux_available() -> bool:
    return shutil.which("tmux") is not None


def kubrick_command() -> list[str]:
    """The installed console script next to this Python, else `python -m kubrick.cli`."""
    script = Path(sys.executable).with_name("kubrick")
    return [str(script)] if script.exists() else [sys.executable, "-m", "kubrick.cli"]


class KubrickInTmux:
    def __init__(self, url: str, home: Path, args: tuple[str, ...] = (), width: int = 100, height: int = 40,
                 env: dict[str, str] | None = None, command: list[str] | None = None):
        """command: run this instead of `kubrick --triton-url URL ARGS` (e.g. scripts/demo)."""
        self.url, self.home, self.args, self.command = url, Path(home), args, command
        self.width, self.height = width, height
        self.env = env or {}
        self.name = f"kubrick-test-{uuid.uuid4().hex[:8]}"
        # a private tmux server (short socket path: sockets are limited to ~100 bytes); never the user's sessions
        self.socket = os.path.join(tempfile.gettempdir(), f"{self.name}.sock")

    def _tmux(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        return subprocess.run(["tmux", "-S", self.socket, *args], capture_output=True, text=True, check=check,
                              timeout=30)

    def __enter__(self) -> "KubrickInTmux":
        self.home.mkdir(parents=True, exist_ok=True)
        env = {"KUBRICK_HOME": str(self.home), "TERM": "xterm-256color", **self.env}
        exports = " ".join(f"{k}={shlex.quote(v)}" for k, v in env.items())
        parts = self.command or [*kubrick_command(), "--triton-url", self.url, *self.args]
        command = " ".join(shlex.quote(part) for part in parts)
        # after kubrick exits, print its exit status and keep the pane open so the test can read it
        shell = f"env {exports} {command}; echo KUBRICK-EXITED-$?; sleep 600"
        self._tmux("-f", "/dev/null", "new-session", "-d", "-s", self.name, "-x", str(self.width),
                   "-y", str(self.height), shell)
        return self

    def __exit__(self, *exc: object) -> None:
        self._tmux("kill-server", check=False)
        Path(self.socket).unlink(missing_ok=True)

    def keys(self, *keys: str) -> None:
        """tmux key names: Enter, C-c, C-d, Escape, Tab …"""
        self._tmux("send-keys", "-t", self.name, *keys)

    def type(self, text: str) -> None:
        self._tmux("send-keys", "-t", self.name, "-l", text)

    def paste(self, text: str) -> None:
        """Paste as a terminal does (bracketed paste), newlines included."""
        self._tmux("set-buffer", "-b", "kubrick-test", text)
        self._tmux("paste-buffer", "-p", "-d", "-b", "kubrick-test", "-t", self.name)

    def screen(self) -> str:
        return self._tmux("capture-pane", "-p", "-J", "-S", "-200", "-t", self.name).stdout

    def wait_for(self, text: str, timeout: float = 30.0, after: str | None = None) -> str:
        """Wait until `text` is on screen (and, if given, appears after the last `after`); returns the screen."""
        deadline = time.monotonic() + timeout
        screen = ""
        while time.monotonic() < deadline:
            screen = self.screen()
            region = screen.rsplit(after, 1)[-1] if after and after in screen else ("" if after else screen)
            if text in region:
                return screen
            time.sleep(0.1)
        raise AssertionError(f"{text!r} did not appear within {timeout} s; the screen shows:\n{screen}")

    def press_until(self, key: str, text: str, after: str | None = None, tries: int = 5, wait: float = 3.0) -> str:
        """Press `key` until `text` shows (after `after`). A key pressed while kubrick is between two prompts can
        be lost on a loaded machine (the terminal is not in raw mode then); a person presses again, so do we."""
        for _ in range(tries):
            self.keys(key)
            try:
                return self.wait_for(text, timeout=wait, after=after)
            except AssertionError:
                continue
        return self.wait_for(text, timeout=wait, after=after)  # fails with the screen in the message

    def exited(self) -> bool:
        return "KUBRICK-EXITED-" in self.screen()

    def exit_status(self, timeout: float = 20.0) -> int:
        screen = self.wait_for("KUBRICK-EXITED-", timeout=timeout)
        return int(screen.split("KUBRICK-EXITED-", 1)[1].split()[0])


if __name__ == "__main__":  # manual use: python tests/repl/tmux_kubrick.py URL  (prints the screen after a question)
    url = sys.argv[1] if len(sys.argv) > 1 else os.environ.get("TRITON_URL", "http://localhost:8000")
    with tempfile.TemporaryDirectory() as tmp, KubrickInTmux(url, Path(tmp)) as k:
        k.wait_for("›")
        k.type("Say hello in one short sentence.")
        k.keys("Enter")
        k.wait_for("tokens", timeout=120)
        print(k.screen())
