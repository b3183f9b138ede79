"""Showing a streaming reply: live Markdown for terminals, plain text for pipes, JSON lines for programs.

The live renderer keeps the cost of a reply linear in its length: finished Markdown blocks are printed once
and never touched again; only the unfinished tail is re-rendered, and at most `max_fps` times a second
(less when rendering gets slow).
"""

from __future__ import annotations

import json
import sys
import time
from contextlib import contextmanager
from typing import Any, Protocol, TextIO

from rich.console import Console, ConsoleOptions, RenderableType, RenderResult
from rich.live import Live
from rich.markdown import Markdown
from rich.segment import Segment
from rich.text import Text

CODE_THEME = "monokai"

# Control characters a model (or a server) may emit would move the terminal's cursor behind rich's back
# (or inject escape sequences): keep newlines and tabs, drop the rest of C0/C1, turn Unicode line breaks
# into spaces. Only the screen sees this; the conversation keeps the text as sent.
_SCREEN_UNSAFE = {c: None for c in [*range(0x00, 0x09), *range(0x0B, 0x20), 0x7F, *range(0x80, 0xA0)]}
_SCREEN_UNSAFE.update({0x2028: " ", 0x2029: " "})


def screen_safe(text: str) -> str:
    return text.translate(_SCREEN_UNSAFE)


@contextmanager
def quiet_terminal():
    """While a reply streams, keys typed (and the ^C of Ctrl-C) are not echoed: an echo would move the
    cursor under the live area and leave stale lines behind. Typed text waits for the next prompt."""
    try:
        import termios

        fd = sys.stdin.fileno()
        saved = termios.tcgetattr(fd) if sys.stdin.isatty() else None
    except (ImportError, OSError, ValueError):
        saved = None
    if saved is None:
        yield
        return
    quiet = list(saved)
    quiet[3] &= ~(termios.ECHO | termios.ECHOCTL)  # lflags
    termios.tcsetattr(fd, termios.TCSANOW, quiet)
    try:
        yield
    finally:
        termios.tcsetattr(fd, termios.TCSANOW, saved)


