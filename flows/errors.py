"""How ``pmlm`` ends on an error a user can act on: one line, what to do, a distinct exit code.

The packages raise `pipelines.errors.PMLMError` subclasses whose message says
what was wrong and where; `error_line` adds what to do from the command line
for the LLM's errors (which flag raises the budget, what to check when the
backend refuses). `run_app` runs the Typer app with the config file's defaults
(`flows.config`) and turns those errors into that line on stderr and the
error's ``exit_code``; with ``pmlm --debug`` the traceback is shown instead.

Exit codes (`EXIT_CODES`): 0 done; 1 other errors; 2 bad input (also click's
usage errors); 3 a missing step; 4 a bad setting; 5 the workspace changed
under the run; 6 the LLM failed (retries exhausted); 7 the LLM budget is spent;
8 the backend refused the request; 9 the privacy guard refused a prompt.
"""

from __future__ import annotations

import sys
from typing import Any

import typer

from pipelines.errors import ConfigError, InputError, MissingStepError, PMLMError, StaleStateError
from promptenv.llm import errors as llm

#: Exit code → what it means (README, "Errors and exit codes").
EXIT_CODES = {
    InputError.exit_code: "bad input (a file, a table, an option)",
    MissingStepError.exit_code: "a step has not run yet: the message names the command",
    ConfigError.exit_code: "a bad setting (backend, key, URL, config file)",
    StaleStateError.exit_code: "the workspace changed under the run: run it again",
    llm.LLMError.exit_code: "the LLM failed (retries exhausted)",
    llm.BudgetExceeded.exit_code: "the LLM budget is spent",
    llm.PermanentBackendError.exit_code: "the LLM backend refused the request",
    llm.PrivacyViolation.exit_code: "the privacy guard refused a prompt",
}
#: What to do from the command line, beyond what the package's message says.
CLI_HINTS: dict[type[PMLMError], str] = {
    llm.BudgetExceeded: "raise --max-calls (or max-calls in pmlm.toml) and run the command again: "
    "the answers already received come from the cache",
    llm.PermanentBackendError: "check --backend (or backend in pmlm.toml / PMLM_BACKEND), "
    "the model name and the API key",
    llm.PrivacyViolation: "use a local backend, or remove the identifiers from the source",
    llm.RetriesExhausted: "run the command again later: the answers already received come from "
    "the cache",
    llm.TransientBackendError: "run the command again later: the answers already received come "
    "from the cache",
}


class Debug:
    """``pmlm --debug``: show tracebacks instead of one line."""

    enabled = False


def error_line(exc: PMLMError) -> str:
    """``error: MESSAGE; WHAT TO DO`` on one line."""
    message = " ".join(str(exc).split())
    hint = next((h for kind, h in CLI_HINTS.items() if isinstance(exc, kind)), None)
    return f"error: {message}" + (f" ({hint})" if hint else "")


def exit_for(exc: Exception) -> typer.Exit:
    """Print ``exc`` as one error line; the `typer.Exit` to raise (a `PMLMError`'s exit code, else 1).

    For commands that catch an error to add where it happened (``raise exit_for(exc) from exc``).
    """
    if isinstance(exc, PMLMError):
        typer.echo(error_line(exc), err=True)
        return typer.Exit(code=exc.exit_code)
    typer.echo("error: " + " ".join(str(exc).split()), err=True)
    return typer.Exit(code=1)


def run_app(app: typer.Typer, args: list[str] | None = None, **extra: Any) -> None:
    """Run ``app`` with the config file's defaults; exit with one line on a `PMLMError`.

    ``extra`` goes to click (a test passes ``standalone_mode``). A bad config file
    is itself a `ConfigError`, reported the same way.
    """
    from flows.config import cli_defaults

    try:
        defaults = cli_defaults(typer.main.get_command(app))
        app(args, default_map=defaults, **extra)
    except PMLMError as exc:
        if Debug.enabled:
            raise
        typer.echo(error_line(exc), err=True)
        sys.exit(exc.exit_code)


__all__ = ["CLI_HINTS", "EXIT_CODES", "Debug", "error_line", "exit_for", "run_app"]
