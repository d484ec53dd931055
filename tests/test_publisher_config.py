"""The agent's configuration: a TOML file, flags and environment, each bad field named."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from virtual_llms.publisher.__main__ import main
from virtual_llms.publisher.config import (
    Config,
    ConfigError,
    Overrides,
    load,
)

ENV = {"MCPD_PUBLISHER_TOKEN": "tok", "XDG_STATE_HOME": "/state"}
LLM = """
[[llm]]
name = "qwen"
model = "Qwen/Qwen2.5-7B-Instruct"
upstream = "http://127.0.0.1:8000/v1/"
"""


def from_toml(tmp_path: Path, text: str, env: dict[str, str] | None = None, **flags: Any) -> Config:
    path = tmp_path / "publisher.toml"
    path.write_text(text)
    return load(Overrides(config_path=path, **flags), ENV if env is None else env)


def refused(tmp_path: Path, text: str, env: dict[str, str] | None = None, **flags: Any) -> str:
    with pytest.raises(ConfigError) as exc:
        from_toml(tmp_path, text, env, **flags)
    return str(exc.value)


def test_a_full_file(tmp_path: Path) -> None:
    (tmp_path / "token").write_text("file-token\n")
    config = from_toml(
        tmp_path,
        """
broker = ["https://a.example/", "https://b.example"]
token_file = "token"
transport = "ws"
heartbeat_seconds = 20
shutdown_grace_seconds = 5
state_file = "state/session.json"

