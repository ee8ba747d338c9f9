"""One meaning for a model reference everywhere (tuneloop.modelcache.resolve_model): a folder, a known base, or a
hub id ``org/name`` pulled into the model cache (``<cache>/org--name``), for serve, train, eval and merge alike.

No hub is reachable here, so a "pulled" hub id is the tiny test model copied to where `tuneloop models pull
someorg/tiny` would have put it, and every test runs with HF_HUB_OFFLINE=1.
"""

from __future__ import annotations

import json
import shutil
import socket
import sys
import textwrap
import types
from pathlib import Path

import pytest
from conftest import CLI, run_with_importtime

from tuneloop.errors import UserError
from tuneloop.modelcache import hub_cache_dir, pull, pull_hub, resolve_model

HUB_ID = "someorg/tiny"


@pytest.fixture
def cache(tmp_path, tiny_model, monkeypatch) -> Path:
    """A model cache ($TUNELOOP_MODEL_CACHE) holding ``someorg/tiny`` as `tuneloop models pull` stores it."""
    c = tmp_path / "model-cache"
    shutil.copytree(tiny_model, c / "someorg--tiny")
    monkeypatch.setenv("TUNELOOP_MODEL_CACHE", str(c))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return c


@pytest.fixture
def offline_cli(cli: CLI, cache: Path) -> CLI:
    return CLI(cli.cwd, dict(cli.env, TUNELOOP_MODEL_CACHE=str(cache), HF_HUB_OFFLINE="1"))


def test_a_pulled_hub_id_resolves_to_its_cache_folder(cache, tiny_model):
    want = (cache / "someorg--tiny").resolve()
    assert hub_cache_dir(HUB_ID, cache) == cache / "someorg--tiny"
    assert resolve_model(HUB_ID, cache) == want
    assert resolve_model("SomeOrg/Tiny", cache) == want  # hub ids are case-insensitive; the folder keeps its case
    assert pull(HUB_ID, cache) == cache / "someorg--tiny"  # `models pull` of a pulled id: nothing to do
    assert resolve_model(str(tiny_model), cache) == tiny_model.resolve()  # a folder stays a folder


def test_an_unpulled_hub_id_offline_names_the_variable_and_the_pull(cache):
    for call in (lambda: resolve_model("nosuch/model", cache), lambda: pull_hub("nosuch/model", cache)):
        with pytest.raises(UserError) as e:
            call()
        msg = str(e.value)
        assert "HF_HUB_OFFLINE" in msg and "tuneloop models pull nosuch/model" in msg, msg
        assert "unreachable" not in msg
    assert not (cache / "nosuch--model").exists()


def test_plan_serving_takes_a_pulled_hub_id(cache, db, home):
    from tuneloop.server.app import plan_serving
    from tuneloop.settings import load_settings

    settings = load_settings(None, [f"server.model={HUB_ID}"])
    plan = plan_serving(settings, db)
    assert plan.base == (cache / "someorg--tiny").resolve() and plan.served_name == "someorg--tiny"


def test_eval_and_train_resolve_a_pulled_hub_id(cache, db, home):
    from tuneloop.settings import load_settings
    from tuneloop.trainer.evaluate import resolve_models
    from tuneloop.trainer.inputs import resolve_base_model

    settings = load_settings()
    [m] = resolve_models([HUB_ID], db, settings)
    assert m.base == (cache / "someorg--tiny").resolve() and m.adapter is None
    assert resolve_base_model(db, settings, HUB_ID) == m.base
    with pytest.raises(UserError, match="unknown model 'no-such'"):
        resolve_models(["no-such"], db, settings)


