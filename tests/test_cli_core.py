"""The console script as a user meets it: help, errors, registry commands."""

from __future__ import annotations


def test_help_lists_commands_and_global_options(cli):
    out = cli("--help").stdout
    assert "--config" in out and "--set" in out and "models" in out


def test_models_list_on_a_fresh_home_says_how_to_start(cli):
    assert "no model versions" in cli("models", "list").stdout


def test_unknown_setting_fails_with_exit_2_and_the_valid_keys(cli):
    r = cli("--set", "server.prot=1", "models", "list", check=False)
    assert r.returncode == 2
    assert "unknown config key" in r.stderr and "port" in r.stderr and "Traceback" not in r.stderr


def test_pulling_an_unknown_model_is_a_clear_error(cli):
    r = cli("models", "pull", "no-such-model", check=False)
    assert r.returncode == 2 and "unknown model" in r.stderr


def test_hub_ids_fail_clearly_offline(cli):
    r = cli("models", "pull", "HuggingFaceTB/SmolLM2-135M-Instruct", check=False)
    assert r.returncode == 2 and "hub" in r.stderr.lower() and "Traceback" not in r.stderr


def test_models_show_unknown_version(cli):
    r = cli("models", "show", "v9", check=False)
    assert r.returncode == 2 and "unknown model version" in r.stderr


def test_config_show_reflects_file_env_and_set(cli, tmp_path):
    (tmp_path / "tuneloop.yaml").write_text(
        "server:\n  port: 9001\n"
    )  # cli runs in tmp_path: picked up as ./tuneloop.yaml
    out = cli("--set", "log.flush_rows=7", "config", "show").stdout
    assert "port: 9001" in out and "flush_rows: 7" in out


def test_config_keys_documents_every_key(cli):
    out = cli("config", "keys").stdout
    assert "engine.kv_cache_gib" in out and "VLLM_CPU_KVCACHE_SPACE" in out
