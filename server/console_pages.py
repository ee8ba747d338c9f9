"""The web console's pages (GET): overview, traffic, request, annotation queue, datasets, runs, versions, canary,
drift — server-rendered Jinja templates (``server/templates/console``), charts as inline SVG
(:mod:`tuneloop.monitoring.charts`).

Contract
--------
* Every page reads through :mod:`tuneloop.store_console` in a worker thread (the event loop never waits
  on the database) and renders one template with the common context (:func:`page`): the visitor, whether they are
  an admin, the CSRF form field, and a ``text`` filter that scrubs PII for display when ``log.scrub_pii`` is on
  (rows logged before the setting was turned on are shown scrubbed too).
* The drift page's topic clusters are k-means over the drift job's sentence embeddings (all-MiniLM-L6-v2, loaded
  on first use) when ``drift.embeddings`` is on, else over hashed bag-of-words vectors.
* Bad query parameters (an unparsable time, an unknown dataset) are a 400 / 404 error page, never a 500.
* ``GET /ui/api/live`` is the JSON the overview polls every few seconds
  (:class:`tuneloop.server.console_live.LiveStats`); ``GET /ui/api/canary`` the running canary's arms and the
  judge's decision, which the canary page polls.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Annotated, Any, TypeVar

from litestar import Controller, Request, get
from litestar.params import FromPath, FromQuery, QueryParameter
from litestar.response import Redirect, Template

from tuneloop import store_console as q
from tuneloop.db import Database
from tuneloop.errors import UserError
from tuneloop.monitoring import charts
from tuneloop.monitoring.likeness import prompt_clusters, user_text
from tuneloop.server.console_auth import (
    ConsoleError,
    is_admin,
    principal_of,
    reviewer_of,
    safe_next,
    session_principal,
)
from tuneloop.timeparse import parse_time

T = TypeVar("T")


async def run(fn: Callable[..., T], *args: Any) -> T:
    """``fn(*args)`` in a worker thread."""
    return await asyncio.to_thread(fn, *args)


def page(request: Request[Any, Any, Any], name: str, nav: str, **context: Any) -> Template:
    """Render ``console/<name>`` with the common context (see module doc)."""
    p = principal_of(request)
    return Template(
        template_name=f"console/{name}",
        context={
            "nav": nav,
            "principal": p,
            "reviewer": reviewer_of(p),
            "admin": is_admin(request),
            "redacted": request.app.state.settings.log.redact_prompts,
            **context,
        },
    )


def _db(request: Request[Any, Any, Any]) -> Database:
    db: Database = request.app.state.db
    return db


def _time(value: str, name: str) -> Any:
    if not value:
        return None
    try:
        return parse_time(value)
    except UserError as e:
        raise ConsoleError(400, f"{name}: {e}") from None


def _svg(chart: Any) -> str:
    return charts.svg(chart)


class ConsolePages(Controller):
    """GET pages of the console."""

    path = "/"
    include_in_schema = False

    @get("/login", opt={"public": True})
    async def login_form(
        self, request: Request, target: Annotated[str, QueryParameter(name="next")] = "/ui"
    ) -> Template | Redirect:
        """The sign-in form; a visitor who needs none (signed in already, or no key exists) goes on to ``next``."""
        if await session_principal(request) is not None:
            return Redirect(safe_next(target), status_code=303)
        return Template(
            template_name="console/login.html",
            context={"nav": "login", "principal": None, "next": safe_next(target), "error": None},
        )

    @get("/")
    async def overview(self, request: Request) -> Template:
        data = await run(q.overview, _db(request))
        live = request.app.state.console_live.read()
        return page(request, "overview.html", "overview", data=data, live=live)

    @get("/api/live", media_type="application/json")
    async def live(self, request: Request) -> dict[str, Any]:
        out: dict[str, Any] = request.app.state.console_live.read()
        return out

    # -- traffic ---------------------------------------------------------------------------------------
    @get("/traffic")
    async def traffic(
        self,
        request: Request,
        version: FromQuery[str] = "",
        route: FromQuery[str] = "",
        status: FromQuery[str] = "",
        since: FromQuery[str] = "",
        until: FromQuery[str] = "",
        rating: FromQuery[str] = "",
        user: FromQuery[str] = "",
        text: Annotated[str, QueryParameter(name="q")] = "",
        before: FromQuery[str] = "",
    ) -> Template:
        flt = q.TrafficFilter(
            version=version.strip(),
            route=route.strip(),
            status=status.strip(),
            since=_time(since.strip(), "since"),
            until=_time(until.strip(), "until"),
            rating=rating.strip() if rating.strip() in q.RATINGS else "",
            user=user.strip(),
            q=text.strip(),
        )
        cursor = q.parse_cursor(before) if before else None
        if before and cursor is None:
            raise ConsoleError(400, f"before: {before!r} is not a page cursor")
        db = _db(request)
        size = request.app.state.settings.ui.page_size
        (rows, nxt), total, choices = await asyncio.gather(
            run(q.traffic_page, db, flt, size, cursor), run(q.traffic_count, db, flt), run(q.traffic_choices, db)
        )
        args = {
            k: v
            for k, v in {
                "version": version,
                "route": route,
                "status": status,
                "since": since,
                "until": until,
                "rating": rating,
                "user": user,
                "q": text,
            }.items()
            if v
        }
        return page(
            request,
            "traffic.html",
            "traffic",
            rows=rows,
            next_cursor=nxt,
            total=total,
            args=args,
            choices=choices,
            ratings=q.RATINGS,
            statuses=list(q.STATUS_CLASSES),
            first_page=cursor is None,
        )

    @get("/requests/{request_id:str}")
    async def request_page(self, request: Request, request_id: FromPath[str]) -> Template:
        detail = await run(q.request_detail, _db(request), request_id)
        if detail is None:
            raise ConsoleError(404, f"No logged request has id {request_id!r}.")
        return page(request, "request.html", "traffic", d=detail, r=detail["request"])

    # -- annotation queue --------------------------------------------------------------------------------
    @get("/queue")
    async def queue(self, request: Request) -> Template:
        from tuneloop import store_review

        reviewer = reviewer_of(principal_of(request))
        db = _db(request)
        assigned = await run(request.app.state.console_queue.fill, reviewer)
        items, progress = await asyncio.gather(
            run(store_review.open_items, db, reviewer), run(store_review.progress, db, reviewer)
        )
        return page(
            request,
            "queue.html",
            "queue",
            items=items,
            progress=progress,
            assigned_now=assigned,
            rules=request.app.state.settings.ui.queue_rules,
        )

    # -- datasets -------------------------------------------------------------------------------------------
    @get("/datasets")
    async def datasets(self, request: Request) -> Template:
        rows = await run(q.datasets, _db(request))
        return page(request, "datasets.html", "datasets", rows=rows)

    @get("/datasets/{dataset_id:str}")
    async def dataset(
        self, request: Request, dataset_id: FromPath[str], split: FromQuery[str] = "train", offset: FromQuery[int] = 0
    ) -> Template:
        from tuneloop.registry import RegistryError, get_dataset

        db = _db(request)
        try:
            rec = await run(get_dataset, db, dataset_id)
        except RegistryError:
            raise ConsoleError(404, f"No dataset {dataset_id!r}.") from None
        size = request.app.state.settings.ui.page_size
        offset = max(0, offset)
        rows, n = await run(q.dataset_rows, db, rec.id, split, offset, size)
        return page(request, "dataset.html", "datasets", ds=rec, split=split, rows=rows, n=n, offset=offset, size=size)

    # -- runs -------------------------------------------------------------------------------------------------
    @get("/runs")
    async def runs(self, request: Request) -> Template:
        rows = await run(q.runs, _db(request))
        return page(request, "runs.html", "runs", rows=rows)

    @get("/runs/compare")
    async def compare_runs(self, request: Request, a: FromQuery[str], b: FromQuery[str]) -> Template:
        db = _db(request)
        ra, rb = await asyncio.gather(run(q.run_detail, db, a), run(q.run_detail, db, b))
        if ra is None or rb is None:
            raise ConsoleError(404, f"No run {a if ra is None else b!r}.")
        points = [{**h, "run": f"{r['id'][-8:]} ({r['method']})"} for r in (ra, rb) for h in r["history"]]
        chart = _svg(charts.line(points, "step", "loss", title="training loss", color="run", x_type="quantitative"))
        keys = sorted(set(ra["config"]) | set(rb["config"]))
        diff = [(k, ra["config"].get(k), rb["config"].get(k)) for k in keys]
        mkeys = sorted(set(ra["metrics"]) | set(rb["metrics"]))
        return page(
            request,
            "run_compare.html",
            "runs",
            a=ra,
            b=rb,
            chart=chart if points else None,
            diff=diff,
            metrics=[(k, ra["metrics"].get(k), rb["metrics"].get(k)) for k in mkeys],
        )

    @get("/runs/{run_id:str}")
    async def run_page(self, request: Request, run_id: FromPath[str]) -> Template:
        r = await run(q.run_detail, _db(request), run_id)
        if r is None:
            raise ConsoleError(404, f"No run {run_id!r}.")
        chart = None
        if r["history"]:
            chart = _svg(charts.line(r["history"], "step", "loss", title="training loss", x_type="quantitative"))
        others = [x for x in await run(q.runs, _db(request)) if x["id"] != run_id]
        return page(request, "run.html", "runs", r=r, chart=chart, others=others)

    # -- versions ------------------------------------------------------------------------------------------------
    @get("/versions")
    async def versions(self, request: Request) -> Template:
        rows = await run(q.versions, _db(request))
        return page(request, "versions.html", "versions", rows=rows)

    @get("/versions/{name:str}")
    async def version(self, request: Request, name: FromPath[str]) -> Template:
        d = await run(q.version_detail, _db(request), name)
        if d is None:
            raise ConsoleError(404, f"No model version {name!r}.")
        return page(request, "version.html", "versions", d=d, v=d["version"])

    @get("/compare")
    async def compare(
        self,
        request: Request,
        report: FromQuery[str],
        a: FromQuery[str],
        b: FromQuery[str],
        metric: FromQuery[str] = "",
    ) -> Template:
        c = await run(q.compare_eval, _db(request), report, a, b, metric or None)
        if c is None:
            raise ConsoleError(404, f"Eval report {report!r} has no per-example results for both {a!r} and {b!r}.")
        return page(request, "compare.html", "versions", c=c)

    # -- canary ---------------------------------------------------------------------------------------------------
    @get("/canary")
    async def canary(self, request: Request) -> Template:
        from tuneloop.monitoring import canary as canary_mod
        from tuneloop.store_deploy import running_canary

        db = _db(request)
        c = await run(running_canary, db)
        decision = None
        if c is not None:
            decision = await run(canary_mod.judge, db, c.id, request.app.state.settings.deploy)
        recent = await run(q.recent_canaries, db)
        return page(request, "canary.html", "canary", c=c, decision=decision, recent=recent)

    @get("/api/canary", media_type="application/json")
    async def canary_live(self, request: Request) -> dict[str, Any]:
        """The running canary's arms and the judge's decision now (the canary page polls it); ``running`` false
        when there is none."""
        from dataclasses import asdict

        from tuneloop.monitoring import canary as canary_mod
        from tuneloop.store_deploy import running_canary

        db = _db(request)
        c = await run(running_canary, db)
        if c is None:
            return {"running": False}
        d = await run(canary_mod.judge, db, c.id, request.app.state.settings.deploy)
        return {
            "running": True,
            "id": c.id,
            "action": d.action,
            "reasons": d.reasons,
            "arms": {k: asdict(v) for k, v in d.arms.items()},
        }

    # -- drift ------------------------------------------------------------------------------------------------------
    @get("/drift")
    async def drift(self, request: Request, version: FromQuery[str] = "") -> Template:
        db = _db(request)
        versions = await run(q.drift_versions, db)
        if not version and versions:
            from tuneloop.registry import version_by_stage

            prod = await run(version_by_stage, db, "production")
            version = prod.name if prod is not None and prod.name in versions else versions[-1]
        series: list[q.DriftSeries] = []
        last: dict[str, Any] | None = None
        chart_svgs: dict[str, str] = {}
        clusters: list[dict[str, Any]] = []
        if version:
            series, last = await run(q.drift_history, db, version)
            for s in series:
                if s.points:
                    chart_svgs[s.feature] = _svg(
                        charts.line(
                            s.points,
                            "at",
                            "value",
                            title=f"{s.feature} ({s.statistic})",
                            threshold=s.threshold,
                            y_title=s.statistic,
                            x_title="computed at",
                            width=420,
                            height=140,
                        )
                    )
            prompts = [user_text(p) for p in await run(q.recent_prompts, db, version, 400)]
            reference = await run(request.app.state.console_queue.reference, version)
            vectors = request.app.state.console_embedder if request.app.state.settings.drift.embeddings else None
            clusters = await run(prompt_clusters, prompts, reference, 6, 0, vectors)
        return page(
            request,
            "drift.html",
            "drift",
            versions=versions,
            version=version,
            series=series,
            last=last,
            charts=chart_svgs,
            clusters=clusters,
            embeddings=request.app.state.settings.drift.embeddings,
        )
