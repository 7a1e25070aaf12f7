"""The Ray Serve application: one deployment whose replicas each hold an :class:`ImageWorker`.

HTTP (FastAPI ingress, Ray's proxy in front):

- ``POST /generate`` -> ``200 {"image_png_base64", "record", "request_id"}``; a refused body is a 4xx with
  ``{"error", "field", "request_id"}``; a failure inside the replica a ``500`` with ``{"error", "request_id"}``.
  Checked requests go through ``@serve.batch`` (at most ``--max-batch`` per call, only one shape per call).
- ``GET /healthz`` -> ``200`` once every replica of the deployment is running (its pipeline loaded), else ``503``.

:func:`build_app` is the application builder named in the serve config (``import_path``), so
``serve deploy`` of :func:`serve_config` runs the same replicas as ``shiva-export serve``. Replica faults,
restarts, autoscaling, queueing and request timeouts are Ray's; metrics are Ray Serve's own plus three
counters of ours (``ray.serve.metrics``).
"""

# No ``from __future__ import annotations``: FastAPI reads the handlers' annotations (``request: Request``, a
# name local to _deployment_class) at definition time.
import asyncio
import base64
import logging
import uuid
from typing import Any

from shiva_export.serve.options import ServeOptions
from shiva_export.serve.requests import RequestError, parse_request
from shiva_export.serve.worker import ImageWorker

__all__ = ["APP_NAME", "DEPLOYMENT_NAME", "IMPORT_PATH", "build_app", "serve_config", "deployment_options"]

APP_NAME = "shiva"
DEPLOYMENT_NAME = "ShivaImage"
IMPORT_PATH = "shiva_export.serve.app:build_app"
logger = logging.getLogger("ray.serve")


def deployment_options(opts: ServeOptions) -> dict[str, Any]:
    """Ray deployment options of ``opts`` (the ``deployments`` entry of the serve config)."""
    out: dict[str, Any] = {
        "name": DEPLOYMENT_NAME,
        "max_ongoing_requests": max(2 * opts.batch, 4),  # one batch running, the next one filling
        "max_queued_requests": 64 * max(opts.replicas, opts.autoscale[1] if opts.autoscale else 1),
        "ray_actor_options": {"num_cpus": opts.num_cpus, "num_gpus": opts.num_gpus},
        "graceful_shutdown_timeout_s": opts.request_timeout_s,  # Ctrl-C / serve shutdown drains in-flight requests
        "health_check_period_s": 5.0,
    }
    if opts.autoscale:
        lo, hi = opts.autoscale
        out["autoscaling_config"] = {
            "min_replicas": lo,
            "initial_replicas": lo,
            "max_replicas": hi,
            "target_ongoing_requests": opts.batch,
        }
    else:
        out["num_replicas"] = opts.replicas
    return out


def http_options(opts: ServeOptions) -> dict[str, Any]:
    return {"host": opts.host, "port": opts.port, "request_timeout_s": opts.request_timeout_s}


def serve_config(opts: ServeOptions) -> dict[str, Any]:
    """Ray's serve config (``serve deploy FILE``) of this application."""
    return {
        "proxy_location": "EveryNode",
        "http_options": http_options(opts),
        "applications": [
            {
                "name": APP_NAME,
                "route_prefix": "/",
                "import_path": IMPORT_PATH,
                "args": opts.to_args(),
                "deployments": [deployment_options(opts)],
            }
        ],
    }


def build_app(args: dict[str, Any]):
    """The Ray Serve application of ``args`` (:meth:`ServeOptions.to_args`): the builder ``serve deploy`` calls."""
    opts = ServeOptions.from_args(dict(args))
    dep = _deployment_class()
    o = deployment_options(opts)
    o.pop("name")
    # A replica that cannot load (wrong artifact, missing weights) fails the same way every time: give up after
    # 3 attempts instead of Ray's 20, so `serve` exits with the reason instead of retrying for minutes.
    return dep.options(**o, max_constructor_retry_count=3).bind(opts.to_args())


