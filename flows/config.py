"""One reviewed config file for every ``pmlm`` command: ``pmlm.toml`` or ``[tool.pmlm]``.

The keys are the flags' names (``backend = "openai/gpt-4o-mini"``,
``max-calls = 500``, ``n-obstetric = 20``, ``cron = "0 3 * * *"``...); see
`Settings` for the list. Each value comes from, in order of precedence:

1. the command's flag (``--backend``);
2. the environment: ``PMLM_`` + the key in upper case with underscores
   (``PMLM_BACKEND``, ``PMLM_MAX_CALLS``; ``PMLM_WORKSPACE`` as before);
3. the config file: ``$PMLM_CONFIG`` when set, else ``./pmlm.toml``, else the
   ``[tool.pmlm]`` table of ``./pyproject.toml``;
4. the flag's default.

pydantic-settings reads the environment and the TOML file and checks the types;
`command_defaults` turns what the environment and the file say into click's
``default_map``, so a flag given on the command line still wins.
``pmlm config show`` prints the effective settings and where each came from.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import typer
from pydantic import ValidationError
from pydantic_settings import BaseSettings, EnvSettingsSource, SettingsConfigDict
from pydantic_settings.sources import PyprojectTomlConfigSettingsSource, TomlConfigSettingsSource
from rich.console import Console
from rich.table import Table

from pipelines.errors import ConfigError

CONFIG_FILE = "pmlm.toml"
CONFIG_ENV = "PMLM_CONFIG"
ENV_PREFIX = "PMLM_"


class Settings(BaseSettings):
    """Every key of the config file, with the flags' defaults (None: the command's own)."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="forbid")

    workspace: Path | None = None
    source: str = "default"
    backend: str = "local"
    max_calls: int | None = None
    n_obstetric: int | None = None
    n_adult: int | None = None
    n_calibration: int | None = None
    llm_parallel: int | None = None
    cron: str = "0 2 * * *"
    timezone: str = "UTC"
    log_level: str | None = None
    quiet: bool = False
    #: titles of a note's plan section (``plan-header = ["Plan", "Plan de tratamiento"]``;
    #: ``PMLM_PLAN_HEADER='["Plan", "Plan de tratamiento"]'``): `pipelines.plans.plan_headers`
    plan_header: list[str] | None = None


class _ToolPmlm(Settings):
    """Where `PyprojectTomlConfigSettingsSource` finds our table (never instantiated)."""

    model_config = SettingsConfigDict(pyproject_toml_table_header=("tool", "pmlm"))


def flag(key: str) -> str:
    """The flag of a settings key: ``max_calls`` → ``--max-calls``."""
    return "--" + key.replace("_", "-")


def env_var(key: str) -> str:
    return ENV_PREFIX + key.upper()


@dataclass(frozen=True)
class Loaded:
    """The effective settings and, per key, where its value came from."""

    settings: Settings
    origin: dict[str, str]
    file: Path | None

    def given(self) -> dict[str, Any]:
        """The keys set by a flag, the environment or the file (not defaults)."""
        values = self.settings.model_dump()
        return {k: values[k] for k, where in self.origin.items() if where != "default"}


def config_file(cwd: Path | None = None) -> tuple[Path | None, dict[str, Any]]:
    """The config file in use and its keys (snake_case), or (None, {}) when there is none.

    Raises ConfigError for a ``$PMLM_CONFIG`` that does not exist or a file
    that is not valid TOML.
    """
    import tomllib

    here = cwd or Path.cwd()
    explicit = os.environ.get(CONFIG_ENV)
    try:
        if explicit:
            path = Path(explicit).expanduser()
            if not path.is_file():
                raise ConfigError(
                    f"{CONFIG_ENV}={explicit} is not a file: point it to a pmlm.toml or unset it"
                )
            raw = TomlConfigSettingsSource(Settings, toml_file=path).toml_data
        elif (here / CONFIG_FILE).is_file():
            path = here / CONFIG_FILE
            raw = TomlConfigSettingsSource(Settings, toml_file=path).toml_data
        elif (here / "pyproject.toml").is_file():
            path = here / "pyproject.toml"
            raw = PyprojectTomlConfigSettingsSource(_ToolPmlm, toml_file=path).toml_data
            if not raw:  # a pyproject.toml without [tool.pmlm]
                return None, {}
        else:
            return None, {}
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path} is not valid TOML: {exc}; fix the file") from exc
    values = {str(k).replace("-", "_"): v for k, v in raw.items()}
    unknown = sorted(k for k in values if k not in Settings.model_fields)
    if unknown:
        known = ", ".join(flag(k)[2:] for k in Settings.model_fields)
        raise ConfigError(f"{path}: unknown key(s) {unknown}; known keys: {known}")
    return path, values


