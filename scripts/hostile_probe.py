#!/usr/bin/env python3
"""Table-driven hostile-input probe of the `shiva-export` CLI (black box).

Every case runs `python -m shiva_export ...` in its own folder under the work root (default /tmp/probe-work/cases/ID),
single-threaded, with a 120 s cap, and is judged on: exit code against the documented one (README "Exit codes"),
a single clear error line naming the bad value, Python tracebacks or library warnings leaking without --debug,
what is left on disk (partial artifacts, files outside the output root, special files replaced, a pickle payload
executed) and wall time (a refusal after heavy work is "late").

Classes: clean | S1 (wrong result or damage with exit 0; damage outside the output root at any exit) | S2 (a bad or
contradictory flag silently accepted, a refusal only after heavy work, a traceback, a wrong exit code, a hang, a
partial artifact left) | S3 (cosmetic: the message does not name the value, more than one error line, a library
warning leaked).

    /work/main/.venv/bin/python scripts/hostile_probe.py --out docs/quality/hostile-probe-2.md [--only ID,ID] [--keep]

Shared setup (one ONNX export of sd35-tiny at ratio 0.4, one TensorRT-RTX engine built ahead of time from it, one
tiny trained router, one two-prompt train-data folder, one cached `generate` graph) is done once at the start and
is itself reported as the S-* cases. Nothing here touches the machine's real special files: FIFOs, character
devices, sockets and escaping symlinks are made inside the work root.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import pickle
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PY = os.environ.get("SHIVA_PROBE_PYTHON", "/work/main/.venv/bin/python")
WORK = Path(os.environ.get("SHIVA_PROBE_WORK", "/tmp/probe-work"))
CACHE = os.environ.get("SHIVA_CACHE_DIR", "/tmp/shiva-cache-probe")
SETUP = WORK / "setup"
CASES = WORK / "cases"
OUTSIDE = WORK / "outside"
PWNED = WORK / "PWNED"  # created only if a pickle payload is ever executed
TIMEOUT = 120
LATE = {"s": 25.0}  # a refusal slower than this came after heavy work (recalibrated at start from a trivial refusal)

CLASS_ORDER = {"clean": 0, "S3": 1, "S2": 2, "S1": 3}


def env(extra: dict | None = None) -> dict:
    e = {k: v for k, v in os.environ.items() if k not in ("SHIVA_DEBUG",)}
    e.update(
        PYTHONPATH=str(REPO),
        OMP_NUM_THREADS="1",
        MKL_NUM_THREADS="1",
        SHIVA_CACHE_DIR=CACHE,
        PYTHONDONTWRITEBYTECODE="1",
        COLUMNS="200",
    )
    e.update(extra or {})
    return e


# ----------------------------------------------------------------------------------------------------------------
# file makers (all inside the work root)


def write(p: Path, data: bytes | str) -> Path:
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(data.encode() if isinstance(data, str) else data)
    return p


def flip(src: Path, dst: Path, offset: int) -> Path:
    b = bytearray(src.read_bytes())
    if offset < 0:
        offset += len(b)
    b[offset] ^= 0xFF
    return write(dst, bytes(b))


def truncate(src: Path, dst: Path, frac: float) -> Path:
    b = src.read_bytes()
    return write(dst, b[: int(len(b) * frac)])


class _Evil:
    def __reduce__(self):
        return (open, (str(PWNED), "w"))


def evil_pickle(dst: Path) -> Path:
    return write(dst, pickle.dumps({"state": _Evil()}))


def evil_torch(dst: Path) -> Path:
    import torch  # noqa: PLC0415

    dst.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"step": 1, "evil": _Evil()}, dst)
    return dst


def fifo(p: Path) -> Path:
    p.parent.mkdir(parents=True, exist_ok=True)
    os.mkfifo(p)
    return p


def chardev(p: Path) -> Path:
    """A private character device node (the null device's numbers) inside the work root."""
    p.parent.mkdir(parents=True, exist_ok=True)
    os.mknod(p, stat.S_IFCHR | 0o600, os.makedev(1, 3))
    return p


def unix_socket(p: Path) -> Path:
    p.parent.mkdir(parents=True, exist_ok=True)
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(p))
    s.close()
    return p


def immutable(p: Path) -> None:
    subprocess.run(["chattr", "+i", str(p)], check=False, capture_output=True)


def nan_router(src: Path, dst: Path) -> Path:
    from safetensors import safe_open  # noqa: PLC0415
    from safetensors.torch import load_file, save_file  # noqa: PLC0415

    with safe_open(str(src), "pt") as f:
        meta = f.metadata()
    t = load_file(str(src))
    t = {k: v.clone().fill_(float("nan")) if v.is_floating_point() else v for k, v in t.items()}
    dst.parent.mkdir(parents=True, exist_ok=True)
    save_file(t, str(dst), metadata=meta)  # keeps the router format header: only the values are bad
    return dst


def onnx_weight_offset(path: Path) -> int:
    """Byte offset of a float in the largest initializer of an ONNX file (a weight, not the graph structure)."""
    import onnx  # noqa: PLC0415

    m = onnx.load(str(path), load_external_data=False)
    cands = [
        t for t in m.graph.initializer if "pos_embed" not in t.name and "weight" in t.name and len(t.raw_data) >= 1024
    ]
    big = max(cands or m.graph.initializer, key=lambda t: len(t.raw_data))  # pos_embed is mostly unused (cropped)
    raw = big.raw_data
    data = path.read_bytes()
    at = data.find(raw[:64])
    return at + len(raw) // 2 + 3


def recipe_text(model: str = "sd35-tiny") -> str:
    """The built-in recipe with its relative router path made absolute (so a copy elsewhere still loads)."""
    txt = (REPO / "recipes" / f"{model}.toml").read_text()
    return re.sub(
        r'(?m)^(weights\s*=\s*)"([^"/][^"]*)"', lambda m: f'{m.group(1)}"{REPO / "recipes" / m.group(2)}"', txt
    )


def recipe_sub(old: str, new: str, model: str = "sd35-tiny") -> Callable[[Path], None]:
    def f(d: Path):
        txt = recipe_text(model)
        assert old in txt, (old, model)
        write(d / "r.toml", txt.replace(old, new, 1))

    return f


def sha(p: Path) -> str | None:
    try:
        return hashlib.sha256(p.read_bytes()).hexdigest()
    except OSError:
        return None


def tree(root: Path) -> dict[str, str]:
    """rel path -> kind (file/dir/link/fifo/chr/sock) of everything under root."""
    out = {}
    if not root.exists():
        return out
    for dp, dns, fns in os.walk(root, followlinks=False):
        for n in dns + fns:
            p = Path(dp) / n
            st = p.lstat()
            m = st.st_mode
            kind = (
                "link"
                if stat.S_ISLNK(m)
                else "dir"
                if stat.S_ISDIR(m)
                else "fifo"
                if stat.S_ISFIFO(m)
                else "chr"
                if stat.S_ISCHR(m)
                else "sock"
                if stat.S_ISSOCK(m)
                else "file"
            )
            out[str(p.relative_to(root))] = kind
    return out


# ----------------------------------------------------------------------------------------------------------------
# cases


#: single-valued options the base templates (G, TR, VP, ...) set, which cases override
BASE_SINGLE = (
    "--steps",
    "--backend",
    "--batch",
    "--phases",
    "--threads",
    "--cases",
    "--repeats",
    "--warmup",
    "--prompts",
    "--n-ref",
    "--velocity-samples",
    "--latency-repeats",
    "--samples",
)


@dataclass
class Case:
    id: str
    cmd: list[str]
    expect: tuple[int, ...]
    note: str
    mention: str | None = None  # the error line should contain this (the bad value or option)
    prep: Callable[[Path], None] | None = None
    check: Callable[[Path, Result], list[tuple[str, str]]] | None = None
    mode: str = "plain"  # plain | sigint | kill | concurrent
    after_s: float = 0.0  # sigint/kill: when to signal
    exit0_class: str = "S2"  # class when a refusal was expected and it exited 0
    timeout: int = TIMEOUT
    artifacts_ok: bool = False  # refusal may leave new files (e.g. a refused second run beside a first's output)
    repeat_ok: bool = False  # the case repeats an option on purpose (O29): keep both

    def __post_init__(self):
        """A case that overrides a base template's single-valued option (G + --steps 0) replaces it rather than
        repeating it: the CLI refuses a repeated single-valued option, which would hide the value under test."""
        if self.repeat_ok:
            return
        for opt in BASE_SINGLE:
            at = [i for i, a in enumerate(self.cmd) if a == opt]
            if len(at) == 2:
                del self.cmd[at[0] : at[0] + 2]


@dataclass
class Result:
    rc: int | None
    out: str
    err: str
    wall: float
    timed_out: bool = False
    extra: dict = field(default_factory=dict)


def fmt(args: list[str], d: Path) -> list[str]:
    return [a.replace("{D}", str(d)).replace("{S}", str(SETUP)).replace("{W}", str(WORK)) for a in args]


def launch(args: list[str], cwd: Path, extra_env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen(
        [PY, "-m", "shiva_export", *args],
        cwd=cwd,
        env=env(extra_env),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        start_new_session=True,
        text=True,
        errors="replace",
    )


def finish(p: subprocess.Popen, t0: float, timeout: float) -> Result:
    timed_out = False
    try:
        out, err = p.communicate(timeout=max(1.0, timeout - (time.time() - t0)))
    except subprocess.TimeoutExpired:
        timed_out = True
        os.killpg(p.pid, signal.SIGKILL)
        out, err = p.communicate()
    return Result(p.returncode, out or "", err or "", time.time() - t0, timed_out)


def execute(c: Case, d: Path) -> Result:
    args = fmt(c.cmd, d)
    t0 = time.time()
    if c.mode == "plain":
        extra = {k: v.replace("{D}", str(d)) for k, v in SPECIAL_ENV.get(c.id, {}).items()}
        return finish(launch(args, d, extra), t0, c.timeout)
    if c.mode in ("sigint", "kill"):
        p = launch(args, d)
        time.sleep(c.after_s)
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGINT if c.mode == "sigint" else signal.SIGKILL)
            signalled = True
        else:
            signalled = False
        r = finish(p, t0, c.timeout)
        r.extra["signalled"] = signalled
        if c.mode == "kill":  # the next identical run must sweep the killed run's temporary files and succeed
            r.extra["killed_tree"] = tree(d)
            t1 = time.time()
            r2 = finish(launch(args, d), t1, c.timeout)
            r.extra["rerun"] = r2
            r.wall += r2.wall
            if r.rc in (-9, 137):
                r.rc, r.out, r.err = r2.rc, r2.out, r2.err  # judge the rerun
        return r
    if c.mode == "concurrent":
        p1, p2 = launch(args, d), launch(args, d)
        r1, r2 = finish(p1, t0, c.timeout), finish(p2, t0, c.timeout)
        rc = 0 if (r1.rc == 0 and r2.rc in (0, 1, 2)) or (r2.rc == 0 and r1.rc in (0, 1, 2)) else (r1.rc or r2.rc)
        r = Result(rc, r1.out + r2.out, r1.err + "\n" + r2.err, time.time() - t0, r1.timed_out or r2.timed_out)
        r.extra["rcs"] = (r1.rc, r2.rc)
        r.extra["errs"] = (r1.err, r2.err)
        return r
    raise ValueError(c.mode)


