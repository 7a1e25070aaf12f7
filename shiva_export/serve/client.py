"""A small stdlib HTTP client for ``shiva-export serve`` that retries what a lost replica leaves behind.

A request is deterministic (prompt, seed and settings fix the image), so sending it again is safe. Retried:
connection errors (refused, reset, closed without answer), 502/503/504, and a 500 that is not ours (Ray's
proxy answers a request whose replica died with a plain-text 500; a failure inside a replica is a JSON 500
with a ``request_id`` and is not retried). A 4xx is the caller's fault and is returned at once.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Any

__all__ = ["Reply", "post_generate", "get_health", "wait_healthy"]


@dataclass
class Reply:
    status: int | None  #: HTTP status of the last attempt (None: no answer at all)
    body: dict[str, Any]
    retries: int  #: attempts beyond the first
    seconds: float  #: wall time over all attempts


def _attempt(url: str, data: bytes, timeout: float) -> tuple[int | None, dict[str, Any], bool]:
    """(status, JSON body, retryable) of one POST."""
    req = urllib.request.Request(url, data=data, headers={"content-type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read()), False
    except urllib.error.HTTPError as e:
        raw = e.read() or b""
        try:
            body = json.loads(raw)
        except ValueError:
            body = {"error": raw.decode("utf-8", "replace")[:200]}
        ours = isinstance(body, dict) and "request_id" in body
        return (
            e.code,
            body if isinstance(body, dict) else {"error": str(body)},
            e.code in (502, 503, 504) or (e.code == 500 and not ours),
        )
    except (urllib.error.URLError, ConnectionError, TimeoutError, OSError) as e:
        return None, {"error": f"{type(e).__name__}: {e}"}, True


def post_generate(
    base_url: str, body: dict[str, Any], *, retries: int = 5, timeout: float = 120.0, backoff: float = 0.5
) -> Reply:
    """POSTs ``body`` to ``base_url/generate``, retrying connection errors and lost replicas at most ``retries`` times."""
    data = json.dumps(body).encode()
    t0 = time.perf_counter()
    for attempt in range(retries + 1):
        status, out, retry = _attempt(base_url.rstrip("/") + "/generate", data, timeout)
        if not retry or attempt == retries:
            return Reply(status, out, attempt, time.perf_counter() - t0)
        time.sleep(backoff * (attempt + 1))
    raise AssertionError("unreachable")


def get_health(base_url: str, timeout: float = 5.0) -> tuple[int | None, dict[str, Any]]:
    try:
        with urllib.request.urlopen(base_url.rstrip("/") + "/healthz", timeout=timeout) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, {}
    except (urllib.error.URLError, OSError, ValueError):
        return None, {}


def wait_healthy(base_url: str, limit_s: float = 120.0) -> bool:
    """Polls ``/healthz`` until 200 or ``limit_s`` seconds have passed."""
    end = time.monotonic() + limit_s
    while time.monotonic() < end:
        if get_health(base_url)[0] == 200:
            return True
        time.sleep(0.5)
    return False
