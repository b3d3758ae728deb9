"""The errors PMLM raises for a user to act on: one base class, a few kinds.

Every package (`pipelines`, `recsys`, `promptenv`) raises subclasses of
`PMLMError` for what a user can fix: bad input, a step that has not run yet,
a wrong setting, a workspace that changed under a running step. The message is
one line saying what was wrong, where, and what to do; the command line prints
that line (no traceback unless ``--debug``) and exits with the kind's
``exit_code``. Programming errors stay built-in exceptions and keep their
traceback.

Each kind also derives from the built-in exception it refines (``ValueError``,
``FileNotFoundError``, ``RuntimeError``), so code that caught those keeps working.
"""

from __future__ import annotations


class PMLMError(Exception):
    """Base of every error a user can act on; ``exit_code`` is the command line's."""

    exit_code = 1


class InputError(PMLMError, ValueError):
    """The data or an argument is not what the step accepts (a file, a table, an option)."""

    exit_code = 2


class MissingStepError(PMLMError, FileNotFoundError):
    """What a step reads is not in the workspace yet: the message names the command that makes it."""

    exit_code = 3


class ConfigError(PMLMError, ValueError):
    """A setting is missing or invalid (an LLM backend, a key, a URL, a flag combination)."""

    exit_code = 4


class StaleStateError(PMLMError, RuntimeError):
    """The workspace changed while a step ran (another run wrote it): run the step again."""

    exit_code = 5


__all__ = ["ConfigError", "InputError", "MissingStepError", "PMLMError", "StaleStateError"]
