"""The OpenAPI document tells the truth: schemathesis, every check, every operation, against a live server.

``/schema/openapi.json`` is loaded from a running ``tuneloop serve`` and every
operation in it (the OpenAI routes, ``/tokenize``, ``/v1/responses``,
``/v1/feedback``, the admin API, health and metrics) is fuzzed with
schemathesis' pytest integration: its examples, coverage and fuzzing phases,
in positive and negative modes, each response checked by
``case.call_and_validate()`` with schemathesis' whole default check set (every
check is enabled, as ``schemathesis run --checks all`` does: no 5xx, documented
status codes, content types, headers and bodies, schema-valid requests
accepted, schema-invalid ones refused, the ``Allow`` header of 405 answers,
...).

Choices, each with its reason:

* **A server of its own** (``contract_server``, module scope) instead of the
  session's ``live_server``: the admin operations are run for real, so
  ``DELETE /admin/adapters/{name}`` does unload adapters and ``POST
  /admin/adapters`` loads folders under generated names, and thousands of
  generated requests land in the request log. None of that may leak into the
  tests that share ``live_server``. Its registry has ``tiny-prod`` (adapter
  ``a``, in production, so unloading it is a 409) and ``tiny-b`` (adapter
  ``b``, loadable by version).
* **Realistic values** (:func:`realistic`, applied to every generated case
  before it is sent): a generated value that is valid is swapped for another
  valid one the server can act on, and an invalid one is left alone, so a
  positive case stays positive and a negative one negative. ``model`` becomes
  a served name most of the time (else every generation request would be a
  404 and never reach the engine); token ids fall inside the vocabulary;
  ``max_tokens`` / ``max_completion_tokens`` / ``max_output_tokens`` are
  capped at :data:`MAX_TOKENS` (and set when absent, since absent means "the
  rest of the context") and ``n`` at 2, so the engine never writes long
  outputs on a CPU; ``min_tokens`` is kept within the token budget (vLLM
  refuses more: a comparison of two fields, which JSON Schema cannot state); a named ``tool_choice`` names
  the first tool; admin ``version`` / ``path`` / ``name`` and feedback
  ``request_id`` point at real versions, folders and requests part of the time.
* **One documented kind of exception** (:func:`semantic_refusal`, a
  ``filter_failure`` hook): a 400 to a schema-valid request is forgiven only
  when its ``code`` says the value is refused for a reason no JSON Schema can
  state (the prompt does not fit the model's context, a token id outside this
  model's vocabulary, a JSON schema / regex / grammar the structured-output
  backend cannot compile, an adapter folder whose content is not a LoRA of
  this base). Every other failure of every check fails the test.
* **Runtime**: ``max_examples`` :data:`EXAMPLES` per operation for the fuzzing
  phase, no shrinking (a failure is reported as generated), no Hypothesis
  database, a fixed seed (the same cases every run; set
  ``OPENAPI_CONTRACT_SEED`` / ``OPENAPI_CONTRACT_EXAMPLES`` to explore others).
"""

from __future__ import annotations

import json
import os
import re
import zlib
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import httpx
import pytest
import schemathesis
from fixtures_server import start_server
from hypothesis import HealthCheck, Phase, settings
from schemathesis.openapi.checks import RejectedPositiveData

pytestmark = [pytest.mark.engine, pytest.mark.slow]

#: fuzzing examples per operation (the coverage phase adds its own deterministic cases)
EXAMPLES = int(os.environ.get("OPENAPI_CONTRACT_EXAMPLES", "100"))
#: the most tokens a generated request may ask for (and the budget set when it asks for none)
MAX_TOKENS = 8
SEED = int(os.environ.get("OPENAPI_CONTRACT_SEED", "20261201"))