def load_settings(flags: Mapping[str, Any] | None = None, cwd: Path | None = None) -> Loaded:
    """The settings from ``flags`` (None values are not given) > environment > file > defaults.

    Raises ConfigError naming the key, its value's origin and what is wrong.
    """
    given = {k: v for k, v in (flags or {}).items() if v is not None}
    path, from_file = config_file(cwd)
    from_env = EnvSettingsSource(Settings)()
    origin: dict[str, str] = {}
    for key in Settings.model_fields:
        if key in given:
            origin[key] = f"flag {flag(key)}"
        elif key in from_env:
            origin[key] = f"env {env_var(key)}"
        elif key in from_file:
            origin[key] = f"file {path}"
        else:
            origin[key] = "default"
    merged = {**from_file, **from_env, **given}
    try:
        settings = Settings.model_validate(merged)
    except ValidationError as exc:
        first = exc.errors()[0]
        key = str(first["loc"][0]) if first["loc"] else "?"
        where = origin.get(key, "the config")
        raise ConfigError(
            f"setting {flag(key)[2:]} = {first.get('input')!r} (from {where}): {first['msg']}; "
            "fix that value"
        ) from exc
    return Loaded(settings, origin, path)


def command_defaults(command: Any, values: Mapping[str, Any]) -> dict[str, Any]:
    """click's ``default_map`` for ``command`` (``typer.main.get_command(app)``): each option
    named like a key gets its value.

    Nested by subcommand, as click expects; options not named like a key are left alone.
    (Typer bundles its own click, so the command is read by its attributes, not its class.)
    """
    out: dict[str, Any] = {
        p.name: values[p.name]
        for p in command.params
        if p.param_type_name == "option" and p.name in values
    }
    if hasattr(command, "commands"):
        for name, sub in command.commands.items():
            nested = command_defaults(sub, values)
            if nested:
                out[name] = nested
    return out


def cli_defaults(command: Any, cwd: Path | None = None) -> dict[str, Any]:
    """The ``default_map`` of the ``pmlm`` command tree from the environment and the config file."""
    return command_defaults(command, load_settings(None, cwd).given())


config_app = typer.Typer(help="The config file (pmlm.toml or [tool.pmlm]).", no_args_is_help=True)


@config_app.command("show")
def config_show_cmd(
    ctx: typer.Context,
    backend: Annotated[str | None, typer.Option(help="As for any command.")] = None,
    workspace: Annotated[Path | None, typer.Option("--workspace", "-w")] = None,
    source: Annotated[str | None, typer.Option()] = None,
    max_calls: Annotated[int | None, typer.Option()] = None,
    n_obstetric: Annotated[int | None, typer.Option()] = None,
    n_adult: Annotated[int | None, typer.Option()] = None,
    llm_parallel: Annotated[int | None, typer.Option()] = None,
    cron: Annotated[str | None, typer.Option()] = None,
    timezone: Annotated[str | None, typer.Option()] = None,
) -> None:
    """Print the effective settings and where each came from (flag, environment, file, default).

    Flags given here show how they would override the rest.
    """
    # only what this command line says: the file's and environment's values reach these
    # options too, as defaults (`command_defaults`), and must keep their own origin
    flags = {
        k: v
        for k, v in locals().items()
        if k in Settings.model_fields
        and getattr(ctx.get_parameter_source(k), "name", None) == "COMMANDLINE"
    }
    try:
        loaded = load_settings(flags)
    except ConfigError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(code=ConfigError.exit_code) from exc
    table = Table(title=f"pmlm settings (config file: {loaded.file or 'none'})")
    for column in ("key", "value", "from"):
        table.add_column(column, overflow="fold")
    values = loaded.settings.model_dump()
    for key in Settings.model_fields:
        value = values[key]
        table.add_row(flag(key)[2:], "" if value is None else str(value), loaded.origin[key])
    Console(width=max(100, Console().width)).print(table)


__all__ = ["Settings", "cli_defaults", "command_defaults", "config_app", "load_settings"]
