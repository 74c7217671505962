"""Exceptions that the command line reports as one clear line.

Every error a user can cause (bad input, bad config) is a :class:`BonedrrError`. The CLI prints it as
``bonedrr <command>: error: <path>: <problem>`` and exits non-zero, with no traceback unless
``--debug`` is given. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

from pathlib import Path


class BonedrrError(Exception):
    """An error caused by the input or the configuration, not by a bug.

    Args:
        message: What is wrong, in one sentence, without the path.
        path: The file or folder the problem is in, if there is one.
    """

    def __init__(self, message: str, path: str | Path | None = None):
        self.message = message
        self.path = None if path is None else str(path)
        super().__init__(f"{self.path}: {message}" if self.path else message)


class InputError(BonedrrError):
    """A CT, radiograph, label or sample file that cannot be used as it is."""


class ConfigError(BonedrrError):
    """The workflow configuration or a sample sheet does not follow its schema."""