#: 400 codes that may answer a schema-valid request, each because the value's validity is not a matter of its
#: shape: (code, param or None for any, message pattern or None for any) -> why no schema can say it
SEMANTIC_400 = {
    ("context_length_exceeded", None, None): "the prompt plus the token budget exceeds this model's context; the "
    "token count of a text depends on the tokenizer",
    ("invalid_tokens", "tokens", None): "a token id outside this model's vocabulary (the schema's bound is the "
    "largest id any model may have)",
    ("invalid_parameter", None, r"out[- ]of[- ]vocab"): "a token id (prompt, stop_token_ids, logit_bias) outside this "
    "model's vocabulary",
    (
        "invalid_parameter",
        None,
        r"^(Failed to transform (regex|json schema|choices) into a grammar|Invalid (JSON )?grammar spec|The provided "
        r"JSON schema contains features not supported|The JSON schema is nested too deeply)",
    ): "a regex, JSON schema, grammar or choice list (structured outputs, response_format, a forced tool call's "
    "parameters) the structured-output backend cannot compile",
    ("invalid_adapter", None, None): "POST /admin/adapters: the folder does not exist, is not a LoRA adapter of this "
    "base model, or its name is already loaded from another folder",
    ("invalid_label", "label", None): "POST /v1/feedback: the label must fit the rated request (a classify request, "
    "one of its classifier's labels), which depends on the logged request, not on the schema",
    ("model_not_classifier", "model", None): "POST /v1/classify on this (chat) server: whether the served model is a "
    "classifier is not a matter of the request (tests/test_classify_serve.py checks the route on a classifier)",
}
#: operations that cannot succeed on this module's chat server (see SEMANTIC_400)
NO_SUCCESS_HERE = {"POST /v1/classify"}


def semantic_refusal(response_body: Any) -> str | None:
    """Why a 400 with this body may answer a schema-valid request (:data:`SEMANTIC_400`), else None."""
    err = response_body.get("error") if isinstance(response_body, dict) else None
    if not isinstance(err, dict):
        return None
    for (code, param, pattern), why in SEMANTIC_400.items():
        if err.get("code") != code or (param is not None and err.get("param") != param):
            continue
        if pattern is None or re.search(pattern, str(err.get("message", ""))):
            return why
    return None


# -- the server ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def contract_server(tiny_model, tiny_adapters, tmp_path_factory):
    """A server for this module only (see module docstring): tiny base, ``tiny-prod`` in production, ``tiny-b``."""
    from tuneloop.db import open_database
    from tuneloop.ids import hash_path
    from tuneloop.registry import ModelVersion, register_version, set_stage

    home = tmp_path_factory.mktemp("contract-home")
    db = open_database(home / "tuneloop.duckdb")
    for name, adapter in (("tiny-prod", "a"), ("tiny-b", "b")):
        path = tiny_adapters[adapter]
        register_version(
            db,
            ModelVersion(
                name=name,
                kind="adapter",
                base_model=str(tiny_model),
                path=str(path),
                content_hash=hash_path(path),
            ),
        )
    set_stage(db, "tiny-prod", "production", actor="test", reason="contract test")
    srv = start_server(home, tiny_model)
    yield srv
    srv.stop()


class World:
    """What :func:`realistic` draws from: served names, the vocabulary, real folders and request ids."""

    def __init__(self, srv, tiny_model: Path, tiny_adapters: dict[str, Path], scratch: Path):
        from transformers import AutoTokenizer

        self.base = srv.base_name
        self.vocab = len(AutoTokenizer.from_pretrained(str(tiny_model)))
        self.models = [self.base, "production", "tiny-b", "tiny-prod", self.base, "no-such-model"]
        self.versions = ["tiny-b", "tiny-prod", "no-such-version"]
        not_an_adapter = scratch / "not-an-adapter"
        not_an_adapter.mkdir(exist_ok=True)
        self.paths = [str(tiny_adapters["b"]), str(tiny_adapters["wide"]), str(not_an_adapter), "/etc"]
        self.adapter_names = ["tiny-b", "tiny-prod", "b", srv.base_name]
        # a served request with feedback on it, so GET/POST /v1/feedback reach their 200s
        with srv.http() as http:
            r = http.post(
                "/v1/chat/completions",
                json={"model": self.base, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2},
            )
            r.raise_for_status()
            self.request_ids = [r.json()["id"]]
            http.post("/v1/feedback", json={"request_id": self.request_ids[0], "rating": "up"}).raise_for_status()


@pytest.fixture(scope="module")
def world(contract_server, tiny_model, tiny_adapters, tmp_path_factory) -> World:
    return World(contract_server, tiny_model, tiny_adapters, tmp_path_factory.mktemp("contract-scratch"))


# -- realistic values -------------------------------------------------------------------------------


def _pick(options: list[Any], generated: Any) -> Any:
    """One of ``options`` or ``generated`` itself, chosen by a stable hash of ``generated`` (so Hypothesis
    replays a case exactly)."""
    i = zlib.crc32(json.dumps(generated, sort_keys=True, default=str).encode()) % (len(options) + 1)
    return generated if i == len(options) else options[i]