def terminal_console() -> Console:
    """A rich Console for the terminal, sized by the terminal itself: inherited COLUMNS/LINES variables
    (which rich would otherwise trust) are often stale and would make the live area taller than the screen."""
    import os

    return Console(_environ={k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES")})


class Renderer(Protocol):
    def start(self) -> None: ...
    def reasoning(self, text: str) -> None: ...
    def answer(self, text: str) -> None: ...
    def finish(self, usage: dict[str, Any] | None = None, finish_reason: str = "") -> None: ...
    def error(self, message: str) -> None: ...


class MarkdownBlocks:
    """Text that grows at its end; `take_finished()` hands out the prefix made of complete Markdown blocks.

    A block is finished at a blank line outside a code fence once the next line has started without
    indentation (an indented line could still belong to a list item), or right after a closing fence.
    Each character is scanned once.
    """

    def __init__(self) -> None:
        self.pending = ""  # not yet handed out
        self._scanned = 0  # pending[:_scanned] holds only whole lines already looked at
        self._fence = ""  # the opening fence (``` or ~~~) while inside a code block
        self._cut = 0  # end of the finished prefix within pending
        self._blank_before = False

    def feed(self, text: str) -> None:
        self.pending += text

    def take_finished(self) -> str:
        while True:
            end = self.pending.find("\n", self._scanned)
            if end < 0:
                break
            line = self.pending[self._scanned : end]
            start = self._scanned
            self._scanned = end + 1
            self._look_at(line, start)
        # a line that has started after a blank one settles the block before it
        if self._blank_before and not self._fence and self._scanned < len(self.pending):
            if not self.pending[self._scanned].isspace():
                self._cut = self._scanned
        done, self.pending = self.pending[: self._cut], self.pending[self._cut :]
        self._scanned -= self._cut
        self._cut = 0
        return done

    def _look_at(self, line: str, start: int) -> None:
        stripped = line.strip()
        if self._fence:
            if stripped.startswith(self._fence) and not stripped[len(self._fence):].strip("`~"):
                self._fence = ""
                self._cut = start + len(line) + 1  # a closed code block is finished
            self._blank_before = False
            return
        if stripped.startswith("```") or stripped.startswith("~~~"):
            self._fence = stripped[:3]
            self._blank_before = False
            return
        if not stripped:
            self._blank_before = True
            return
        if self._blank_before and not line[:1].isspace():
            self._cut = start
        self._blank_before = False


class _Bottom:
    """Shows only the last `height` lines of a renderable, like a terminal scrolling along."""

    def __init__(self, renderable: RenderableType, height: int):
        self.renderable, self.height = renderable, height

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        lines = console.render_lines(self.renderable, options, pad=False)
        for line in lines[-self.height :]:
            yield from line
            yield Segment.line()


class LiveRenderer:
    """Rich output for a terminal: dimmed reasoning, then the answer as live Markdown with highlighted code."""

    def __init__(self, console: Console, show_reasoning: bool = True, max_fps: float = 10.0,
                 show_errors: bool = True):
        self.console = console
        self.show_reasoning = show_reasoning
        self.show_errors = show_errors  # off when the caller reports errors itself (kubrick -p: one line on stderr)
        self.min_interval = 1.0 / max_fps
        self._reasoning = MarkdownBlocks()
        self._answer = MarkdownBlocks()
        self._in_answer = False
        self._next_refresh = 0.0
        self._thinking_shown = False
        self._live: Live | None = None
        self.renders = 0  # live refreshes, for the benchmark

    def _ensure_live(self) -> Live:
        if self._live is None:
            self._live = Live(console=self.console, auto_refresh=False, transient=True, redirect_stdout=False,
                              redirect_stderr=False)
            self._autowrap(False)
            self._live.start()
        return self._live

    def _autowrap(self, on: bool) -> None:
        """Rich and the terminal may disagree on the width of some characters (combining marks of Indic
        scripts, emoji sequences). With autowrap off, a line the terminal finds too long is clipped instead of
        wrapped, so the live area keeps the height rich thinks it has and no stale lines are left behind."""
        if self.console.is_terminal:
            self.console.file.write("\x1b[?7h" if on else "\x1b[?7l")
            self.console.file.flush()

    def start(self) -> None:
        """Until the first token: a dim line saying we wait (prefill of a long conversation takes a while)."""
        self._ensure_live().update(Text("waiting for the model…", style="dim italic"), refresh=True)

    def reasoning(self, text: str) -> None:
        if self._in_answer:
            return
        if not self.show_reasoning:
            if not self._thinking_shown:  # say that something is happening, once
                self._thinking_shown = True
                self._ensure_live().update(Text("thinking…", style="dim italic"), refresh=True)
            return
        self._reasoning.feed(screen_safe(text))
        self._update()

    def answer(self, text: str) -> None:
        if not self._in_answer:
            self._in_answer = True
            self._commit_reasoning(everything=True)
        self._answer.feed(screen_safe(text))
        self._update()

    def _commit_reasoning(self, everything: bool) -> None:
        if everything:
            done, self._reasoning.pending = self._reasoning.pending, ""
            done = done.rstrip()
            if done:
                self._ensure_live()
                self.console.print(Text(done, style="dim"))
                self.console.print()
        else:
            done = self._reasoning.take_finished()
            if done.strip():  # whole paragraphs, each followed by its blank line
                self._ensure_live()
                self.console.print(Text(done.rstrip("\n"), style="dim"))
                self.console.print()

    def _update(self) -> None:
        now = time.monotonic()
        if now < self._next_refresh:
            return
        started = now
        live = self._ensure_live()
        if self._in_answer:
            done = self._answer.take_finished()
            if done.strip():
                self.console.print(Markdown(done, code_theme=CODE_THEME))
            tail: RenderableType = Markdown(self._answer.pending, code_theme=CODE_THEME)
        else:
            self._commit_reasoning(everything=False)
            tail = Text(self._reasoning.pending, style="dim")
        live.update(_Bottom(tail, max(1, self.console.height - 2)), refresh=True)
        self.renders += 1
        cost = time.monotonic() - started
        # slow renders (a huge unfinished block) back off so the CPU stays a small fraction of the stream
        self._next_refresh = time.monotonic() + max(self.min_interval, 4 * cost)

    def finish(self, usage: dict[str, Any] | None = None, finish_reason: str = "") -> None:
        """Print whatever is still pending in full and leave the live area."""
        if not self._in_answer:
            self._commit_reasoning(everything=True)
        rest = self._answer.pending
        self._answer.pending = ""
        if self._live is not None:
            self._live.update(Text(""), refresh=True)
            self._live.stop()
            self._live = None
            self._autowrap(True)
        if rest.strip():
            self.console.print(Markdown(rest, code_theme=CODE_THEME))

    def error(self, message: str) -> None:
        if self.show_errors:
            self.console.print(Text(message, style="bold red"))


class PlainRenderer:
    """The answer as plain text, written as it arrives (for pipes and files); reasoning is left out."""

    def __init__(self, out: TextIO | None = None):
        self.out = out or sys.stdout
        self._last = "\n"

    def start(self) -> None:
        pass

    def reasoning(self, text: str) -> None:
        pass

    def answer(self, text: str) -> None:
        self.out.write(text)
        self.out.flush()
        self._last = text[-1:] or self._last

    def finish(self, usage: dict[str, Any] | None = None, finish_reason: str = "") -> None:
        if self._last != "\n":
            self.out.write("\n")
        self.out.flush()

    def error(self, message: str) -> None:
        pass  # the error goes to stderr as the CLI's one-line message


class JsonRenderer:
    """One JSON event per line, the same shapes the server sends: reasoning, chunk, complete, error."""

    def __init__(self, out: TextIO | None = None):
        self.out = out or sys.stdout

    def start(self) -> None:
        pass

    def _emit(self, event: dict[str, Any]) -> None:
        self.out.write(json.dumps(event, ensure_ascii=False) + "\n")
        self.out.flush()

    def reasoning(self, text: str) -> None:
        self._emit({"type": "reasoning", "content": text})

    def answer(self, text: str) -> None:
        self._emit({"type": "chunk", "content": text})

    def finish(self, usage: dict[str, Any] | None = None, finish_reason: str = "") -> None:
        if usage is not None:
            event: dict[str, Any] = {"type": "complete", "usage": usage}
            if finish_reason:
                event["finish_reason"] = finish_reason
            self._emit(event)

    def error(self, message: str) -> None:
        self._emit({"type": "error", "content": message})
