"""POST /v1/classify on a live `tuneloop serve` over a tiny sequence classifier: vLLM's shape, transformers'
probabilities, refusals, the request log, metrics and drift of the predicted labels.

One server for the module (real vLLM pooling engine, real DuckDB file, real HTTP): the tiny random Llama with a
3-label classification head (``a``, ``b``, ``c``), served as its folder name, plus two registered versions of the
same folder whose training datasets' label counts either match what the model predicts on :data:`TEXTS` or not.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import httpx
import pytest
from fixtures_server import read_requests, start_server
from prometheus_client import CollectorRegistry

LABELS = ["a", "b", "c"]
TEXTS = [
    f"{w} number {i} is {adj}"
    for i, (w, adj) in enumerate(zip(["order", "parcel", "refund"] * 10, ["late", "fine", "great", "broken", "ok"] * 6))
]


@pytest.fixture(scope="module")
def tiny_classifier(tiny_model, tmp_path_factory) -> Path:
    """The tiny model with a seeded 3-label head, saved as a full ``LlamaForSequenceClassification`` folder."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(
        str(tiny_model), num_labels=3, id2label=dict(enumerate(LABELS)), label2id={x: i for i, x in enumerate(LABELS)}
    )
    tok = AutoTokenizer.from_pretrained(str(tiny_model))
    model.config.pad_token_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    dest = tmp_path_factory.mktemp("classifier") / "tiny-cls"
    model.save_pretrained(str(dest))
    tok.save_pretrained(str(dest))
    return dest


