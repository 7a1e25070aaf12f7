"""One place for CLI output: results on stdout, progress/warnings/errors on stderr (Rich)."""

from __future__ import annotations

import json
import sys
from contextlib import contextmanager
from typing import Any

from rich.console import Console

#: progress, warnings and errors
err_console = Console(stderr=True, highlight=False, soft_wrap=True)


def result_json(obj: Any) -> None:
    sys.stdout.write(json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")
    sys.stdout.flush()


def result_text(text: str) -> None:
    sys.stdout.write(text + ("" if text.endswith("\n") else "\n"))
    sys.stdout.flush()


def error(msg: str) -> None:
    err_console.print(f"[bold red]Error:[/] {msg}", markup=True, highlight=False) if err_console.is_terminal else print(
        f"Error: {msg}", file=sys.stderr
    )


def warning(msg: str) -> None:
    print(f"Warning: {msg}", file=sys.stderr)


def hint(msg: str) -> None:
    print(f"Hint: {msg}", file=sys.stderr)


@contextmanager
def stages(enabled: bool = True):
    """Yields ``advance(stage_name)``; shows a Rich spinner with elapsed time per stage on a TTY,
    plain ``[stage]`` lines otherwise, nothing when disabled (``--quiet``)."""
    import time

    if not enabled:
        yield lambda stage: None
        return
    if not err_console.is_terminal:
        t0 = [time.perf_counter()]

        def plain(stage: str) -> None:
            print(f"[{time.perf_counter() - t0[0]:7.1f}s] {stage}", file=sys.stderr, flush=True)

        yield plain
        return
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    with Progress(
        SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(), console=err_console, transient=False
    ) as prog:
        current: list[int] = []

        def advance(stage: str) -> None:
            if current:
                prog.update(current[-1], completed=1, total=1)
            current.append(prog.add_task(stage, total=None))

        yield advance
        if current:
            prog.update(current[-1], completed=1, total=1)
