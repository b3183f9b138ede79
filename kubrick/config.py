"""Settings and where they come from: flags > environment > ~/.kubrick/config.json > defaults.

One function, `resolve_settings`, decides every value and remembers its source, so `kubrick config` can show
both. The config file is only ever read: a mistake in it is reported with its line and column, never "fixed".
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable
from urllib.parse import urlsplit

from kubrick.errors import KubrickError

REASONING_EFFORTS = ("low", "medium", "high")


def kubrick_home() -> Path:
    """The folder for config, history and conversations: $KUBRICK_HOME, else ~/.kubrick."""
    home = os.environ.get("KUBRICK_HOME")
    return Path(home).expanduser() if home else Path.home() / ".kubrick"


def config_file_path() -> Path:
    return kubrick_home() / "config.json"


def normalize_url(value: str) -> str:
    """Accept `localhost:8000`, `http://…` and `https://…`; return a URL with a scheme and no trailing slash."""
    url = value.strip()
    if not url:
        raise ValueError("the URL is empty")
    if "://" not in url:
        url = "http://" + url
    scheme = url.split("://", 1)[0].lower()
    if scheme not in ("http", "https"):
        raise ValueError(f"use http:// or https://, not {scheme}://")
    if not url.split("://", 1)[1].strip("/"):
        raise ValueError("the URL names no host")
    try:  # a bad port or bracket would otherwise surface later as a traceback from httpx
        parts = urlsplit(url)
        parts.port
    except ValueError:
        raise ValueError(f"{value.strip()!r} is not a valid URL; expected host:port, http://host:port or https://host:port") from None
    if not parts.hostname:
        raise ValueError("the URL names no host")
    return url.rstrip("/")


def _shown(value: Any) -> str:
    """A bad value as the person wrote it: JSON's null/true/false, not Python's None/True/False."""
    return json.dumps(value) if value is None or isinstance(value, bool) else repr(value)


def _float_in(low: float, high: float | None, low_open: bool = False) -> Callable[[Any], float]:
    def check(value: Any) -> float:
        if isinstance(value, bool):
            raise ValueError(f"expected a number, got {_shown(value)}")
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise ValueError(f"expected a number, got {_shown(value)}") from None
        if number != number or number in (float("inf"), float("-inf")):
            raise ValueError(f"expected a finite number, got {_shown(value)}")
        if (number <= low if low_open else number < low) or (high is not None and number > high):
            bound = f"({low}, {high}]" if low_open else (f"[{low}, {high}]" if high is not None else f"{low} or more")
            raise ValueError(f"expected {bound}, got {_shown(value)}")
        return number

    return check


def _int_at_least(low: int) -> Callable[[Any], int]:
    def check(value: Any) -> int:
        if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
            raise ValueError(f"expected a whole number, got {_shown(value)}")
        try:
            number = int(value)
        except (TypeError, ValueError):
            raise ValueError(f"expected a whole number, got {_shown(value)}") from None
        if number < low:
            raise ValueError(f"expected {low} or more, got {_shown(value)}")
        return number

    return check


def _optional_int(value: Any) -> int | None:
    if value is None or (isinstance(value, str) and value.strip().lower() in ("", "none", "null")):
        return None
    if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
        raise ValueError(f"expected a whole number, got {_shown(value)}")
    try:
        return int(value)
    except (TypeError, ValueError):
        raise ValueError(f"expected a whole number or none, got {_shown(value)}") from None


def _effort(value: Any) -> str:
    effort = str(value).strip().lower()
    if effort not in REASONING_EFFORTS:
        raise ValueError(f"expected low, medium or high, got {_shown(value)}")
    return effort


def _text(value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError(f"expected a string, got {_shown(value)}")
    return value


def _name(value: Any) -> str:
    name = _text(value).strip()
    if not name:
        raise ValueError("expected a non-empty name")
    return name


def _bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(f"expected true or false, got {_shown(value)}")


def _url(value: Any) -> str:
    return normalize_url(_text(value))


@dataclass(frozen=True)
class Setting:
    key: str  # the config.json key and the attribute of Settings
    default: Any
    parse: Callable[[Any], Any]
    env: str
    flag: str
    help: str


SETTINGS: tuple[Setting, ...] = (
    Setting("triton_url", "http://localhost:8000", _url, "TRITON_URL", "--triton-url", "Triton server URL"),
    Setting("model_name", "llm_decoupled", _name, "TRITON_MODEL_NAME", "--model-name", "model to chat with"),
    Setting("temperature", 1.0, _float_in(0.0, None), "KUBRICK_TEMPERATURE", "--temperature", "sampling temperature, 0 = greedy"),
    Setting("top_p", 1.0, _float_in(0.0, 1.0, low_open=True), "KUBRICK_TOP_P", "--top-p", "nucleus sampling cut-off, (0, 1]"),
    Setting("max_tokens", 4096, _int_at_least(1), "KUBRICK_MAX_TOKENS", "--max-tokens", "most tokens in one reply"),
    Setting("seed", None, _optional_int, "KUBRICK_SEED", "--seed", "sampling seed (none = random)"),
    Setting("reasoning_effort", "medium", _effort, "KUBRICK_REASONING_EFFORT", "--reasoning", "low, medium or high"),
    Setting("system_prompt", "", _text, "KUBRICK_SYSTEM_PROMPT", "--system", "system prompt for new chats"),
    Setting("hide_reasoning", False, _bool, "KUBRICK_HIDE_REASONING", "--hide-reasoning", "hide the model's reasoning"),
)
SETTING_KEYS = tuple(s.key for s in SETTINGS)


@dataclass
class Settings:
    triton_url: str = "http://localhost:8000"
    model_name: str = "llm_decoupled"
    temperature: float = 1.0
    top_p: float = 1.0
    max_tokens: int = 4096
    seed: int | None = None
    reasoning_effort: str = "medium"
    system_prompt: str = ""
    hide_reasoning: bool = False
    # key -> where its value came from: "flag --x", "env X", "file PATH" or "default"
    sources: dict[str, str] = field(default_factory=dict)

    def generation_parameters(self) -> dict[str, Any]:
        """The request `parameters` for generate_stream (unset seed is left out)."""
        params: dict[str, Any] = {
            "temperature": self.temperature,
            "top_p": self.top_p,
            "max_tokens": self.max_tokens,
            "reasoning_effort": self.reasoning_effort,
        }
        if self.seed is not None:
            params["seed"] = self.seed
        return params


def read_config_file(path: Path) -> dict[str, Any]:
    """The config file's settings, or {} if it does not exist. Any mistake is one line naming file and place."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return {}
    except (OSError, UnicodeDecodeError) as err:
        raise KubrickError(f"cannot read config file {path}: {err}") from None
    if not text.strip():
        return {}
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise KubrickError(
            f"config file {path} line {err.lineno} column {err.colno}: {err.msg} (fix or remove the file)"
        ) from None
    if not isinstance(data, dict):
        raise KubrickError(f'config file {path} line 1 column 1: expected a JSON object like {{"model_name": "…"}}')
    unknown = sorted(set(data) - set(SETTING_KEYS))
    if unknown:
        raise KubrickError(
            f"config file {path}: unknown key {unknown[0]!r} at {_position(text, unknown[0])}; "
            f"known keys: {', '.join(SETTING_KEYS)}"
        )
    return data


