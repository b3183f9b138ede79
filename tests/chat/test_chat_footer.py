"""The footer after a reply: tokens, time to first token and an honest tokens/s."""

from __future__ import annotations

import io

from kubrick.chat.render import PlainRenderer
from kubrick.chat.session import ChatSession, TurnResult
from kubrick.chat.store import ConversationStore
from kubrick.client import TritonClient
from kubrick.config import resolve_settings
from scripted_triton import ScriptedTriton, sse


def held_back_reply(body):
    """Like the engine on a random model: nothing for a while, then 30 tokens' text in one burst."""
    usage = {"prompt_tokens": 68, "completion_tokens": 30, "time_to_first_token_s": 0.03, "tokens_per_s": 74.2}
    return [0.3, sse({"type": "chunk", "content": "thirty tokens of text at once"}),
            sse({"type": "chunk", "content": " and a tail"}),
            sse({"type": "complete", "usage": usage, "finish_reason": "length"})]


def test_a_burst_at_the_end_shows_the_servers_rate_not_thousands(kubrick_home):
    with ScriptedTriton({"llm_decoupled": held_back_reply}) as server:
        settings = resolve_settings({"triton_url": server.url}, environ={})
        client = TritonClient(server.url, settings.model_name)
        try:
            session = ChatSession(settings, client, ConversationStore(kubrick_home / "conversations"))
            result = session.ask("hi", PlainRenderer(io.StringIO()))
        finally:
            client.close()
    footer = result.footer()
    assert footer.startswith("30 tokens · first token ")
    assert "74.2 tok/s" in footer
    assert "reached max_tokens" in footer


def test_without_a_server_rate_pieces_are_timed_from_first_to_last():
    # 5 pieces, the first at 1.0 s and the last at 3.0 s: 4 pieces in 2 s, whatever the stream's end
    result = TurnResult(status="cancelled", pieces=5, time_to_first_token_s=1.0, first_piece_s=1.0,
                        last_piece_s=3.0, duration_s=60.0)
    assert result.footer() == "5 tokens · first token 1.00 s · 2.0 tok/s · stopped"


def test_a_single_piece_shows_no_rate():
    result = TurnResult(status="complete", pieces=1, time_to_first_token_s=0.5, first_piece_s=0.5,
                        last_piece_s=0.5, duration_s=0.6)
    assert result.footer() == "1 token · first token 0.50 s"
