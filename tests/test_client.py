"""The Triton client against a real HTTP server on loopback playing every event form and failure."""

from __future__ import annotations

import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from kubrick.client import (
    Chunk,
    Complete,
    Reasoning,
    ServerError,
    ServerUnreachable,
    StreamCutOff,
    TritonClient,
    UnknownModel,
)
from scripted_triton import DROP, ScriptedTriton, chat_reply, sse

MESSAGES = [{"role": "user", "content": "hi"}]


def play(frames, model="m"):
    """Stream one reply from a server playing `frames`; returns (events, error or None)."""
    with ScriptedTriton({model: lambda body: frames}) as server, TritonClient(server.url, model) as client:
        events = []
        try:
            for event in client.generate_stream(MESSAGES, {"temperature": 0.5}):
                events.append(event)
        except Exception as err:  # noqa: BLE001 - the test inspects it
            return events, err
        return events, None


def text_of(events, kind=Chunk):
    return "".join(e.text for e in events if isinstance(e, kind))


def test_triton_wrapped_events_give_reasoning_answer_and_usage():
    events, error = play(chat_reply("Hello there, friend.", reasoning="User greets."))
    assert error is None
    assert text_of(events, Reasoning) == "User greets."
    assert text_of(events) == "Hello there, friend."
    assert isinstance(events[-1], Complete) and events[-1].usage["prompt_tokens"] == 12


def test_complete_says_why_the_reply_ended():
    events, error = play([sse({"type": "chunk", "content": "long"}),
                          sse({"type": "complete", "finish_reason": "length", "usage": {"completion_tokens": 1}})])
    assert error is None and events[-1].finish_reason == "length"


def test_request_carries_messages_and_streaming_parameters():
    with ScriptedTriton({"m": lambda body: chat_reply("ok")}) as server, TritonClient(server.url, "m") as client:
        list(client.generate_stream(MESSAGES, {"temperature": 0.5, "reasoning_effort": "low"}))
        request = server.requests[0]
    assert json.loads(request["text_input"]) == MESSAGES
    assert request["parameters"] == {"temperature": 0.5, "reasoning_effort": "low", "streaming": True}


def test_direct_form_events():
    frames = [sse({"type": "chunk", "content": "direct "}, wrap=False),
              sse({"type": "chunk", "content": "form"}, wrap=False),
              sse({"type": "complete"}, wrap=False)]
    events, error = play(frames)
    assert error is None and text_of(events) == "direct form"


def test_outputs_data_form_events():
    def out(obj):
        return sse({"outputs": [{"name": "text_output", "datatype": "BYTES", "data": [json.dumps(obj)]}]}, wrap=False)

    events, error = play([out({"type": "chunk", "content": "tensor "}), out({"type": "chunk", "content": "form"}),
                          out({"type": "complete"})])
    assert error is None and text_of(events) == "tensor form"


def test_plain_text_output_is_answer_text():
    events, error = play([sse("plain "), sse("words"), sse({"type": "complete"})])
    assert error is None and text_of(events) == "plain words"


def test_error_event_under_http_200_is_reported_with_its_text():
    events, error = play([sse({"type": "chunk", "content": "par"}), sse({"error": "CUDA out of memory"}, wrap=False)])
    assert isinstance(error, ServerError) and "CUDA out of memory" in str(error)
    assert text_of(events) == "par"


def test_model_error_event_is_reported_with_its_text():
    events, error = play([sse({"type": "error", "content": "prompt is longer than the context (9000 > 8192)"})])
    assert isinstance(error, ServerError) and "9000 > 8192" in str(error)


def test_done_marker_ends_the_reply():
    events, error = play([sse({"type": "chunk", "content": "x"}, wrap=False), b"data: [DONE]\n\n",
                          sse({"type": "chunk", "content": "after done"}, wrap=False)])
    assert error is None and text_of(events) == "x" and isinstance(events[-1], Complete)


def test_comments_crlf_and_unknown_types_are_handled():
    frames = [b": keep-alive\r\n\r\n",
              b'data: {"type":"chunk","content":"a"}\r\n\r\n',
              b"event: ping\r\ndata: {\"type\":\"metrics\",\"content\":\"ignore me\"}\r\n\r\n",
              b"retry: 100\r\n\r\n",
              sse({"type": "future-thing", "content": "ignore me too"}),
              b'data: {"type":"chunk","content":"b"}\r\n\r\n',
              b'data: {"type":"complete"}\r\n\r\n']
    events, error = play(frames)
    assert error is None and text_of(events) == "ab"


