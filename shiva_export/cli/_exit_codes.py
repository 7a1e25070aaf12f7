"""Exit codes of the ``shiva-export`` CLI (documented in the README and in ``shiva-export --help``)."""

from __future__ import annotations

from enum import IntEnum

from shiva_export import errors


class ExitCode(IntEnum):
    OK = 0  #: success
    ERROR = 1  #: a ShivaError at run time (unreadable weights, unwritable output, export failure, ...)
    USAGE = 2  #: bad option value or combination (ratio, size, unknown model, dtype, bad recipe)
    VALIDATION_FAILED = 3  #: validation ran and a parity threshold was exceeded
    UNAVAILABLE = 4  #: an optional dependency or the required hardware is missing


#: error class -> exit code; the first matching class (in this order) wins.
ERROR_EXIT_CODES: list[tuple[type[BaseException], ExitCode]] = [
    (errors.ParityError, ExitCode.VALIDATION_FAILED),
    (errors.MissingDependencyError, ExitCode.UNAVAILABLE),
    (errors.HardwareError, ExitCode.UNAVAILABLE),
    (errors.ConfigError, ExitCode.USAGE),
    (errors.ShapeError, ExitCode.USAGE),
    (errors.RecipeError, ExitCode.USAGE),
    (errors.ModelNotFoundError, ExitCode.USAGE),
    (errors.RouterError, ExitCode.USAGE),
    (errors.ShivaError, ExitCode.ERROR),
]

EXIT_CODES_HELP = (
    "Exit codes: 0 ok | 1 error | 2 usage (bad value: ratio, size, model, recipe) | "
    "3 parity/validation failed | 4 missing optional dependency or hardware."
)


def exit_code_for(err: BaseException) -> ExitCode:
    for cls, code in ERROR_EXIT_CODES:
        if isinstance(err, cls):
            return code
    return ExitCode.ERROR
