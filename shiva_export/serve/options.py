"""The options of ``shiva-export serve``, checked in full before Ray starts or a model loads (no Ray import here).

:class:`ServeOptions` is also the ``args`` of the Ray Serve application builder
(:func:`shiva_export.serve.app.build_app`), so ``--dump-config`` writes exactly what a replica will load:
:meth:`ServeOptions.to_args` gives JSON values only and :meth:`ServeOptions.from_args` refuses unknown keys.
"""

from __future__ import annotations

import dataclasses
import math
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from shiva_export.errors import ConfigError
from shiva_export.models import adapter_for_architecture
from shiva_export.runtime.pipeline import generation_recipe

__all__ = ["ServeOptions", "parse_autoscale", "check_port_free", "DEFAULT_MAX_BATCH"]

#: requests per pipeline call when --max-batch is not given (one call of a batch-1 graph with --artifact)
DEFAULT_MAX_BATCH = 4


@dataclass
class ServeOptions:
    """What one serve application loads and how Ray runs it (see ``shiva-export serve --help``)."""

    model: str = "sd35-tiny"
    recipe: str | None = None
    weights: str | None = None
    router: str | None = None
    backend: str = "torch"
    ratio: float | None = None
    phases: bool = False
    artifacts: list[str] = field(default_factory=list)
    context: str | None = None
    dtype: str = "fp32"
    device: str = "cpu"
    provider: str = "cpu"
    threads: int | None = None
    artifact_root: str = "engines"
    replicas: int = 1
    autoscale: tuple[int, int] | None = None
    max_batch: int | None = None
    batch_wait_ms: float = 20.0
    host: str = "127.0.0.1"
    port: int = 8000
    num_cpus: float = 1.0
    num_gpus: float = 0.0
    max_body_bytes: int = 65536
    request_timeout_s: float = 300.0

    @property
    def batch(self) -> int:
        """Requests per pipeline call at most: --max-batch, else 4 (1 with --artifact: the given graphs fix it)."""
        if self.max_batch is not None:
            return self.max_batch
        return 1 if self.artifacts else DEFAULT_MAX_BATCH

    def validate(self) -> ServeOptions:
        """Raises :class:`ConfigError` (or the recipe's own error) on the first bad option; returns self."""
        _one_of("--backend", self.backend, ("torch", "ort", "trt"))
        _one_of("--dtype", self.dtype, ("fp32", "fp16", "bf16") if self.backend == "torch" else ("fp32", "fp16"))
        _one_of("--device", self.device, ("cpu", "cuda"))
        _one_of("--provider", self.provider, ("cpu", "cuda"))
        if self.context is not None:
            _one_of("--context", self.context, ("keep", "drop"))
        if self.ratio is not None and not (
            isinstance(self.ratio, (int, float)) and math.isfinite(self.ratio) and 0.0 <= self.ratio < 1.0
        ):
            raise ConfigError(
                f"--ratio {self.ratio} is out of range; give the fraction of image tokens pruned, in [0, 1) (0.4 keeps 60%)."
            )
        if self.ratio is not None and self.phases:
            raise ConfigError("give --ratio or --phases, not both (a fixed ratio is a one-phase schedule).")
        if self.artifacts and self.backend == "torch":
            raise ConfigError(
                "--artifact runs exported graphs (--backend ort) or engines (--backend trt); the torch backend has none."
            )
        if self.artifacts and self.max_batch not in (None, 1):
            raise ConfigError(
                f"--max-batch {self.max_batch} with --artifact: the given graphs fix the batch (one request per call); drop --max-batch or --artifact."
            )
        for a in self.artifacts:
            if not Path(a).exists():
                raise ConfigError(
                    f"--artifact {a} does not exist; pass an exported model.onnx (ort) or an engine folder (trt)."
                )
        _int_in("--replicas", self.replicas, 1, 256)
        if self.autoscale is not None:
            lo, hi = self.autoscale
            _int_in("--autoscale MIN", lo, 1, 256)
            _int_in("--autoscale MAX", hi, lo, 256)
        _int_in("--max-batch", self.batch, 1, 64)
        _int_in("--port", self.port, 1, 65535)
        if self.threads is not None:
            _int_in("--threads", self.threads, 1, 1024)
        _float_in("--batch-wait-ms", self.batch_wait_ms, 0.0, 10_000.0)
        _float_in("--num-cpus", self.num_cpus, 0.0, 1024.0)
        _float_in("--num-gpus", self.num_gpus, 0.0, 64.0)
        _float_in("--request-timeout", self.request_timeout_s, 1.0, 86_400.0)
        _int_in("--max-body-bytes", self.max_body_bytes, 1024, 64 * 1024 * 1024)
        if not isinstance(self.host, str) or not self.host.strip():
            raise ConfigError(f"--host {self.host!r} is empty; give an address to listen on, e.g. 127.0.0.1.")
        self._check_model()
        self._absolute_paths()
        return self

    def _absolute_paths(self) -> None:
        """Replicas run in Ray worker processes whose working folder is not the caller's: paths go absolute."""
        for name in ("recipe", "weights", "router"):
            if getattr(self, name) is not None:
                setattr(self, name, str(Path(getattr(self, name)).resolve()))
        self.artifacts = [str(Path(a).resolve()) for a in self.artifacts]
        self.artifact_root = str(Path(self.artifact_root).resolve())

    def _check_model(self) -> None:
        """The model, recipe and context resolve (reads the recipe TOML only; nothing is loaded)."""
        for name, p in (("--recipe", self.recipe), ("--weights", self.weights), ("--router", self.router)):
            if p is not None and not Path(p).exists():
                raise ConfigError(f"{name} {p} does not exist; pass an existing path.")
        rec = generation_recipe(self.model, self.recipe)
        if self.context is not None:
            adapter_for_architecture(rec.architecture).check_context(self.context)

    def to_args(self) -> dict[str, Any]:
        """JSON values only: the ``args`` of the application in Ray's serve config."""
        out = dataclasses.asdict(self)
        out["autoscale"] = list(self.autoscale) if self.autoscale else None
        return out

    @classmethod
    def from_args(cls, args: dict[str, Any]) -> ServeOptions:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(args) - names)
        if unknown:
            raise ConfigError(
                f"serve config args: unknown key(s) {', '.join(unknown)}; allowed: {', '.join(sorted(names))}."
            )
        kw = dict(args)
        if kw.get("autoscale") is not None:
            kw["autoscale"] = tuple(kw["autoscale"])
        kw["artifacts"] = [str(a) for a in kw.get("artifacts") or []]
        return cls(**kw).validate()