@pytest.fixture(scope="module")
def reference_probs(tiny_classifier) -> dict[str, list[float]]:
    """transformers' softmax(logits) of every text, on the same folder."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(str(tiny_classifier), dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(str(tiny_classifier))
    with torch.no_grad():
        return {t: torch.softmax(model(**tok(t, return_tensors="pt")).logits[0], -1).tolist() for t in TEXTS}


@pytest.fixture(scope="module")
def cls_server(tiny_model, tiny_classifier, reference_probs, tmp_path_factory):
    """The classifier server; versions ``cls-match`` / ``cls-shift`` serve the same folder, trained (per their
    dataset cards) on the label mix the model predicts on TEXTS / on a mix it hardly predicts."""
    from tuneloop.db import open_database
    from tuneloop.ids import hash_path
    from tuneloop.registry import DatasetRecord, ModelVersion, register_dataset, register_version

    predicted = Counter(LABELS[max(range(3), key=p.__getitem__)] for p in reference_probs.values())
    rare = min(LABELS, key=lambda x: (predicted[x], x))
    cards = {
        "cls-match": {x: 10 * predicted[x] for x in LABELS},
        "cls-shift": {x: (300 if x == rare else 3) for x in LABELS},
    }
    home = tmp_path_factory.mktemp("serve-cls")
    db = open_database(home / "tuneloop.duckdb")
    for name, labels in cards.items():
        register_dataset(
            db,
            DatasetRecord(
                id=f"{name}-data@0",
                name=f"{name}-data",
                content_hash="0",
                kind="classification",
                path=str(home / name),
                rows_train=sum(labels.values()),
                rows_validation=0,
                rows_test=0,
                card={"labels": labels, "label_names": LABELS},
            ),
        )
        register_version(
            db,
            ModelVersion(
                name=name,
                kind="merged",
                base_model=str(tiny_model),
                path=str(tiny_classifier),
                content_hash=hash_path(tiny_classifier),
                dataset_id=f"{name}-data@0",
                task="classification",
            ),
        )
    db.close()
    srv = start_server(home, tiny_classifier)
    yield srv
    srv.stop()


def classify(srv, body: dict, **kw) -> httpx.Response:
    return httpx.post(srv.url + "/v1/classify", json=body, timeout=120, **kw)


def test_single_input_answers_vllm_shape_with_transformers_probabilities(cls_server, reference_probs):
    text = TEXTS[0]
    r = classify(cls_server, {"model": "tiny-cls", "input": text})
    assert r.status_code == 200, r.text
    body = r.json()
    assert set(body) == {"id", "object", "created", "model", "data", "usage"}
    assert body["object"] == "list" and body["model"] == "tiny-cls"
    assert body["id"].startswith("classify-") and r.headers["x-request-id"] == body["id"]
    [item] = body["data"]
    assert item["index"] == 0 and item["num_classes"] == 3
    assert item["probs"] == pytest.approx(reference_probs[text], abs=1e-4)
    assert item["label"] == LABELS[max(range(3), key=reference_probs[text].__getitem__)]
    assert body["usage"]["prompt_tokens"] == body["usage"]["total_tokens"] > 0


def test_batched_inputs_are_answered_in_order_with_transformers_probabilities(cls_server, reference_probs):
    texts = TEXTS[:5]
    r = classify(cls_server, {"input": texts})  # no model: the served model
    assert r.status_code == 200, r.text
    data = r.json()["data"]
    assert [d["index"] for d in data] == list(range(5))
    for d, t in zip(data, texts):
        assert d["probs"] == pytest.approx(reference_probs[t], abs=1e-4)


def test_truncate_prompt_tokens_keeps_that_many_tokens(cls_server):
    full = classify(cls_server, {"input": TEXTS[1]}).json()["usage"]["prompt_tokens"]
    r = classify(cls_server, {"input": TEXTS[1], "truncate_prompt_tokens": 3})
    assert r.status_code == 200, r.text
    assert full > 3 and r.json()["usage"]["prompt_tokens"] == 3


@pytest.mark.parametrize("field", ["padding", "priority", "messages"])
def test_an_unknown_field_is_a_400_naming_it(cls_server, field):
    r = classify(cls_server, {"input": "hello", field: "x"})
    assert r.status_code == 400
    err = r.json()["error"]
    assert err["code"] == "unsupported_parameter" and err["param"] == field


@pytest.mark.parametrize("value", [[], "", 5, ["text", [1, 2]], [""]])
def test_bad_input_is_a_400_on_input(cls_server, value):
    r = classify(cls_server, {"input": value})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] in ("input", "input[0]")


def test_generating_routes_on_a_classifier_server_are_400(cls_server):
    chat = httpx.post(
        cls_server.url + "/v1/chat/completions",
        json={"model": "tiny-cls", "messages": [{"role": "user", "content": "hi"}]},
        timeout=60,
    )
    cmpl = httpx.post(cls_server.url + "/v1/completions", json={"model": "tiny-cls", "prompt": "hi"}, timeout=60)
    for r in (chat, cmpl):
        assert r.status_code == 400
        err = r.json()["error"]
        assert err["code"] == "model_is_classifier" and "/v1/classify" in err["message"]


def test_classify_on_a_chat_server_is_a_400_saying_how_to_serve_a_classifier(live_server):
    r = classify(live_server, {"model": live_server.base_name, "input": "hello"})
    assert r.status_code == 400
    err = r.json()["error"]
    assert err["code"] == "model_not_classifier" and "ForSequenceClassification" in err["message"]


def test_each_input_is_logged_with_its_label_scores_and_latency(cls_server):
    r = classify(cls_server, {"input": TEXTS[2:4], "user": "u-log"})
    rid = r.json()["id"]
    cls_server.flush_log()
    rows = {row["id"]: row for row in read_requests(cls_server.db_path, "user_id = ?", ["u-log"])}
    assert set(rows) == {f"{rid}-0", f"{rid}-1"}

    for i, d in enumerate(r.json()["data"]):
        row = rows[f"{rid}-{i}"]
        assert row["route"] == "classify" and row["status"] == 200 and row["model_version"] == "tiny-cls"
        assert json.loads(row["prompt"]) == TEXTS[2 + i]
        assert row["response"] == d["label"]
        assert json.loads(row["scores"]) == pytest.approx(dict(zip(LABELS, d["probs"])))
        assert row["latency_s"] > 0 and row["prompt_tokens"] > 0


def test_a_refused_classify_request_is_logged_with_its_error(cls_server):
    r = classify(cls_server, {"input": [], "user": "u-bad"})
    cls_server.flush_log()
    [row] = read_requests(cls_server.db_path, "id = ?", [r.headers["x-request-id"]])
    assert row["route"] == "classify" and row["status"] == 400 and row["scores"] is None


def test_metrics_count_each_prediction_by_label(cls_server):
    def predictions() -> float:
        text = httpx.get(cls_server.url + "/metrics", timeout=30).text
        return sum(
            float(line.rsplit(" ", 1)[1])
            for line in text.splitlines()
            if line.startswith("tuneloop_classify_predictions_total{") and 'model_version="tiny-cls"' in line
        )

    before = predictions()
    classify(cls_server, {"input": TEXTS[:3]})
    text = httpx.get(cls_server.url + "/metrics", timeout=30).text
    assert predictions() == before + 3
    assert 'tuneloop_classify_confidence_count{model_version="tiny-cls"}' in text


def test_the_openapi_document_lists_classify(cls_server):
    doc = httpx.get(cls_server.url + "/schema/openapi.json", timeout=30).json()
    assert "post" in doc["paths"]["/v1/classify"]
    assert "ClassificationRequest" in doc["components"]["schemas"]


def test_drift_flags_a_shifted_label_distribution_and_not_a_matching_one(cls_server):
    from tuneloop.db import open_database
    from tuneloop.monitoring.drift_job import DriftJob
    from tuneloop.settings import DriftSettings

    for version in ("cls-match", "cls-shift"):
        for start in range(0, len(TEXTS), 10):
            r = classify(cls_server, {"model": version, "input": TEXTS[start : start + 10]})
            assert r.status_code == 200 and r.json()["model"] == version, r.text
    cls_server.flush_log()
    registry = CollectorRegistry()
    job = DriftJob(open_database(cls_server.db_path), DriftSettings(min_requests=20, embeddings=False), registry)
    results = {v: job.run_once(v, "1h")[0] for v in ("cls-match", "cls-shift")}
    for res in results.values():
        assert res.skipped is None, res.skipped
        assert res.n_requests == len(TEXTS)
    shifted, matching = (
        results["cls-shift"].feature("label_distribution"),
        results["cls-match"].feature("label_distribution"),
    )
    assert shifted is not None and shifted.drifted and results["cls-shift"].drifted
    assert matching is not None and not matching.drifted and not results["cls-match"].drifted
    gauge = registry.get_sample_value(
        "tuneloop_drifted", {"feature": "label_distribution", "model_version": "cls-shift"}
    )
    assert gauge == 1.0
    assert registry.get_sample_value("tuneloop_drifted", {"feature": "overall", "model_version": "cls-match"}) == 0.0


def test_confidence_drift_compares_the_window_with_the_reference_window():
    """compare_classify without a server: a window whose confidences fell is drifted, one like its reference not."""
    import numpy as np

    from tuneloop.monitoring.drift import ClassifyStats, compare_classify
    from tuneloop.settings import DriftSettings

    rng = np.random.default_rng(0)
    settings = DriftSettings(min_requests=50)
    labels = {"a": 100, "b": 100}
    reference = rng.beta(8, 2, 500)

    def window(conf: np.ndarray):
        stats = ClassifyStats("v", len(conf), None, None, {"a": len(conf) // 2, "b": len(conf) - len(conf) // 2})
        stats.confidence, stats.reference_confidence = conf, reference
        return compare_classify(labels, stats, settings, "id")

    same, fell = window(rng.beta(8, 2, 300)), window(rng.beta(2, 2, 300))
    for res, drifted in ((same, False), (fell, True)):
        assert res.feature("confidence_psi").drifted is drifted
        assert res.feature("confidence_ks").drifted is drifted
        assert res.feature("label_distribution").drifted is False
