"""The Harmony chat format: what the model is shown, and how its tokens become reasoning and answer text."""

from __future__ import annotations

import datetime

from kubrick.engine import harmony
from kubrick.engine.api import ContentDelta, Message, ReasoningDelta
from kubrick.engine.vocab import SHA256, VocabularyMissing, ensure_vocabulary, install


def _text(tokens):
    return harmony.encoding().decode(tokens)


def test_the_prompt_carries_effort_date_instructions_and_history():
    messages = [
        Message("system", "Answer in French."),
        Message("user", "Hi"),
        Message("assistant", "Bonjour !"),
        Message("user", "How are you?"),
    ]
    text = _text(harmony.render_prompt(messages, "high", today=datetime.date(2026, 1, 2)))
    assert "Reasoning: high" in text
    assert "Current date: 2026-01-02" in text
    assert "<|start|>developer<|message|># Instructions\n\nAnswer in French.<|end|>" in text
    assert "<|start|>user<|message|>Hi<|end|><|start|>assistant<|channel|>final<|message|>Bonjour !<|end|>" in text
    assert text.endswith("<|start|>user<|message|>How are you?<|end|><|start|>assistant")


def test_no_system_message_means_no_developer_message():
    text = _text(harmony.render_prompt([Message("user", "Hi")], "low"))
    assert "<|start|>developer" not in text and "Reasoning: low" in text


def _stream(text: str) -> list:
    stream = harmony.HarmonyStream()
    events = []
    for token in harmony.encoding().encode(text, allowed_special="all"):
        events += stream.feed(token)
    return events + stream.finish()


def _joined(events, kind):
    return "".join(e.text for e in events if isinstance(e, kind))


def test_analysis_is_reasoning_and_final_is_the_answer():
    events = _stream(
        "<|channel|>analysis<|message|>User greets. Reply kindly.<|end|>"
        "<|start|>assistant<|channel|>final<|message|>Hello, **café** lover!"
    )
    assert _joined(events, ReasoningDelta) == "User greets. Reply kindly."
    assert _joined(events, ContentDelta) == "Hello, **café** lover!"
    assert len(events) > 2  # streamed piece by piece, not in one lump


def test_text_outside_the_format_still_reaches_the_user_as_answer_text():
    events = _stream("Just some words, no header at all, that keep going for a while and then some more words " * 3)
    assert _joined(events, ReasoningDelta) == ""
    assert _joined(events, ContentDelta) == "Just some words, no header at all, that keep going for a while and then some more words " * 3


def test_a_header_that_never_ends_is_shown_when_generation_stops():
    events = _stream("<|channel|>final and then nothing")
    assert _joined(events, ContentDelta) == "<|channel|>final and then nothing"


def test_a_held_header_cut_off_inside_a_character_is_still_shown_when_generation_stops():
    # "<|channel|>final 🎉" without its last token: the held tokens end with half of the emoji's bytes.
    tokens = harmony.encoding().encode("<|channel|>final 🎉", allowed_special="all")[:-1]
    stream = harmony.HarmonyStream()
    events = [e for token in tokens for e in stream.feed(token)] + stream.finish()
    assert _joined(events, ContentDelta) == "<|channel|>final \ufffd"


def test_a_token_the_parser_rejects_is_shown_and_the_rest_follows_as_text():
    events = _stream("<|channel|>final<|message|>Done.<|end|>stray words<|end|>")
    assert _joined(events, ContentDelta) == "Done.stray words<|end|>"


def test_stop_tokens_are_return_and_call():
    enc = harmony.encoding()
    assert harmony.stop_tokens() == {enc.encode("<|return|>", allowed_special="all")[0], enc.encode("<|call|>", allowed_special="all")[0]}


def test_the_vocabulary_installs_from_the_wheel_with_its_hash_checked(tmp_path):
    import hashlib

    path = install(tmp_path)
    assert hashlib.sha256(path.read_bytes()).hexdigest() == SHA256


def test_a_vocabulary_that_cannot_be_found_says_how_to_get_it(tmp_path, monkeypatch):
    import sys

    import pytest

    monkeypatch.delenv("TIKTOKEN_ENCODINGS_BASE", raising=False)
    monkeypatch.setenv("KUBRICK_VOCAB_DIR", str(tmp_path / "empty"))
    monkeypatch.setitem(sys.modules, "bpe_openai", None)  # the wheel is not installed
    with pytest.raises(VocabularyMissing, match="run `python -m kubrick.engine.vocab install`"):
        ensure_vocabulary()
