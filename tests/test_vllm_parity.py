"""``/v1/completions`` of ``tuneloop serve`` answers as vLLM's own OpenAI server does, token for token.

Both servers run the same tiny model with the same engine settings (tests/fixtures_vllm.py); every request
goes to both with the official ``openai`` client (each server's own model id, read from ``/v1/models``) and the
choices are compared: text, finish reason, and the logprobs block (tokens, text offsets, token logprobs within
1e-4; vLLM gives the first prompt token no logprob, ``None``). Covered: ``echo`` with ``logprobs`` (the prompt's
tokens and logprobs, then the completion's), ``max_tokens`` 0 with echo (vLLM answers the prompt alone), 1 (what
lm-eval's log-likelihood requests send) and more, prompts given as text, as a token-id list, and as batches of
token-id lists and of texts, a prompt whose tokens split UTF-8 characters, and lm-eval's exact payload. On a
mismatch the assertion quotes the request and both answers.
"""

from __future__ import annotations

import json
import math
from typing import Any

import httpx
import pytest
from fixtures_vllm import base_model_id

pytestmark = [pytest.mark.engine, pytest.mark.slow]

TOL = 1e-4
PROMPTS = [
    "Hello world, how are",
    "The capital of France is Paris. The capital of Italy is",
    "naïve café ☃",  # byte-level BPE: some tokens are parts of one character (empty text, shared offsets)
    " leading space\nand a second line",
]


@pytest.fixture
def servers(parity_server, vllm_server) -> dict[str, dict[str, Any]]:
    """``{"tuneloop": {...}, "vllm": {...}}``: each server's name, base URL, model id, ``openai`` client, process."""
    return {
        "tuneloop": {
            "name": "tuneloop",
            "url": parity_server.url,
            "model": base_model_id(parity_server.url),
            "client": parity_server.openai(),
            "server": parity_server,
        },
        "vllm": {
            "name": "vLLM",
            "url": vllm_server.url,
            "model": vllm_server.model,
            "client": vllm_server.openai(),
            "server": vllm_server,
        },
    }


@pytest.fixture(scope="module")
def tok(tiny_model):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tiny_model))


def ids(tok, text: str) -> list[int]:
    """The token ids of ``text`` as lm-eval's tokenized requests send them (no special tokens)."""
    return list(tok.encode(text, add_special_tokens=False))


def log_errors(server: Any, lines: int = 3) -> str:
    """The last error lines of a server's log (an engine crash names its cause there)."""
    errors = [ln for ln in server.output().splitlines() if "Error" in ln]
    return "\n".join(errors[-lines:])


def both_one(s: dict[str, Any], **request: Any) -> dict:
    """``completions.create(**request)`` on one server (``servers[side]``) with its model id: the answer as a dict;
    an error answer fails with the request and the last errors of the server's log."""
    import openai

    try:
        return s["client"].completions.create(model=s["model"], **request).model_dump()
    except openai.APIStatusError as e:
        raise AssertionError(
            f"{s['name']} ({s['url']}) answered {e.status_code}: {e.response.text}\n"
            f"request: {json.dumps(request, ensure_ascii=False)}\nlast errors in its log:\n{log_errors(s['server'])}"
        ) from None


def both(servers, **request: Any) -> tuple[dict, dict]:
    """The answers of tuneloop and of vLLM to ``request`` (see :func:`both_one`)."""
    return both_one(servers["tuneloop"], **request), both_one(servers["vllm"], **request)


def mismatch(what: str, request: dict, tl: Any, vl: Any) -> str:
    return (
        f"{what} differs from vLLM's server\nrequest: {json.dumps(request, ensure_ascii=False)}\n"
        f"tuneloop: {json.dumps(tl, ensure_ascii=False)}\nvLLM:     {json.dumps(vl, ensure_ascii=False)}"
    )


def logprobs_close(a: list, b: list) -> bool:
    return len(a) == len(b) and all(
        (x is None and y is None) or (x is not None and y is not None and math.isclose(x, y, rel_tol=0, abs_tol=TOL))
        for x, y in zip(a, b)
    )


def top_close(a: list | None, b: list | None) -> bool:
    if a is None or b is None:
        return a is b
    return len(a) == len(b) and all(
        (x is None and y is None)
        or (
            x is not None
            and y is not None
            and x.keys() == y.keys()
            and all(math.isclose(x[k], y[k], rel_tol=0, abs_tol=TOL) for k in x)
        )
        for x, y in zip(a, b)
    )