def _is_int(v: Any, lo: int, hi: int | None = None) -> bool:
    """Whether ``v`` is a JSON integer (``2.0`` included, as JSON Schema reads it) in ``lo .. hi``."""
    whole = type(v) is int or (type(v) is float and v.is_integer())
    return whole and v >= lo and (hi is None or v <= hi)


def _is_str(v: Any, lo: int = 1, hi: int = 512) -> bool:
    return isinstance(v, str) and lo <= len(v) <= hi


def _is_function_name(v: Any) -> bool:
    return isinstance(v, str) and re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", v) is not None


def _token_ids(v: Any, vocab: int) -> Any:
    """Valid token ids (ints 0 .. 2**31-1, at any list depth) moved into the vocabulary; anything else as is."""
    if isinstance(v, list):
        return [_token_ids(x, vocab) for x in v]
    return int(v) % vocab if _is_int(v, 0, 2**31 - 1) else v


def realistic(case: schemathesis.Case, world: World) -> None:
    """Swap valid generated values for valid values the server can act on (see module docstring)."""
    body = case.body
    if case.path == "/admin/adapters/{name}" and _is_str(case.path_parameters.get("name"), 1, 10_000):
        case.path_parameters["name"] = _pick(world.adapter_names, case.path_parameters["name"])
    if case.path == "/v1/feedback/{request_id}" and isinstance(case.path_parameters.get("request_id"), str):
        case.path_parameters["request_id"] = _pick(world.request_ids * 2, case.path_parameters["request_id"])
    if not isinstance(body, dict):
        return
    if case.path == "/admin/adapters":
        if _is_str(body.get("version"), 1, 10_000):
            body["version"] = _pick(world.versions, body["version"])
            if _is_str(body.get("name"), 1, 256) and _is_str(body["version"], 1, 256):
                body["name"] = body["version"]  # a version is served under its own name
        if _is_str(body.get("path"), 1, 10_000):
            body["path"] = _pick(world.paths, body["path"])
        return
    if case.path == "/v1/feedback":
        if _is_str(body.get("request_id"), 1, 200) and body["request_id"].strip():
            body["request_id"] = _pick(world.request_ids * 2, body["request_id"])
        return
    if _is_str(body.get("model")):
        body["model"] = _pick(world.models, body["model"])
    budget_keys = {
        "/v1/chat/completions": ("max_tokens", "max_completion_tokens"),
        "/v1/completions": ("max_tokens",),
        "/v1/responses": ("max_output_tokens",),
    }.get(case.path, ())
    for key in budget_keys:
        v = body.get(key)
        if v is None:
            body[key] = MAX_TOKENS
        elif _is_int(v, 1):
            body[key] = 1 + int(v) % MAX_TOKENS
    if _is_int(body.get("n"), 2, 64):  # n > 1 stays > 1 (with temperature 0 it is refused)
        body["n"] = 2
    budget = body.get("max_completion_tokens") or body.get("max_tokens")
    if _is_int(body.get("min_tokens"), 0) and _is_int(budget, 0):
        body["min_tokens"] = min(int(body["min_tokens"]), max(int(budget), 1))
    for key in ("prompt", "stop_token_ids", "tokens"):
        if key in body:
            body[key] = _token_ids(body[key], world.vocab)
    bias = body.get("logit_bias")
    if isinstance(bias, dict):
        body["logit_bias"] = {
            (str(int(k) % world.vocab) if re.fullmatch(r"[0-9]{1,4000}", k) else k): v for k, v in bias.items()
        }
    choice, tools = body.get("tool_choice"), body.get("tools")
    named = choice.get("function") if isinstance(choice, dict) else None
    first = tools[0].get("function") if isinstance(tools, list) and tools and isinstance(tools[0], dict) else None
    if (
        isinstance(named, dict)
        and isinstance(first, dict)
        and all(map(_is_function_name, (named.get("name"), first.get("name"))))
    ):
        named["name"] = first["name"]


# -- the test --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def api_schema(contract_server, world):
    schema = schemathesis.openapi.from_url(contract_server.url + "/schema/openapi.json", timeout=60)
    schema.config.update(base_url=contract_server.url, request_timeout=120)
    schema.config.seed = SEED

    @schema.hook
    def filter_failure(ctx, failure, case, response) -> bool:
        """Keep every failure but a schema-valid request refused for a reason no schema can state."""
        if not isinstance(failure, RejectedPositiveData) or response.status_code != 400:
            return True
        try:
            body = json.loads(response.content)
        except ValueError:
            return True
        return semantic_refusal(body) is None

    return schema


