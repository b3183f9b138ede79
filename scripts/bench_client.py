#!/usr/bin/env python3
"""Can the chat client's screen keep pace with a fast model, and at what CPU cost?

A loopback server streams an N-token Markdown reply (prose, lists and code) at R tokens/s in Triton's wire
format into the real `kubrick -p`, whose stdout is a pseudo-terminal, so the live Markdown renderer does
its full work. Reported: the stream's own duration, the end-to-end time until kubrick has drawn the last
token and exited, kubrick's CPU seconds, and whether it kept up (end-to-end within 10% of the stream) with
CPU under half a core.

    python scripts/bench_client.py [--tokens 8000] [--rate 2000]
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import pty
import struct
import subprocess
import sys
import tempfile
import termios
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

PROSE = ("The scheduler keeps every sequence of the batch in step, and the cache hands out pages as a reply "
         "grows, so that **no memory is wasted** on padding. ")
CODE = ["def decode(tokens, cache):", "    for step in range(len(tokens)):",
        "        logits = model(tokens[step], cache)", "        yield sample(logits, temperature=0.7)"]


def markdown_tokens(count: int) -> list[str]:
    """Roughly one word per token: headings, paragraphs, a list and a fenced code block, repeated."""
    tokens: list[str] = []
    section = 0
    while len(tokens) < count:
        section += 1
        tokens += [f"## Part {section}\n\n"]
        tokens += [w + " " for w in (PROSE * 3).split()] + ["\n\n"]
        tokens += [f"- point {i} about `cache` pages\n" for i in range(4)] + ["\n"]
        tokens += ["```python\n"]
        for line in CODE:
            tokens += [word + " " for word in line.split(" ")[:-1]] + [line.split(" ")[-1] + "\n"]
        tokens += ["```\n\n"]
    return tokens[:count]


class PacedReply:
    """Streams tokens at `rate` per second by the clock (each write sends all tokens due so far)."""

    def __init__(self, tokens: list[str], rate: float):
        self.tokens, self.rate = tokens, rate
        self.first_sent = self.last_sent = 0.0

    def frames(self):
        def event(obj):
            wrapped = {"model_name": "llm_decoupled", "model_version": "1", "text_output": json.dumps(obj)}
            return f"data: {json.dumps(wrapped)}\n\n"

        start = time.monotonic()
        self.first_sent = start
        sent = 0
        while sent < len(self.tokens):
            due = min(len(self.tokens), int((time.monotonic() - start) * self.rate) + 1)
            yield "".join(event({"type": "chunk", "content": t}) for t in self.tokens[sent:due]).encode()
            sent = due
            next_due = start + sent / self.rate
            time.sleep(max(0.0, next_due - time.monotonic()))
        usage = {"prompt_tokens": 10, "completion_tokens": len(self.tokens)}
        yield event({"type": "complete", "usage": usage}).encode()
        self.last_sent = time.monotonic()


def serve(reply: PacedReply) -> ThreadingHTTPServer:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):
            pass

        def do_GET(self):
            self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def do_POST(self):
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            for frame in reply.frames():
                self.wfile.write(f"{len(frame):x}\r\n".encode() + frame + b"\r\n")
                self.wfile.flush()
            self.wfile.write(b"0\r\n\r\n")
            self.wfile.flush()

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.handle_error = lambda request, address: None  # kubrick leaving closes its idle health-check connection
    threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
    return server


def run_kubrick_in_pty(url: str, cols: int, rows: int) -> tuple[float, float, float, int]:
    """Run `kubrick -p` with a terminal as stdout; returns (start, end, cpu seconds, bytes drawn)."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))
    kubrick = os.path.join(os.path.dirname(sys.executable), "kubrick")
    command = [kubrick] if os.path.exists(kubrick) else [sys.executable, "-m", "kubrick.cli"]
    env = {**os.environ, "KUBRICK_HOME": tempfile.mkdtemp(prefix="kubrick-bench-"), "TERM": "xterm-256color",
           "COLUMNS": str(cols), "LINES": str(rows)}
    drawn = 0

    def drain():
        nonlocal drawn
        while True:
            try:
                data = os.read(master, 65536)
            except OSError:
                return
            if not data:
                return
            drawn += len(data)

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    start = time.monotonic()
    process = subprocess.Popen([*command, "-p", "Write the long document.", "--triton-url", url],
                               stdin=slave, stdout=slave, stderr=slave, env=env)
    _, status, usage = os.wait4(process.pid, 0)
    end = time.monotonic()
    process.returncode = os.waitstatus_to_exitcode(status)
    os.close(slave)
    reader.join(timeout=5)
    os.close(master)
    if process.returncode != 0:
        sys.exit(f"kubrick exited with {process.returncode}")
    return start, end, usage.ru_utime + usage.ru_stime, drawn


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=8000)
    parser.add_argument("--rate", type=float, default=2000.0, help="tokens per second")
    parser.add_argument("--cols", type=int, default=120)
    parser.add_argument("--rows", type=int, default=40)
    args = parser.parse_args()

    reply = PacedReply(markdown_tokens(args.tokens), args.rate)
    server = serve(reply)
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        start, end, cpu_s, drawn = run_kubrick_in_pty(url, args.cols, args.rows)
    finally:
        server.shutdown()
    stream_s = reply.last_sent - reply.first_sent
    end_to_end_s = end - reply.first_sent  # first token sent -> last token drawn and kubrick gone
    startup_s = reply.first_sent - start
    kept_up = end_to_end_s <= 1.10 * stream_s
    cpu_share = cpu_s / (end - start)
    print(f"reply: {args.tokens} tokens of Markdown at {args.rate:.0f} tok/s, {args.cols}x{args.rows} terminal")
    print(f"stream duration (server):          {stream_s:.2f} s")
    print(f"end-to-end (first token -> drawn): {end_to_end_s:.2f} s  ({(end_to_end_s / stream_s - 1) * 100:+.1f}%)")
    print(f"kubrick start-up before request:  {startup_s:.2f} s")
    print(f"kubrick CPU (user+sys):            {cpu_s:.2f} s over {end - start:.2f} s = {cpu_share:.2f} cores")
    print(f"bytes drawn to the terminal:       {drawn}")
    print(f"kept up (within 10%): {'yes' if kept_up else 'NO'}; CPU under half a core: {'yes' if cpu_share < 0.5 else 'NO'}")


if __name__ == "__main__":
    main()
