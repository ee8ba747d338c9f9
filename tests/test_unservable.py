"""A version the server cannot serve (a prompt- or prefix-tuning adapter, a DoRA or other non-LoRA weight adapter)
never reaches a gate, a canary or production, and the reason says what to do instead."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tuneloop.registry import (
    ModelVersion,
    RegistryError,
    get_version,
    register_version,
    set_stage,
    unservable_reason,
    version_by_stage,
)


def _adapter(root: Path, name: str, peft_type: str, **conf: object) -> Path:
    d = root / name
    d.mkdir(parents=True)
    (d / "adapter_config.json").write_text(
        json.dumps({"peft_type": peft_type, "base_model_name_or_path": "/b", **conf})
    )
    return d


@pytest.fixture
def versions(db, tmp_path):
    for name, peft in (("lora-v1", "LORA"), ("pt-v2", "PROMPT_TUNING"), ("px-v3", "PREFIX_TUNING")):
        path = _adapter(tmp_path / "adapters", name, peft)
        register_version(
            db,
            ModelVersion(name=name, kind="adapter", base_model="/b", path=str(path), content_hash=name, dataset_id="d"),
        )
    set_stage(db, "lora-v1", "production", actor="test", reason="baseline")
    return db


def test_the_reason_names_the_adapter_type_and_what_to_do_instead(versions, tmp_path):
    pt = get_version(versions, "pt-v2")
    why = unservable_reason(pt.kind, pt.path)
    assert why is not None and "PROMPT_TUNING adapter" in why and "vLLM serves only LoRA adapters" in why
    assert "method=lora" in why
    lora = get_version(versions, "lora-v1")
    assert unservable_reason(lora.kind, lora.path) is None
    assert unservable_reason("merged", str(tmp_path)) is None
    assert unservable_reason("adapter", str(tmp_path / "nowhere")) is None  # a missing folder: the server names it


def test_prefix_tuning_is_refused_like_prompt_tuning_naming_a_served_method(versions):
    from tuneloop.deploy.gate import GateError, run_gate
    from tuneloop.monitoring import canary
    from tuneloop.settings import load_settings

    px = get_version(versions, "px-v3")
    why = unservable_reason(px.kind, px.path)
    assert why is not None and "PREFIX_TUNING adapter" in why and "method=lora" in why and "cannot be merged" not in why
    with pytest.raises(RegistryError, match="px-v3 cannot be served, so it cannot go to production"):
        set_stage(versions, "px-v3", "production", actor="test")
    with pytest.raises(canary.CanaryError, match="px-v3 cannot be served, so it cannot take traffic"):
        canary.start(versions, "px-v3", 0.1)
    with pytest.raises(GateError, match="px-v3 cannot be served, so it cannot pass the gate"):
        run_gate(versions, load_settings(), "px-v3")
    assert get_version(versions, "px-v3").stage == "candidate"


@pytest.mark.parametrize("peft_type", ["ADALORA", "IA3", "LOHA", "LOKR", "OFT"])
def test_a_weight_adapter_vllm_cannot_load_is_told_to_merge(tmp_path, peft_type):
    why = unservable_reason("adapter", str(_adapter(tmp_path, peft_type.lower(), peft_type)))
    assert why is not None and f"{peft_type} adapter" in why and "`tuneloop merge`" in why


def test_a_dora_adapter_is_refused_because_vllm_does_not_serve_dora(tmp_path):
    why = unservable_reason("adapter", str(_adapter(tmp_path, "dora", "LORA", use_dora=True)))
    assert why is not None and "DoRA" in why and "`tuneloop merge`" in why
    assert unservable_reason("adapter", str(_adapter(tmp_path, "plain", "LORA", use_dora=False))) is None


def test_promoting_or_canarying_it_is_refused_and_changes_nothing(versions):
    from tuneloop.monitoring import canary

    events = versions.query("SELECT count(*) AS n FROM deploy_events")[0]["n"]
    with pytest.raises(
        RegistryError, match="pt-v2 cannot be served, so it cannot go to production: it is a PROMPT_TUNING"
    ):
        set_stage(versions, "pt-v2", "production", actor="test")
    with pytest.raises(canary.CanaryError, match="pt-v2 cannot be served, so it cannot take traffic"):
        canary.start(versions, "pt-v2", 0.1)
    assert version_by_stage(versions, "production").name == "lora-v1"
    assert get_version(versions, "pt-v2").stage == "candidate"
    assert versions.query("SELECT count(*) AS n FROM canaries")[0]["n"] == 0
    assert versions.query("SELECT count(*) AS n FROM deploy_events")[0]["n"] == events


def test_the_gate_refuses_it_before_evaluating_anything(versions, home):
    from tuneloop.deploy.gate import GateError, run_gate
    from tuneloop.settings import load_settings

    with pytest.raises(GateError, match="pt-v2 cannot be served, so it cannot pass the gate"):
        run_gate(versions, load_settings(), "pt-v2")
    assert versions.query("SELECT count(*) AS n FROM eval_reports")[0]["n"] == 0


def test_the_cli_says_why_and_exits_2(versions, cli):
    for args in (
        ["deploy", "promote", "pt-v2", "--force"],
        ["deploy", "canary", "pt-v2", "--force"],
        ["deploy", "gate", "pt-v2"],
    ):
        r = cli(*args, check=False)
        assert r.returncode == 2, (args, r.stdout, r.stderr)
        assert r.stderr.startswith("error: pt-v2 cannot be served") and "Traceback" not in r.stderr
    assert get_version(versions, "pt-v2").stage == "candidate"


def test_the_server_does_not_advertise_it(versions, home, tmp_path):
    from tuneloop.server.engine import Engine
    from tuneloop.server.routing import ModelRouter
    from tuneloop.settings import EngineSettings

    base = tmp_path / "b"
    base.mkdir()
    router = ModelRouter(versions, Engine(base, EngineSettings(), "base"))
    router._versions = {v.name: v for v in (get_version(versions, "lora-v1"), get_version(versions, "pt-v2"))}
    for v in router._versions.values():
        v.base_model = str(base)
    names = router.model_names()
    assert "lora-v1" in names and "pt-v2" not in names