TB = re.compile(r"Traceback \(most recent call last\)")
WARN = re.compile(r"(\b\w*Warning: |warnings\.warn\(|\[W:onnxruntime|^\[W\] |^WARNING[: ])", re.M)
ERRLINE = re.compile(r"^(?:Error|error|ERROR)\b.*$", re.M)
FIXWORDS = re.compile(
    r"(expected|expects|use |give|pass |must|needs?|install|run |one of|choose|remove|set |add |between|in \[|"
    r"in \(|--\w|should|only|at least|at most|refus|rebuild|re-export|not )",
    re.I,
)
PARTIAL = re.compile(r"(\.tmp\b|\btmp[.-]|\.partial|\.part$|\.incomplete|\.\d{3,}\.tmp|\.pid\d+|\.lock$)")
ARTIFACT = re.compile(r"(\.onnx$|\.onnx\.data$|\.plan$|\.safetensors$|\.png$|\.json$|\.pt$)")


def judge(
    c: Case, d: Path, r: Result, before: dict[str, str], outside_before: dict[str, str | None]
) -> tuple[str, str]:
    issues: list[tuple[str, str]] = []
    text = r.out + "\n" + r.err
    refusal = 0 not in c.expect
    # exit code
    if r.timed_out:
        issues.append(("S2", f"hung: killed after {c.timeout} s"))
    elif r.rc not in c.expect:
        if r.rc == 0 and refusal:
            issues.append((c.exit0_class, "accepted (exit 0)"))
        else:
            issues.append(("S2", f"exit {r.rc}, expected {'/'.join(map(str, c.expect))}"))
    # tracebacks, warnings
    if TB.search(text):
        issues.append(("S2", "traceback leaked"))
    m = WARN.search(text)
    if m:
        line = text[m.start() : text.find("\n", m.start())][:90].strip()
        issues.append(("S3", f"library warning leaked: `{line}`"))
    # message quality for refusals that did refuse
    if refusal and r.rc not in (0, None) and not r.timed_out and c.mode == "plain":
        errs = ERRLINE.findall(r.err) + ERRLINE.findall(r.out)
        if r.rc == 3:  # a parity failure ends with its documented greppable summary line instead of `Error:`
            errs = errs or re.findall(r"^FAILED \|.*$", r.out + "\n" + r.err, re.M)
        if not errs:
            issues.append(("S3", "no `Error:` line"))
        else:
            if len(errs) > 1:
                issues.append(("S3", f"{len(errs)} error lines"))
            e = errs[0]
            if c.mention and c.mention.lower() not in e.lower():
                issues.append(("S3", f"error line does not name `{c.mention}`"))
            if not FIXWORDS.search(e) and "Hint:" not in r.err.replace("Hint: add --debug", ""):
                issues.append(("S3", "no fix named"))
        if r.wall > LATE["s"]:
            made = [k for k, v in tree(d).items() if k not in before and v == "file" and ARTIFACT.search(k)]
            issues.append(
                (
                    "S2",
                    f"refused only after {r.wall:.0f} s" + (f" ({len(made)} artifacts written first)" if made else ""),
                )
            )
    # disk
    after = tree(d)
    for rel, kind in before.items():
        if kind in ("fifo", "chr", "sock") and after.get(rel) != kind:
            issues.append(("S1", f"special file {rel} ({kind}) replaced by {after.get(rel)}"))
    if refusal and r.rc != 0 and not c.artifacts_ok:
        new = [k for k, v in after.items() if k not in before and v == "file" and PARTIAL.search(k)]
        if new:
            issues.append(("S2", "temporary files left on disk: " + ", ".join(sorted(new)[:3])))
    for name, h in outside_before.items():
        if sha(OUTSIDE / name) != h:
            issues.append(("S1", f"file outside the output root changed: outside/{name}"))
    extra_out = set(tree(OUTSIDE)) - set(outside_before)
    if extra_out:
        issues.append(("S1", "written outside the output root: " + ", ".join(sorted(extra_out)[:3])))
    if set(outside_before) != set(tree(OUTSIDE)) or any(sha(OUTSIDE / n) != h for n, h in outside_before.items()):
        shutil.rmtree(OUTSIDE, ignore_errors=True)
        reset_outside()
    if PWNED.exists():
        issues.append(("S1", "pickle payload executed"))
        PWNED.unlink()
    if c.check:
        issues.extend(c.check(d, r))
    if not issues:
        return "clean", ""
    worst = max(issues, key=lambda i: CLASS_ORDER[i[0]])[0]
    return worst, "; ".join(f"{m}" if k == worst else f"({k}) {m}" for k, m in issues)


# ----------------------------------------------------------------------------------------------------------------
# case-specific checks


def chk_no_files(pattern: str) -> Callable:
    def f(d: Path, r: Result):
        left = [k for k in tree(d) if re.search(pattern, k)]
        return [("S2", "partial artifact after interrupt: " + ", ".join(left[:3]))] if left else []

    return f


def chk_sigint(d: Path, r: Result):
    out = []
    if not r.extra.get("signalled"):
        out.append(("S3", "finished before the signal (case not exercised)"))
    left = [k for k, v in tree(d).items() if v == "file" and not k.startswith("in/")]
    if left and r.rc != 0:
        out.append(("S2", "left after Ctrl-C: " + ", ".join(sorted(left)[:4])))
    return out


def chk_kill(d: Path, r: Result):
    out = []
    killed = r.extra.get("killed_tree", {})
    after = tree(d)
    stale = [k for k in after if re.search(r"(tmp|\.partial|\.\d{3,}\b|pid)", k) and k in killed]
    if stale:
        out.append(("S2", "killed run's temp files not swept by the rerun: " + ", ".join(stale[:3])))
    if not r.extra.get("signalled"):
        out.append(("S3", "finished before the kill (case not exercised)"))
    return out


def chk_onnx_valid(rel: str) -> Callable:
    def f(d: Path, r: Result):
        import onnx  # noqa: PLC0415

        p = d / rel
        try:
            onnx.checker.check_model(onnx.load(str(p)))
        except Exception as e:  # noqa: BLE001
            return [("S1" if r.rc == 0 else "S2", f"{rel} not a valid ONNX after the run: {type(e).__name__}")]
        return []

    return f


def chk_concurrent(rel: str) -> Callable:
    def f(d: Path, r: Result):
        rcs = r.extra.get("rcs")
        out = chk_onnx_valid(rel)(d, r) if rel.endswith(".onnx") else []
        mf = d / rel / "manifest.json"
        if not rel.endswith(".onnx") and 0 in rcs and mf.exists() and rel == "o":
            try:
                m = json.loads(mf.read_text())
                shards = [s for s in m.get("shards", []) if isinstance(s, dict)]
                for s in shards:
                    f = d / rel / s.get("file", s.get("name", ""))
                    if "sha256" in s and sha(f) != s["sha256"]:
                        out.append(("S1", f"{f.name} does not match the manifest after concurrent writes"))
            except (OSError, ValueError) as e:
                out.append(("S1", f"manifest unreadable after concurrent writes: {e}"))
        errs = r.extra.get("errs", ("", ""))
        for rc, e in zip(rcs, errs):
            if rc not in (0,) and TB.search(e):
                out.append(("S2", "loser's traceback"))
        out.append(("clean", f"exit codes {rcs}"))
        return out

    return f


def chk_unchanged(rel: str, h_file: str) -> Callable:
    def f(d: Path, r: Result):
        h = (d / h_file).read_text().strip() if (d / h_file).exists() else None
        if sha(d / rel) != h:
            return [("S1", f"{rel} overwritten")]
        return []

    return f


def chk_gen_same_as_setup(d: Path, r: Result):
    """A tampered cached graph must be re-exported (same image as the untampered run) or refused."""
    if r.rc != 0:
        return []
    ref = SETUP / "gen" / "000-a-red-cube.png"
    got = d / "gen" / "000-a-red-cube.png"
    if sha(ref) and sha(got) != sha(ref):
        return [("S1", "the tampered cached ONNX was used: the image differs from the untampered run")]
    return [("clean", "tampered cache detected and rebuilt (same image)")]


def chk_plan_rebuilt(d: Path, r: Result):
    if r.rc != 0:
        return []
    mf = json.loads((d / "sd35-tiny/ratio0.40/fp32/manifest.json").read_text())
    if sha(d / "sd35-tiny/ratio0.40/fp32/model.plan") != mf.get("engine_sha256"):
        return [("S1", "tampered plan kept: its sha256 does not match the manifest")]
    return [("clean", "tampered plan rebuilt")]


def chk_data_intact(d: Path, r: Result):
    left = sorted(tree(d / "mine"))
    if "keep.txt" not in left or (d / "mine/keep.txt").read_text() != "precious":
        return [("S1", "a user folder was deleted/overwritten by --overwrite")]
    return []


def chk_gen_symlink(d: Path, r: Result):
    p = d / "gen" / "generate.json"
    if p.is_symlink():
        return [("S2" if r.rc == 0 else "clean", "generate.json still the escaping symlink")] if r.rc == 0 else []
    return []


def chk_train_sigint(d: Path, r: Result):
    out = []
    if not r.extra.get("signalled"):
        out.append(("S3", "finished before the signal (case not exercised)"))
    files = [k for k, v in tree(d).items() if v == "file"]
    bad = [k for k in files if re.search(r"(tmp|partial)", k)]
    if bad:
        out.append(("S2", "temp files left after Ctrl-C: " + ", ".join(bad[:3])))
    return out


# ----------------------------------------------------------------------------------------------------------------
# the table