def test_serve_cli_resolves_a_pulled_hub_id(offline_cli):
    """The plan resolves (no 'does not exist', no pull advice); the busy port stops it before any engine starts."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        r = offline_cli("serve", "--model", HUB_ID, "--port", str(port), check=False, timeout=120)
    assert r.returncode == 2 and "cannot listen" in r.stderr, r.stderr


def test_eval_and_train_cli_resolve_a_pulled_hub_id(offline_cli):
    r = offline_cli("eval", HUB_ID, "--dataset", "no-such-dataset", check=False, timeout=120)
    assert r.returncode == 2 and "cannot load dataset 'no-such-dataset'" in r.stderr, r.stderr
    r = offline_cli("train", f"base={HUB_ID}", "dataset=no-such-dataset", "max_steps=1", check=False, timeout=120)
    assert r.returncode == 2 and "cannot load dataset 'no-such-dataset'" in r.stderr, r.stderr


def test_prompt_tuning_advice_is_true(db, home, tmp_path, tiny_model):
    """Neither the server nor `tuneloop merge` takes a prompt-tuning adapter; both point to eval or method=lora."""
    from tuneloop.registry import ModelVersion, register_version
    from tuneloop.server.engine import AdapterError, Engine
    from tuneloop.settings import EngineSettings, load_settings
    from tuneloop.trainer.merge import merge

    ad = tmp_path / "pt"
    ad.mkdir()
    (ad / "adapter_config.json").write_text(json.dumps({"peft_type": "PROMPT_TUNING"}))
    with pytest.raises(AdapterError) as e:
        Engine(tiny_model, EngineSettings(), "base").validate_adapter(ad)
    msg = str(e.value)
    assert "tuneloop eval" in msg and "method=lora" in msg and "merge other kinds" not in msg, msg
    register_version(
        db, ModelVersion(name="pt-v1", kind="adapter", base_model=str(tiny_model), path=str(ad), content_hash="x")
    )
    with pytest.raises(UserError) as e:
        merge("pt-v1", db, load_settings())
    msg = str(e.value)
    assert "only weight adapters" in msg and "tuneloop eval" in msg and "method=lora" in msg, msg


def test_the_offline_engine_gets_the_placement_settings(monkeypatch, tiny_model):
    """engine.tensor_parallel_size and engine.gpu_memory_utilization reach vLLM's LLM as the server passes them."""
    from tuneloop.server.offline_engine import OfflineGenerator
    from tuneloop.settings import EngineSettings

    seen: dict = {}

    class FakeLLM:
        def __init__(self, **kw):
            seen.update(kw)

    monkeypatch.setitem(sys.modules, "vllm", types.SimpleNamespace(LLM=FakeLLM))
    g = OfflineGenerator(EngineSettings(tensor_parallel_size=2, gpu_memory_utilization=0.42))
    g._engine(tiny_model, 0)
    g._llm = None  # nothing to shut down
    assert seen["tensor_parallel_size"] == 2 and seen["gpu_memory_utilization"] == 0.42


@pytest.mark.parametrize(
    "argv",
    [
        ["merge", "no-such"],
        ["eval", "no-such", "--dataset", "x"],
        ["train", "base={model}", "dataset=no-such", "max_steps=1"],
    ],
    ids=["merge", "eval", "train"],
)
def test_cheap_refusals_come_before_torch(cli: CLI, tiny_model, argv):
    """An unknown version, model or dataset is refused before torch, transformers or datasets is imported."""
    args = [a.format(model=tiny_model) for a in argv]
    r, imported = run_with_importtime(cli, *args)
    assert r.returncode == 2 and "error: " in r.stderr, r.stderr[-2000:]
    assert not imported & {"torch", "transformers", "peft", "datasets", "vllm"}, textwrap.shorten(
        str(sorted(imported)), 300
    )


def test_a_copy_of_a_model_is_the_same_model_but_a_fine_tune_of_the_same_shape_is_not(tiny_model, tmp_path):
    """What a server serves for a version named by its folder: a byte copy (a moved cache) is its own model; a
    fine-tune with the same config and weight sizes (a merged LoRA, another classifier head) never is."""
    import torch
    from safetensors.torch import load_file, save_file

    from tuneloop.server.engine import _same_model

    copy = tmp_path / "copy"
    shutil.copytree(tiny_model, copy)
    tuned = tmp_path / "tuned"
    shutil.copytree(tiny_model, tuned)
    (weights,) = tuned.glob("*.safetensors")
    tensors = load_file(weights)
    name = next(iter(tensors))
    tensors[name] = tensors[name] + torch.ones_like(tensors[name]) * 1e-3  # same shapes and dtypes: same file size
    save_file(tensors, weights, metadata={"format": "pt"})
    assert sorted(f.stat().st_size for f in tuned.glob("*.safetensors")) == sorted(
        f.stat().st_size for f in tiny_model.glob("*.safetensors")
    )
    assert _same_model(copy, tiny_model) and _same_model(tiny_model, copy)
    assert not _same_model(tuned, tiny_model)
