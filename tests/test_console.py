"""The web console (/ui) in a real browser: Debian's Chromium driven by Playwright against a live `tuneloop serve`.

One server for the module, over the tiny model, with a request log of **1,000,001+ rows** (a million old rows
written with DuckDB SQL before the server starts, then live traffic), an admin key (``ops``) and an inference key
(``alice``), version ``tiny-a`` in production and ``tiny-b`` its running canary. Screenshots of every page go to the
folder the tests print (``$TUNELOOP_TEST_ARTIFACTS/console``, default ``test-artifacts/console``).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from bench.console import seed_log
from tests.conftest import require_tool
from tests.fixtures_server import start_server

pytestmark = [pytest.mark.engine]

ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = Path(os.environ.get("TUNELOOP_TEST_ARTIFACTS") or ROOT / "test-artifacts") / "console"
OLD_ROWS = 1_000_000
WORDS = ["zebra", "quasar", "lantern", "walnut", "origami", "tundra", "saffron", "glacier"]


@pytest.fixture(scope="module")
def console(tiny_model, tiny_adapters, tmp_path_factory) -> Iterator[dict]:
    from tuneloop.dataset_store import save_dataset
    from tuneloop.db import open_database
    from tuneloop.ids import hash_path
    from tuneloop.monitoring import canary
    from tuneloop.registry import ModelVersion, register_version, save_eval_report, set_stage
    from tuneloop.server.auth import create_key

    home = tmp_path_factory.mktemp("console-home")
    db = open_database(home / "tuneloop.duckdb")
    seed_log(db, OLD_ROWS)  # a million old requests (8 to 38 days ago, outside the queue's window)
    for name, adapter in (("tiny-a", "a"), ("tiny-b", "b")):
        path = tiny_adapters[adapter]
        register_version(
            db,
            ModelVersion(
                name=name, kind="adapter", base_model=str(tiny_model), path=str(path), content_hash=hash_path(path)
            ),
        )
    set_stage(db, "tiny-a", "production")
    # an eval report comparing the two per example: tiny-b wins e1, loses e2, ties e3
    report = {
        "models": ["tiny-b", "tiny-a"],
        "example_ids": ["e1", "e2", "e3"],
        "summary": {"tiny-b": {"token_f1": 0.53}, "tiny-a": {"token_f1": 0.47}},
        "per_example": {"tiny-b": {"token_f1": [0.9, 0.2, 0.5]}, "tiny-a": {"token_f1": [0.5, 0.4, 0.5]}},
        "samples": [{"id": "e1", "prompt": "What is a zebra?", "reference": "A striped horse.",
                     "tiny-b": "A striped horse.", "tiny-a": "An animal."}],
    }  # fmt: skip
    save_eval_report(db, "report-1", None, ["tiny-b", "tiny-a"], report, None)
    rows = [
        {"id": f"r{i}", "messages": [{"role": "user", "content": f"What is fact {i}?"},
                                      {"role": "assistant", "content": f"Fact {i}."}],
         "request_id": None, "origin": "file"}
        for i in range(3)
    ]  # fmt: skip
    facts = save_dataset(db, home, "facts", {"train": rows, "validation": [], "test": []}, "sft", {}, {})
    c = canary.start(db, "tiny-b", 0.5, actor="test")
    _, admin = create_key(db, "admin", "ops")
    _, alice = create_key(db, "inference", "alice")
    srv = start_server(home, tiny_model, env={"TUNELOOP_UI__QUEUE_SAMPLE_SHARE": "1"})
    try:
        client = srv.openai(api_key=alice)
        ids = []
        for i, w in enumerate(WORDS):
            r = client.chat.completions.with_raw_response.create(
                model="production",
                messages=[{"role": "user", "content": f"Tell me about the {w}, please."}],
                max_tokens=6,
                user=f"user-{i % 3}",
            )
            ids.append(r.headers["x-request-id"])
        # a user's thumbs-down through the API: the queue's first rule puts it first
        r = httpx.post(
            srv.url + "/v1/feedback",
            json={"request_id": ids[0], "rating": "down"},
            headers={"Authorization": f"Bearer {alice}"},
        )
        assert r.status_code == 201, r.text
        srv.flush_log({"Authorization": f"Bearer {admin}"})
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        print(f"\nconsole screenshots and timings: {ARTIFACTS}")
        yield {
            "server": srv,
            "db": db,
            "admin": admin,
            "alice": alice,
            "ids": ids,
            "canary": c.id,
            "home": home,
            "dataset": facts.id,
        }
    finally:
        srv.stop()


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    exe = require_tool("chromium")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=exe, args=["--no-sandbox", "--disable-dev-shm-usage"])
        yield b
        b.close()


class Session:
    """A browser context signed in (or not) to the console, collecting console errors and uncaught exceptions."""

    def __init__(self, browser, base: str):
        self.context = browser.new_context(viewport={"width": 1300, "height": 900})
        self.page = self.context.new_page()
        self.base = base
        self.errors: list[str] = []
        self.page.on(
            "console", lambda m: self.errors.append(f"{self.page.url}: {m.text}") if m.type == "error" else None
        )
        self.page.on("pageerror", lambda e: self.errors.append(f"{self.page.url}: {e}"))

    def go(self, path: str):
        return self.page.goto(self.base + path)

    def sign_in(self, key: str) -> None:
        self.go("/ui/login")
        self.page.get_by_label("API key").fill(key)
        self.page.get_by_role("button", name="Sign in").click()
        self.page.wait_for_url(re.compile(r".*/ui$"))

    def shot(self, name: str) -> None:
        self.page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)

    def close(self) -> None:
        self.context.close()


@pytest.fixture
def session(console, browser) -> Iterator[Session]:
    s = Session(browser, console["server"].url)
    yield s
    s.close()


def test_the_console_asks_for_a_key_refuses_a_wrong_one_and_keeps_only_an_httponly_strict_session(console, session):
    resp = session.go("/ui/traffic")
    assert session.page.url.startswith(console["server"].url + "/ui/login")  # redirected, asked to sign in
    assert resp is not None and resp.status == 200
    session.page.get_by_label("API key").fill("tl-this-is-not-a-key")
    session.page.get_by_role("button", name="Sign in").click()
    assert session.page.get_by_role("alert").inner_text().startswith("Incorrect or revoked API key")
    session.sign_in(console["alice"])
    assert session.page.get_by_role("heading", level=1).inner_text() == "Overview"
    cookies = {c["name"]: c for c in session.context.cookies()}
    sess = cookies["tuneloop_session"]
    assert sess["httpOnly"] and sess["sameSite"] == "Strict" and sess["path"] == "/ui"
    assert cookies["tuneloop_csrf"]["httpOnly"] and cookies["tuneloop_csrf"]["sameSite"] == "Strict"
    assert console["alice"] not in sess["value"] and console["alice"] not in session.page.content()
    # the key never reaches the server's log either
    assert console["alice"] not in console["server"].output()
    session.page.get_by_role("button", name="Sign out").click()
    session.page.wait_for_url(re.compile(r".*/ui/login$"))
    session.go("/ui/queue")
    assert "/ui/login" in session.page.url


def test_traffic_filters_by_text_version_and_rating_and_opens_a_request_with_its_lineage(console, session):
    session.sign_in(console["alice"])
    session.go("/ui/traffic")
    total = int(session.page.locator("#count").inner_text().split()[0])
    assert total >= OLD_ROWS + len(WORDS)
    session.page.get_by_label("Search").fill("quasar")
    session.page.get_by_role("button", name="Filter").click()
    assert session.page.locator("#count").inner_text().startswith("1 request matches")
    rows = session.page.locator("table.traffic tbody tr")
    assert rows.count() == 1 and "quasar" in rows.first.inner_text()
    session.shot("traffic-filtered")
    # the rating filter: exactly the request the user gave a thumbs-down
    session.go("/ui/traffic?rating=down")
    assert session.page.locator("#count").inner_text().startswith("1 request matches")
    # by version: the million old rows are all tiny-a's, keyset paging goes to an older page
    session.go("/ui/traffic?version=tiny-a&user=user-5")
    first = session.page.locator("table.traffic tbody tr td a").first.inner_text()
    session.page.get_by_role("link", name="Older →").click()
    assert session.page.locator("table.traffic tbody tr td a").first.inner_text() < first
    # open the quasar request
    session.go("/ui/traffic?q=quasar")
    session.page.locator("table.traffic tbody tr td a").first.click()
    session.page.wait_for_url(re.compile(r".*/ui/requests/"))
    body = session.page.locator("main").inner_text()
    assert "Tell me about the quasar, please." in body
    assert re.search(r"Version\s+tiny-[ab]", body) and re.search(r"\d+ prompt, \d+ completion", body)
    session.page.get_by_role("link", name=re.compile(r"^tiny-[ab]$")).first.click()
    assert session.page.get_by_role("heading", level=1).inner_text().startswith("Version tiny-")
    assert not session.errors, session.errors


def test_three_reviews_from_the_queue_become_reviewer_feedback_that_the_next_feedback_sample_uses(
    console, session, cli
):
    session.sign_in(console["alice"])
    session.go("/ui/queue")
    page = session.page
    items = page.locator("[data-item]")
    assert items.count() >= 3
    # the thumbs-down from the API comes first, by the first rule
    assert "thumbs_down" in items.first.locator("h2").inner_text()
    first_id = items.nth(0).locator("form").get_attribute("action").rsplit("/", 1)[-1]
    assert first_id == console["ids"][0]
    progress = page.locator("progress")
    total = int(progress.get_attribute("max"))
    # item 1, by keyboard only: thumbs down, edit the correction (the diff shows it), save
    page.keyboard.press("d")
    page.keyboard.press("e")
    page.keyboard.press("Control+a")
    page.keyboard.type("A zebra is a striped African horse.")
    diff = items.first.locator(".diff")
    assert "zebra" in diff.locator("ins").all_inner_texts()
    with page.expect_navigation():
        page.keyboard.press("Control+Enter")
    assert progress.get_attribute("value") == "1"
    # item 2: 4 stars; item 3: thumbs up (the page reloads with the reviewed item gone)
    second_id = items.nth(0).locator("form").get_attribute("action").rsplit("/", 1)[-1]
    page.keyboard.press("4")
    with page.expect_navigation():
        page.keyboard.press("s")
    third_id = items.nth(0).locator("form").get_attribute("action").rsplit("/", 1)[-1]
    page.keyboard.press("u")
    with page.expect_navigation():
        page.keyboard.press("s")
    assert progress.get_attribute("value") == "3" and int(progress.get_attribute("max")) == total
    session.shot("queue-after-three-reviews")
    assert not session.errors, session.errors

    fb = {
        r["request_id"]: r
        for r in console["db"].query("SELECT * FROM feedback WHERE source = 'review:alice' ORDER BY created_at")
    }
    assert set(fb) == {first_id, second_id, third_id}
    assert (fb[first_id]["rating"], fb[first_id]["rating_kind"]) == (-1, "thumbs")
    assert fb[first_id]["correction"] == "A zebra is a striped African horse."
    assert (fb[second_id]["rating"], fb[second_id]["rating_kind"], fb[second_id]["correction"]) == (4, "stars", None)
    assert (fb[third_id]["rating"], fb[third_id]["rating_kind"]) == (1, "thumbs")
    done = console["db"].query(
        "SELECT request_id FROM review_assignments WHERE reviewer = 'alice' AND reviewed_at IS NOT NULL"
    )
    assert {r["request_id"] for r in done} == {first_id, second_id, third_id}

    # the next `feedback sample` trains on the reviewer's correction and keeps the pair for DPO
    env_home = console["home"]
    out = cli("--home", str(env_home), "feedback", "sample", "--name", "reviewed", "--window", "1h", "--json")
    from tuneloop.dataset_store import load_splits

    splits = load_splits(console["db"], "reviewed")
    answers = [row["messages"][-1]["content"] for split in splits.values() for row in split]
    assert "A zebra is a striped African horse." in answers, out.stdout
    pref = load_splits(console["db"], "reviewed-pref")
    chosen = [row["chosen"] for split in pref.values() for row in split]
    assert "A zebra is a striped African horse." in [c[-1]["content"] if isinstance(c, list) else c for c in chosen]


def test_an_admin_promotes_the_canary_from_its_page_and_an_inference_key_cannot(console, browser):
    alice = Session(browser, console["server"].url)
    alice.sign_in(console["alice"])
    alice.go("/ui/canary")
    assert alice.page.get_by_role("button", name=re.compile("^Promote")).count() == 0
    assert "need an admin key" in alice.page.locator("main").inner_text()
    # even a hand-made form with a valid CSRF token is refused
    alice.page.evaluate(
        """([id]) => { const f = document.createElement('form'); f.method = 'post'; f.action = '/ui/canary/promote';
           for (const [k, v] of [['canary_id', id], ['_csrf_token', document.querySelector('input[name=_csrf_token]').value]]) {
             const i = document.createElement('input'); i.type = 'hidden'; i.name = k; i.value = v; f.appendChild(i); }
           document.body.appendChild(f); f.submit(); }""",
        [console["canary"]],
    )
    alice.page.wait_for_load_state()
    assert "Only an admin may do this" in alice.page.get_by_role("alert").inner_text()
    from tuneloop.registry import get_version

    assert get_version(console["db"], "tiny-b").stage == "canary"
    alice.close()

    ops = Session(browser, console["server"].url)
    ops.sign_in(console["admin"])
    ops.go("/ui/canary")
    assert "The judge now:" in ops.page.locator("main").inner_text()
    # the arms' numbers are live: twelve more requests (twelve users, so both arms get some) show up on the open
    # page without a reload, and the judge's reasons follow
    cell = "document.querySelector('[data-live-key=\"arms.{}.requests\"]').textContent"
    both = f"(+{cell.format('canary')} + +{cell.format('production')})"
    before = ops.page.evaluate(f"() => {both}")
    client = console["server"].openai(api_key=console["alice"])
    for i in range(12):
        client.chat.completions.create(
            model="production", messages=[{"role": "user", "content": f"live {i}"}], max_tokens=4, user=f"live-{i}"
        )
    console["server"].flush_log({"Authorization": f"Bearer {console['admin']}"})
    ops.page.wait_for_function(f"() => {both} === {before + 12}", timeout=30_000)
    n_canary = ops.page.evaluate(f"() => +{cell.format('canary')}")
    expected = f"canary has {n_canary}/" if n_canary else "no canary traffic yet"
    ops.page.wait_for_function(
        f"() => document.querySelector('[data-live-list=reasons]').textContent.includes({json.dumps(expected)})",
        timeout=30_000,
    )
    ops.shot("canary-before-promote")
    dialogs: list[str] = []
    answers = ["dismiss", "accept"]  # the first confirmation is cancelled, the second accepted

    def on_dialog(d) -> None:
        dialogs.append(d.message)
        d.dismiss() if answers.pop(0) == "dismiss" else d.accept()

    ops.page.on("dialog", on_dialog)
    ops.page.get_by_role("button", name="Promote tiny-b").click()
    assert dialogs and dialogs[0].startswith("Promote tiny-b to production?")
    assert get_version(console["db"], "tiny-b").stage == "canary"  # cancelled: nothing happened
    ops.page.get_by_label("Reason").first.fill("looks good in the console")
    with ops.page.expect_navigation():
        ops.page.get_by_role("button", name="Promote tiny-b").click()
    assert len(dialogs) == 2
    assert get_version(console["db"], "tiny-b").stage == "production"
    ev = console["db"].query(
        "SELECT actor, reason FROM deploy_events WHERE model_version = 'tiny-b' AND to_stage = 'production'"
    )
    assert ev == [{"actor": "console:ops", "reason": "looks good in the console"}]
    assert "No canary is running" in ops.page.locator("main").inner_text()
    assert not ops.errors, ops.errors
    ops.close()


def test_a_form_without_the_csrf_token_is_refused_and_changes_nothing(console, session):
    session.sign_in(console["alice"])
    cookies = {c["name"]: c["value"] for c in session.context.cookies()}
    rid = console["ids"][-1]
    r = httpx.post(
        console["server"].url + f"/ui/review/{rid}",
        data={"rating": "down", "correction": "forged"},
        cookies={"tuneloop_session": cookies["tuneloop_session"]},
    )
    assert r.status_code == 403 and "CSRF" in r.text
    assert console["db"].query("SELECT * FROM feedback WHERE correction = 'forged'") == []


def test_every_page_renders_without_console_errors_and_the_traffic_pages_first_paint_on_a_million_rows_is_reported(
    console, session
):
    session.sign_in(console["admin"])
    ids = console["ids"]
    # the traffic page's first paint on the 1M-row log, from the browser's own paint timing (reported, not asserted)
    paint = """() => new Promise((done) => new PerformanceObserver((list, obs) => {
                 const fcp = list.getEntriesByName('first-contentful-paint')[0];
                 if (!fcp) return;
                 obs.disconnect();
                 const nav = performance.getEntriesByType('navigation')[0];
                 done({fcp: fcp.startTime, ttfb: nav.responseStart, response_end: nav.responseEnd});
               }).observe({type: 'paint', buffered: true}))"""

    def first_paints(path: str) -> list[dict]:
        out = []
        for _ in range(3):
            session.go(path)
            out.append(session.page.evaluate(paint))
        return out

    full, recent = first_paints("/ui/traffic"), first_paints("/ui/traffic?since=1h")
    best = min(t["fcp"] for t in full)
    baseline = min(t["fcp"] for t in recent)
    report = {
        "log_rows": OLD_ROWS + len(ids),
        "traffic_page": full,
        "baseline_last_hour_only": recent,
        "first_paint_ms": best,
        "baseline_first_paint_ms": baseline,
        "ratio": best / baseline,
        "target_ms": 1000,
    }
    (ARTIFACTS / "traffic-first-paint.json").write_text(json.dumps(report, indent=1))
    print(f"\ntraffic page on {report['log_rows']} rows: first contentful paint {best:.0f} ms "
          f"(runs {[round(t['fcp']) for t in full]}); the last hour only ({len(ids)} rows): {baseline:.0f} ms; "
          f"ratio {best / baseline:.2f}x; target <= 1000 ms")  # fmt: skip
    assert all(t["fcp"] > 0 for t in full + recent)  # the browser painted the page each time

    pages = {
        "overview": "/ui",
        "traffic": "/ui/traffic",
        "request": f"/ui/requests/{ids[1]}",
        "queue": "/ui/queue",
        "datasets": "/ui/datasets",
        "runs": "/ui/runs",
        "versions": "/ui/versions",
        "version": "/ui/versions/tiny-a",
        "canary": "/ui/canary",
        "drift": "/ui/drift",
        "compare": "/ui/compare?report=report-1&a=tiny-b&b=tiny-a",
    }
    for name, path in pages.items():
        resp = session.go(path)
        assert resp is not None and resp.status == 200, (path, resp and resp.status)
        assert session.page.locator("h1").count() == 1, path
        session.shot(name)
    # the per-example comparison from the version page's eval report: wins, losses and ties, losses first
    session.go("/ui/versions/tiny-b")
    session.page.get_by_role("link", name="compare per example").click()
    body = session.page.locator("main").inner_text()
    assert "1 wins · 1 losses · 1 ties for tiny-b on token_f1" in body
    verdicts = session.page.locator("table tbody tr td:nth-child(5)").all_inner_texts()
    assert verdicts == ["loss", "tie", "win"]
    # a dataset's page: its rows are browsable
    assert session.go(f"/ui/datasets/{console['dataset']}").status == 200
    assert "What is fact 2?" in session.page.locator("main").inner_text()
    session.shot("dataset")
    assert not session.errors, session.errors
    # a bad filter is a 400 page that says why, not a 500 (the browser logs the 400 itself)
    assert session.go("/ui/traffic?since=yesterday-ish").status == 400
    assert "since: bad time" in session.page.get_by_role("alert").inner_text()
    shots = sorted(p.name for p in ARTIFACTS.glob("*.png"))
    assert {f"{n}.png" for n in pages} <= set(shots)


def test_the_annotation_page_is_labelled_and_keyboard_operable(console, session):
    session.sign_in(console["alice"])  # she still holds open items after her three reviews
    session.go("/ui/queue")
    page = session.page
    assert page.locator("html").get_attribute("lang") == "en"
    assert page.locator("main#main").count() == 1 and page.locator("a.skip[href='#main']").count() == 1
    unlabelled = page.evaluate(
        """() => Array.from(document.querySelectorAll('main input:not([type=hidden]), main textarea, main select'))
             .filter(el => !(el.labels && el.labels.length) && !el.getAttribute('aria-label')).map(el => el.outerHTML)"""
    )
    assert unlabelled == []
    names = page.evaluate(
        "() => Array.from(document.querySelectorAll('main button')).map(b => b.innerText.trim()).filter(t => !t)"
    )
    assert names == []  # every button has a visible name
    assert page.locator("[data-item]").count() >= 2
    assert page.evaluate("() => document.activeElement === document.querySelectorAll('[data-item]')[0]")
    page.keyboard.press("j")
    assert page.evaluate("() => document.activeElement === document.querySelectorAll('[data-item]')[1]")
    page.keyboard.press("k")
    assert page.evaluate("() => document.activeElement === document.querySelectorAll('[data-item]')[0]")
    page.keyboard.press("3")  # a shortcut rates the focused item, and Escape leaves the editor
    assert page.locator("[data-item]").first.locator("input[name=rating][value='3']").is_checked()
    page.keyboard.press("e")
    assert page.evaluate("() => document.activeElement.tagName") == "TEXTAREA"
    page.keyboard.press("Escape")
    assert page.evaluate("() => document.activeElement === document.querySelectorAll('[data-item]')[0]")
    # on a page without a queue, Tab from the top reaches the skip link first, then the navigation
    session.go("/ui/traffic")
    page.keyboard.press("Tab")
    assert page.evaluate("() => document.activeElement.className") == "skip"
    page.keyboard.press("Tab")
    assert page.evaluate("() => document.activeElement.textContent") == "tuneloop"
    assert not session.errors, session.errors