T = "sd35-tiny"
ONNX = "{S}/m.onnx"
ROUTER = "{S}/train/router.safetensors"
ENGINE = "{S}/engines/sd35-tiny/ratio0.40/fp32"
DATA = "{S}/data"
O = ["onnx", "--model", T, "--no-validate", "-q"]  # noqa: E741 (the onnx template, beside G and TR)
G = ["generate", "--model", T, "--prompt", "a red cube", "--steps", "1", "--backend", "ort", "-q"]
TR = ["train", "--model", T, "--steps", "1", "--batch", "1", "--phases", "1", "--threads", "1", "-q"]
TD = ["train-data", "--model", T, "-q"]
VP = ["validate", "parity", "--model", T, "--cases", "1", "-q"]
VS = ["validate", "speed", "--model", T, "--repeats", "1", "--warmup", "0", "-q"]
VQ = [
    "validate",
    "quality",
    "--model",
    "sd35-shapes",
    "--prompts",
    "1",
    "--steps",
    "1",
    "--n-ref",
    "8",
    "--velocity-samples",
    "1",
    "--latency-repeats",
    "0",
    "-q",
]
VF = [
    "validate",
    "frontier",
    "--model",
    T,
    "--prompts",
    "1",
    "--steps",
    "2",
    "--no-ort",
    "--latency-repeats",
    "0",
    "-q",
]
VE = ["validate", "estimator", "--model", T, "--samples", "1", "--keep", "0.6", "-q"]
TRT = ["trt", "--model", T, "--no-dense", "-q"]
RR = ["--ratio", "0.4"]  # one budget: a late refusal costs one export, not four


def deep_toml(n: int) -> str:
    return "x = " + "[" * n + "]" * n + "\n"


SETUP_CASES = [
    Case(
        "S-onnx",
        ["onnx", "--model", T, "--ratio", "0.4", "--parity-cases", "1", "--out", ONNX, "-q"],
        (0,),
        "shared ONNX export (setup)",
        check=lambda d, r: chk_onnx_valid(str(SETUP / "m.onnx"))(Path("/"), r),
    ),
    Case(
        "S-trt",
        ["trt", "--onnx", ONNX, "--backend", "tensorrt-rtx", "--out-dir", "{S}/engines", "-q"],
        (0,),
        "shared engine built ahead of time on the CPU (setup)",
    ),
    Case(
        "S-train",
        [
            "train",
            "--model",
            T,
            "--steps",
            "3",
            "--batch",
            "1",
            "--phases",
            "1",
            "--threads",
            "1",
            "--out-dir",
            "{S}/train",
            "-q",
        ],
        (0,),
        "shared tiny router (setup)",
    ),
    Case(
        "S-data",
        ["train-data", "--model", T, "--prompts", "{S}/p.txt", "--shard-size", "1", "--out", DATA, "-q"],
        (0,),
        "shared two-prompt text data (setup)",
        prep=lambda d: write(SETUP / "p.txt", "a red cube\na blue ball\n"),
    ),
    Case(
        "S-gen",
        [
            "generate",
            "--model",
            T,
            "--prompt",
            "a red cube",
            "--steps",
            "2",
            "--backend",
            "ort",
            "--ratio",
            "0.4",
            "--out",
            "{S}/gen",
            "--artifact-root",
            "{S}/art",
            "-q",
        ],
        (0,),
        "shared cached graph (setup)",
    ),
]

