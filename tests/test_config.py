"""Settings precedence (flags > env > config file > defaults), `kubrick config`, and malformed config files."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from kubrick.config import normalize_url, resolve_settings
from kubrick.errors import KubrickError


def write_config(home, obj_or_text):
    path = home / "config.json"
    path.write_text(obj_or_text if isinstance(obj_or_text, str) else json.dumps(obj_or_text, indent=2))
    return path


def test_defaults_when_nothing_is_set(kubrick_home):
    settings = resolve_settings({}, environ={})
    assert settings.triton_url == "http://localhost:8000"
    assert settings.model_name == "llm_decoupled"
    assert all(source == "default" for source in settings.sources.values())


def test_flags_beat_env_beat_file_beat_defaults(kubrick_home):
    path = write_config(kubrick_home, {"triton_url": "file-host:1", "model_name": "from_file", "temperature": 0.3,
                                       "top_p": 0.5})
    env = {"TRITON_URL": "env-host:2", "TRITON_MODEL_NAME": "from_env", "KUBRICK_TEMPERATURE": "0.7"}
    settings = resolve_settings({"triton_url": "https://flag-host", "temperature": None}, environ=env)
    assert settings.triton_url == "https://flag-host" and settings.sources["triton_url"] == "flag --triton-url"
    assert settings.model_name == "from_env" and settings.sources["model_name"] == "env TRITON_MODEL_NAME"
    assert settings.temperature == 0.7 and settings.sources["temperature"] == "env KUBRICK_TEMPERATURE"
    assert settings.top_p == 0.5 and settings.sources["top_p"] == f"file {path}"
    assert settings.max_tokens == 4096 and settings.sources["max_tokens"] == "default"


def test_generation_defaults_from_the_file_reach_the_request(kubrick_home):
    write_config(kubrick_home, {"temperature": 0, "max_tokens": 77, "reasoning_effort": "HIGH", "seed": 5,
                                "system_prompt": "Be brief."})
    settings = resolve_settings({}, environ={})
    assert settings.generation_parameters() == {"temperature": 0.0, "top_p": 1.0, "max_tokens": 77,
                                                "reasoning_effort": "high", "seed": 5}
    assert settings.system_prompt == "Be brief."


@pytest.mark.parametrize("given,expected", [("localhost:8000", "http://localhost:8000"),
                                            ("http://h:9/", "http://h:9"), ("https://triton.example", "https://triton.example")])
def test_url_forms(given, expected):
    assert normalize_url(given) == expected


def test_bad_url_scheme_is_refused(kubrick_home):
    with pytest.raises(KubrickError, match="flag --triton-url: bad triton_url: use http:// or https://"):
        resolve_settings({"triton_url": "ftp://x"}, environ={})


def test_malformed_file_names_file_line_and_column_and_is_left_untouched(kubrick_home):
    text = '{\n  "model_name": "x",\n  "temperature": 0.5,,\n}\n'
    path = write_config(kubrick_home, text)
    with pytest.raises(KubrickError) as caught:
        resolve_settings({}, environ={})
    message = str(caught.value)
    assert str(path) in message and "line 3 column 22" in message and "\n" not in message
    assert path.read_text() == text


def test_bad_value_in_file_names_the_key_and_its_place(kubrick_home):
    path = write_config(kubrick_home, '{\n  "top_p": 7\n}')
    with pytest.raises(KubrickError) as caught:
        resolve_settings({}, environ={})
    assert str(path) in str(caught.value) and "'top_p' at line 2 column 3" in str(caught.value)


def test_unknown_key_in_file_is_named(kubrick_home):
    write_config(kubrick_home, {"temprature": 1})
    with pytest.raises(KubrickError, match="unknown key 'temprature'"):
        resolve_settings({}, environ={})


def test_bad_env_value_names_the_variable(kubrick_home):
    with pytest.raises(KubrickError, match="env KUBRICK_MAX_TOKENS: bad max_tokens"):
        resolve_settings({}, environ={"KUBRICK_MAX_TOKENS": "lots"})


def run_kubrick(*args, env_extra=None):
    env = {**os.environ, **(env_extra or {})}
    return subprocess.run([sys.executable, "-m", "kubrick.cli", *args], capture_output=True, text=True, env=env,
                          timeout=60)


def test_kubrick_config_shows_values_and_sources(kubrick_home):
    write_config(kubrick_home, {"temperature": 0.2})
    result = run_kubrick("config", "--model-name", "flagged", env_extra={"TRITON_URL": "env-host:8123"})
    assert result.returncode == 0, result.stderr
    lines = {line.split()[0]: line for line in result.stdout.splitlines()}
    assert '"http://env-host:8123"' in lines["triton_url"] and "env TRITON_URL" in lines["triton_url"]
    assert '"flagged"' in lines["model_name"] and "flag --model-name" in lines["model_name"]
    assert "0.2" in lines["temperature"] and "file" in lines["temperature"]
    assert "default" in lines["max_tokens"]


def test_kubrick_with_malformed_config_exits_nonzero_with_one_line(kubrick_home):
    path = write_config(kubrick_home, "{ nope")
    result = run_kubrick("config")
    assert result.returncode != 0
    assert result.stderr.count("\n") == 1 and str(path) in result.stderr and "line 1 column 3" in result.stderr
    assert "Traceback" not in result.stderr
    assert path.read_text() == "{ nope"


@pytest.mark.parametrize("url", ["localhost:notaport", "http://[::1", "localhost:99999", "http://:8000"])
def test_unusable_url_is_one_line_before_any_connection(kubrick_home, url):
    result = run_kubrick("--triton-url", url, "-p", "hi")
    assert result.returncode == 1
    assert result.stderr.startswith("kubrick: error: flag --triton-url: bad triton_url:")
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert result.stdout == ""


def test_a_null_or_boolean_in_the_file_is_quoted_as_json(kubrick_home):
    write_config(kubrick_home, '{"temperature": null, "max_tokens": true}')
    with pytest.raises(KubrickError) as caught:
        resolve_settings({}, environ={})
    assert "expected a number, got null" in str(caught.value) or "got true" in str(caught.value)
    assert "None" not in str(caught.value) and "True" not in str(caught.value)
