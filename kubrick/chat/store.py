"""The conversation store: one JSON file per conversation under ~/.kubrick/conversations/.

Files are written whole to a temp file in the same folder, fsynced, then renamed over the old one, so a
kubrick killed at any moment leaves either the previous version or the new one, never a broken file.
Query them with any JSON tool, e.g. `jq -r '.messages[] | select(.role=="user") | .content' ~/.kubrick/conversations/*.json`.
"""

from __future__ import annotations

import json
import os
import secrets
import tempfile
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from kubrick.errors import KubrickError

FORMAT_VERSION = 1


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


def new_id() -> str:
    """Sortable by time, unique enough for one person: 20261122-195612-a3f9."""
    return datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S-") + secrets.token_hex(2)


@dataclass
class Conversation:
    id: str = field(default_factory=new_id)
    name: str = ""
    created: str = field(default_factory=_now)
    updated: str = field(default_factory=_now)
    model: str = ""
    system: str = ""
    # {"role": "user"|"assistant", "content": str, "time": iso} and for replies also
    # "reasoning", "status" (complete|cancelled|cut_off|error) and "usage"
    messages: list[dict[str, Any]] = field(default_factory=list)

    def wire_messages(self) -> list[dict[str, str]]:
        """What the server sees: the system prompt, then every user and assistant message (role and content)."""
        wire = [{"role": "system", "content": self.system}] if self.system else []
        wire += [{"role": m["role"], "content": m["content"]} for m in self.messages if m.get("content")]
        return wire

    def title(self) -> str:
        if self.name:
            return self.name
        first = next((m["content"] for m in self.messages if m["role"] == "user"), "")
        return " ".join(first.split())[:60]

    def to_json(self) -> dict[str, Any]:
        return {"format": FORMAT_VERSION, **asdict(self)}

    @classmethod
    def from_json(cls, data: Any) -> "Conversation":
        """A conversation from its file, or ValueError saying what is wrong (a wrong file must not pass as an
        empty conversation)."""
        if not isinstance(data, dict) or "messages" not in data:
            raise ValueError('not a kubrick conversation (expected a JSON object with "messages")')
        known = {k: data[k] for k in cls.__dataclass_fields__ if k in data}
        conversation = cls(**known)
        if not isinstance(conversation.messages, list):
            raise ValueError("messages is not a list")
        for i, message in enumerate(conversation.messages):
            if not isinstance(message, dict) or message.get("role") not in ("user", "assistant"):
                raise ValueError(f'message {i} is not an object with role "user" or "assistant"')
            if not isinstance(message.get("content"), str):
                raise ValueError(f"message {i} has no text content")
        for name in ("id", "name", "created", "updated", "model", "system"):
            if not isinstance(getattr(conversation, name), str):
                raise ValueError(f"{name} is not a string")
        return conversation


class ConversationStore:
    def __init__(self, root: Path):
        self.root = root

    def path_for(self, conversation: Conversation) -> Path:
        return self.root / f"{conversation.id}.json"

    def save(self, conversation: Conversation) -> Path:
        """Write atomically (temp file + fsync + rename)."""
        conversation.updated = _now()
        path = self.path_for(conversation)
        data = json.dumps(conversation.to_json(), ensure_ascii=False, indent=1)
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self.root, prefix=f".{conversation.id}.", suffix=".tmp")
        except OSError as err:
            raise KubrickError(f"cannot save the conversation in {self.root}: {err.strerror or err}") from None
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as out:
                out.write(data)
                out.flush()
                os.fsync(out.fileno())
            os.replace(tmp, path)
        except BaseException as err:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass
            if isinstance(err, OSError):  # a full disk, say: the previous version of the file stays
                raise KubrickError(f"cannot save the conversation to {path}: {err.strerror or err}") from None
            raise
        return path

    def load(self, ref: str) -> Conversation:
        """A conversation by path, id, unique id prefix, or name."""
        path = self._find(ref)
        try:
            return Conversation.from_json(json.loads(path.read_text(encoding="utf-8")))
        except (OSError, ValueError, TypeError) as err:
            raise KubrickError(f"cannot read conversation {path}: {err}") from None

    def _find(self, ref: str) -> Path:
        given = Path(ref).expanduser()
        if ref.endswith(".json") or os.sep in ref:
            if given.is_file():
                return given
            raise KubrickError(f"no conversation file at {given}")
        exact = self.root / f"{ref}.json"
        if exact.is_file():
            return exact
        matches = [p for p in self._files() if p.stem.startswith(ref)]
        if not matches:
            matches = [p for p in self._files() if self._name_of(p) == ref]
        if len(matches) == 1:
            return matches[0]
        if len(matches) > 1:
            raise KubrickError(f"{ref!r} matches {len(matches)} conversations; give more of the id (see /list)")
        raise KubrickError(f"no conversation {ref!r} in {self.root}; /list shows the saved ones")

    def _files(self) -> list[Path]:
        if not self.root.is_dir():
            return []
        return sorted((p for p in self.root.glob("*.json") if not p.name.startswith(".")), reverse=True)

    def _name_of(self, path: Path) -> str:
        try:
            return json.loads(path.read_text(encoding="utf-8")).get("name", "")
        except (OSError, ValueError, AttributeError):
            return ""

    def recent(self, limit: int = 20) -> list[Conversation]:
        """The newest conversations first; unreadable files are skipped."""
        found = []
        for path in self._files():
            try:
                found.append(Conversation.from_json(json.loads(path.read_text(encoding="utf-8"))))
            except (OSError, ValueError, TypeError):
                continue
            if len(found) >= limit:
                break
        return found
