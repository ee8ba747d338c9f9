"""`tuneloop serve` refuses what it cannot serve before starting an engine: `error: ...`, exit 2."""

from __future__ import annotations

import socket

import pytest

pytestmark = pytest.mark.slow


def test_serve_help_explains_what_is_served(cli):
    out = cli("serve", "--help").stdout
    for words in ("--model", "--adapter", "production", "canary", "/v1/chat/completions", "SIGTERM"):
        assert words in out


@pytest.mark.parametrize(
    "args, message",
    [
        (["--model", "/nonexistent/model"], "does not exist"),
        (["--model", "not-pulled-anywhere"], "tuneloop models pull"),
        (["--port", "70000"], "not a TCP port"),
    ],
)
def test_serve_refuses_bad_arguments(cli, tiny_model, args, message):
    full = args if "--model" in args else ["--model", str(tiny_model), *args]
    r = cli("serve", *full, check=False, timeout=120)
    assert r.returncode == 2 and r.stderr.startswith("error: ") and message in r.stderr, r.stderr
    assert "Traceback" not in r.stderr


def test_serve_refuses_bad_startup_adapters(cli, tiny_model, tiny_adapters, tmp_path):
    r = cli("serve", "--model", str(tiny_model), "--adapter", f"x={tmp_path}", check=False, timeout=120)
    assert r.returncode == 2 and "adapter_config.json" in r.stderr
    r = cli("serve", "--model", str(tiny_model), "--adapter", f"wide={tiny_adapters['wide']}", check=False, timeout=120)
    assert r.returncode == 2 and "max_lora_rank" in r.stderr
    r = cli("serve", "--model", str(tiny_model), "--adapter", "no-such-version", check=False, timeout=120)
    assert r.returncode == 2 and "neither an adapter folder nor a registered version" in r.stderr


def test_serve_refuses_a_busy_port(cli, tiny_model):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        r = cli("serve", "--model", str(tiny_model), "--port", str(port), check=False, timeout=120)
    assert r.returncode == 2 and "cannot listen" in r.stderr, r.stderr
