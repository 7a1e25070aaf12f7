"""``shiva-export serve`` (Ray Serve) and ``generate --ray`` (Ray Data) on a local Ray cluster (2 CPUs, 127.0.0.1 only).

One Ray instance per module. The served app is two replicas of sd35-tiny, torch backend (no export to wait for
in CI; the ort path of static batch graphs is the slow-marked test at the end), ratio 0.4, max batch 2, at 2
denoising steps: concurrent requests, a refused request, a replica killed with -9 under load (the client
retries connection errors and Ray's plain 500 of a lost replica; nothing may be lost), and the image of a
request served alone equal byte for byte to ``generate``'s. The batched call is checked in process (PSNR
>= 40 dB against ``generate``). Ray's absence must be a one-line exit 4.
"""

from __future__ import annotations

import base64
import concurrent.futures as cf
import io
import json
import os
import signal
import socket
import sys
from pathlib import Path

import numpy as np
import pytest

from shiva_export.errors import ConfigError
from shiva_export.serve.options import ServeOptions, check_port_free
from shiva_export.serve.requests import Limits, RequestError, parse_request
from tests import shared

XDIST_GROUP = shared.RUNTIME  # conftest: one worker, whose runtime cache (shared.runtime_root) they share

STEPS = 2
PROMPTS = ["a red cube", "a blue ball", "a green triangle"]
LIMITS = Limits(steps=12, guidance=4.5, height=256, width=256)


# ------------------------------------------------------------------------------------ no Ray needed
@pytest.mark.parametrize(
    "body, status, field",
    [
        (b'{"seed": 1}', 422, "prompt"),
        (b'{"prompt": 3}', 422, "prompt"),
        (b'{"prompt": "  "}', 422, "prompt"),
        (b'{"prompt": "x", "seed": "1"}', 422, "seed"),
        (b'{"prompt": "x", "seed": -1}', 422, "seed"),
        (b'{"prompt": "x", "steps": 1000000000}', 422, "steps"),
        (b'{"prompt": "x", "steps": true}', 422, "steps"),
        (b'{"prompt": "x", "guidance": NaN}', 422, "guidance"),
        (b'{"prompt": "x", "guidance": Infinity}', 422, "guidance"),
        (b'{"prompt": "x", "height": 100000}', 422, "height"),
        (b'{"prompt": "x", "width": 2.5}', 422, "width"),
        (b'{"prompt": "x", "batch": 64}', 422, "batch"),
        (b'{"prompt": "x", "colour": "red"}', 422, "colour"),
        (b"[1, 2]", 400, None),
        (b"{not json", 400, None),
        (b'{"prompt": "' + b"x" * 70000 + b'"}', 413, None),
    ],
)
def test_bad_bodies_are_refused_naming_the_field(body, status, field):
    with pytest.raises(RequestError) as e:
        parse_request(body, LIMITS, 65536)
    assert (e.value.status, e.value.field) == (status, field)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"{field or 'body'}:")


def test_good_body_takes_the_recipe_defaults():
    r = parse_request(b'{"prompt": "a cat", "seed": 7}', LIMITS, 65536)
    assert (r.prompt, r.seed, r.steps, r.guidance, r.height, r.width) == ("a cat", 7, 12, 4.5, 256, 256)


@pytest.mark.parametrize(
    "kw, needle",
    [
        ({"ratio": 1.0}, "--ratio"),
        ({"ratio": 0.4, "phases": True}, "not both"),
        ({"backend": "tensorflow"}, "--backend"),
        ({"replicas": 0}, "--replicas"),
        ({"autoscale": (3, 2)}, "--autoscale MAX"),
        ({"artifacts": ["x.onnx"]}, "--artifact"),
        ({"backend": "ort", "artifacts": ["/nonexistent.onnx"]}, "does not exist"),
        ({"max_batch": 0}, "--max-batch"),
        ({"port": 70000}, "--port"),
        ({"model": "no-such-model"}, "no-such-model"),
    ],
)
def test_serve_options_are_refused_before_ray_starts(kw, needle):
    from shiva_export.errors import ShivaError

    with pytest.raises(ShivaError, match=needle.replace("-", r"\-")):
        ServeOptions(**kw).validate()


