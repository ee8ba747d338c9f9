"""Typed configuration: YAML < env < key=value overrides, with clear errors for unknown keys and bad types."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from tuneloop.config import ConfigError, build, field_help, parse_overrides
from tuneloop.settings import Settings, load_settings


@dataclass
class Lora:
    r: int = field(default=8, metadata={"help": "rank"})
    targets: list[str] = field(default_factory=lambda: ["q_proj"], metadata={"help": "modules"})


@dataclass
class Cfg:
    lr: float = field(default=1e-4, metadata={"help": "learning rate"})
    packing: bool = field(default=False, metadata={"help": "pack"})
    name: str | None = field(default=None, metadata={"help": "name"})
    lora: Lora = field(default_factory=Lora, metadata={"help": "LoRA"})


def test_overrides_win_over_yaml_and_are_coerced_to_field_types():
    cfg = build(Cfg, {"lr": 0.1, "lora": {"r": 4}}, ["lr=2e-5", "packing=true", "lora.targets=[q_proj,v_proj]"])
    assert cfg.lr == 2e-5 and cfg.packing is True
    assert cfg.lora.r == 4 and cfg.lora.targets == ["q_proj", "v_proj"]


def test_unknown_key_lists_the_valid_ones():
    with pytest.raises(ConfigError) as e:
        build(Cfg, {}, ["learning_rate=1"])
    assert "learning_rate" in str(e.value) and "lr" in str(e.value) and "packing" in str(e.value)


def test_unknown_nested_key_names_its_section():
    with pytest.raises(ConfigError, match="section 'lora'.*rank"):  # noqa: RUF043
        build(Cfg, {"lora": {"rank": 4}})


@pytest.mark.parametrize(
    "override,msg",
    [
        ("lr=fast", "lr: expected a number"),
        ("packing=maybe", "packing: expected true/false"),
        ("lora.r=1.5", "lora.r: expected an integer"),
    ],
)
def test_wrong_types_are_errors_naming_the_key(override, msg):
    with pytest.raises(ConfigError, match=msg):
        build(Cfg, {}, [override])


def test_override_without_equals_is_an_error():
    with pytest.raises(ConfigError, match="not key=value"):
        parse_overrides(["lr"])


def test_every_leaf_field_has_help():
    helps = field_help(Settings)
    assert "server.port" in helps and "engine.kv_cache_gib" in helps
    assert all(h and not h.startswith("(default") for h in helps.values()), [
        k for k, h in helps.items() if h.startswith("(default")
    ]


def test_settings_from_yaml_env_and_overrides(tmp_path, monkeypatch):
    f = tmp_path / "tuneloop.yaml"
    f.write_text("server:\n  port: 9000\n  host: 0.0.0.0\nlog:\n  flush_interval_s: 0.5\n")
    monkeypatch.setenv("TUNELOOP_SERVER__PORT", "9100")
    s = load_settings(str(f), ["log.flush_rows=10"])
    assert s.server.port == 9100 and s.server.host == "0.0.0.0"
    assert s.log.flush_interval_s == 0.5 and s.log.flush_rows == 10


def test_bad_yaml_file_is_a_clear_error(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("server: [\n")
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_settings(str(f))
    with pytest.raises(ConfigError, match="not found"):
        load_settings(str(tmp_path / "missing.yaml"))