def assert_same(servers, *, top: bool = False, **request: Any) -> tuple[dict, dict]:
    """Send ``request`` to both servers and assert the choices match (see module doc); both answers."""
    tl, vl = both(servers, **request)
    tc = sorted(tl["choices"], key=lambda c: c["index"])
    vc = sorted(vl["choices"], key=lambda c: c["index"])
    assert [c["index"] for c in tc] == [c["index"] for c in vc], mismatch("the choices", request, tl, vl)
    for t, v in zip(tc, vc):
        for key in ("text", "finish_reason"):
            assert t[key] == v[key], mismatch(f"choice {t['index']}: {key}", request, t, v)
        if v["logprobs"] is None:
            assert t["logprobs"] is None, mismatch(f"choice {t['index']}: logprobs", request, t, v)
            continue
        assert t["logprobs"] is not None, mismatch(f"choice {t['index']}: logprobs", request, t, v)
        tlp, vlp = t["logprobs"], v["logprobs"]
        for key in ("tokens", "text_offset"):
            assert tlp[key] == vlp[key], mismatch(f"choice {t['index']}: logprobs.{key}", request, tlp, vlp)
        assert logprobs_close(tlp["token_logprobs"], vlp["token_logprobs"]), mismatch(
            f"choice {t['index']}: logprobs.token_logprobs (tolerance {TOL})", request, tlp, vlp
        )
        if top:
            assert top_close(tlp["top_logprobs"], vlp["top_logprobs"]), mismatch(
                f"choice {t['index']}: logprobs.top_logprobs (tolerance {TOL})", request, tlp, vlp
            )
    assert tl["usage"]["prompt_tokens"] == vl["usage"]["prompt_tokens"], mismatch("usage", request, tl, vl)
    return tl, vl


def test_the_reference_runs_tuneloops_engine_settings(vllm_server, tiny_model):
    """vLLM's server got tuneloop's engine arguments (the fixture derives them from ``Engine.engine_args``)."""
    from fixtures_vllm import live_engine_args

    args = live_engine_args(tiny_model)
    cmd = vllm_server.server.cmd
    flags = {cmd[i]: cmd[i + 1] for i in range(len(cmd) - 1) if cmd[i].startswith("--")}
    assert (flags["--dtype"], flags["--seed"], flags["--max-logprobs"]) == ("float32", str(args.seed), "20")
    assert "--enforce-eager" in cmd and "--enable-lora" not in cmd
    models = httpx.get(vllm_server.url + "/v1/models", timeout=30).json()["data"]
    assert [m["max_model_len"] for m in models] == [args.max_model_len] == [512]  # SERVER_SETTINGS


@pytest.mark.parametrize("max_tokens", [1, 4])
@pytest.mark.parametrize("prompt", PROMPTS)
def test_echo_logprobs_of_a_text_prompt(servers, prompt, max_tokens):
    tl, vl = assert_same(servers, prompt=prompt, echo=True, logprobs=1, max_tokens=max_tokens, temperature=0)
    lp = vl["choices"][0]["logprobs"]
    # the echo really covers the prompt: its tokens come first, the first one without a logprob
    assert vl["choices"][0]["text"].startswith(prompt) and lp["token_logprobs"][0] is None
    assert len(lp["tokens"]) == vl["usage"]["prompt_tokens"] + max_tokens
    assert tl["usage"]["completion_tokens"] == vl["usage"]["completion_tokens"] == max_tokens


def test_echo_with_max_tokens_0_is_the_prompt_alone(servers):
    """vLLM answers ``echo`` with ``max_tokens`` 0 with the prompt and its logprobs alone (finish reason
    ``length``); without echo it refuses max_tokens 0 (400)."""
    prompt = PROMPTS[1]
    _, vl = assert_same(servers, prompt=prompt, echo=True, logprobs=1, max_tokens=0, temperature=0)
    assert vl["choices"][0]["text"] == prompt
    assert len(vl["choices"][0]["logprobs"]["tokens"]) == vl["usage"]["prompt_tokens"]


def test_top_logprobs_with_echo_match(servers):
    """The top alternatives too: at a prompt position vLLM lists the prompt token and the top ``logprobs`` ones
    (lm-eval's ``is_greedy`` compares the token's logprob with the best of them)."""
    for prompt in PROMPTS[:2]:
        assert_same(servers, top=True, prompt=prompt, echo=True, logprobs=2, max_tokens=2, temperature=0)


