"""Serving and batch generation on Ray: ``shiva-export serve`` (Ray Serve) and ``generate --ray`` (Ray Data).

The project never runs its own distributed engine: replicas, batching, autoscaling, health checks, retries of
actors and metrics are Ray's. What lives here is only what is ours:

- :mod:`~shiva_export.serve.options`: the ``serve`` options, validated before Ray starts (no Ray import);
- :mod:`~shiva_export.serve.requests`: the ``POST /generate`` body, checked field by field (no Ray import);
- :mod:`~shiva_export.serve.worker`: one loaded pipeline and the batched call of it (no Ray import), shared by
  the Serve replicas and the Ray Data actors, loaded through the same ``load_pipeline`` as ``generate``;
- :mod:`~shiva_export.serve.app`: the Ray Serve deployment, its HTTP routes and ``serve deploy`` config;
- :mod:`~shiva_export.serve.data`: ``generate --prompts FILE --ray`` on Ray Data actors.

Ray is an optional extra (``pip install 'shiva-export[serve]'``), imported only inside these functions.
"""

from __future__ import annotations

from shiva_export.errors import MissingDependencyError

__all__ = ["require_ray", "RAY_INSTALL"]

#: the install line printed when Ray is missing
RAY_INSTALL = "pip install 'shiva-export[serve]'  (Ray Serve and Ray Data: ray[serve,data]>=2.40)"


def require_ray(purpose: str):
    """Imports ``ray`` or raises :class:`~shiva_export.errors.MissingDependencyError` with the install line."""
    try:
        import ray
        import ray.serve  # noqa: F401 - the extra installs both; a partial install fails here, not mid-run
    except ImportError as err:
        raise MissingDependencyError(
            f"Optional package 'ray' is needed for {purpose} but cannot be imported ({err}). Install it: {RAY_INSTALL}."
        ) from None
    return ray