CASES_TABLE: list[Case] = [
    # ---------------- onnx: numbers
    Case("O01", O + ["--ratio", "-0.1"], (2,), "negative ratio", "-0.1"),
    Case("O02", O + ["--ratio", "nan"], (2,), "NaN ratio", "nan"),
    Case("O03", O + ["--ratio", "inf"], (2,), "inf ratio", "inf"),
    Case("O04", O + ["--ratio", "1"], (2,), "ratio 1 (k = 0)", "1"),
    Case("O05", O + ["--ratio", "0.999"], (2,), "ratio leaving k = 0 at N = 256", "0.999"),
    Case("O06", O + ["--ratio", "1e999"], (2,), "ratio overflowing to inf", "ratio"),
    Case("O07", O + ["--ratio", "0x1p-2"], (2,), "hex float ratio", "ratio"),
    Case("O08", O + ["--height", "0"], (2,), "zero height", "0"),
    Case("O09", O + ["--height", "-16"], (2,), "negative height", "-16"),
    Case("O10", O + ["--height", "72"], (2,), "height not a multiple of 16", "72"),
    Case("O11", O + ["--height", "99999999999999999999999"], (2,), "height beyond 64 bits", "height"),
    Case("O12", O + ["--height", "8192"], (2,), "height beyond the position embedding", "8192"),
    Case("O13", O + ["--width", "1.5"], (2,), "float width", "width"),
    Case("O14", O + ["--batch", "0"], (2,), "zero batch", "batch"),
    Case("O15", O + ["--batch", "-1"], (2,), "negative batch", "batch"),
    Case("O16", O + ["--batch", "18446744073709551617"], (2,), "batch 2**64+1", "batch"),
    Case("O17", O + ["--text-len", "0"], (2,), "zero text length", "text"),
    Case("O18", O + ["--opset", "16"], (2,), "opset below range", "16"),
    Case("O19", O + ["--opset", "99"], (2,), "opset above range", "99"),
    Case("O20", O + ["--dtype", "bf16"], (2,), "bf16 export (documented refusal)", "bf16"),
    Case("O21", O + ["--dtype", "int8"], (2,), "unknown dtype", "int8"),
    Case("O22", ["onnx", "--model", T, "--parity-cases", "0", "-q"], (2,), "zero parity cases", "parity"),
    Case("O23", ["onnx", "--model", T, "--parity-cases", "9", "-q"], (2,), "parity cases above 8", "9"),
    Case("O24", O + ["--context", "sometimes"], (2,), "unknown --context", "sometimes"),
    Case(
        "O25",
        ["onnx", "--model", "flux-tiny", "--context", "keep", "--no-validate", "-q"],
        (2,),
        "--context keep on Flux (documented refusal)",
        "context",
    ),
    Case("O26", O + ["--phase", "nosuchphase"], (2,), "unknown phase", "nosuchphase"),
    Case(
        "O27", O + ["--phase", "early", "--ratio", "0.3"], (2,), "--phase and --ratio together (contradictory)", "ratio"
    ),
    Case("O28", O + ["--phase", "7"], (2,), "phase index out of range", "7"),
    Case(
        "O29",
        O + ["--ratio", "0.4", "--ratio", "0.5", "--out", "{D}/x.onnx"],
        (2,),
        "single-valued --ratio given twice (last one silently wins?)",
        "ratio",
        repeat_ok=True,
    ),
    # ---------------- onnx: models, paths
    Case("O30", ["onnx", "--model", "../../recipes/sd35-tiny", "-q"], (2,), "--model as a path", "model"),
    Case("O31", ["onnx", "--model", "", "-q"], (2,), "empty --model", "model"),
    Case("O32", ["onnx", "--model", "sd35", "--no-validate", "-q"], (2,), "hub model offline", "weights"),
    Case("O33", O + ["--weights", "{D}/missing"], (1, 2), "missing --weights", "missing"),
    Case(
        "O34",
        O + ["--weights", "{D}/w.bin"],
        (1, 2),
        "--weights is a file",
        "w.bin",
        prep=lambda d: write(d / "w.bin", b"\0" * 64),
    ),
    Case(
        "O35",
        O + ["--weights", "{D}/empty"],
        (1, 2),
        "--weights empty folder",
        "empty",
        prep=lambda d: (d / "empty").mkdir(),
    ),
    Case(
        "O36",
        O + ["--weights", "{D}/w"],
        (1, 2),
        "--weights folder with another class's config.json",
        "w",
        prep=lambda d: write(d / "w/config.json", json.dumps({"_class_name": "UNet2DConditionModel"})),
    ),
    Case("O37", O + ["--router", "{D}/missing.safetensors"], (2,), "missing router", "missing.safetensors"),
    Case("O38", O + ["--router", "{D}"], (2,), "router is a directory", "router"),
    Case(
        "O39",
        O + ["--router", "{D}/r.safetensors"],
        (2,),
        "pickle disguised as .safetensors",
        "r.safetensors",
        prep=lambda d: evil_pickle(d / "r.safetensors"),
    ),
    Case(
        "O40",
        O + ["--router", "{D}/r.safetensors"],
        (2,),
        "truncated router",
        "r.safetensors",
        prep=lambda d: truncate(SETUP / "train/router.safetensors", d / "r.safetensors", 0.5),
    ),
    Case(
        "O41",
        O + ["--router", "{D}/r.safetensors"],
        (2,),
        "router header byte flipped",
        "r.safetensors",
        prep=lambda d: flip(SETUP / "train/router.safetensors", d / "r.safetensors", 10),
    ),
    Case(
        "O42",
        O + ["--router", "{D}/r.safetensors", "--out", "{D}/o/m.onnx"],
        (2,),
        "all-NaN router weights",
        "nan",
        prep=lambda d: nan_router(SETUP / "train/router.safetensors", d / "r.safetensors"),
    ),
    Case(
        "O43",
        O + ["--router", "{D}/r.safetensors"],
        (2,),
        "empty router file",
        "r.safetensors",
        prep=lambda d: write(d / "r.safetensors", b""),
    ),
    Case(
        "O44",
        O + ["--router", "{D}/r.safetensors"],
        (2,),
        "router is a FIFO (must not hang)",
        "r.safetensors",
        prep=lambda d: fifo(d / "r.safetensors"),
        timeout=60,
    ),
    Case(
        "O45",
        O + ["--out", "{D}/dir"],
        (1, 2),
        "--out is an existing directory",
        "dir",
        prep=lambda d: (d / "dir").mkdir(),
    ),
    Case(
        "O46",
        O + ["--out", "{D}/f/m.onnx"],
        (1, 2),
        "--out parent is a regular file",
        "f",
        prep=lambda d: write(d / "f", "x"),
    ),
    Case(
        "O47",
        O + ["--out", "{D}/ro/m.onnx"],
        (1,),
        "--out in an immutable folder (chattr +i; root)",
        "ro",
        prep=lambda d: ((d / "ro").mkdir(), immutable(d / "ro")),
    ),
    Case(
        "O48",
        O + ["--out", "{D}/p.onnx"],
        (1, 2),
        "--out is a FIFO",
        "p.onnx",
        prep=lambda d: fifo(d / "p.onnx"),
        timeout=60,
    ),
    Case(
        "O49",
        O + ["--out", "{D}/c.onnx"],
        (1, 2),
        "--out is a character device node",
        "c.onnx",
        prep=lambda d: chardev(d / "c.onnx"),
    ),
    Case(
        "O50",
        O + ["--out", "{D}/o/m.onnx"],
        (0, 1, 2),
        "--out is a symlink to a file outside the folder",
        prep=lambda d: ((d / "o").mkdir(), os.symlink(OUTSIDE / "victim.onnx", d / "o/m.onnx")),
    ),
    Case(
        "O51",
        O + ["--out", "{D}/ü 模型\u200b/m\u00e9.onnx"],
        (0,),
        "unicode / zero-width output name",
        check=chk_onnx_valid("ü 模型\u200b/mé.onnx"),
    ),
    Case("O52", O + ["--out", "{D}/m.txt"], (0, 2), "--out without the .onnx suffix"),
    Case(
        "O53",
        O + ["--out", "{D}/s.onnx"],
        (1, 2),
        "--out is a unix socket",
        "s.onnx",
        prep=lambda d: unix_socket(d / "s.onnx"),
    ),
    Case("O54", O + ["--dynamic-batch", "--batch", "0"], (2,), "dynamic batch with batch 0", "batch"),
    # ---------------- recipes
    Case("R01", O + ["--recipe", "{D}/missing.toml"], (2,), "missing recipe", "missing.toml"),
    Case("R02", O + ["--recipe", "{D}"], (2,), "recipe is a directory", "recipe"),
    Case(
        "R03",
        O + ["--recipe", "{D}/r.toml"],
        (2,),
        "binary recipe",
        "r.toml",
        prep=lambda d: write(d / "r.toml", os.urandom(4096)),
    ),
    Case(
        "R04",
        ["recipe", "check", "{D}/r.toml"],
        (2,),
        "deeply nested TOML (recursion)",
        "r.toml",
        prep=lambda d: write(d / "r.toml", deep_toml(50000)),
    ),
    Case(
        "R05",
        ["recipe", "check", "{D}/r.toml"],
        (2,),
        "empty recipe (missing keys)",
        "r.toml",
        prep=lambda d: write(d / "r.toml", ""),
    ),
    Case(
        "R06",
        ["recipe", "check", "{D}/r.toml"],
        (2,),
        "unknown top-level key",
        "surprise",
        prep=lambda d: write(d / "r.toml", recipe_text() + "\n[surprise]\nx = 1\n"),
    ),
    Case(
        "R07",
        ["recipe", "check", "{D}/r.toml"],
        (2,),
        "duplicate key (invalid TOML)",
        "r.toml",
        prep=lambda d: write(d / "r.toml", recipe_text() + "\n[surprise]\nx = 1\nx = 2\n"),
    ),
    Case(
        "R08",
        ["recipe", "check", "{D}/r.toml"],
        (2,),
        "UTF-16 encoded recipe",
        "r.toml",
        prep=lambda d: write(d / "r.toml", recipe_text().encode("utf-16")),
    ),
    Case(
        "R09",
        ["recipe", "check", "{D}/r.toml"],
        (2,),
        "recipe is a FIFO (must not hang)",
        "r.toml",
        prep=lambda d: fifo(d / "r.toml"),
        timeout=60,
    ),
    Case("R10", ["recipe", "show", "../scripts/bootstrap"], (2,), "recipe name escaping recipes/", "bootstrap"),
    Case("R11", ["recipe", "check", "sd35-tiny"], (0,), "built-in recipe checks"),
    Case("R12", ["recipe", "show", "sd35-tiny"], (0,), "built-in recipe shows"),
    Case("R13", ["recipe", "schema"], (0,), "schema prints"),
    Case("R14", ["recipe", "list"], (0,), "list prints"),
    Case(
        "R15",
        O + ["--recipe", "{D}/r.toml"],
        (2,),
        "recipe field of the wrong type (string for a table/number)",
        "num_layers",
        prep=recipe_sub("num_layers = 6", 'num_layers = "six"'),
    ),
    Case(
        "R16",
        O + ["--recipe", "{D}/r.toml"],
        (2,),
        "integer beyond 64 bits in a recipe",
        "r.toml",
        prep=recipe_sub("bottleneck = 64", "bottleneck = 99999999999999999999999"),
    ),
    Case(
        "R17",
        ["recipe", "check", "{D}/r.toml"],
        (2,),
        "scheduler_shift = nan in a recipe",
        "scheduler_shift",
        prep=recipe_sub("scheduler_shift = 3.0", "scheduler_shift = nan"),
    ),
    Case(
        "R18",
        ["onnx", "--recipe", "{D}/r.toml", "--phase", "0", "--no-validate", "-q"],
        (2,),
        "phase named ../../../../outside/evil (default output path would escape)",
        "evil",
        prep=recipe_sub('name = "early"', 'name = "../../../../outside/evil"'),
    ),
    Case(
        "R21",
        O + ["--recipe", "{D}/r.toml"],
        (2,),
        "recipe [prune] ratios = [-0.5, 1.5]",
        "ratios",
        prep=recipe_sub("ratios = [0.2, 0.4, 0.6]", "ratios = [-0.5, 1.5]"),
    ),
    Case(
        "R22",
        O + ["--recipe", "{D}/r.toml", "--phase", "early"],
        (2,),
        "recipe phase k beyond N (k = 9999)",
        "k",
        prep=recipe_sub("k = [196, 191, 184, 149, 56]", "k = [9999, 191, 184, 149, 56]"),
    ),
    Case(
        "R19",
        ["recipe", "check", "{D}/r.toml"],
        (2,),
        "10 MB recipe of one long string",
        "r.toml",
        prep=lambda d: write(d / "r.toml", 'x = "' + "a" * 10_000_000 + '"\n'),
    ),
    Case(
        "R20",
        ["recipe", "check", "{D}/r.toml"],
        (2,),
        "recipe with a NUL byte",
        "r.toml",
        prep=lambda d: write(d / "r.toml", recipe_text().replace("\n", "\n\0", 1)),
    ),
    # ---------------- trt
    Case("T01", TRT + ["--ratio", "1.2"], (2,), "trt ratio above 1", "1.2"),
    Case("T02", TRT + RR + ["--backend", "cuda-magic"], (2,), "unknown backend", "cuda-magic"),
    Case("T03", TRT + RR + ["--opt-level", "9"], (2,), "opt level above 5", "9"),
    Case("T04", TRT + RR + ["--opt-level", "-1"], (2,), "negative opt level", "-1"),
    Case("T05", TRT + RR + ["--workspace", "-5"], (2,), "negative workspace", "-5"),
    Case("T06", TRT + RR + ["--segments", "0"], (2,), "zero segments", "segments"),
    Case(
        "T07",
        TRT + RR + ["--dynamic-batch", "--batch-min", "5", "--batch-max", "2"],
        (2,),
        "batch-min > batch-max",
        "batch",
    ),
    Case(
        "T08",
        TRT + ["--batch-min", "3", "--ratio", "0.4"],
        (2,),
        "--batch-min without --dynamic-batch (ignored flag)",
        "batch-min",
    ),
    Case(
        "T09", TRT + RR + ["--backend", "tensorrt-rtx", "--aot-target", "99.9"], (2,), "impossible AOT target", "99.9"
    ),
    Case(
        "T10",
        TRT + RR + ["--backend", "tensorrt", "--aot-target", "8.9"],
        (2, 4),
        "--aot-target with datacenter tensorrt (contradictory)",
    ),
    Case("T11", ["trt", "--onnx", "{D}/missing.onnx", "-q"], (2,), "trt --onnx missing", "missing.onnx"),
    Case(
        "T12",
        ["trt", "--onnx", ONNX, "--ratio", "0.2", "--out-dir", "{D}/e", "-q"],
        (2,),
        "--onnx with a different --ratio (contradictory)",
        "ratio",
    ),
    Case(
        "T13",
        ["trt", "--onnx", "{D}/m.onnx", "--backend", "tensorrt-rtx", "--out-dir", "{D}/e", "-q"],
        (2,),
        "trt --onnx truncated",
        "m.onnx",
        prep=lambda d: truncate(SETUP / "m.onnx", d / "m.onnx", 0.3),
    ),
    Case(
        "T14",
        ["trt", "--onnx", ONNX, "--segments", "2", "--dynamic-batch", "--out-dir", "{D}/e", "-q"],
        (2,),
        "--segments with --dynamic-batch (documented fixed shapes only)",
        "segments",
    ),
    Case(
        "T15",
        ["trt", "--onnx", ONNX, "--backend", "tensorrt-rtx", "--timing-cache", "{D}", "--out-dir", "{D}/e", "-q"],
        (1, 2),
        "--timing-cache is a directory",
        "timing",
    ),
    Case(
        "T16",
        [
            "trt",
            "--onnx",
            ONNX,
            "--backend",
            "tensorrt-rtx",
            "--timing-cache",
            "{D}/notes.txt",
            "--out-dir",
            "{D}/e",
            "-q",
        ],
        (1, 2),
        "--timing-cache is a foreign file (must not overwrite)",
        "notes.txt",
        prep=lambda d: (
            write(d / "notes.txt", "my notes\n"),
            write(d / "notes.sha", hashlib.sha256(b"my notes\n").hexdigest()),
        ),
        check=chk_unchanged("notes.txt", "notes.sha"),
        exit0_class="S2",
        artifacts_ok=True,
    ),
    Case(
        "T17",
        ["trt", "--onnx", ONNX, "--backend", "tensorrt-rtx", "--strip-weights", "--out-dir", "{D}/e", "-q"],
        (4,),
        "--strip-weights without a GPU (documented: needs CUDA)",
        "GPU",
    ),
    Case(
        "T18",
        ["trt", "--onnx", ONNX, "--backend", "tensorrt-rtx", "--out-dir", "{D}/f", "-q"],
        (1, 2),
        "--out-dir is a file",
        "f",
        prep=lambda d: write(d / "f", "x"),
    ),
    Case("T19", TRT + ["--dtype", "bf16", "--ratio", "0.4"], (2,), "trt bf16 ONNX (refused by onnx)", "bf16"),
    Case(
        "T20",
        ["trt", "--onnx", ONNX, "--backend", "tensorrt-rtx", "--out-dir", "{D}/e", "-q"],
        (0,),
        "tampered plan in the cache is detected and rebuilt",
        prep=lambda d: (
            shutil.copytree(SETUP / "engines", d / "e"),
            flip(d / "e/sd35-tiny/ratio0.40/fp32/model.plan", d / "e/sd35-tiny/ratio0.40/fp32/model.plan", -100),
        ),
        check=lambda d, r: chk_plan_rebuilt(d / "e", r),
    ),
    Case(
        "T21",
        ["trt", "--onnx", ONNX, "--backend", "tensorrt-rtx", "--segments", "-3", "--out-dir", "{D}/e", "-q"],
        (2,),
        "negative segments",
        "-3",
    ),
    # ---------------- inspect
    Case("I01", ["inspect", "{D}/missing.onnx"], (2,), "inspect missing file", "missing.onnx"),
    Case("I02", ["inspect", "{D}"], (2,), "inspect a directory", "I02"),
    Case(
        "I03",
        ["inspect", "{D}/e.onnx"],
        (2,),
        "inspect an empty file",
        "e.onnx",
        prep=lambda d: write(d / "e.onnx", b""),
    ),
    Case(
        "I04",
        ["inspect", "{D}/t.onnx"],
        (2,),
        "inspect a truncated ONNX",
        "t.onnx",
        prep=lambda d: truncate(SETUP / "m.onnx", d / "t.onnx", 0.5),
    ),
    Case(
        "I05",
        ["inspect", "{D}/r.onnx"],
        (2,),
        "inspect random bytes",
        "r.onnx",
        prep=lambda d: write(d / "r.onnx", os.urandom(100000)),
    ),
    Case(
        "I06",
        ["inspect", "{D}/p.onnx"],
        (2,),
        "inspect a pickle named .onnx",
        "p.onnx",
        prep=lambda d: evil_pickle(d / "p.onnx"),
    ),
    Case("I07", ["inspect", ONNX, "--backend", "foo"], (2,), "inspect unknown backend", "foo"),
    Case("I08", ["inspect", ONNX, "--backend-version", "banana"], (2,), "inspect bogus backend version", "banana"),
    Case(
        "I09",
        ["inspect", "{D}/f.onnx"],
        (2,),
        "inspect a FIFO (must not hang)",
        "f.onnx",
        prep=lambda d: fifo(d / "f.onnx"),
        timeout=60,
    ),
    Case(
        "I10",
        ["inspect", "{D}/loop.onnx"],
        (2,),
        "inspect a symlink loop",
        "loop.onnx",
        prep=lambda d: (os.symlink(d / "loop2.onnx", d / "loop.onnx"), os.symlink(d / "loop.onnx", d / "loop2.onnx")),
    ),
    Case("I11", ["inspect", ONNX, "--backend", "tensorrt-rtx", "--json"], (0,), "inspect a good export"),
    Case(
        "I12",
        ["inspect", "{D}/h.onnx"],
        (2,),
        "inspect an ONNX with its header byte flipped",
        "h.onnx",
        prep=lambda d: flip(SETUP / "m.onnx", d / "h.onnx", 2),
    ),
    Case(
        "I13",
        ["inspect", "{D}/ext.onnx"],
        (2,),
        "inspect an ONNX whose external data file is missing",
        "data",
        prep=lambda d: _external_missing(d),
    ),
    # ---------------- run
    Case("U01", ["run", "{D}/missing"], (1, 2), "run missing engine", "missing"),
    Case("U02", ["run", "{D}/empty"], (1, 2), "run empty folder", "empty", prep=lambda d: (d / "empty").mkdir()),
    Case(
        "U03",
        ["run", "{D}/e"],
        (1, 2),
        "run: manifest.json is garbage",
        "manifest",
        prep=lambda d: (
            shutil.copytree(ENGINE.replace("{S}", str(SETUP)), d / "e"),
            write(d / "e/manifest.json", "{not json"),
        ),
    ),
    Case(
        "U04",
        ["run", "{D}/e"],
        (1, 2),
        "run: plan byte flipped (sha256 checked before the GPU)",
        "sha256",
        prep=lambda d: (
            shutil.copytree(ENGINE.replace("{S}", str(SETUP)), d / "e"),
            flip(d / "e/model.plan", d / "e/model.plan", -50),
        ),
    ),
    # since issue 21 the manifest is sealed (self_sha256): any edit is a run-time integrity error, exit 1 (as
    # tests/test_hostile_inputs_2.py pins), named as an edit; it no longer reaches the version comparison
    Case(
        "U05",
        ["run", "{D}/e"],
        (1,),
        "run: manifest backend_version edited",
        "edited",
        prep=lambda d: (shutil.copytree(ENGINE.replace("{S}", str(SETUP)), d / "e"), _edit_manifest(d / "e")),
    ),
    Case("U06", ["run", ENGINE], (4,), "run an intact engine without a GPU", "GPU"),
    Case("U07", ["run", ENGINE, "--iterations", "0"], (2,), "zero iterations", "iterations"),
    Case("U08", ["run", ENGINE, "--iterations", "-1"], (2,), "negative iterations", "-1"),
    Case(
        "U09",
        ["run", "{D}/e"],
        (1, 2),
        "run: model.plan is a FIFO (must not hang)",
        "plan",
        prep=lambda d: (
            shutil.copytree(ENGINE.replace("{S}", str(SETUP)), d / "e"),
            (d / "e/model.plan").unlink(),
            fifo(d / "e/model.plan"),
        ),
        timeout=60,
    ),
    Case("U10", ["run", ENGINE, "--seed", "99999999999999999999999"], (2,), "seed beyond 64 bits", "seed"),
    # ---------------- generate
    Case("G01", G + ["--steps", "0"], (2,), "zero steps", "steps"),
    Case("G02", G + ["--steps", "-3"], (2,), "negative steps", "-3"),
    Case("G03", G + ["--steps", "1000000000000000000000"], (2,), "steps beyond 64 bits", "steps"),
    Case("G04", G + ["--guidance", "nan"], (2,), "NaN guidance", "nan"),
    Case("G05", G + ["--guidance", "inf"], (2,), "inf guidance", "inf"),
    Case("G06", G + ["--seed", "99999999999999999999999"], (2,), "seed beyond 64 bits", "seed"),
    Case("G07", ["generate", "--model", T, "--steps", "1", "-q"], (2,), "no prompt", "prompt"),
    Case(
        "G08",
        ["generate", "--model", T, "--prompts", "{D}/missing.txt", "-q"],
        (2,),
        "missing prompts file",
        "missing.txt",
    ),
    Case("G09", ["generate", "--model", T, "--prompts", "{D}", "-q"], (2,), "prompts is a directory", "prompts"),
    Case(
        "G10",
        ["generate", "--model", T, "--prompts", "{D}/p.txt", "-q"],
        (2,),
        "prompts file only comments",
        "p.txt",
        prep=lambda d: write(d / "p.txt", "# nothing\n\n   \n"),
    ),
    Case(
        "G11",
        ["generate", "--model", T, "--prompts", "{D}/p.txt", "-q"],
        (2,),
        "binary prompts file",
        "p.txt",
        prep=lambda d: write(d / "p.txt", os.urandom(2048)),
    ),
    Case("G12", G + ["--backend", "tensorflow"], (2,), "unknown backend", "tensorflow"),
    Case("G13", G[:-3] + ["--backend", "trt", "--ratio", "0.4", "-q"], (4,), "trt backend without a GPU", "GPU"),
    Case("G14", G + ["--provider", "cuda"], (4,), "cuda provider without onnxruntime-gpu", "onnxruntime-gpu"),
    Case("G15", G + ["--device", "cuda"], (4,), "cuda device without a GPU", "cuda"),
    Case("G16", G + ["--dtype", "bf16"], (2,), "bf16 with the ort backend", "bf16"),
    Case("G17", G + ["--phases", "--ratio", "0.4"], (2,), "--phases with --ratio (contradictory)", "ratio"),
    Case(
        "G18",
        ["generate", "--model", "flux-tiny", "--prompt", "x", "--negative-prompt", "y", "--steps", "1", "-q"],
        (2,),
        "negative prompt on Flux (documented refusal)",
        "negative",
    ),
    Case(
        "G19",
        ["generate", "--model", "dit-tiny", "--prompt", "notaclass", "--steps", "1", "-q"],
        (2,),
        "DiT unknown class label",
        "notaclass",
    ),
    Case(
        "G20",
        ["generate", "--model", "dit-tiny", "--prompt", "1000", "--steps", "1", "-q"],
        (2,),
        "DiT class id out of range",
        "1000",
    ),
    Case(
        "G21",
        ["generate", "--model", "dit-tiny", "--prompt", "cat", "--context", "keep", "--steps", "1", "-q"],
        (2,),
        "--context keep on DiT (documented refusal)",
        "context",
    ),
    Case("G22", G + ["--height", "100"], (2,), "height not a multiple of 16", "100"),
    Case("G23", G + ["--width", "0"], (2,), "zero width", "width"),
    Case("G24", G + ["--threads", "0"], (2,), "zero threads", "threads"),
    Case("G25", G + ["--threads", "-1"], (2,), "negative threads", "threads"),
    Case("G26", G + ["--artifact", ONNX, "--ratio", "0.2"], (2,), "--artifact of ratio 0.4 with --ratio 0.2", "ratio"),
    Case(
        "G27",
        [
            "generate",
            "--model",
            "dit-tiny",
            "--prompt",
            "cat",
            "--backend",
            "ort",
            "--artifact",
            ONNX,
            "--steps",
            "1",
            "-q",
        ],
        (2,),
        "another model's ONNX as --artifact",
        "artifact",
    ),
    Case("G28", G + ["--out", "{D}/f"], (1, 2), "--out is a file", "f", prep=lambda d: write(d / "f", "x")),
    Case(
        "G29",
        G + ["--ratio", "0.4", "--artifact-root", "{D}/f"],
        (1, 2),
        "--artifact-root is a file",
        "f",
        prep=lambda d: write(d / "f", "x"),
    ),
    Case(
        "G30",
        [
            "generate",
            "--model",
            T,
            "--prompt",
            "a red cube",
            "--steps",
            "2",
            "--backend",
            "ort",
            "--ratio",
            "0.4",
            "--out",
            "{D}/gen",
            "--artifact-root",
            "{D}/art",
            "-q",
        ],
        (0, 2),
        "flipped byte in the cached runtime ONNX (content key unchanged)",
        prep=lambda d: _tamper_cache(d),
        check=chk_gen_same_as_setup,
    ),
    Case(
        "G31",
        [
            "generate",
            "--model",
            T,
            "--prompt",
            "a red cube",
            "--steps",
            "2",
            "--backend",
            "ort",
            "--ratio",
            "0.4",
            "--out",
            "{D}/gen",
            "--artifact-root",
            "{S}/art",
            "-q",
        ],
        (0, 1, 2),
        "--out holds generate.json symlinked outside the folder",
        prep=lambda d: ((d / "gen").mkdir(), os.symlink(OUTSIDE / "victim.json", d / "gen/generate.json")),
    ),
    Case(
        "G32",
        G + ["--ratio", "0.4", "--artifact", "{D}/junk"],
        (2,),
        "--artifact is a folder of junk",
        "junk",
        prep=lambda d: write(d / "junk/model.onnx", os.urandom(5000)),
    ),
    Case(
        "G33",
        G + ["--guidance", "0.5", "--ratio", "0.4", "--artifact", ONNX],
        (2,),
        "guidance <= 1 (CFG off) with a CFG export",
        "cfg",
    ),
    Case("G34", G + ["--prompt", "x" * 100000], (0, 2), "a 100 kB prompt"),
    # ---------------- validate parity
    Case("P01", VP + ["--cases", "0"], (2,), "zero cases", "cases"),
    Case("P02", VP + ["--cases", "9"], (2,), "nine cases", "9"),
    Case("P03", VP + ["--ratio", "nan"], (2,), "NaN ratio", "nan"),
    Case(
        "P04", VP + ["--backend", "engine", "--ratio", "0.4"], (2,), "engine backend without --engines-dir", "engines"
    ),
    Case("P05", VP + ["--backend", "ort-cuda", "--ratio", "0.4"], (4,), "ort-cuda without onnxruntime-gpu", "cuda"),
    Case(
        "P06",
        ["validate", "parity", "--onnx", ONNX, "--ratio", "0.2", "--cases", "1", "-q"],
        (2,),
        "--onnx of ratio 0.4 with --ratio 0.2",
        "ratio",
    ),
    Case("P07", ["validate", "parity", "--onnx", "{D}/missing.onnx", "-q"], (2,), "--onnx missing", "missing.onnx"),
    Case(
        "P08",
        ["validate", "parity", "--model", T, "--onnx", "{D}/m.onnx", "--cases", "1", "-q"],
        (3,),
        "ONNX with a weight byte flipped must FAIL parity",
        None,
        prep=lambda d: flip(SETUP / "m.onnx", d / "m.onnx", onnx_weight_offset(SETUP / "m.onnx")),
        exit0_class="S1",
    ),
    Case(
        "P09",
        VP + ["--ratio", "0.4", "--report", "{D}/f/r.md"],
        (1, 2),
        "--report under a regular file",
        "f",
        prep=lambda d: write(d / "f", "x"),
    ),
    Case("P10", VP + ["--backend", "bogus"], (2,), "unknown backend", "bogus"),
    Case("P11", VP + ["--engines-dir", "{D}/missing", "--ratio", "0.4"], (2,), "--engines-dir missing", "missing"),
    # ---------------- validate speed
    Case("V01", VS + ["--repeats", "0"], (2,), "zero repeats", "repeats"),
    Case("V02", VS + ["--warmup", "-1"], (2,), "negative warmup", "warmup"),
    Case("V03", VS + ["--backend", "foo"], (2,), "unknown backend", "foo"),
    Case("V04", VS + ["--device", "cuda", "--backend", "torch"], (4,), "cuda without a GPU", "cuda"),
    Case(
        "V05",
        VS + ["--compile", "--backend", "torch", "--ratio", "0.4"],
        (2,),
        "--compile without --e2e (ignored)",
        "compile",
    ),
    Case(
        "V06",
        VS + ["--steps", "5", "--backend", "torch", "--ratio", "0.4"],
        (2,),
        "--steps without --e2e (ignored)",
        "steps",
    ),
    Case(
        "V07",
        VS + ["--phases", "--backend", "torch", "--ratio", "0.4"],
        (2,),
        "--phases without --e2e (ignored)",
        "phases",
    ),
    Case("V08", VS + ["--threads", "0"], (2,), "zero threads", "threads"),
    Case("V09", VS + ["--ratio", "1"], (2,), "ratio 1", "1"),
    Case(
        "V10",
        VS + ["--out-dir", "{D}/f", "--backend", "torch", "--ratio", "0.4"],
        (1, 2),
        "--out-dir is a file",
        "f",
        prep=lambda d: write(d / "f", "x"),
    ),
    # ---------------- validate quality
    Case("Q01", VQ + ["--prompts", "0"], (2,), "zero prompts", "prompts"),
    Case("Q02", VQ + ["--prompts", "97"], (2,), "97 prompts (max 96)", "97"),
    Case("Q03", VQ + ["--keep", "0"], (2,), "keep 0", "keep"),
    Case("Q04", VQ + ["--keep", "1.5"], (2,), "keep above 1", "1.5"),
    Case("Q05", VQ + ["--keep", "nan"], (2,), "NaN keep", "nan"),
    Case("Q06", VQ + ["--seed", "2", "--seed", "2"], (2,), "repeated seed (documented distinct)", "seed"),
    Case("Q07", VQ + ["--method", "bogus"], (2,), "unknown method", "bogus"),
    Case(
        "Q08",
        ["validate", "quality", "--model", T, "--prompts", "1", "--steps", "1", "-q"],
        (2,),
        "model without a judge",
        T,
    ),
    Case("Q09", VQ + ["--n-ref", "0"], (2,), "zero reference scenes", "n-ref"),
    Case("Q10", VQ + ["--velocity-samples", "-1"], (2,), "negative velocity samples", "velocity"),
    Case("Q11", VQ + ["--latency-repeats", "-1"], (2,), "negative latency repeats", "latency"),
    Case("Q12", VQ + ["--out-dir", "{D}/f"], (1, 2), "--out-dir is a file", "f", prep=lambda d: write(d / "f", "x")),
    # ---------------- validate frontier
    Case("F01", VF + ["--prompts", "0"], (2,), "zero prompts", "prompts"),
    Case("F02", VF + ["--family", "bogus"], (2,), "unknown family", "bogus"),
    Case("F03", VF + ["--dense-steps", "0"], (2,), "dense steps 0", "dense-steps"),
    Case("F04", VF + ["--keep", "-0.2"], (2,), "negative keep", "-0.2"),
    Case("F05", VF + ["--steps", "0"], (2,), "zero steps", "steps"),
    Case("F06", VF + ["--threads", "0"], (2,), "zero threads", "threads"),
    Case(
        "F07",
        VF + ["--out-dir", "{D}/f"],
        (1, 2),
        "--out-dir is a file (must refuse before generating)",
        "f",
        prep=lambda d: write(d / "f", "x"),
    ),
    Case("F08", VF + ["--dense-steps", "-4"], (2,), "negative dense steps", "-4"),
    Case("F09", VF + ["--guidance", "nan"], (2,), "NaN guidance", "nan"),
    # ---------------- validate estimator
    Case("E01", VE + ["--delta", "0"], (2,), "zero delta", "delta"),
    Case("E02", VE + ["--delta", "nan"], (2,), "NaN delta", "nan"),
    Case("E03", VE + ["--delta", "5"], (2,), "delta beyond the keep range", "5"),
    Case("E04", VE + ["--samples", "0"], (2,), "zero samples", "samples"),
    Case("E05", VE + ["--estimator", "bogus"], (2,), "unknown estimator", "bogus"),
    Case("E06", VE[:-3] + ["--keep", "1", "-q"], (2,), "keep 1 (+delta leaves [0, 1])", "keep"),
    Case(
        "E07",
        VE + ["--router", "{D}/r.safetensors"],
        (2,),
        "pickle router for the estimator",
        "r.safetensors",
        prep=lambda d: evil_pickle(d / "r.safetensors"),
    ),
    Case("E08", VE + ["--min-agreement", "2"], (2,), "min agreement above 1", "2"),
    Case(
        "E09",
        VE + ["--report", "{D}/f/r.md"],
        (1, 2),
        "--report under a regular file",
        "f",
        prep=lambda d: write(d / "f", "x"),
    ),
    Case(
        "E10",
        VE + ["--data", "{D}/d"],
        (2,),
        "--data with a truncated shard",
        "shard",
        prep=lambda d: (
            shutil.copytree(SETUP / "data", d / "d"),
            truncate(d / "d/shard-00000.safetensors", d / "d/shard-00000.safetensors", 0.6),
        ),
    ),
    # ---------------- validate suite
    Case("X01", ["validate", "suite", "nosuchsuite", "-q"], (2,), "unknown suite", "nosuchsuite"),
    Case(
        "X02",
        ["validate", "suite", "{D}/s.toml", "-q"],
        (2,),
        "binary suite",
        "s.toml",
        prep=lambda d: write(d / "s.toml", os.urandom(3000)),
    ),
    Case(
        "X03",
        ["validate", "suite", "{D}/s.toml", "-q"],
        (2,),
        "deeply nested suite TOML",
        "s.toml",
        prep=lambda d: write(d / "s.toml", deep_toml(50000)),
    ),
    Case(
        "X04",
        ["validate", "suite", "{D}/s.toml", "-q"],
        (2,),
        "suite named ../../../../outside/esc (default report folder would escape)",
        "name",
        prep=lambda d: _escaping_suite(d),
    ),
    Case(
        "X05",
        ["validate", "suite", "{D}/s.toml", "-q"],
        (2,),
        "suite with an unknown key",
        "bogus_key",
        prep=lambda d: write(d / "s.toml", SMALL_SUITE.replace("NAME", "ok") + "bogus_key = 1\n"),
    ),
    Case(
        "X06",
        ["validate", "suite", "{D}/s.toml", "-q"],
        (2,),
        "suite case with ratios = [nan]",
        "nan",
        prep=lambda d: write(d / "s.toml", SMALL_SUITE.replace("NAME", "ok").replace("[0.4]", "[nan]")),
    ),
    # ---------------- train
    Case("N01", TR + ["--target-keep", "0"], (2,), "target keep 0", "target-keep"),
    Case("N02", TR + ["--target-keep", "1"], (2,), "target keep 1", "target-keep"),
    Case(
        "N03", TR + ["--target-keep", "0.6", "--ratio", "0.4"], (2,), "--target-keep with --ratio (exclusive)", "ratio"
    ),
    Case(
        "N04",
        TR[:3] + ["--steps", "1", "--steps", "2", "--batch", "1", "-q"],
        (2,),
        "two --steps values (1 or 3)",
        "steps",
        repeat_ok=True,
    ),
    Case("N05", TR[:3] + ["--steps", "-5", "-q"], (2,), "negative steps", "-5"),
    Case("N06", TR + ["--batch", "0"], (2,), "zero batch", "batch"),
    Case("N07", TR + ["--phases", "5"], (2,), "five phases (max 4)", "5"),
    Case("N08", TR + ["--lr-router", "nan"], (2,), "NaN learning rate", "nan"),
    Case("N09", TR + ["--lr-router", "-1"], (2,), "negative learning rate", "-1"),
    Case(
        "N10", TR + ["--min-keep", "0.9", "--target-keep", "0.5"], (2,), "keep floor above the target keep", "min-keep"
    ),
    Case("N11", TR + ["--max-logit", "0"], (2,), "zero logit bound", "max-logit"),
    Case("N12", TR + ["--budget", "foo"], (2,), "unknown budget", "foo"),
    Case(
        "N13",
        TR + ["--lambda-budget", "3", "--out-dir", "{D}/o"],
        (2,),
        "--lambda-budget without --budget ema (ignored)",
        "lambda",
    ),
    Case("N14", TR + ["--dora-rank", "8", "--out-dir", "{D}/o"], (2,), "--dora-rank without --dora (ignored)", "dora"),
    Case(
        "N15",
        TR + ["--dense-weight", "1", "--out-dir", "{D}/o"],
        (2,),
        "--dense-weight without --dora (documented --dora only)",
        "dense-weight",
    ),
    Case(
        "N16",
        TR + ["--patience", "3", "--out-dir", "{D}/o"],
        (2,),
        "--patience without --eval-every (documented needs)",
        "patience",
    ),
    Case("N17", TR + ["--eval-every", "0"], (2,), "zero eval-every", "eval-every"),
    Case("N18", TR + ["--caption-dropout", "1.5"], (2,), "dropout above 1", "1.5"),
    Case("N19", TR + ["--accumulate", "0"], (2,), "zero accumulate", "accumulate"),
    Case("N20", TR + ["--device", "cuda"], (4,), "cuda without a GPU", "cuda"),
    Case("N21", TR + ["--resume", "--out-dir", "{D}/o"], (2,), "--resume without a checkpoint", "checkpoint"),
    Case(
        "N22",
        TR + ["--resume", "--out-dir", "{D}/o"],
        (2,),
        "--resume from a pickle-bomb checkpoint.pt",
        "checkpoint",
        prep=lambda d: evil_torch(d / "o/checkpoint.pt"),
    ),
    Case(
        "N23",
        TR + ["--resume", "--out-dir", "{D}/o"],
        (2,),
        "--resume from a truncated checkpoint.pt",
        "checkpoint",
        prep=lambda d: truncate(SETUP / "train/checkpoint.pt", d / "o/checkpoint.pt", 0.5),
    ),
    Case("N24", TR + ["--data", "{D}/missing"], (2,), "--data missing", "missing"),
    Case(
        "N25",
        TR + ["--data", "{D}/d"],
        (2,),
        "--data shard with a byte flipped",
        "shard",
        prep=lambda d: (
            shutil.copytree(SETUP / "data", d / "d"),
            flip(d / "d/shard-00001.safetensors", d / "d/shard-00001.safetensors", -7),
        ),
    ),
    Case(
        "N26",
        TR + ["--data", "{D}/d"],
        (2,),
        "--data manifest.json garbage",
        "manifest",
        prep=lambda d: (shutil.copytree(SETUP / "data", d / "d"), write(d / "d/manifest.json", "[1,2")),
    ),
    Case(
        "N27",
        ["train", "--model", "flux-tiny", "--steps", "1", "--batch", "1", "--phases", "1", "--data", DATA, "-q"],
        (2,),
        "sd35-tiny data used for flux-tiny",
        "flux",
    ),
    Case("N28", TR + ["--out-dir", "{D}/f"], (1, 2), "--out-dir is a file", "f", prep=lambda d: write(d / "f", "x")),
    Case("N29", TR + ["--sampler-steps", "0"], (2,), "zero sampler steps", "sampler-steps"),
    Case("N30", TR + ["--sampler-shift", "nan"], (2,), "NaN sampler shift", "nan"),
    Case("N31", TR + ["--stage3-keep", "1.5"], (2,), "stage3 keep above 1", "1.5"),
    Case(
        "N32",
        TR + ["--paper-only", "--estimator", "output-gated", "--out-dir", "{D}/o"],
        (2,),
        "--paper-only with the non-paper estimator (contradictory)",
        "estimator",
    ),
    Case("N33", TR + ["--threads", "0"], (2,), "zero threads", "threads"),
    Case(
        "N34",
        TR + ["--data", "{D}/d"],
        (2,),
        "--data shard is a pickle renamed .safetensors",
        "shard",
        prep=lambda d: (shutil.copytree(SETUP / "data", d / "d"), evil_pickle(d / "d/shard-00000.safetensors")),
    ),
    Case(
        "N35",
        O + ["--recipe", "{D}/r.toml"],
        (2,),
        "recipe whose router file is another model's (sha256 kept)",
        "router",
        prep=lambda d: _foreign_router_recipe(d),
    ),
    # ---------------- train-data
    Case("D01", TD + ["--out", "{D}/o"], (2,), "no prompts, dataset or images", "prompts"),
    Case("D02", TD + ["--prompts", "{D}/missing.txt", "--out", "{D}/o"], (2,), "prompts file missing", "missing.txt"),
    Case(
        "D03",
        TD + ["--prompts", "{D}/p.txt", "--out", "{D}/o"],
        (2,),
        "empty prompts file",
        "p.txt",
        prep=lambda d: write(d / "p.txt", ""),
    ),
    Case(
        "D04",
        TD + ["--prompts", "{D}/p.txt", "--out", "{D}/o"],
        (2,),
        "binary prompts file",
        "p.txt",
        prep=lambda d: write(d / "p.txt", os.urandom(4096)),
    ),
    Case(
        "D05", TD + ["--prompts", "{S}/p.txt", "--shard-size", "0", "--out", "{D}/o"], (2,), "zero shard size", "shard"
    ),
    Case("D06", TD + ["--prompts", "{S}/p.txt", "--batch", "0", "--out", "{D}/o"], (2,), "zero batch", "batch"),
    Case("D07", TD + ["--prompts", "{S}/p.txt", "--dtype", "int4", "--out", "{D}/o"], (2,), "unknown dtype", "int4"),
    Case(
        "D08",
        TD + ["--prompts", "{S}/p.txt", "--out", "{D}/mine"],
        (1, 2),
        "--out is a non-empty user folder",
        "mine",
        prep=lambda d: write(d / "mine/keep.txt", "precious"),
        check=chk_data_intact,
    ),
    Case(
        "D09",
        TD + ["--prompts", "{S}/p.txt", "--out", "{D}/mine", "--overwrite"],
        (1, 2),
        "--overwrite on a folder that is not a train-data output",
        "mine",
        prep=lambda d: write(d / "mine/keep.txt", "precious"),
        check=chk_data_intact,
        exit0_class="S1",
    ),
    Case(
        "D10",
        TD + ["--prompts", "{S}/p.txt", "--out", "{D}/f"],
        (1, 2),
        "--out is a file",
        "f",
        prep=lambda d: write(d / "f", "x"),
    ),
    Case(
        "D11",
        TD + ["--images", "{D}/imgs", "--out", "{D}/o"],
        (2,),
        "--images is empty",
        "imgs",
        prep=lambda d: (d / "imgs").mkdir(),
    ),
    Case(
        "D12",
        TD + ["--images", "{D}/imgs", "--out", "{D}/o"],
        (2,),
        "--images with a corrupt PNG",
        "bad.png",
        prep=lambda d: (
            write(d / "imgs/bad.png", b"\x89PNG\r\n\x1a\n" + os.urandom(200)),
            write(d / "imgs/bad.txt", "a red cube"),
        ),
    ),
    Case(
        "D13",
        TD + ["--images", "{D}/imgs", "--prompts", "{D}/p.txt", "--out", "{D}/o"],
        (2,),
        "fewer captions than images",
        "p.txt",
        prep=lambda d: _two_pngs(d),
    ),
    Case("D14", TD + ["--dataset", "nobody/nothing", "--out", "{D}/o"], (2, 4), "dataset not cached", "nobody"),
    Case(
        "D15",
        TD + ["--prompts", "{S}/p.txt", "--prompt-column", "text", "--out", "{D}/o"],
        (2,),
        "--prompt-column without --dataset (ignored)",
        "prompt-column",
    ),
    Case(
        "D16", TD + ["--prompts", "{S}/p.txt", "--device", "cuda", "--out", "{D}/o"], (4,), "cuda without a GPU", "cuda"
    ),
    Case(
        "D17",
        TD + ["--images", "{D}/imgs", "--height", "100", "--out", "{D}/o"],
        (2,),
        "image height not a multiple of 16",
        "100",
        prep=lambda d: _two_pngs(d, captions=True),
    ),
    Case(
        "D18",
        TD + ["--prompts", "{S}/p.txt", "--out", "{D}/o", "--split", "validation"],
        (2,),
        "--split without --dataset (ignored)",
        "split",
    ),
    # ---------------- interrupts and concurrency
    Case(
        "K01",
        ["onnx", "--model", T, "--ratio", "0.4", "--out", "{D}/o/m.onnx", "-q"],
        (130,),
        "Ctrl-C during an onnx export",
        mode="sigint",
        after_s=9.0,
        check=chk_sigint,
    ),
    Case(
        "K02",
        ["onnx", "--model", T, "--ratio", "0.4", "--no-validate", "--out", "{D}/o/m.onnx", "-q"],
        (0,),
        "kill -9 during an onnx export, then rerun (temps swept)",
        mode="kill",
        after_s=9.0,
        check=chk_kill,
        timeout=240,
    ),
    Case(
        "K03",
        TR[:3] + ["--steps", "200", "--batch", "1", "--threads", "1", "-q", "--out-dir", "{D}/o"],
        (130,),
        "Ctrl-C during training",
        mode="sigint",
        after_s=10.0,
        check=chk_train_sigint,
    ),
    Case(
        "K04",
        TD + ["--prompts", "{D}/in/p.txt", "--out", "{D}/o"],
        (130,),
        "Ctrl-C during train-data (3000 prompts: still encoding at 5 s)",
        mode="sigint",
        after_s=5.0,
        check=chk_sigint,
        prep=lambda d: write(d / "in/p.txt", "".join(f"a red cube number {i}\n" for i in range(3000))),
    ),
    Case(
        "K05",
        ["onnx", "--model", T, "--ratio", "0.4", "--no-validate", "--out", "{D}/o/m.onnx", "-q"],
        (0,),
        "two concurrent exports into one --out",
        mode="concurrent",
        check=chk_concurrent("o/m.onnx"),
        timeout=300,
    ),
    Case(
        "K06",
        TD + ["--prompts", "{S}/p.txt", "--out", "{D}/o"],
        (0,),
        "two concurrent train-data into one --out",
        mode="concurrent",
        check=chk_concurrent("o"),
        timeout=300,
    ),
    Case(
        "K07",
        ["trt", "--onnx", "{D}/m.onnx", "--backend", "tensorrt-rtx", "--out-dir", "{D}/e", "-q"],
        (0,),
        "two concurrent trt builds into one folder (documented lock)",
        mode="concurrent",
        prep=lambda d: shutil.copy(SETUP / "m.onnx", d / "m.onnx"),
        check=chk_concurrent("e"),
        timeout=300,
    ),
    # ---------------- misc / global
    Case("M01", ["--version"], (0,), "version"),
    Case("M02", ["bogus-command"], (2,), "unknown command", "bogus-command"),
    Case(
        "M03",
        G + ["--ratio", "0.4"],
        (1, 2),
        "SHIVA_CACHE_DIR is a file",
        "cache",
        prep=lambda d: write(d / "cachefile", "x"),
    ),
]


