"""Running the serve application on a local (or ``RAY_ADDRESS``) Ray cluster, draining it, and dumping its config."""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path

from shiva_export import errors
from shiva_export.serve import require_ray
from shiva_export.serve.app import APP_NAME, build_app, http_options, serve_config
from shiva_export.serve.options import ServeOptions, check_port_free
from shiva_export.utils.io import atomic_write_text

__all__ = ["dump_config", "start_app", "stop_app", "serve_forever"]

#: seconds the HTTP proxy is kept after the last replica exits, to deliver the last answers
PROXY_FLUSH_S = 2.0


def dump_config(opts: ServeOptions, path: str | Path) -> Path:
    """Writes Ray's serve config YAML (checked against Ray's own schema) for ``serve deploy``."""
    require_ray("shiva-export serve --dump-config")
    import yaml
    from ray.serve.schema import ServeDeploySchema

    config = serve_config(opts)
    ServeDeploySchema.model_validate(config) if hasattr(
        ServeDeploySchema, "model_validate"
    ) else ServeDeploySchema.parse_obj(config)
    return atomic_write_text(
        path, "# shiva-export serve config: serve deploy THIS_FILE\n" + yaml.safe_dump(config, sort_keys=False)
    )


def start_app(
    opts: ServeOptions,
    *,
    num_cpus: int | None = None,
    metrics_port: int | None = None,
    say: Callable[[str], None] = lambda m: None,
):
    """Starts Ray (a local cluster unless ``RAY_ADDRESS`` names one; its Prometheus metrics on ``metrics_port``),
    Serve's HTTP proxy and the application; returns once every replica has loaded its pipeline (Ray's
    ``serve.run`` waits for that)."""
    ray = require_ray("shiva-export serve")
    from ray import serve

    check_port_free(opts.host, opts.port)  # before Ray starts: a second app on this port is refused in one line
    if not ray.is_initialized():
        say("start ray")
        extra = (
            {"_metrics_export_port": metrics_port} if metrics_port else {}
        )  # what `ray start --metrics-export-port` sets
        ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=False, logging_level="ERROR", **extra)
    serve.start(http_options=http_options(opts))
    say(f"load {opts.replicas if not opts.autoscale else opts.autoscale[0]} replica(s)")
    try:
        return serve.run(build_app(opts.to_args()), name=APP_NAME, route_prefix="/", blocking=False)
    except RuntimeError as err:  # Ray reports a replica that failed to load as text: raise the replica's own error
        cause = replica_error(str(err) + "\n" + _deployment_messages())
        if cause is None:
            raise
        serve.shutdown()
        raise cause from None


def _deployment_messages() -> str:
    """Ray's status messages of the application and its deployments (they carry a failed replica's traceback)."""
    from ray import serve

    try:
        app = serve.status().applications.get(APP_NAME)
    except Exception:  # noqa: BLE001 - only used to word an error that is already being raised
        return ""
    if app is None:
        return ""
    return "\n".join([app.message or ""] + [d.message or "" for d in app.deployments.values()])


def replica_error(text: str):
    """The last ``shiva_export.errors.<Class>: <message>`` line of a Ray deployment failure, as that error."""
    import re

    found = re.findall(r"shiva_export\.errors\.(\w+): ([^\n]*)", text)
    if not found:
        return None
    name, message = found[-1]
    cls = getattr(errors, name, errors.ShivaError)
    return (cls if isinstance(cls, type) and issubclass(cls, errors.ShivaError) else errors.ShivaError)(
        f"a replica failed to load: {message}"
    )


def stop_app(*, shutdown_ray: bool = True) -> None:
    """Drains: the application is deleted first (each replica finishes its in-flight requests, up to the
    graceful-shutdown timeout, while the proxy still delivers the answers), then Serve and Ray stop."""
    import ray
    from ray import serve

    serve.delete(APP_NAME, _blocking=True)
    # The last answers leave the replicas as they exit; the proxy still has to write them to their sockets
    # (measured: without this pause the final batch's clients saw their connection closed).
    time.sleep(PROXY_FLUSH_S)
    serve.shutdown()
    if shutdown_ray:
        ray.shutdown()


def serve_forever(
    opts: ServeOptions, say: Callable[[str], None] = lambda m: None, metrics_port: int | None = None
) -> None:
    """:func:`start_app`, then waits for Ctrl-C / SIGTERM and :func:`stop_app` (draining in-flight requests)."""
    stop = threading.Event()
    previous = {s: signal.signal(s, lambda *_: stop.set()) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        start_app(opts, say=say, metrics_port=metrics_port)
        say(f"serving http://{opts.host}:{opts.port}/generate (GET /healthz); Ctrl-C drains and stops")
        while not stop.wait(0.5):
            pass
        say("draining in-flight requests")
        t0 = time.perf_counter()
        stop_app()
        say(f"stopped after {time.perf_counter() - t0:.1f} s of draining")
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