@pytest.mark.parametrize(
    "request_",
    [
        pytest.param({"prompt": "Hello", "suffix": " world", "max_tokens": 2}, id="suffix"),
        pytest.param({"prompt": "Hello", "max_tokens": 0}, id="max_tokens-0-without-echo"),
        pytest.param({"prompt": [], "max_tokens": 1}, id="no-prompt"),
    ],
)
def test_both_refuse(servers, request_):
    """What vLLM's server refuses (400) tuneloop refuses too."""
    codes = {}
    for side, s in servers.items():
        r = httpx.post(s["url"] + "/v1/completions", json={"model": s["model"], **request_}, timeout=60)
        codes[side] = (r.status_code, r.text)
    assert codes["vllm"][0] == 400 and codes["tuneloop"][0] == 400, mismatch(
        "the answer to an invalid request", request_, codes["tuneloop"], codes["vllm"]
    )


def test_echo_logprobs_of_a_token_id_prompt(servers, tok):
    prompt = ids(tok, PROMPTS[1])
    _, vl = assert_same(servers, prompt=prompt, echo=True, logprobs=1, max_tokens=1, temperature=0)
    assert vl["usage"]["prompt_tokens"] == len(prompt)
    assert len(vl["choices"][0]["logprobs"]["tokens"]) == len(prompt) + 1


def test_greedy_completion_with_logprobs_without_echo(servers, tok):
    for prompt in (PROMPTS[0], ids(tok, PROMPTS[1])):
        assert_same(servers, top=True, prompt=prompt, logprobs=3, max_tokens=6, temperature=0)


def test_echo_logprobs_of_a_batch_of_token_id_prompts(servers, tok):
    prompts = [ids(tok, PROMPTS[0]), ids(tok, PROMPTS[2])]
    _, vl = assert_same(servers, prompt=prompts, echo=True, logprobs=1, max_tokens=1, temperature=0, seed=1234)
    assert [len(c["logprobs"]["tokens"]) for c in vl["choices"]] == [len(p) + 1 for p in prompts]


def test_echo_logprobs_of_a_batch_of_text_prompts(servers):
    assert_same(servers, prompt=PROMPTS[:3], echo=True, logprobs=1, max_tokens=2, temperature=0)


def test_lm_eval_loglikelihood_payload(servers, tok):
    """The body lm-eval's ``local-completions`` posts for log-likelihoods (a batch of token-id lists, max_tokens 1,
    echo, logprobs 1, seed), sent as raw JSON; its score, the logprobs of the continuation tokens, is equal."""
    context, continuation = ids(tok, "The capital of France is"), ids(tok, " Paris")
    inputs = [context + continuation, ids(tok, "Bees make honey")]
    answers = {}
    for side, s in servers.items():
        body = {"model": s["model"], "prompt": inputs, "temperature": 0, "max_tokens": 1, "logprobs": 1}
        body |= {"seed": 1234, "echo": True}
        r = httpx.post(s["url"] + "/v1/completions", json=body, timeout=120)
        assert r.status_code == 200, (
            f"{side} answered {r.status_code}: {r.text}\nrequest: {json.dumps(body)}\n"
            f"last errors in its log:\n{log_errors(s['server'])}"
        )
        answers[side] = r.json()
    ctxlen = len(context)
    scores = {
        side: sum(sorted(a["choices"], key=lambda c: c["index"])[0]["logprobs"]["token_logprobs"][ctxlen:-1])
        for side, a in answers.items()
    }
    assert math.isfinite(scores["vllm"]) and scores["vllm"] < 0
    assert math.isclose(scores["tuneloop"], scores["vllm"], rel_tol=0, abs_tol=TOL * len(continuation)), mismatch(
        "lm-eval's log-likelihood", {"prompt": inputs}, answers["tuneloop"], answers["vllm"]
    )


def test_concurrent_echo_requests(servers):
    """lm-eval's ``num_concurrent``: echo + logprobs requests in flight together (the engine schedules them into
    one step) answer as they do one by one on vLLM's server."""
    from concurrent.futures import ThreadPoolExecutor

    request = {"echo": True, "logprobs": 1, "max_tokens": 1, "temperature": 0}
    s = servers["tuneloop"]
    with ThreadPoolExecutor(len(PROMPTS)) as pool:
        futures = [pool.submit(both_one, s, prompt=p, **request) for p in PROMPTS]
        answers = [f.result() for f in futures]
    for prompt, tl in zip(PROMPTS, answers):
        v = servers["vllm"]
        vl = v["client"].completions.create(model=v["model"], prompt=prompt, **request).model_dump()
        t, c = tl["choices"][0], vl["choices"][0]
        assert (t["text"], t["logprobs"]["tokens"]) == (c["text"], c["logprobs"]["tokens"]), mismatch(
            "a concurrent request's answer", {"prompt": prompt, **request}, t, c
        )
        assert logprobs_close(t["logprobs"]["token_logprobs"], c["logprobs"]["token_logprobs"]), mismatch(
            "a concurrent request's token_logprobs", {"prompt": prompt, **request}, t, c
        )
