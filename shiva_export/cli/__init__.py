"""The ``shiva-export`` command line: a thin layer over the ``shiva_export`` library.

``main()`` owns exit codes and tracebacks: library errors (``ShivaError``) print one line and exit with
their documented code (see ``_exit_codes.py``); ``--debug`` (anywhere on the line) or ``SHIVA_DEBUG=1``
shows the traceback. Commands import torch/diffusers inside their bodies so ``--help`` stays instant and
works without any optional backend.
"""

from __future__ import annotations

import os
import sys
import traceback

import click
import typer

from shiva_export._version import __version__
from shiva_export.cli._exit_codes import EXIT_CODES_HELP, ExitCode, exit_code_for
from shiva_export.cli._output import error, hint
from shiva_export.errors import ShivaError

__all__ = ["app", "main"]

_EXIT_TYPES = tuple({typer.Exit, click.exceptions.Exit})
_ABORT_TYPES = tuple({typer.Abort, click.exceptions.Abort})

app = typer.Typer(
    name="shiva-export",
    help=(
        "Shiva-DiT static top-k token pruning for diffusers DiTs: export to ONNX, build TensorRT engines, "
        "prove parity and speed.\n\n--ratio everywhere is the FRACTION OF IMAGE TOKENS PRUNED in each routed "
        "block: --ratio 0.4 keeps 60% (the paper's 1.54x 'Shiva-60%' point).\n\n" + EXIT_CODES_HELP
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)


def _version_callback(value: bool) -> None:
    if value:
        typer.echo(f"shiva-export {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", callback=_version_callback, is_eager=True, help="Print the version and exit."
    ),
    debug: bool = typer.Option(False, "--debug", help="Show full tracebacks on errors (also SHIVA_DEBUG=1)."),
) -> None:
    """Shiva-DiT export toolkit."""


def _register() -> None:
    from shiva_export.cli import engines as _engines
    from shiva_export.cli import frontier as _frontier
    from shiva_export.cli import generate as _generate
    from shiva_export.cli import onnx as _onnx
    from shiva_export.cli import recipe as _recipe
    from shiva_export.cli import serve as _serve
    from shiva_export.cli import train as _train
    from shiva_export.cli import train_data as _train_data
    from shiva_export.cli import validate as _validate

    app.command(name="onnx", help=_onnx.HELP, epilog=_onnx.EPILOG)(_onnx.onnx_command)
    app.command(name="trt", help=_engines.TRT_HELP, epilog=_engines.TRT_EPILOG)(_engines.trt_command)
    app.command(name="inspect", help=_engines.INSPECT_HELP)(_engines.inspect_command)
    app.command(name="run", help=_engines.RUN_HELP)(_engines.run_command)
    app.command(name="generate", help=_generate.HELP, epilog=_generate.EPILOG)(_generate.generate_command)
    app.command(name="serve", help=_serve.HELP, epilog=_serve.EPILOG)(_serve.serve_command)
    app.command(name="train", help=_train.HELP, epilog=_train.EPILOG)(_train.train_command)
    app.command(name="train-data", help=_train_data.HELP, epilog=_train_data.EPILOG)(_train_data.train_data_command)
    _validate.validate_app.command(name="frontier", help=_frontier.HELP, epilog=_frontier.EPILOG)(
        _frontier.frontier_command
    )
    app.add_typer(_validate.validate_app, name="validate")
    app.add_typer(_recipe.recipe_app, name="recipe")


_register()


def main(argv: list[str] | None = None) -> int:
    """Runs the CLI and returns its exit code (the console script passes it to ``sys.exit``)."""
    args = list(sys.argv[1:] if argv is None else argv)
    debug = os.environ.get("SHIVA_DEBUG", "0") not in ("", "0", "false") or "--debug" in args
    args = [a for a in args if a != "--debug"]
    if not debug:
        _quiet_libraries()
    command = typer.main.get_command(app)
    try:
        _refuse_repeated_options(command, args)
        rv = command.main(args=args, prog_name="shiva-export", standalone_mode=False)
        return int(rv) if isinstance(rv, int) else ExitCode.OK
    except _EXIT_TYPES as e:
        return int(getattr(e, "exit_code", 0) or 0)
    except _ABORT_TYPES:
        error("aborted.")
        return 130
    except KeyboardInterrupt:
        error("interrupted; no partial output was left behind.")
        return 130
    except ShivaError as e:
        code = exit_code_for(e)
        if debug:
            traceback.print_exc()
        error(str(e).splitlines()[0] if str(e) else type(e).__name__)
        if not debug:
            hint("add --debug (or set SHIVA_DEBUG=1) for the full traceback.")
        return code
    except Exception as e:
        # Click usage errors (typer vendors its own click, so match by duck type, not class).
        if hasattr(e, "show") and hasattr(e, "exit_code"):
            _name_commands(e)
            e.show()
            return int(e.exit_code)
        raise


def _name_commands(e) -> None:
    """An unknown command's usage error also lists the commands there are (the fix, on the error line)."""
    cmds = getattr(getattr(getattr(e, "ctx", None), "command", None), "commands", None)
    msg = getattr(e, "message", None)
    if isinstance(cmds, dict) and isinstance(msg, str) and msg.startswith("No such command"):
        e.message = f"{msg} Choose one of: {', '.join(sorted(cmds))}."


def _refuse_repeated_options(command, args: list[str]) -> None:
    """A single-valued option given twice (``--ratio 0.4 --ratio 0.5``) is refused: click would let the last one
    win silently. Walks the words the way click parses them (values are skipped, ``--`` ends options); a
    flag and its ``--no-`` twin count as one option. Unknown words are left to click's own message. Typer vendors
    its own click, so commands and options are matched by duck type."""
    from shiva_export.errors import ConfigError

    seen: dict[str, str] = {}
    i = 0
    while i < len(args):
        word = args[i]
        if word == "--":
            return
        if (
            isinstance(getattr(command, "commands", None), dict)
            and not word.startswith("-")
            and word in command.commands
        ):
            command, seen = command.commands[word], {}
            i += 1
            continue
        name, _, inline = word.partition("=")
        param = next(
            (
                p
                for p in command.params
                if getattr(p, "param_type_name", "") == "option" and name in p.opts + p.secondary_opts
            ),
            None,
        )
        if param is None:
            i += 1
            continue
        takes_value = not (param.is_flag or param.count)
        if takes_value and not inline and i + 1 >= len(args):
            return  # click names the missing value
        i += 1 if (not takes_value or inline) else 2
        if param.multiple or param.count:
            continue
        given = word if inline or not takes_value else f"{word} {args[i - 1]}"
        if param.name in seen and seen[param.name] != given:  # the same flag twice (-q -q) changes nothing
            raise ConfigError(
                f"{seen[param.name]} and {given} both set {param.opts[0]}, which takes one value (the last "
                f"would win silently); pass it once."
            )
        seen[param.name] = given


def _quiet_libraries() -> None:
    """Library warnings (diffusers, transformers, accelerate, hub) reach the terminal only with --debug."""
    import warnings

    for var in ("TRANSFORMERS_VERBOSITY", "DIFFUSERS_VERBOSITY", "HF_HUB_VERBOSITY"):
        os.environ.setdefault(var, "error")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings(
        "ignore", category=UserWarning, module=r"(diffusers|transformers|accelerate|huggingface_hub)\b.*"
    )


def _entry() -> None:
    sys.exit(main())
