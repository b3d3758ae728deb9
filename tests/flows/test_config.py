"""The config file: flag > environment > file > default, for every command and in `pmlm config show`."""

from __future__ import annotations

from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from flows.config import ENV_PREFIX, Settings, cli_defaults, command_defaults, load_settings
from pipelines.errors import ConfigError

FILE = """
backend = "openai/gpt-4o-mini"
max-calls = 500
n-obstetric = 20
cron = "0 3 * * *"
workspace = "from-file"
"""


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No PMLM_* variable of the caller's shell, and a folder of our own."""
    import os

    for name in list(os.environ):
        if name.startswith(ENV_PREFIX):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)


def show(*args: str) -> dict[str, tuple[str, str]]:
    """`pmlm config show` as {key: (value, from)}, with the defaults `pmlm` gives every command."""
    from flows.cli import app

    defaults = cli_defaults(typer.main.get_command(app))
    result = CliRunner().invoke(
        app, ["config", "show", *args], env={"COLUMNS": "250"}, default_map=defaults
    )
    assert result.exit_code == 0, result.output
    rows = {}
    for line in result.output.splitlines():
        cells = [c.strip() for c in line.strip("│┃ ").split("│")]
        if len(cells) == 3 and cells[0] in {k.replace("_", "-") for k in Settings.model_fields}:
            rows[cells[0]] = (cells[1], cells[2])
    assert len(rows) == len(Settings.model_fields), result.output
    return rows


def test_a_flag_beats_the_environment_which_beats_the_file_which_beats_the_default(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert show()["backend"] == ("local", "default")
    (tmp_path / "pmlm.toml").write_text(FILE)
    file = f"file {tmp_path / 'pmlm.toml'}"
    rows = show()
    assert rows["backend"] == ("openai/gpt-4o-mini", file)
    assert rows["max-calls"] == ("500", file) and rows["cron"] == ("0 3 * * *", file)
    assert rows["n-adult"] == ("", "default") and rows["timezone"] == ("UTC", "default")
    monkeypatch.setenv("PMLM_BACKEND", "anthropic/claude-x")
    monkeypatch.setenv("PMLM_MAX_CALLS", "7")
    rows = show()
    assert rows["backend"] == ("anthropic/claude-x", "env PMLM_BACKEND")
    assert rows["max-calls"] == ("7", "env PMLM_MAX_CALLS")
    assert rows["n-obstetric"] == ("20", file)
    rows = show("--backend", "local", "--n-obstetric", "3")
    assert rows["backend"] == ("local", "flag --backend")
    assert rows["n-obstetric"] == ("3", "flag --n-obstetric")
    assert rows["max-calls"] == ("7", "env PMLM_MAX_CALLS")


def test_the_tool_pmlm_table_of_a_pyproject_and_an_explicit_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "pyproject.toml").write_text('[project]\nname = "x"\n')
    assert load_settings().file is None  # a pyproject.toml without [tool.pmlm]
    (tmp_path / "pyproject.toml").write_text('[project]\nname = "x"\n[tool.pmlm]\nn-adult = 9\n')
    loaded = load_settings()
    assert loaded.settings.n_adult == 9 and loaded.file == tmp_path / "pyproject.toml"
    (tmp_path / "pmlm.toml").write_text("n-adult = 4\n")  # pmlm.toml comes first
    assert load_settings().settings.n_adult == 4
    other = tmp_path / "team.toml"
    other.write_text("n-adult = 12\n")
    monkeypatch.setenv("PMLM_CONFIG", str(other))
    assert load_settings().settings.n_adult == 12
    assert load_settings().origin["n_adult"] == f"file {other}"


def test_bad_files_and_values_say_where_and_what(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "pmlm.toml").write_text("backnd = 'local'\n")
    with pytest.raises(ConfigError, match=r"pmlm.toml: unknown key\(s\) \['backnd'\]; known keys"):
        load_settings()
    (tmp_path / "pmlm.toml").write_text("n-adult = 'many'\n")
    with pytest.raises(ConfigError, match=r"n-adult = 'many' \(from file .*pmlm.toml\)"):
        load_settings()
    (tmp_path / "pmlm.toml").write_text("n-adult = \n")
    with pytest.raises(ConfigError, match="is not valid TOML"):
        load_settings()
    monkeypatch.setenv("PMLM_CONFIG", str(tmp_path / "absent.toml"))
    with pytest.raises(ConfigError, match=r"PMLM_CONFIG=.*absent\.toml is not a file"):
        load_settings()


def test_every_command_takes_its_defaults_from_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The real command tree: the file's values become the defaults of the options named
    like its keys, and a flag on the command line still wins."""
    from flows.cli import app

    (tmp_path / "pmlm.toml").write_text(FILE)
    command = typer.main.get_command(app)
    defaults = command_defaults(command, load_settings().given())
    assert defaults["evaluate"]["backend"] == "openai/gpt-4o-mini"
    assert defaults["evaluate"]["max_calls"] == 500
    assert defaults["evaluate"]["n_obstetric"] == 20
    assert defaults["serve"]["cron"] == "0 3 * * *"
    assert defaults["data"]["summary"]["workspace"] == Path("from-file")
    # click applies the map: the workspace of the file, unless --workspace says otherwise
    runner = CliRunner()
    seen = runner.invoke(app, ["data", "summary"], default_map=defaults)
    assert "from-file" in str(seen.exception or "") + seen.output
    flagged = runner.invoke(app, ["data", "summary", "-w", "flagged"], default_map=defaults)
    text = str(flagged.exception or "") + flagged.output
    assert "flagged" in text and "from-file" not in text
