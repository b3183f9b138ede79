"""Rendering a streamed reply: finished Markdown blocks are printed once, the rest stays live, cost stays linear."""

from __future__ import annotations

import io
import json
import time

from rich.console import Console

from kubrick.chat.render import JsonRenderer, LiveRenderer, MarkdownBlocks, PlainRenderer

REPLY = """# Plan

First paragraph with **bold** text
that spans two lines.

- item one
- item two

  indented continuation of item two

```python
def f():

    return 1
```

1. first
2. second

Last words."""


def feed_in_pieces(text, size):
    blocks, out = MarkdownBlocks(), []
    for start in range(0, len(text), size):
        blocks.feed(text[start : start + size])
        out.append(blocks.take_finished())
    return out, blocks.pending


def test_blocks_hand_out_the_whole_text_exactly_once_whatever_the_piece_size():
    for size in (1, 2, 3, 7, 50, len(REPLY)):
        pieces, rest = feed_in_pieces(REPLY, size)
        assert "".join(pieces) + rest == REPLY


def test_code_blocks_and_indented_continuations_are_never_split():
    pieces, rest = feed_in_pieces(REPLY, 1)
    finished = [p for p in pieces if p]
    for piece in finished:
        assert piece.count("```") % 2 == 0  # a fence is never cut in half
        assert not piece.startswith("  ")  # an indented continuation stays with its list
    assert any("def f():\n\n    return 1\n```" in p for p in finished)
    assert rest == "Last words."


def render_with(renderer_factory, pieces):
    out = io.StringIO()
    console = Console(file=out, width=80, force_terminal=False, color_system=None)
    renderer = renderer_factory(console)
    for kind, text in pieces:
        getattr(renderer, kind)(text)
    renderer.finish({"completion_tokens": 3})
    return out.getvalue(), renderer


def test_live_renderer_shows_reasoning_then_the_whole_answer_once():
    pieces = [("reasoning", "Thinking about "), ("reasoning", "the plan.")] + [("answer", c) for c in REPLY]
    text, _ = render_with(lambda c: LiveRenderer(c, max_fps=1000), pieces)
    assert text.index("Thinking about the plan.") < text.index("Plan")
    for words in ("First paragraph with bold text", "item one", "indented continuation", "def f():", "return 1", "second", "Last words."):
        assert text.count(words) == 1, words
    assert "```" not in text and "**" not in text  # Markdown was rendered, not printed raw


def test_control_characters_from_the_model_never_reach_the_terminal():
    text, _ = render_with(lambda c: LiveRenderer(c), [("reasoning", "think\x1b[2J"), ("answer", "a\rb\x07c\x85d\u2028e\tf")])
    assert "\x1b[2J" not in text and "\r" not in text and "\x07" not in text and "\x85" not in text
    assert "think[2J" in text and "abcd e" in text


def test_hidden_reasoning_is_not_shown():
    text, _ = render_with(lambda c: LiveRenderer(c, show_reasoning=False), [("reasoning", "secret"), ("answer", "Hi")])
    assert "secret" not in text and "Hi" in text


def test_refreshes_are_limited_by_time_not_by_the_number_of_pieces():
    pieces = [("answer", f"word{i} ") for i in range(5000)]
    started = time.monotonic()
    _, renderer = render_with(lambda c: LiveRenderer(c, max_fps=10), pieces)
    elapsed = time.monotonic() - started
    assert renderer.renders <= 2 + elapsed * 10


def test_plain_renderer_prints_only_the_answer_and_ends_the_line():
    out = io.StringIO()
    renderer = PlainRenderer(out)
    renderer.reasoning("hidden thoughts")
    renderer.answer("**raw** text")
    renderer.finish()
    assert out.getvalue() == "**raw** text\n"


def test_json_renderer_prints_one_event_per_line():
    out = io.StringIO()
    renderer = JsonRenderer(out)
    renderer.reasoning("r")
    renderer.answer("a")
    renderer.finish({"completion_tokens": 1})
    events = [json.loads(line) for line in out.getvalue().splitlines()]
    assert events == [{"type": "reasoning", "content": "r"}, {"type": "chunk", "content": "a"},
                      {"type": "complete", "usage": {"completion_tokens": 1}}]