def _external_missing(d: Path) -> None:
    import onnx  # noqa: PLC0415

    m = onnx.load(str(SETUP / "m.onnx"))
    onnx.save_model(
        m,
        str(d / "ext.onnx"),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location="ext.onnx.data",
        size_threshold=1024,
    )
    (d / "ext.onnx.data").unlink()


def _edit_manifest(e: Path) -> None:
    mf = json.loads((e / "manifest.json").read_text())
    mf["backend_version"] = "0.0.1"
    write(e / "manifest.json", json.dumps(mf, indent=2))


def _tamper_cache(d: Path) -> None:
    shutil.copytree(SETUP / "art", d / "art")
    for p in (d / "art").rglob("model.onnx"):
        flip(p, p, onnx_weight_offset(p))


def _two_pngs(d: Path, captions: bool = False) -> None:
    from PIL import Image  # noqa: PLC0415

    (d / "imgs").mkdir(parents=True, exist_ok=True)
    for i in range(2):
        Image.new("RGB", (64, 64), (200 * i, 30, 90)).save(d / f"imgs/{i}.png")
        if captions:
            write(d / f"imgs/{i}.txt", "a red cube")
    write(d / "p.txt", "only one caption\n")


SMALL_SUITE = """schema_version = 1
name = "NAME"
description = "probe"

[[case]]
kind = "parity"
model = "sd35-tiny"
ratios = [0.4]
backends = ["ort-cpu"]
cases = 1
"""