def test_frames_split_anywhere_even_inside_a_utf8_character():
    answer = "naïve café — 日本語 🎉 done"
    whole = b"".join(chat_reply(answer, reasoning="思考 ok", pieces=4))
    frames = []
    for i in range(len(whole)):  # one byte per HTTP chunk, with pauses so they arrive as separate reads
        frames.append(whole[i : i + 1])
        if i % 7 == 0:
            frames.append(0.001)
    events, error = play(frames)
    assert error is None
    assert text_of(events) == answer and text_of(events, Reasoning) == "思考 ok"


def test_stream_that_ends_without_complete_is_cut_off_and_keeps_partial_text():
    events, error = play([sse({"type": "chunk", "content": "half an ans"})])
    assert isinstance(error, StreamCutOff) and "cut off" in str(error)
    assert text_of(events) == "half an ans"


def test_connection_dropped_mid_stream_is_cut_off():
    events, error = play([sse({"type": "chunk", "content": "so far"}), 0.05, b'data: {"type":"chu', DROP])
    assert isinstance(error, StreamCutOff)
    assert text_of(events) == "so far"


@pytest.mark.parametrize("status", [400, 404])
def test_unknown_model_is_named_and_available_models_listed(status):
    models = {"llm_decoupled": lambda body: chat_reply("x"), "other": lambda body: chat_reply("y")}
    with ScriptedTriton(models, unknown_model_status=status) as server, TritonClient(server.url, "gpt-5") as client:
        with pytest.raises(UnknownModel) as caught:
            list(client.generate_stream(MESSAGES, {}))
    message = str(caught.value)
    assert "'gpt-5'" in message and "llm_decoupled" in message and "other" in message


def test_list_models():
    with ScriptedTriton({"a": lambda b: [], "b": lambda b: []}) as server, TritonClient(server.url, "a") as client:
        assert client.list_models() == ["a", "b"]


def test_health_check_passes_on_a_live_server_and_fails_on_a_dead_one():
    with ScriptedTriton({}) as server, TritonClient(server.url, "m") as client:
        client.check_health()
    with ScriptedTriton({}, live=False) as server, TritonClient(server.url, "m") as client:
        with pytest.raises(ServerUnreachable, match="not live"):
            client.check_health()


def test_unreachable_server_is_named_quickly_with_a_hint():
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    with TritonClient(url, "m") as client:
        with pytest.raises(ServerUnreachable) as caught:
            client.check_health()
        with pytest.raises(ServerUnreachable):
            list(client.generate_stream(MESSAGES, {}))
    assert url in str(caught.value) and "kubrick serve" in str(caught.value)


def test_unroutable_server_gives_up_within_the_connect_timeout():
    # 10.255.255.1 is normally unroutable: the connect hangs until our timeout, not forever
    with TritonClient("http://10.255.255.1:8000", "m", connect_timeout=0.5) as client:
        with pytest.raises(ServerUnreachable, match="10.255.255.1"):
            client.check_health()


def test_closing_the_stream_early_disconnects_so_the_server_can_cancel():
    def slow(body):
        for i in range(200):
            yield sse({"type": "chunk", "content": f"w{i} "})
            yield 0.05

    with ScriptedTriton({"m": slow}) as server, TritonClient(server.url, "m") as client:
        stream = client.generate_stream(MESSAGES, {})
        assert isinstance(next(stream), Chunk)
        stream.close()
        assert server.disconnected.wait(timeout=10)


class _GetOnly(BaseHTTPRequestHandler):
    """Like Triton's metrics port: answers any GET, refuses POST."""

    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def do_POST(self):
        self.send_error(405, "Method Not Allowed")

    def log_message(self, *args):
        pass


def test_a_port_that_answers_get_but_not_post_is_named_as_probably_the_wrong_port():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _GetOnly)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        with TritonClient(url, "m") as client:
            client.check_health()
            with pytest.raises(ServerError) as caught:
                list(client.generate_stream(MESSAGES, {}))
    finally:
        server.shutdown()
        server.server_close()
    assert "HTTP 405" in str(caught.value) and "is that Triton's HTTP port?" in str(caught.value)


def test_a_port_that_does_not_speak_http_is_named_as_probably_the_grpc_port():
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()

    def answer_like_http2():
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            with conn:
                conn.recv(4096)
                conn.sendall(b"\x00\x00\x06\x04\x00\x00\x00\x00\x00\x00\x03\x00\x00\x00\x64")  # an HTTP/2 SETTINGS frame

    threading.Thread(target=answer_like_http2, daemon=True).start()
    url = f"http://127.0.0.1:{listener.getsockname()[1]}"
    try:
        with TritonClient(url, "m") as client:
            with pytest.raises(ServerUnreachable) as caught:
                client.check_health()
    finally:
        listener.close()
    assert url in str(caught.value) and "gRPC port" in str(caught.value)