[[llm]]
name = "llama3.2:3b"
upstream = "http://127.0.0.1:11434/v1"
api_key_env = "OLLAMA_KEY"
tier = "slow"
description = "Ollama on the desk"
max_concurrent = 2
timeout_seconds = 60
wake_command = ["systemctl", "start", "ollama"]
sleep_command = "systemctl stop ollama"
idle_seconds = 900
""",
        env={"OLLAMA_KEY": "s3cret-key"},
    )
    assert config.brokers == ("https://a.example", "https://b.example")
    assert config.token == "file-token"
    assert config.transport == "ws"
    assert (config.heartbeat_seconds, config.shutdown_grace_seconds) == (20.0, 5.0)
    assert config.state_file == tmp_path / "state" / "session.json"
    (llm,) = config.llms
    assert llm.model == "llama3.2:3b"  # defaults to the name
    assert (llm.api_key, llm.tier, llm.max_concurrent, llm.type) == (
        "s3cret-key",
        "slow",
        2,
        "openai",
    )
    assert llm.power is not None
    assert llm.power.wake_command == ("systemctl", "start", "ollama")
    assert llm.power.sleep_command == "systemctl stop ollama"
    assert llm.power.ready_url == "http://127.0.0.1:11434/v1/models"  # the default
    assert llm.power.ready_timeout_seconds == 300.0
    assert llm.power.idle_seconds == 900.0
    assert "s3cret" not in repr(llm)  # secrets stay out of logs
    assert "file-token" not in repr(config)


def test_defaults_and_the_environment(tmp_path: Path) -> None:
    config = from_toml(tmp_path, 'broker = "http://x:1"\n' + LLM)
    assert config.transport == "sse"
    assert config.heartbeat_seconds == 30.0
    assert config.llms[0].upstream == "http://127.0.0.1:8000/v1"
    assert config.llms[0].power is None
    assert config.state_file.parent == Path("/state/mcpd-publish")
    env = {**ENV, "MCPD_BROKER_URL": "http://e1:1, http://e2:2"}
    assert from_toml(tmp_path, 'broker = "http://x:1"\n' + LLM, env).brokers == (
        "http://e1:1",
        "http://e2:2",
    )


def test_flags_win_over_the_file(tmp_path: Path) -> None:
    config = from_toml(
        tmp_path,
        'broker = "http://x:1"\ntransport = "ws"\n' + LLM,
        brokers=["http://flag:1"],
        transport="sse",
        llms=[
            "name=extra,upstream=http://127.0.0.1:9000/v1,max_concurrent=3,idle_seconds=60,"
            "wake_command=systemctl start extra"
        ],
        state_file=Path("/tmp/s.json"),
    )
    assert config.brokers == ("http://flag:1",)
    assert config.transport == "sse"
    assert config.state_file == Path("/tmp/s.json")
    extra = config.llms[1]
    assert (extra.name, extra.model, extra.max_concurrent) == ("extra", "extra", 3)
    assert extra.power is not None
    assert extra.power.idle_seconds == 60.0


def test_flags_alone_are_enough() -> None:
    config = load(
        Overrides(
            brokers=["http://b:1"],
            llms=["name=m,model=M,upstream=http://127.0.0.1:8000/v1"],
        ),
        ENV,
    )
    assert [llm.name for llm in config.llms] == ["m"]
    assert config.token == "tok"


@pytest.mark.parametrize(
    ("text", "named"),
    [
        (LLM, "broker: no broker URL"),
        ('broker = "ftp://x"\n' + LLM, "broker: must be an http:// or https:// URL"),
        ("broker = []\n" + LLM, "broker: must not be an empty list"),
        ('broker = ["http://a", "http://a"]\n' + LLM, "broker: lists the same URL twice"),
        ('broker = "http://a"\ntransport = "grpc"\n' + LLM, "transport: must be 'sse' or 'ws'"),
        ('broker = "http://a"\nheartbeat_seconds = 300\n' + LLM, "heartbeat_seconds: must be"),
        ('broker = "http://a"\nheartbeat_seconds = "30"\n' + LLM, "heartbeat_seconds: must be"),
        ('broker = "http://a"\ncolour = "blue"\n' + LLM, "colour: unknown field"),
        ('broker = "http://a"\n', "llm: nothing to publish"),
        ('broker = "http://a"\nllm = 3\n', "llm: must be an array of tables"),
    ],
)
def test_bad_top_level_fields_are_named(tmp_path: Path, text: str, named: str) -> None:
    message = refused(tmp_path, text)
    assert named in message
    if "nothing to publish" not in named:
        assert message.startswith(f"{tmp_path / 'publisher.toml'}: ")


def test_an_unreadable_token_file(tmp_path: Path) -> None:
    message = refused(tmp_path, 'broker = "http://a"\ntoken_file = "nope"\n' + LLM, env={})
    assert f"token_file: {tmp_path / 'nope'} cannot be read" in message
    (tmp_path / "empty").write_text("\n")
    message = refused(tmp_path, 'broker = "http://a"\ntoken_file = "empty"\n' + LLM, env={})
    assert f"token_file: {tmp_path / 'empty'} is empty" in message


def llm_with(extra: str, *, drop: str = "") -> str:
    lines = [line for line in LLM.strip().splitlines() if not line.startswith(drop or "\0")]
    return 'broker = "http://a"\n' + "\n".join(lines) + "\n" + extra + "\n"


@pytest.mark.parametrize(
    ("extra", "drop", "named"),
    [
        ("", "name", "llm[0].name: is required"),
        ("", "upstream", "llm[0].upstream (LLM 'qwen'): is required"),
        ('name2 = "x"', "", "llm[0].name2 (LLM 'qwen'): unknown field"),
        ("upstream2 = 1", "", "llm[0].upstream2 (LLM 'qwen'): unknown field"),
        ("tier = 3", "", "llm[0].tier (LLM 'qwen'): must be a string"),
        ('description = ""', "", "llm[0].description (LLM 'qwen'): must not be empty"),
        ("max_concurrent = 0", "", "llm[0].max_concurrent (LLM 'qwen'): must be a whole number"),
        ("max_concurrent = 2.5", "", "llm[0].max_concurrent (LLM 'qwen'): must be a whole number"),
        ("timeout_seconds = -1", "", "llm[0].timeout_seconds (LLM 'qwen'): must be between"),
        (
            'api_key_env = "NOT_SET_ANYWHERE"',
            "",
            "llm[0].api_key_env (LLM 'qwen'): the environment",
        ),
        ('api_key = "a"\napi_key_env = "B"', "", "llm[0].api_key_env (LLM 'qwen'): give either"),
        ('sleep_command = "x"', "", "llm[0].sleep_command (LLM 'qwen'): needs wake_command"),
        ("idle_seconds = 60", "", "llm[0].idle_seconds (LLM 'qwen'): needs wake_command"),
        ("wake_command = []", "", "llm[0].wake_command (LLM 'qwen'): must be a shell command"),
        ('wake_command = "w"\nidle_seconds = 0', "", "llm[0].idle_seconds (LLM 'qwen'): must be"),
        ('wake_command = "w"\nready_url = "nope"', "", "llm[0].ready_url (LLM 'qwen'): must be an"),
        ('wake_command = "w"\nready_timeout_seconds = true', "", "ready_timeout_seconds (LLM"),
    ],
)
def test_bad_llm_fields_are_named(tmp_path: Path, extra: str, drop: str, named: str) -> None:
    assert named in refused(tmp_path, llm_with(extra, drop=drop))


def test_bad_names(tmp_path: Path) -> None:
    bad_name = llm_with("").replace('name = "qwen"', 'name = "-qwen with spaces"')
    assert "llm[0].name: '-qwen with spaces' must be 1-128 characters" in refused(
        tmp_path, bad_name
    )
    twice = llm_with("") + LLM
    assert "llm: the name 'qwen' is published twice" in refused(tmp_path, twice)


def test_no_token(tmp_path: Path) -> None:
    message = refused(tmp_path, llm_with(""), env={})
    assert "token: no publisher token: set MCPD_PUBLISHER_TOKEN" in message


def test_bad_flags_are_named(tmp_path: Path) -> None:
    assert "--llm #1.max_concurrent (LLM 'm'): must be a whole number" in refused(
        tmp_path, llm_with(""), llms=["name=m,upstream=http://a/v1,max_concurrent=lots"]
    )
    assert "--llm #1: expected key=value pairs" in refused(
        tmp_path, llm_with(""), llms=["name=m,upstream"]
    )
    assert "--llm #1.name: given twice" in refused(tmp_path, llm_with(""), llms=["name=m,name=n"])
    assert "--broker: must be an http:// or https:// URL" in refused(
        tmp_path, llm_with(""), brokers=["localhost:8000"]
    )
    assert "--transport: must be 'sse' or 'ws'" in refused(tmp_path, llm_with(""), transport="udp")


def test_broken_toml_and_missing_file(tmp_path: Path) -> None:
    assert "not valid TOML" in refused(tmp_path, "broker = [")
    with pytest.raises(ConfigError, match="no such file"):
        load(Overrides(config_path=tmp_path / "absent.toml"), ENV)


def test_main_refuses_bad_configuration_with_status_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "publisher.toml"
    path.write_text(llm_with("max_concurrent = -3"))
    monkeypatch.setenv("MCPD_PUBLISHER_TOKEN", "tok")
    assert main(["--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert "bad configuration" in err
    assert "llm[0].max_concurrent (LLM 'qwen')" in err


def test_the_example_file_is_valid() -> None:
    example = Path(__file__).resolve().parent.parent / "publisher.example.toml"
    config = load(Overrides(config_path=example), {**ENV, "VLLM_API_KEY": "k"})
    assert [llm.name for llm in config.llms] == ["qwen2.5-7b", "llama3.2:3b", "gemma-2b-cpu"]


def test_every_mistake_is_reported_at_once(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    text = llm_with("max_concurrent = 0\ntier = 3").replace(
        'broker = "http://a"', 'broker = "http://a"\nheartbeat_seconds = 300\ncolour = "blue"'
    )
    with pytest.raises(ConfigError) as exc:
        from_toml(tmp_path, text, ENV, llms=["name=m,upstream=nope"])
    problems = exc.value.problems
    named = [
        "heartbeat_seconds: must be",
        "colour: unknown field",
        "llm[0].max_concurrent (LLM 'qwen'): must be a whole number",
        "llm[0].tier (LLM 'qwen'): must be a string",
        "--llm #1.upstream (LLM 'm'): must be an http",
    ]
    assert len(problems) == len(named), problems
    for want in named:
        assert sum(want in got for got in problems) == 1, (want, problems)
    path = tmp_path / "publisher.toml"
    monkeypatch.setenv("MCPD_PUBLISHER_TOKEN", "tok")
    assert main(["--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert "bad configuration (4 problems):" in err
    assert err.count("\n  ") == 4, err


def test_the_help_shows_the_llm_example_whole_and_not_on_the_broker_port(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COLUMNS", "80")
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    example = "name=qwen,upstream=http://127.0.0.1:8080/v1"
    assert example in out.replace("\n", " ").replace("  ", " ") or example in out
    assert any(example in line for line in out.splitlines()), out
    assert ":8000" not in out


def test_pool_and_the_slot_limit_reach_the_register_call(tmp_path: Path) -> None:
    from virtual_llms.publisher.agent import Served

    config = from_toml(tmp_path, llm_with("pool = true\nmax_concurrent = 3"))
    assert config.llms[0].pool is True
    provider = Served(config.llms[0], None).provider()
    assert provider["pool"] is True
    assert provider["maxConcurrency"] == 3
    plain = from_toml(tmp_path, llm_with(""))
    assert "pool" not in Served(plain.llms[0], None).provider()


@pytest.mark.parametrize(
    ("extra", "named"),
    [
        ('pool = "yes"', "llm[0].pool (LLM 'qwen'): must be true or false"),
        ("max_concurrent = 4097", "llm[0].max_concurrent (LLM 'qwen'): must be at most 4096"),
    ],
)
def test_bad_pool_settings_are_refused(tmp_path: Path, extra: str, named: str) -> None:
    assert named in refused(tmp_path, llm_with(extra))
