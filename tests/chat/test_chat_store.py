"""The conversation store: one JSON file per conversation, written atomically, found by id, prefix, name or path."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from kubrick.chat.store import Conversation, ConversationStore
from kubrick.errors import KubrickError


def test_saved_conversation_loads_back_by_id_prefix_name_and_path(tmp_path):
    store = ConversationStore(tmp_path / "conversations")
    conversation = Conversation(model="m", system="Be kind.", name="trip plans")
    conversation.messages += [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    path = store.save(conversation)
    assert path == tmp_path / "conversations" / f"{conversation.id}.json"
    for ref in (conversation.id, conversation.id[:17], "trip plans", str(path)):
        loaded = store.load(ref)
        assert loaded.messages == conversation.messages and loaded.system == "Be kind."
    assert json.loads(path.read_text())["format"] == 1


def test_wire_messages_put_the_system_prompt_first():
    conversation = Conversation(system="S")
    conversation.messages += [{"role": "user", "content": "q", "time": "t"},
                              {"role": "assistant", "content": "a", "status": "cancelled"}]
    assert conversation.wire_messages() == [{"role": "system", "content": "S"}, {"role": "user", "content": "q"},
                                            {"role": "assistant", "content": "a"}]


def test_unknown_and_ambiguous_references_are_explained(tmp_path):
    store = ConversationStore(tmp_path)
    with pytest.raises(KubrickError, match="no conversation 'nope'"):
        store.load("nope")
    with pytest.raises(KubrickError, match="no conversation file"):
        store.load(str(tmp_path / "missing.json"))
    store.save(Conversation(id="20260101-000000-aaaa"))
    store.save(Conversation(id="20260101-000000-aaab"))
    with pytest.raises(KubrickError, match="matches 2 conversations"):
        store.load("20260101")


def test_recent_lists_newest_first_and_skips_broken_files(tmp_path):
    store = ConversationStore(tmp_path)
    store.save(Conversation(id="20260101-000000-aaaa"))
    store.save(Conversation(id="20260102-000000-aaaa"))
    (tmp_path / "20260103-000000-bad0.json").write_text("{ broken")
    assert [c.id for c in store.recent()] == ["20260102-000000-aaaa", "20260101-000000-aaaa"]


SAVER = """
import sys
from pathlib import Path
from kubrick.chat.store import Conversation, ConversationStore
store = ConversationStore(Path(sys.argv[1]))
conversation = Conversation(id="20260101-000000-kill")
n = 0
while True:
    n += 1
    conversation.messages = [{"role": "user", "content": f"version {n} " + "x" * 200_000}]
    store.save(conversation)
    print(n, flush=True)
"""


def test_killing_kubrick_during_saves_never_leaves_a_broken_file(tmp_path):
    path = tmp_path / "20260101-000000-kill.json"
    for attempt in range(8):
        saver = subprocess.Popen([sys.executable, "-c", SAVER, str(tmp_path)], stdout=subprocess.PIPE, text=True)
        try:
            saver.stdout.readline()  # at least one save happened
            time.sleep(0.01 * attempt)  # land the kill at different moments of a save
            os.kill(saver.pid, signal.SIGKILL)
        finally:
            saver.wait(timeout=30)
        data = json.loads(path.read_text())  # always whole, valid JSON
        assert data["messages"][0]["content"].startswith("version ")
    store = ConversationStore(tmp_path)
    assert [c.id for c in store.recent()] == ["20260101-000000-kill"]  # leftover temp files are not listed


@pytest.mark.parametrize("text,why", [
    ("[]", "not a kubrick conversation"),
    ("{}", "not a kubrick conversation"),
    ('{"messages": [1]}', "message 0 is not an object"),
    ('{"messages": [{"role": "wizard", "content": "x"}]}', "message 0 is not an object with role"),
    ('{"messages": [{"role": "user"}]}', "message 0 has no text content"),
    ('{"messages": [], "system": 5}', "system is not a string"),
])
def test_a_file_that_is_not_a_conversation_is_refused_not_loaded_empty(tmp_path, text, why):
    # loading [] once gave an empty conversation: the person thought they continued one
    path = tmp_path / "other.json"
    path.write_text(text)
    with pytest.raises(KubrickError) as caught:
        ConversationStore(tmp_path / "conversations").load(str(path))
    assert str(caught.value).startswith(f"cannot read conversation {path}: {why}")
    assert path.read_text() == text
