"""One exception tree. The CLI maps each class to an exit code; nothing else calls exit."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class CompressError(Exception):
    """Base of every error the tool raises on purpose. ``problems`` holds one line per problem."""

    exit_code = 1

    def __init__(self, message: str | list[str]):
        self.problems = [message] if isinstance(message, str) else list(message)
        super().__init__("\n".join(self.problems))


class RecipeError(CompressError):
    """The recipe (or a command-line override) is invalid. Exit code 2."""

    exit_code = 2


class UsageError(CompressError):
    """The command line is wrong (e.g. output exists without --force). Exit code 2."""

    exit_code = 2


class SourceError(CompressError):
    """A model, checkpoint or dataset could not be loaded. Exit code 1."""


class StageError(CompressError):
    """A stage failed while running (NaN loss, unsupported model, ...). Exit code 1."""


class GuardError(CompressError):
    """A guard (e.g. max_accuracy_drop) was violated. Exit code 3."""

    exit_code = 3


class Interrupted(CompressError):
    """SIGINT/SIGTERM received; a snapshot was written. Exit code 130."""

    exit_code = 130


def did_you_mean(name: object, choices: Iterable[str]) -> str:
    """`` (did you mean 'x'?)`` for the closest choice, else `` (known: a, b, ...)``: appended to errors."""
    choices = list(choices)
    close = difflib.get_close_matches(str(name), choices, n=1, cutoff=0.5)
    return f" (did you mean {close[0]!r}?)" if close else f" (known: {', '.join(sorted(choices))})"