def _escaping_suite(d: Path) -> None:
    write(d / "s.toml", SMALL_SUITE.replace("NAME", "../../../../outside/esc"))


def _foreign_router_recipe(d: Path) -> None:
    txt = (SETUP / "train/recipe.toml").read_text()
    shapes_router = REPO / "recipes/sd35-shapes-ctx.learned/router.safetensors"
    if not shapes_router.exists():
        shapes_router = REPO / "recipes/sd35-shapes.learned/router.safetensors"
    new = re.sub(r'(?m)^(weights\s*=\s*)"[^"]*"', lambda m: f'{m.group(1)}"{shapes_router}"', txt)
    write(d / "r.toml", new)


# M03's environment: SHIVA_CACHE_DIR points at a file
SPECIAL_ENV = {"M03": {"SHIVA_CACHE_DIR": "{D}/cachefile"}}


# ----------------------------------------------------------------------------------------------------------------


VICTIMS = ("victim.onnx", "victim.json")
JUDGE_LOCK = threading.Lock()


def reset_outside() -> dict[str, str | None]:
    OUTSIDE.mkdir(parents=True, exist_ok=True)
    write(OUTSIDE / "victim.onnx", b"victim onnx: must stay\n")
    write(OUTSIDE / "victim.json", b'{"victim": true}\n')
    return {n: sha(OUTSIDE / n) for n in VICTIMS}


