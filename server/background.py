"""Background work the live server runs beside inference: drift monitoring and the canary judge.

Contract: :func:`start_background` starts, on the running event loop,
* the drift job (``tuneloop.monitoring.drift_job.DriftJob``) every ``drift.interval_s``
  seconds (first pass after one interval), exporting ``tuneloop_drift_score`` /
  ``tuneloop_drifted`` on the app's registry and writing ``drift_reports``;
* the canary judge every ``deploy.canary_judge_interval_s`` seconds: when a
  canary is running it is judged (``tuneloop.monitoring.canary.judge``) and, once the
  decision is promote or rollback, the decision is applied atomically and the
  router re-reads deploy state at once, so the server decides by itself.
Heavy work runs in threads; a failed pass is logged and retried next interval.
Both stop when the returned event is set; :func:`stop_background` awaits them.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    from prometheus_client import CollectorRegistry

    from tuneloop.db import Database
    from tuneloop.monitoring.canary import Decision
    from tuneloop.monitoring.drift_job import DriftJob
    from tuneloop.server.routing import ModelRouter
    from tuneloop.settings import DeploySettings, Settings

log = logging.getLogger("tuneloop.server")


async def _canary_loop(db: Database, deploy: DeploySettings, router: ModelRouter, stop: asyncio.Event) -> None:
    from tuneloop.monitoring import canary

    interval = deploy.canary_judge_interval_s
    while not stop.is_set():
        try:
            await asyncio.wait_for(stop.wait(), timeout=interval)
            return
        except TimeoutError:
            pass
        try:

            def judge_once() -> Decision | None:
                run = canary.running(db, task=router.task)  # this server judges the canary of its own task
                if run is None:
                    return None
                decision = canary.judge(db, run.id, deploy)
                if decision.action == "wait":
                    return None
                canary.apply(db, decision, actor="server-canary-judge")
                return decision

            decision = await asyncio.to_thread(judge_once)
            if decision is not None:
                log.info("canary %s: %s (%s)", decision.canary_id, decision.action, "; ".join(decision.reasons))
                await router.refresh(force=True)
        except canary.CanaryDecided as e:  # another replica (or the CLI) decided it first: nothing to do here
            log.info("%s", e)
            await router.refresh(force=True)
        except Exception:
            log.exception("canary judge pass failed")


async def _drift_loop(job: DriftJob, interval: float, stop: asyncio.Event) -> None:
    try:
        await asyncio.wait_for(stop.wait(), timeout=interval)
        return
    except TimeoutError:
        pass
    await job.run_forever(stop)


def start_background(
    settings: Settings, db: Database, registry: CollectorRegistry, router: ModelRouter
) -> tuple[asyncio.Event, list[asyncio.Task[None]]]:
    stop = asyncio.Event()
    tasks: list[asyncio.Task[None]] = []
    if settings.drift.interval_s > 0:
        from tuneloop.monitoring.drift_job import DriftJob

        job = DriftJob(db, settings.drift, registry)
        tasks.append(asyncio.create_task(_drift_loop(job, settings.drift.interval_s, stop), name="tuneloop-drift"))
    if settings.deploy.canary_judge_interval_s > 0:
        tasks.append(asyncio.create_task(_canary_loop(db, settings.deploy, router, stop), name="tuneloop-canary-judge"))
    return stop, tasks


async def stop_background(stop: asyncio.Event, tasks: list[asyncio.Task[None]]) -> None:
    stop.set()
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