def test_a_second_app_on_a_busy_port_is_refused_in_one_line():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        port = s.getsockname()[1]
        with pytest.raises(ConfigError, match=f"--port {port} on 127.0.0.1 is already in use"):
            check_port_free("127.0.0.1", port)
    check_port_free("127.0.0.1", port)  # closed: free again


def test_without_ray_serve_and_generate_ray_exit_4_with_the_install_line(monkeypatch, capsys):
    from shiva_export.cli import main

    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError
    assert main(["serve", "--model", "sd35-tiny", "--port", str(_free_port())]) == 4
    assert "pip install 'shiva-export[serve]'" in capsys.readouterr().err
    assert main(["generate", "--prompt", "x", "--ray", "--out", "/tmp/unused-shiva-ray"]) == 4
    assert "pip install 'shiva-export[serve]'" in capsys.readouterr().err


def test_serve_help_works_without_ray_torch_or_diffusers():
    blocker = (
        "import sys\n"
        "class B:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('ray', 'torch', 'diffusers', 'onnxruntime', 'fastapi'):\n"
        "            raise ImportError(name)\n"
        "sys.meta_path.insert(0, B())\n"
        "from shiva_export.cli import main\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )
    import subprocess

    r = subprocess.run([sys.executable, "-c", blocker, "serve", "--help"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "--dump-config" in r.stdout, r.stderr


def test_dump_config_is_rays_serve_config_of_the_same_options(tmp_path, capsys):
    pytest.importorskip("ray.serve")
    import yaml
    from ray.serve.schema import ServeDeploySchema

    from shiva_export.cli import main

    path = tmp_path / "serve.yaml"
    assert (
        main(
            [
                "serve",
                "--backend",
                "ort",
                "--ratio",
                "0.4",
                "--autoscale",
                "1:3",
                "--port",
                "8123",
                "--dump-config",
                str(path),
            ]
        )
        == 0
    )
    config = yaml.safe_load(path.read_text())
    ServeDeploySchema.model_validate(config)
    app = config["applications"][0]
    assert app["import_path"] == "shiva_export.serve.app:build_app" and config["http_options"]["port"] == 8123
    assert (
        app["deployments"][0]["autoscaling_config"]["max_replicas"] == 3 and "num_replicas" not in app["deployments"][0]
    )
    again = ServeOptions.from_args(app["args"])
    assert (again.backend, again.ratio, again.autoscale) == ("ort", 0.4, (1, 3)) and again.to_args() == app["args"]


def test_a_replica_that_cannot_load_is_reported_as_its_own_error():
    from shiva_export.errors import WeightsError
    from shiva_export.serve.server import replica_error

    text = "Deploying application shiva failed\nTraceback ...\nshiva_export.errors.WeightsError: Cannot load a pipeline from /x: gone.\n"
    err = replica_error(text)
    assert (
        isinstance(err, WeightsError) and str(err) == "a replica failed to load: Cannot load a pipeline from /x: gone."
    )
    assert replica_error("RuntimeError: something else") is None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --------------------------------------------------------------------------------- local Ray cluster
@pytest.fixture(scope="module")
def ray_cluster():
    ray = pytest.importorskip("ray")
    pytest.importorskip("ray.serve")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def opts():
    return ServeOptions(
        model="sd35-tiny",
        backend="torch",
        ratio=0.4,
        replicas=2,
        max_batch=2,
        threads=1,
        num_cpus=0.5,
        artifact_root=str(shared.runtime_root()),
        port=_free_port(),
        batch_wait_ms=50.0,
    ).validate()


@pytest.fixture(scope="module")
def worker(opts):
    """The replica's worker, in process (for the batched call)."""
    from shiva_export.serve.worker import ImageWorker

    return ImageWorker(opts)


@pytest.fixture(scope="module")
def reference(opts, worker, tmp_path_factory):
    """``generate`` of PROMPTS at seeds 0, 1, 2 with the same model, backend, graphs and threads."""
    from shiva_export.runtime.generate import generate

    out = tmp_path_factory.mktemp("generate")
    rec = generate(
        model="sd35-tiny",
        prompts=PROMPTS,
        out_dir=out,
        backend=opts.backend,
        ratio=0.4,
        steps=STEPS,
        seed=0,
        threads=1,
        artifact_root=opts.artifact_root,
    )
    return out, rec


@pytest.fixture(scope="module")
def served(ray_cluster, opts, worker):
    from shiva_export.serve.client import wait_healthy
    from shiva_export.serve.server import start_app, stop_app

    start_app(opts)
    url = f"http://127.0.0.1:{opts.port}"
    assert wait_healthy(url, 120)
    yield url
    stop_app(shutdown_ray=False)


def test_batched_call_is_within_40_db_of_generate(worker, reference):
    from PIL import Image

    from shiva_export.runtime.generate import psnr
    from shiva_export.serve.requests import GenerateRequest

    _, rec = reference
    reqs = [GenerateRequest(p, i, STEPS, 4.5, 256, 256) for i, p in enumerate(PROMPTS[:2])]
    res = worker.run(reqs)
    assert [r["record"]["batch_size"] for r in res] == [2, 2]
    for r, im in zip(res, rec["images"]):
        ref = np.asarray(Image.open(im["png"]), dtype=np.float64) / 255.0
        got = np.asarray(Image.open(io.BytesIO(r["png"])), dtype=np.float64) / 255.0
        assert psnr(got, ref) >= 40.0


def test_served_alone_is_generate_byte_for_byte_and_healthz_is_up(served, reference):
    from shiva_export.serve.client import get_health, post_generate

    assert get_health(served) == (200, {"ok": True, "status": "RUNNING", "replicas": {"RUNNING": 2}})
    _, rec = reference
    reply = post_generate(served, {"prompt": PROMPTS[2], "seed": 2, "steps": STEPS})
    assert reply.status == 200, reply.body
    png = base64.b64decode(reply.body["image_png_base64"])
    assert png == Path(rec["images"][2]["png"]).read_bytes()
    r = reply.body["record"]
    assert r["batch_size"] == 1 and r["image"]["seed"] == 2 and r["image"]["phase_trace"] == "RR"
    assert r["pipeline"]["router"] == rec["pipeline"]["router"] and r["request_id"]


def test_generate_ray_writes_the_single_process_files_and_resumes(ray_cluster, opts, reference, tmp_path):
    from shiva_export.serve.data import generate_ray

    out_ref, rec_ref = reference
    seen = []
    rec = generate_ray(
        prompts=PROMPTS,
        out_dir=tmp_path,
        replicas=2,
        model="sd35-tiny",
        backend=opts.backend,
        ratio=0.4,
        steps=STEPS,
        threads=1,
        artifact_root=opts.artifact_root,
        num_cpus=0.5,
        progress=lambda d, n: seen.append((d, n)),
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in out_ref.iterdir())
    for a, b in zip(rec["images"], rec_ref["images"]):
        assert Path(a["png"]).read_bytes() == Path(b["png"]).read_bytes()
    assert _comparable(json.loads((tmp_path / "generate.json").read_text())) == _comparable(
        json.loads((out_ref / "generate.json").read_text())
    )
    assert seen[0] == (0, 3) and seen[-1] == (3, 3)
    seen.clear()
    again = generate_ray(
        prompts=PROMPTS,
        out_dir=tmp_path,
        replicas=2,
        model="sd35-tiny",
        backend=opts.backend,
        ratio=0.4,
        steps=STEPS,
        threads=1,
        artifact_root=opts.artifact_root,
        num_cpus=0.5,
        progress=lambda d, n: seen.append((d, n)),
    )
    assert seen == [(3, 3)]  # every image was finished: nothing ran
    assert again["images"] == rec["images"]


def test_concurrent_requests_a_bad_one_and_a_killed_replica_lose_nothing(served):
    from shiva_export.serve.client import post_generate

    bad = post_generate(served, {"prompt": "x", "guidance": float("nan")})
    assert bad.status == 422 and bad.body["field"] == "guidance" and bad.retries == 0
    wrong = post_generate(served, {"prompt": "x", "height": 100000})
    assert wrong.status == 422 and wrong.body["field"] == "height" and "4096" in wrong.body["error"]
    first = post_generate(served, {"prompt": "warm", "steps": STEPS})
    victim = first.body["record"]["replica"]["pid"]
    with cf.ThreadPoolExecutor(6) as ex:
        futs = [
            ex.submit(post_generate, served, {"prompt": f"shape {i}", "seed": i, "steps": 8}, retries=8)
            for i in range(6)
        ]
        os.kill(victim, signal.SIGKILL)
        replies = [f.result() for f in futs]
    assert [r.status for r in replies] == [200] * 6, [r.body for r in replies]
    assert sorted(r.body["record"]["image"]["seed"] for r in replies) == list(range(6))


def test_generate_ray_reports_an_actors_error_in_one_line(ray_cluster, opts, tmp_path):
    """A user error inside an actor (here the size) is generate's own ShapeError in the driver, not Ray's wrapping."""
    from shiva_export.errors import ShapeError
    from shiva_export.serve.data import generate_ray

    with pytest.raises(ShapeError, match="^--height 100 is not a positive multiple of 16 px"):
        generate_ray(
            prompts=["a"],
            out_dir=tmp_path,
            model="sd35-tiny",
            backend=opts.backend,
            ratio=0.4,
            steps=STEPS,
            height=100,
            artifact_root=opts.artifact_root,
            num_cpus=0.5,
        )
    assert not (tmp_path / "generate.json").exists()


def _comparable(record: dict) -> dict:
    """A generate.json without what differs between two runs of the same images: timings and the folder."""
    r = dict(record)
    r["images"] = [
        {k: v for k, v in e.items() if k not in ("timings_ms", "png")} | {"png": os.path.basename(e["png"])}
        for e in r["images"]
    ]
    return r


def test_ort_static_batch_graphs_lone_bit_exact_batched_40_db(tmp_path):
    """ort: the worker loads generate's batch-1 graph and a batch-2 graph; a lone request is generate's PNG, a
    pair runs in the batch-2 graph within 40 dB, a size that fits no graph gets generate's shape message."""
    from PIL import Image

    from shiva_export.runtime.generate import generate, psnr
    from shiva_export.serve.requests import GenerateRequest
    from shiva_export.serve.worker import ImageWorker

    o = ServeOptions(
        model="sd35-tiny", backend="ort", ratio=0.4, max_batch=2, threads=1, artifact_root=str(shared.runtime_root())
    ).validate()
    w = ImageWorker(o)
    assert sorted(w.pipes) == [1, 2] and w.chunks(3) == [2, 1]
    rec = generate(
        model="sd35-tiny",
        prompts=PROMPTS[:2],
        out_dir=tmp_path / "g",
        backend="ort",
        ratio=0.4,
        steps=STEPS,
        threads=1,
        artifact_root=o.artifact_root,
    )
    lone = w.run([GenerateRequest(PROMPTS[0], 0, STEPS, 4.5, 256, 256)])[0]
    assert lone["png"] == Path(rec["images"][0]["png"]).read_bytes()
    pair = w.run([GenerateRequest(p, i, STEPS, 4.5, 256, 256) for i, p in enumerate(PROMPTS[:2])])
    for r, im in zip(pair, rec["images"]):
        assert r["record"]["batch_size"] == 2
        assert (
            psnr(
                np.asarray(Image.open(io.BytesIO(r["png"])), np.float64) / 255,
                np.asarray(Image.open(im["png"]), np.float64) / 255,
            )
            >= 40
        )
    with pytest.raises(RequestError, match="^generate: height is 512 px but the artifact was exported for 256 px"):
        w.check(GenerateRequest("x", 0, STEPS, 4.5, 512, 256))
