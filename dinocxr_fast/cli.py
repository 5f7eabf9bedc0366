"""What every command's ``--help`` shares: each option with its default, descriptions kept as
written. Imports nothing heavy, so ``--help`` answers before torch is loaded."""
from __future__ import annotations

import argparse
import sys
import time

_command_start: float | None = None


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Appends ``(default: X)`` to an option's help when it has a default worth showing."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "%(default)" in text or action.default in (None, False, [], argparse.SUPPRESS) or not action.option_strings:
            return text
        return f"{text} (default: %(default)s)"


def parser(prog: str, description: str, epilog: str | None = None) -> argparse.ArgumentParser:
    """An ArgumentParser with HelpFormatter; docstring markup (``code``) is shown as plain text."""
    description = description.replace("``", "")
    return argparse.ArgumentParser(prog=prog, description=description, epilog=epilog, formatter_class=HelpFormatter)


def mark_command_start() -> None:
    """A command began (before its heavy imports): train.max_minutes counts from here."""
    global _command_start
    _command_start = time.monotonic()


def command_start() -> float:
    """When the running command began; now if no command marked its start (a job built in code)."""
    return _command_start if _command_start is not None else time.monotonic()


def clear_command_start() -> None:
    global _command_start
    _command_start = None


# The errors a user can act on (a missing file, a bad value, a refused device or backend): the
# commands report them as one line and exit 1 instead of a traceback.
USER_ERRORS = (FileNotFoundError, ValueError, RuntimeError)


def user_error(message: object) -> int:
    """Report one line on stderr; returns the exit status 1."""
    print(f"error: {message}", file=sys.stderr)
    return 1


def run(work, *args) -> int:
    """A command's exit status: 0 when ``work(*args)`` ends, 1 with one line on stderr when it
    raises a user error (USER_ERRORS)."""
    try:
        work(*args)
    except USER_ERRORS as exc:
        return user_error(exc)
    return 0
