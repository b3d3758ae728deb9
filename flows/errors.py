"""How ``pmlm`` ends on an error a user can act on: one line, what to do, a distinct exit code.

The packages raise `pipelines.errors.PMLMError` subclasses whose message says
what was wrong and where; `error_line` adds what to do from the command line
for the LLM's errors (which flag raises the budget, what to check when the
backend refuses); `flows.options.PMLMGroup` prints that line on stderr and exits
with the error's ``exit_code`` (``pmlm --debug`` or ``PMLM_DEBUG=1``: the
traceback instead). `run_app` runs the Typer app with the config file's
defaults (`flows.config`).

Exit codes (`EXIT_CODES`): 0 done; 1 other errors; 2 bad input (also click's
usage errors); 3 a missing step; 4 a bad setting; 5 the workspace changed
under the run; 6 the LLM failed (retries exhausted); 7 the LLM budget is spent;
8 the backend refused the request; 9 the privacy guard refused a prompt; 10 the
SQL target refused the export.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import typer

from pipelines.errors import ConfigError, InputError, MissingStepError, PMLMError, StaleStateError
from pipelines.export import ExportFailed
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
    ExportFailed.exit_code: "the SQL target refused the export (rolled back)",
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


def error_line(exc: PMLMError) -> str:
    """``error: MESSAGE; WHAT TO DO`` on one line."""
    message = " ".join(str(exc).split())
    hint = next((h for kind, h in CLI_HINTS.items() if isinstance(exc, kind)), None)
    return f"error: {message}" + (f" ({hint})" if hint else "")


#: Seconds the temporary Prefect server may take to start, unless
#: ``PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS`` says otherwise. Prefect's own
#: 20 s is too short for its first start on a busy 2-core machine, where it creates
#: its database (measured: a fresh machine's first ``make run`` failed at 20 s).
SERVER_STARTUP_SECONDS = 120
SERVER_STARTUP_ENV = "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"


def prefect_defaults() -> None:
    """PMLM's defaults for Prefect settings the user did not set: no usage telemetry, and
    `SERVER_STARTUP_SECONDS` for the temporary server. Call before Prefect is imported:
    it reads its settings once."""
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault(SERVER_STARTUP_ENV, str(SERVER_STARTUP_SECONDS))


@contextmanager
def temporary_server_errors() -> Iterator[None]:
    """Turn the temporary Prefect server's failure to start into a `ConfigError` that says
    what to do."""
    try:
        yield
    except RuntimeError as exc:
        if "ephemeral Prefect API server" not in str(exc):
            raise
        raise ConfigError(
            "the temporary Prefect server did not start within "
            f"{os.environ.get(SERVER_STARTUP_ENV, 20)} s: "
            f"raise {SERVER_STARTUP_ENV}, or set PREFECT_API_URL to a running server "
            "(`prefect server start`)"
        ) from exc


def run_app(app: typer.Typer, args: list[str] | None = None, **extra: Any) -> None:
    """Run ``app`` with the config file's defaults (`flows.config`).

    The commands' own errors are reported by `flows.options.PMLMGroup`; a bad
    config file is a `ConfigError` reported here the same way, before any command runs.
    ``extra`` goes to click (e.g. ``standalone_mode``).
    """
    from flows.config import cli_defaults
    from flows.options import DEBUG_ENV

    try:
        defaults = cli_defaults(typer.main.get_command(app))
    except PMLMError as exc:
        if os.environ.get(DEBUG_ENV):
            raise
        typer.echo(error_line(exc), err=True)
        sys.exit(exc.exit_code)
    app(args, default_map=defaults, **extra)


__all__ = [
    "CLI_HINTS",
    "EXIT_CODES",
    "SERVER_STARTUP_SECONDS",
    "error_line",
    "prefect_defaults",
    "run_app",
    "temporary_server_errors",
]
