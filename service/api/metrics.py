"""`/metrics` in the Prometheus text format, and the HTTP metrics and log line of each request.

Open where keys are optional (loopback); an admin key where they are required (the blueprint
is an admin one in service/api/auth.py). Each request gets a request id (a valid
X-Request-ID from the caller, else a new one), bound to its log lines and enqueued tasks and
returned in the response's X-Request-ID header.
"""

from __future__ import annotations

import logging
import time

from flask import Blueprint, Flask, Response, current_app, g, request
from spectree import Response as Resp

from service import logs
from service.api.openapi import spec
from service.api.schemas import ErrorResponse
from service.gauges import InventoryCollector, QueueDepthCollector
from service.metrics import HTTP_DURATION, HTTP_REQUESTS, render

bp = Blueprint("metrics", __name__)
log = logging.getLogger("service.api.requests")

UNMATCHED = "unmatched"  # 404s and 405s: no URL rule, and raw paths would be unbounded
QUIET_ENDPOINTS = frozenset({"health.healthz", "health.readyz", "metrics.metrics"})


def _collectors(app: Flask) -> list[object]:
    """The scrape-time collectors of this process, made on first use."""
    collectors = app.extensions.get("metrics_collectors")
    if collectors is None:
        conf = app.extensions["celery"].conf
        queues = [conf.task_default_queue, *(q.name for q in conf.task_queues or ())]
        collectors = [InventoryCollector(app.extensions["db_sessionmaker"],
                                         int(app.config["METRICS_EXACT_COUNT_MAX_ROWS"]))]
        if app.config.get("REDIS_URL"):
            collectors.append(QueueDepthCollector(str(app.config["REDIS_URL"]), queues))
        app.extensions["metrics_collectors"] = collectors
    return collectors


@bp.get("/metrics")
@spec.validate(resp=Resp("HTTP_200", HTTP_401=ErrorResponse, HTTP_403=ErrorResponse),
               tags=["metrics"])
def metrics() -> Response:
    """Every process's counters and histograms, plus queue depth and inventory read now."""
    body, content_type = render(_collectors(current_app))  # type: ignore[arg-type]
    return Response(body, content_type=content_type)


def _start() -> None:
    g.request_started = time.perf_counter()
    g.request_id = (logs.valid_request_id(request.headers.get(logs.REQUEST_ID_HEADER))
                    or logs.new_request_id())
    g.log_token = logs.bind(request_id=g.request_id)


def _finish(response: Response) -> Response:
    started = g.get("request_started")
    if started is None:
        return response
    elapsed = time.perf_counter() - started
    route = request.url_rule.rule if request.url_rule is not None else UNMATCHED
    status = response.status_code
    HTTP_REQUESTS.labels(request.method, route, str(status)).inc()
    HTTP_DURATION.labels(request.method, route).observe(elapsed)
    response.headers[logs.REQUEST_ID_HEADER] = g.request_id
    level = logging.DEBUG if request.endpoint in QUIET_ENDPOINTS and status < 400 else logging.INFO
    log.log(level, "%s %s %d", request.method, route, status,
            extra={"method": request.method, "route": route, "path": request.path[:500],
                   "status": status, "duration_ms": round(elapsed * 1000, 2)})
    return response


def _end(_exc: BaseException | None) -> None:
    logs.reset(g.pop("log_token", None))


def init_request_telemetry(app: Flask) -> None:
    """Request ids, HTTP metrics and the request log line; call before other before_request hooks.

    First, so that a request refused by the edge or authentication is still counted, logged
    and given its id.
    """
    app.before_request(_start)
    app.after_request(_finish)
    app.teardown_request(_end)
