"""Errors in a run's inputs, and how command lines report them.

A ``UserError`` is a mistake the user fixes in a file or a config field (a missing shard set
or weights file, a checkpoint that does not fit the model, too few shards for the ranks and
workers, a run folder that already holds checkpoints). Its message names the file or field
and what to do; the stage command lines print it as one line and exit with
``USER_ERROR_EXIT_CODE``, without a traceback unless ``--debug`` is given or
``VIDEO_DEBUG=1`` is set. Any other exception is an internal error and keeps its traceback.
The subclasses also derive from the built-in error they replace, so ``except ValueError``
keeps working.
"""
from __future__ import annotations

import logging
import os
import sys
from typing import Callable, Sequence

logger = logging.getLogger(__name__)

USER_ERROR_EXIT_CODE = 2
DEBUG_VARIABLE = "VIDEO_DEBUG"


class RunStopped(Exception):
    """The run ended early for a reason its message states (a stop signal, non-finite losses
    or weights): the command line logs that one line and exits with ``exit_code``."""

    exit_code = 1


class UserError(Exception):
    """A mistake in the run's inputs, fixed by the user (see the module docstring)."""


class InputError(UserError, ValueError):
    """A value, file content or combination of settings that cannot work."""


class MissingInputError(UserError, FileNotFoundError):
    """A file or folder the run needs does not exist."""


class RunExistsError(UserError, FileExistsError):
    """The run folder already holds a run that would be overwritten."""


def debug_requested(argv: Sequence[str]) -> bool:
    return "--debug" in argv or os.environ.get(DEBUG_VARIABLE, "") not in ("", "0")


def run_command(main: Callable[[list[str]], int], argv: Sequence[str] | None = None) -> int:
    """``main(argv)`` with user errors as one line on stderr and ``USER_ERROR_EXIT_CODE``, and
    a ``RunStopped`` logged as one line with its ``exit_code`` (``--debug`` is taken out of
    ``argv`` and shows the traceback instead)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = debug_requested(argv)
    try:
        return main([a for a in argv if a != "--debug"])
    except UserError as err:
        if debug:
            raise
        print(f"error: {err} (--debug shows the traceback)", file=sys.stderr)
        return USER_ERROR_EXIT_CODE
    except RunStopped as stop:
        if debug:
            raise
        logger.log(logging.WARNING if stop.exit_code != 1 else logging.ERROR, "%s", stop)
        return stop.exit_code