def unlock(root: Path) -> None:
    if root.exists():
        subprocess.run(["chattr", "-R", "-i", str(root)], check=False, capture_output=True)


def run_case(c: Case, keep: bool) -> dict:
    d = (SETUP if c.id.startswith("S-") else CASES) / ("" if c.id.startswith("S-") else c.id)
    if not c.id.startswith("S-"):
        unlock(d)
        shutil.rmtree(d, ignore_errors=True)
    d.mkdir(parents=True, exist_ok=True)
    with JUDGE_LOCK:
        outside = reset_outside() if not OUTSIDE.exists() else {n: sha(OUTSIDE / n) for n in VICTIMS}
    prep_err = None
    if c.prep:
        try:
            c.prep(d)
        except Exception as e:  # noqa: BLE001
            prep_err = f"prep failed: {type(e).__name__}: {e}"
    before = tree(d)
    if prep_err:
        r = Result(None, "", prep_err, 0.0)
        cls, note = "S3", prep_err
    else:
        r = execute(c, d)
        with JUDGE_LOCK:
            cls, note = judge(c, d, r, before, outside)
    first_err = next((ln for ln in (r.err + "\n" + r.out).splitlines() if ERRLINE.match(ln)), "")
    if not keep and not c.id.startswith("S-"):
        unlock(d)
    return {
        "id": c.id,
        "cmd": "shiva-export " + " ".join(_short(a) for a in fmt(c.cmd, d)),
        "what": c.note,
        "expected": "/".join(map(str, c.expect)),
        "got": ("timeout" if r.timed_out else r.rc),
        "class": cls,
        "note": note,
        "wall_s": round(r.wall, 1),
        "error_line": first_err[:300],
        "stderr_tail": r.err[-600:],
    }