schema = schemathesis.pytest.from_fixture("api_schema")


@pytest.fixture(autouse=True)
def _node_id_for_schemathesis(request):
    """schemathesis 4.32's lazy schemas read (and rename, per operation) ``request.node._nodeid``, an attribute
    pytest 9 no longer has (it keeps ``_id``): give the node one."""
    if not hasattr(request.node, "_nodeid"):
        request.node._nodeid = request.node.nodeid


@schema.parametrize()
@settings(
    max_examples=EXAMPLES,
    deadline=None,
    phases=[Phase.explicit, Phase.generate],
    suppress_health_check=list(HealthCheck),
    database=None,
)
def test_the_api_behaves_as_its_openapi_document_says(case, world):
    realistic(case, world)
    response = case.call_and_validate(timeout=120)
    STATUSES[case.operation.label][response.status_code] += 1


#: the statuses each operation answered above (for the test below, and ``-s`` output)
STATUSES: defaultdict[str, Counter[int]] = defaultdict(Counter)


def test_the_fuzzing_reached_every_operations_success(contract_server):
    """Realistic values make every operation answer a 2xx at least once, so the success bodies were checked too,
    not only the refusals."""
    if not STATUSES:
        pytest.skip("the fuzzing test did not run in this session")
    print("\n" + "\n".join(f"{op}: {dict(sorted(c.items()))}" for op, c in sorted(STATUSES.items())))
    assert not [op for op, c in STATUSES.items() if op not in NO_SUCCESS_HERE and not any(200 <= s < 300 for s in c)], (
        dict(STATUSES)
    )


def test_every_operation_is_in_the_document(contract_server):
    """The fuzzing above covers what the document lists: every route the server has is in it."""
    doc = httpx.get(contract_server.url + "/schema/openapi.json", timeout=30).json()
    ops = {(m.upper(), p) for p, item in doc["paths"].items() for m in item}
    assert ops == {
        ("GET", "/v1/models"),
        ("POST", "/v1/chat/completions"),
        ("POST", "/v1/completions"),
        ("POST", "/v1/responses"),
        ("POST", "/v1/classify"),
        ("POST", "/tokenize"),
        ("POST", "/detokenize"),
        ("POST", "/v1/feedback"),
        ("GET", "/v1/feedback/{request_id}"),
        ("GET", "/admin/adapters"),
        ("POST", "/admin/adapters"),
        ("DELETE", "/admin/adapters/{name}"),
        ("GET", "/admin/state"),
        ("POST", "/admin/state/refresh"),
        ("GET", "/admin/log"),
        ("POST", "/admin/log/flush"),
        ("GET", "/healthz"),
        ("GET", "/readyz"),
        ("GET", "/metrics"),
    }
    # every error is documented with the OpenAI-style body the server sends, never Litestar's default
    for p, item in doc["paths"].items():
        for m, op in item.items():
            for status, resp in op["responses"].items():
                if status.startswith(("4", "5")) and p != "/readyz":
                    schema_ref = resp["content"]["application/json"]["schema"]
                    assert schema_ref == {"$ref": "#/components/schemas/ErrorResponse"}, (m, p, status)


def test_a_logit_bias_key_that_is_not_a_token_id_is_a_400(contract_server):
    for key in ("abc", "1.5"):
        r = httpx.post(
            contract_server.url + "/v1/chat/completions",
            json={
                "model": contract_server.base_name,
                "messages": [{"role": "user", "content": "hi"}],
                "max_tokens": 1,
                "logit_bias": {key: 1},
            },
            timeout=60,
        )
        assert r.status_code == 400, (key, r.status_code, r.text)
        assert r.json()["error"]["param"] == "logit_bias"


def test_the_feedback_whitespace_of_the_document_is_what_the_server_strips():
    """The feedback patterns spell out str.strip()'s whitespace (a JSON Schema ``\\s`` is narrower than Python's)."""
    import sys

    from tuneloop.server.feedback_routes import WHITESPACE

    ws = re.compile(WHITESPACE)
    assert [hex(i) for i in range(sys.maxunicode + 1) if bool(ws.fullmatch(chr(i))) != chr(i).isspace()] == []