def _deployment_class():
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse
    from ray import serve

    api = FastAPI(title="shiva-export serve", docs_url=None, redoc_url=None)

    @serve.deployment(name=DEPLOYMENT_NAME)
    @serve.ingress(api)
    class ShivaImage:
        """One replica: the pipeline(s) loaded once in ``__init__`` (Ray marks the replica ready after it)."""

        def __init__(self, args: dict[str, Any]):
            self.opts = ServeOptions.from_args(args)
            self.worker = ImageWorker(self.opts)
            self.generate_batch.set_max_batch_size(self.worker.max_batch)
            self.generate_batch.set_batch_wait_timeout_s(self.opts.batch_wait_ms / 1000.0)
            self.metrics = _metrics()

        @api.post("/generate")
        async def generate(self, request: Request):
            rid = request.headers.get("x-request-id") or uuid.uuid4().hex
            try:
                body = await _read_body(request, self.opts.max_body_bytes)
                req = parse_request(body, self.worker.limits, self.opts.max_body_bytes)
                self.worker.check(req)
            except RequestError as err:
                self.metrics["rejected"].inc(tags={"field": err.field or "body"})
                return JSONResponse(dict(err.to_dict(), request_id=rid), status_code=err.status)
            try:
                res = await self.generate_batch(req)
            except Exception as err:  # noqa: BLE001 - the batch itself failed: a 500 with the request id, never a hang
                res = err
            if isinstance(res, BaseException):
                logger.error("request %s failed: %s: %s", rid, type(res).__name__, res)
                self.metrics["failed"].inc()
                msg = str(res).splitlines()[0] if str(res) else ""
                return JSONResponse(
                    {"error": f"internal error in the replica: {type(res).__name__}: {msg}", "request_id": rid},
                    status_code=500,
                )
            self.metrics["images"].inc()
            record = dict(res["record"], request_id=rid)
            return JSONResponse(
                {"image_png_base64": base64.b64encode(res["png"]).decode("ascii"), "record": record, "request_id": rid}
            )

        @api.get("/healthz")
        async def healthz(self):
            ok, detail = await asyncio.to_thread(_app_health)
            return JSONResponse({"ok": ok, **detail}, status_code=200 if ok else 503)

        @serve.batch(max_batch_size=64, batch_wait_timeout_s=0.02)
        async def generate_batch(self, reqs: list) -> list:
            self.metrics["batch"].observe(len(reqs))
            # The pipeline runs in a thread, so this replica keeps answering /healthz and refusing bad bodies meanwhile.
            return await asyncio.to_thread(self.worker.run, reqs)

    return ShivaImage


async def _read_body(request, limit: int) -> bytes:
    """The body, refused (413) as soon as it passes ``limit`` bytes: never read whole when oversized."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise RequestError(413, None, f"body: {declared} bytes exceeds the limit of {limit} bytes.")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise RequestError(413, None, f"body: more than {limit} bytes; the limit is {limit} bytes.")
        chunks.append(chunk)
    return b"".join(chunks)


def _app_health() -> tuple[bool, dict[str, Any]]:
    """Whether the application runs with every replica of the deployment running (Ray's own status)."""
    from ray import serve

    st = serve.status()
    app = st.applications.get(APP_NAME)
    if app is None:
        return False, {"status": "absent"}
    dep = app.deployments.get(DEPLOYMENT_NAME)
    states = {str(getattr(k, "value", k)): int(v) for k, v in (dep.replica_states.items() if dep else [])}
    running = states.get("RUNNING", 0)
    ok = str(getattr(app.status, "value", app.status)) == "RUNNING" and running > 0 and running == sum(states.values())
    return ok, {"status": str(getattr(app.status, "value", app.status)), "replicas": states}


def _metrics() -> dict[str, Any]:
    from ray.serve.metrics import Counter, Histogram

    return {
        "images": Counter("shiva_serve_images", description="Images returned (HTTP 200)."),
        "failed": Counter("shiva_serve_failed", description="Requests failed inside a replica (HTTP 500)."),
        "rejected": Counter(
            "shiva_serve_rejected", description="Requests refused (HTTP 4xx), by field.", tag_keys=("field",)
        ),
        "batch": Histogram(
            "shiva_serve_batch_size",
            description="Requests per batched pipeline call.",
            boundaries=[1, 2, 4, 8, 16, 32, 64],
        ),
    }
