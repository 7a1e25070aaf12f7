"""Load, faults and shutdown of ``shiva-export serve`` on a local Ray cluster, against ``generate`` in a loop.

    PYTHONPATH=. python scripts/serve_load.py --requests 24 --concurrency 4 --out bench/serve_load.json

Bounded: every phase sends at most ``--requests`` requests and stops after ``--time-limit`` seconds; clients
talk only to 127.0.0.1. Phases (sd35-tiny, ``--backend``, ratio 0.4, the recipe's steps, ``--threads`` per
replica, distinct prompts and seeds):

1. ``generate`` in a loop: one process, one pipeline, the prompts one after another (throughput, latency).
2. ``serve`` with 1 and 2 replicas (max batch 2) under ``--concurrency`` clients: throughput, p50 / p99 latency.
3. Fault: 2 replicas under load, one replica ``kill -9``-ed after the first answers; retried and failed requests
   (the client retries connection errors and Ray's 500 of a lost replica), and whether every request got its image.
4. Graceful shutdown: the real CLI (``shiva-export serve``) in a subprocess, SIGINT while requests are in flight:
   answered vs dropped, and the drain time; a second ``serve`` on the same port meanwhile (refused in one line).
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path


def _pct(xs: list[float], q: float) -> float:
    import numpy as np

    return float(np.percentile(np.asarray(xs), q)) if xs else float("nan")


def _summary(name: str, lat: list[float], wall: float, n_ok: int, **extra) -> dict:
    return {
        "setting": name,
        "images": n_ok,
        "wall_s": round(wall, 2),
        "images_per_s": round(n_ok / wall, 3) if wall else None,
        "p50_s": round(_pct(lat, 50), 3),
        "p99_s": round(_pct(lat, 99), 3),
        **extra,
    }


def bench_generate(args, prompts) -> dict:
    from shiva_export.runtime.generate import generate

    rec = generate(
        model=args.model,
        prompts=prompts[:2],
        out_dir=Path(args.work) / "warm",
        backend=args.backend,
        ratio=0.4,
        threads=args.threads,
        artifact_root=args.artifact_root,
    )  # exports / warms the caches, not timed
    t0 = time.perf_counter()
    rec = generate(
        model=args.model,
        prompts=prompts,
        out_dir=Path(args.work) / "loop",
        backend=args.backend,
        ratio=0.4,
        threads=args.threads,
        artifact_root=args.artifact_root,
    )
    wall = time.perf_counter() - t0
    return _summary(
        "generate (loop, 1 process)",
        [im["timings_ms"]["total"] / 1e3 for im in rec["images"]],
        wall,
        len(rec["images"]),
        concurrency=1,
    )


def _load(url: str, prompts: list[str], args, kill_after: int | None = None) -> dict:
    """Sends the prompts with ``args.concurrency`` clients; with ``kill_after``, kill -9s the replica of the
    ``kill_after``-th answer."""
    from shiva_export.serve.client import post_generate

    deadline = time.monotonic() + args.time_limit
    killed: list[int] = []

    def one(i: int):
        if time.monotonic() > deadline:
            return None
        r = post_generate(url, {"prompt": prompts[i], "seed": i}, retries=8)
        if kill_after is not None and i >= kill_after and not killed and r.status == 200:
            killed.append(r.body["record"]["replica"]["pid"])
            os.kill(killed[0], signal.SIGKILL)
        return r

    t0 = time.perf_counter()
    with cf.ThreadPoolExecutor(args.concurrency) as ex:
        replies = [r for r in ex.map(one, range(len(prompts))) if r is not None]
    wall = time.perf_counter() - t0
    ok = [r for r in replies if r.status == 200]
    batches = [r.body["record"]["batch_size"] for r in ok]
    return {
        "lat": [r.seconds for r in ok],
        "wall": wall,
        "ok": len(ok),
        "sent": len(replies),
        "retried": sum(r.retries > 0 for r in replies),
        "retries": sum(r.retries for r in replies),
        "failed": len(replies) - len(ok),
        "mean_batch": round(sum(batches) / max(len(batches), 1), 2),
        "killed_pid": killed[0] if killed else None,
    }


def bench_serve(args, prompts) -> list[dict]:
    from shiva_export.serve.client import post_generate, wait_healthy
    from shiva_export.serve.options import ServeOptions
    from shiva_export.serve.server import start_app, stop_app

    rows = []
    for replicas, fault in ((1, False), (2, False), (2, True)):
        opts = ServeOptions(
            model=args.model,
            backend=args.backend,
            ratio=0.4,
            replicas=replicas,
            max_batch=2,
            threads=args.threads,
            num_cpus=args.num_cpus / 2,
            artifact_root=args.artifact_root,
            port=args.port,
        ).validate()
        t0 = time.perf_counter()
        start_app(opts)
        url = f"http://127.0.0.1:{args.port}"
        wait_healthy(url, 120)
        ready = time.perf_counter() - t0
        for i in range(2 * replicas):  # warm every replica (first call: ORT session and allocator start-up)
            post_generate(url, {"prompt": "warm up", "seed": i})
        res = _load(url, prompts, args, kill_after=args.concurrency if fault else None)
        name = f"serve, {replicas} replica(s)" + (", one kill -9'd under load" if fault else "")
        rows.append(
            _summary(
                name,
                res["lat"],
                res["wall"],
                res["ok"],
                concurrency=args.concurrency,
                sent=res["sent"],
                retried=res["retried"],
                retries=res["retries"],
                failed=res["failed"],
                mean_batch=res["mean_batch"],
                ready_s=round(ready, 1),
                killed_pid=res["killed_pid"],
            )
        )
        print(json.dumps(rows[-1]), flush=True)
        stop_app(shutdown_ray=False)
    return rows


def bench_shutdown(args, prompts) -> dict:
    """The real CLI: SIGINT (what Ctrl-C sends) while ``concurrency`` requests are in flight; then a second serve on the port."""
    from shiva_export.serve.client import post_generate, wait_healthy

    port = args.port + 1
    cmd = [
        sys.executable,
        "-m",
        "shiva_export",
        "serve",
        "--model",
        args.model,
        "--backend",
        args.backend,
        "--ratio",
        "0.4",
        "--replicas",
        "1",
        "--max-batch",
        "2",
        "--threads",
        str(args.threads),
        "--num-cpus",
        "1",
        "--artifact-root",
        args.artifact_root,
        "--port",
        str(port),
    ]
    srv = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        if not wait_healthy(url, 240):
            return {"setting": "graceful shutdown", "error": "server did not come up in 240 s"}
        second = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        refusal = [ln for ln in second.stderr.splitlines() if ln.startswith("Error:")]
        with cf.ThreadPoolExecutor(args.concurrency) as ex:
            futs = [
                ex.submit(post_generate, url, {"prompt": prompts[i], "seed": i}, retries=0)
                for i in range(args.concurrency)
            ]
            time.sleep(0.5)
            t0 = time.perf_counter()
            srv.send_signal(signal.SIGINT)
            replies = [f.result() for f in futs]
        srv.wait(timeout=args.time_limit)
        drain = time.perf_counter() - t0
    finally:
        if srv.poll() is None:
            srv.kill()
    answered = sum(r.status == 200 for r in replies)
    return {
        "setting": "graceful shutdown (SIGINT with requests in flight)",
        "in_flight": len(replies),
        "answered": answered,
        "dropped": len(replies) - answered,
        "stop_s": round(drain, 1),
        "exit_code": srv.returncode,
        "second_serve_same_port": {
            "exit_code": second.returncode,
            "line": refusal[0] if refusal else second.stderr[-200:],
        },
    }


def markdown(rows: list[dict], shutdown: dict, args) -> str:
    out = [
        "| setting | clients | images | wall s | images/s | p50 s | p99 s | mean batch | retried / failed |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        rf = f"{r.get('retried', 0)} / {r.get('failed', 0)}" if "retried" in r else "-"
        out.append(
            f"| {r['setting']} | {r['concurrency']} | {r['images']} | {r['wall_s']} | {r['images_per_s']} | {r['p50_s']} | {r['p99_s']} | "
            f"{r.get('mean_batch', 1)} | {rf} |"
        )
    if shutdown.get("in_flight") is not None:
        out.append("")
        out.append(
            f"Graceful shutdown: SIGINT with {shutdown['in_flight']} requests in flight: {shutdown['answered']} answered, {shutdown['dropped']} dropped, "
            f"stopped in {shutdown['stop_s']} s (exit {shutdown['exit_code']}). A second `serve` on the same port: exit "
            f"{shutdown['second_serve_same_port']['exit_code']}, `{shutdown['second_serve_same_port']['line']}`"
        )
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="sd35-tiny")
    ap.add_argument("--backend", default="ort")
    ap.add_argument("--requests", type=int, default=24, help="requests per phase (bounded)")
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("--time-limit", type=float, default=300.0, help="seconds per phase at most")
    ap.add_argument("--threads", type=int, default=1, help="CPU threads per replica / generate process")
    ap.add_argument("--num-cpus", type=float, default=2.0, help="CPUs of the local Ray cluster")
    ap.add_argument("--port", type=int, default=8311)
    ap.add_argument("--artifact-root", default="engines")
    ap.add_argument("--work", default="bench/serve_load")
    ap.add_argument("--out", default=None, help="JSON output (also prints the Markdown table)")
    args = ap.parse_args()
    if not (1 <= args.requests <= 1000 and 1 <= args.concurrency <= 64):
        ap.error("--requests must be in 1..1000 and --concurrency in 1..64")
    args.artifact_root = str(Path(args.artifact_root).resolve())
    prompts = [
        f"a {c} {s}"
        for s in ("cube", "ball", "triangle", "ring")
        for c in ("red", "green", "blue", "yellow", "purple", "white")
    ]
    prompts = (prompts * (args.requests // len(prompts) + 1))[: args.requests]

    import ray

    rows = [bench_generate(args, prompts)]
    print(json.dumps(rows[-1]), flush=True)
    ray.init(num_cpus=int(args.num_cpus), include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    try:
        rows += bench_serve(args, prompts)
    finally:
        ray.shutdown()
    shutdown = bench_shutdown(args, prompts)
    print(json.dumps(shutdown), flush=True)
    md = markdown(rows, shutdown, args)
    print(md)
    if args.out:
        from shiva_export.utils.io import atomic_write_json

        atomic_write_json(args.out, {"rows": rows, "shutdown": shutdown, "args": vars(args), "markdown": md})


if __name__ == "__main__":
    main()