def _position(text: str, key: str) -> str:
    """'line L column C' of a key in the file's text, for error messages."""
    index = text.find(json.dumps(key))
    if index < 0:
        return "an unknown place"
    line = text.count("\n", 0, index) + 1
    column = index - (text.rfind("\n", 0, index) + 1) + 1
    return f"line {line} column {column}"


def resolve_settings(flags: dict[str, Any] | None = None, environ: dict[str, str] | None = None) -> Settings:
    """Every setting from the first source that has it: flags (non-None values) > env > config file > default."""
    flags = {k: v for k, v in (flags or {}).items() if v is not None}
    environ = os.environ if environ is None else environ
    path = config_file_path()
    from_file = read_config_file(path)
    settings = Settings()
    for setting in SETTINGS:
        if setting.key in flags:
            raw, source = flags[setting.key], f"flag {setting.flag}"
        elif environ.get(setting.env) not in (None, ""):
            raw, source = environ[setting.env], f"env {setting.env}"
        elif setting.key in from_file:
            raw, source = from_file[setting.key], f"file {path}"
        else:
            settings.sources[setting.key] = "default"
            continue
        try:
            value = setting.parse(raw)
        except (TypeError, ValueError) as err:
            where = source
            if source.startswith("file"):
                where = f"config file {path}: key {setting.key!r} at {_position(path.read_text(encoding='utf-8'), setting.key)}"
            raise KubrickError(f"{where}: bad {setting.key}: {err}") from None
        setattr(settings, setting.key, value)
        settings.sources[setting.key] = source
    return settings


def show_config(triton_url: str | None = None, model_name: str | None = None) -> None:
    """Print every effective setting, its value and where it came from (`kubrick config`)."""
    settings = resolve_settings({"triton_url": triton_url, "model_name": model_name})
    width = max(len(k) for k in SETTING_KEYS)
    print(f"config file: {config_file_path()}" + ("" if config_file_path().exists() else " (absent)"))
    for setting in SETTINGS:
        value = getattr(settings, setting.key)
        shown = json.dumps(value, ensure_ascii=False)
        print(f"{setting.key:<{width}}  {shown:<24}  {settings.sources[setting.key]}")