def _short(a: str) -> str:
    a = a.replace(str(CASES) + "/", "").replace(str(SETUP), "setup").replace(str(WORK), "work")
    if len(a) > 40:
        a = a[:37] + "..."
    return a if a and " " not in a else repr(a)


def md(rows: list[dict], total_s: float) -> str:
    n = len(rows)
    counts = {k: sum(r["class"] == k for r in rows) for k in ("clean", "S1", "S2", "S3")}
    lines = [
        "# Hostile-input probe 2",
        "",
        f"Generated by `scripts/hostile_probe.py` on {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} "
        f"(commit `{_commit()}`), {total_s / 60:.1f} min on a shared 2-core machine, one thread per case "
        f"(load average {os.getloadavg()[0]:.0f} now; during the full run 8 agents shared the machine and a trivial "
        "refusal took 5-8 s instead of 1.6 s: about 12 min on a quiet machine).",
        "",
        f"**Cases: {n} | clean: {counts['clean']} ({100 * counts['clean'] / max(n, 1):.0f}%) | "
        f"S1: {counts['S1']} | S2: {counts['S2']} | S3: {counts['S3']}**",
        "",
        "Classes: S1 = wrong result or damage with exit 0 (or damage outside the output root at any exit); "
        "S2 = bad/contradictory flag silently accepted, refusal only after heavy work, traceback, wrong exit code, hang, "
        "partial artifact left; S3 = cosmetic (error line does not name the value or a fix, several error lines, a "
        "library warning leaked). Expected codes are README's: 2 usage/config, 4 missing hardware or package, "
        "1 run-time error, 3 parity failed, 130 interrupted. `S-*` rows are the shared setup.",
        "",
        "## Not clean",
        "",
    ]
    for r in rows:
        if r["class"] != "clean":
            lines.append(f"- **{r['id']}** ({r['class']}) `{r['cmd']}`: {r['what']}; got {r['got']}: {r['note']}")
    lines += [
        "",
        "## All cases",
        "",
        "| id | command (short) | probe | expected | got | class | s | note / error line |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        note = r["note"] or r["error_line"]
        note = note.replace("|", "\\|").replace("\n", " ")[:260]
        cmd = r["cmd"].replace("|", "\\|")
        lines.append(
            f"| {r['id']} | `{cmd}` | {r['what']} | {r['expected']} | {r['got']} | {r['class']} | "
            f"{r['wall_s']} | {note} |"
        )
    return "\n".join(lines) + "\n"


def _commit() -> str:
    try:
        return subprocess.run(
            ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
    except Exception:  # noqa: BLE001
        return "?"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=REPO / "docs/quality/hostile-probe-2.md")
    ap.add_argument("--only", default="", help="comma-separated case ids (the setup always runs unless --reuse-setup)")
    ap.add_argument("--reuse-setup", action="store_true", help="keep an existing setup folder")
    ap.add_argument("--keep", action="store_true", help="keep the case folders")
    ap.add_argument(
        "--merge",
        action="store_true",
        help="with --only: replace those rows in the existing OUT (and OUT .json), keep the others",
    )
    ap.add_argument("--jobs", type=int, default=2, help="plain cases run this many at a time (each single-threaded)")
    a = ap.parse_args()
    t0 = time.time()
    WORK.mkdir(parents=True, exist_ok=True)
    if PWNED.exists():
        PWNED.unlink()
    rows = []
    if not (a.reuse_setup and (SETUP / "gen").exists()):
        unlock(SETUP)
        shutil.rmtree(SETUP, ignore_errors=True)
        SETUP.mkdir(parents=True)
        for c in SETUP_CASES:
            rows.append(run_case(c, a.keep))
            print(
                f"{rows[-1]['id']:6} {rows[-1]['class']:5} rc={rows[-1]['got']} {rows[-1]['wall_s']:6.1f}s "
                f"{rows[-1]['note'][:120]}",
                flush=True,
            )
    only = {s for s in a.only.split(",") if s}
    todo = [c for c in CASES_TABLE if not only or c.id in only]
    # a trivial refusal, timed alone: refusals slower than 8x this (and 25 s) count as "after heavy work"
    t1 = time.time()
    subprocess.run(
        [PY, "-m", "shiva_export", "onnx", "--model", T, "--ratio", "-0.1"],
        env=env(),
        cwd=WORK,
        capture_output=True,
        check=False,
    )
    LATE["s"] = max(25.0, 8 * (time.time() - t1))
    print(f"refusal baseline {time.time() - t1:.1f} s: late after {LATE['s']:.0f} s", flush=True)

    def one(c: Case) -> dict:
        r = run_case(c, a.keep)
        print(f"{r['id']:6} {r['class']:5} rc={r['got']} {r['wall_s']:6.1f}s {r['note'][:140]}", flush=True)
        return r

    by_id = {}
    plain = [c for c in todo if c.mode == "plain"]
    with ThreadPoolExecutor(max_workers=max(1, a.jobs)) as pool:
        for r in pool.map(one, plain):
            by_id[r["id"]] = r
    for c in todo:  # signals and concurrent runs go alone
        if c.mode != "plain":
            by_id[c.id] = one(c)
    rows += [by_id[c.id] for c in todo]
    if a.merge and a.out.with_suffix(".json").exists():
        old = json.loads(a.out.with_suffix(".json").read_text())
        new = {r["id"]: r for r in rows}
        rows = [new.pop(r["id"], r) for r in old] + list(new.values())
    unlock(CASES)
    if not a.keep:
        shutil.rmtree(CASES, ignore_errors=True)
    total = time.time() - t0
    if a.merge and a.out.exists():  # the full run's time plus this rerun's
        m = re.search(r"([\d.]+) min on", a.out.read_text())
        total += 60 * float(m.group(1)) if m else 0.0
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(md(rows, total))
    a.out.with_suffix(".json").write_text(json.dumps(rows, indent=1, ensure_ascii=False) + "\n")
    counts = {k: sum(r["class"] == k for r in rows) for k in ("clean", "S1", "S2", "S3")}
    print(f"{len(rows)} cases, {total / 60:.1f} min: {counts}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
