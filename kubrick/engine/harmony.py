"""The Harmony chat format: render a conversation to prompt tokens, and turn sampled tokens into deltas.

Rendering: one system message (reasoning effort, today's date), the `system`/`developer` messages as
developer instructions, then the user/assistant history, ending with `<|start|>assistant`.

Parsing: openai-harmony's StreamableParser places each token; text on the `analysis` channel is reasoning,
anything else is the answer. A model that leaves the format (a random checkpoint does) must not lose its
words: tokens the parser cannot place, or a header that never ends, go out as decoded answer text.
"""

from __future__ import annotations

import datetime
import functools

import openai_harmony as oh

from kubrick.engine.api import ContentDelta, Message, ReasoningDelta

VOCAB_SIZE = 201088  # o200k_harmony: ordinary tokens, Harmony's specials and reserved ids
MAX_HEADER_TOKENS = 32  # a real header (`<|channel|>final<|message|>`, maybe a recipient) is far shorter
EFFORTS = {"low": oh.ReasoningEffort.LOW, "medium": oh.ReasoningEffort.MEDIUM, "high": oh.ReasoningEffort.HIGH}


@functools.lru_cache(maxsize=1)
def encoding() -> oh.HarmonyEncoding:
    from kubrick.engine.vocab import ensure_vocabulary

    ensure_vocabulary()
    return oh.load_harmony_encoding(oh.HarmonyEncodingName.HARMONY_GPT_OSS)


def stop_tokens() -> set[int]:
    """`<|return|>` (answer done) and `<|call|>` (tool call): the assistant hands the turn back."""
    return set(encoding().stop_tokens_for_assistant_actions())


def render_prompt(messages: list[Message], reasoning_effort: str = "medium", today: datetime.date | None = None) -> list[int]:
    system = (
        oh.SystemContent.new()
        .with_reasoning_effort(EFFORTS[reasoning_effort])
        .with_conversation_start_date((today or datetime.date.today()).isoformat())
    )
    rendered = [oh.Message.from_role_and_content(oh.Role.SYSTEM, system)]
    instructions = [m.content for m in messages if m.role in ("system", "developer")]
    if instructions:
        developer = oh.DeveloperContent.new().with_instructions("\n\n".join(instructions))
        rendered.append(oh.Message.from_role_and_content(oh.Role.DEVELOPER, developer))
    for m in messages:
        if m.role == "user":
            rendered.append(oh.Message.from_role_and_content(oh.Role.USER, m.content))
        elif m.role == "assistant":
            rendered.append(oh.Message.from_role_and_content(oh.Role.ASSISTANT, m.content).with_channel("final"))
    conversation = oh.Conversation.from_messages(rendered)
    return list(encoding().render_conversation_for_completion(conversation, oh.Role.ASSISTANT))


class HarmonyStream:
    """Feed sampled tokens one by one; get back the reasoning/content deltas they complete."""

    def __init__(self):
        self.encoding = encoding()
        self.parser: oh.StreamableParser | None = oh.StreamableParser(self.encoding, oh.Role.ASSISTANT)
        self.unplaced: list[int] = []  # tokens the parser holds in a header, not yet shown
        self.raw: list[int] = []  # once the format is lost: tokens held until they end on a whole character

    def feed(self, token: int) -> list[ReasoningDelta | ContentDelta]:
        if self.parser is None:
            return self._raw([token])
        try:
            self.parser.process(token)
        except Exception:  # HarmonyError or anything else the parser objects to: the words must still get out
            return self._abandon_format(token)
        if self.parser.state == oh.StreamState.EXPECT_START:  # the token closed a message
            self.unplaced.clear()
            return []
        if self.parser.state == oh.StreamState.HEADER:
            self.unplaced.append(token)
            if len(self.unplaced) > MAX_HEADER_TOKENS:
                return self._abandon_format()
            return []
        self.unplaced.clear()
        delta = self.parser.last_content_delta
        if not delta:
            return []
        if self.parser.current_channel == "analysis":
            return [ReasoningDelta(delta)]
        return [ContentDelta(delta)]

    def finish(self) -> list[ContentDelta]:
        """At the end of generation: show whatever never made it out (an unfinished header, held bytes)."""
        if self.parser is not None and self.unplaced:
            return self._abandon_format(final=True)  # final: a character cut off at the end shows as U+FFFD
        return self._raw([], final=True) if self.parser is None else []

    def _abandon_format(self, token: int | None = None, final: bool = False) -> list[ContentDelta]:
        self.parser = None
        pending = self.unplaced + ([token] if token is not None else [])
        self.unplaced = []
        return self._raw(pending, final)

    def _raw(self, tokens: list[int], final: bool = False) -> list[ContentDelta]:
        self.raw.extend(tokens)
        text = self.encoding.decode(self.raw)
        if not final and text.endswith("\ufffd"):
            return []  # a character split across tokens: wait for its other bytes
        # The held tokens end on a character boundary: start afresh, so each token is decoded once (decoding
        # the whole reply again every token cost O(n) a token, and a long reply O(n^2)).
        self.raw = []
        return [ContentDelta(text)] if text else []