def parse_autoscale(text: str) -> tuple[int, int]:
    """``"MIN:MAX"`` -> (min, max) replicas."""
    parts = text.split(":")
    if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
        raise ConfigError(f"--autoscale {text!r} is not MIN:MAX (two whole numbers, e.g. 1:4).")
    return int(parts[0]), int(parts[1])


def check_port_free(host: str, port: int) -> None:
    """Refuses a port that something (another ``serve`` app) already listens on, before Ray starts."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError as err:
        raise ConfigError(
            f"--host {host!r} does not resolve ({err.strerror or err}); give an address such as 127.0.0.1."
        ) from None
    family, _, _, _, addr = infos[0]
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(
            socket.SOL_SOCKET, socket.SO_REUSEADDR, 1
        )  # as uvicorn binds: a closed app's TIME_WAIT is no listener
        try:
            s.bind(addr)
        except OSError:
            raise ConfigError(
                f"--port {port} on {host} is already in use (another serve app?); stop it or pass another --port."
            ) from None


def _one_of(name: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"{name} {value!r} is not one of {', '.join(allowed)}.")


def _int_in(name: str, value: Any, lo: int, hi: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise ConfigError(f"{name} {value!r} is out of range; expected a whole number in {lo}..{hi}.")


def _float_in(name: str, value: Any, lo: float, hi: float) -> None:
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not math.isfinite(value)
        or not lo <= value <= hi
    ):
        raise ConfigError(f"{name} {value!r} is out of range; expected a number in {lo:g}..{hi:g}.")
