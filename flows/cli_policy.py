"""``pmlm policy train|apply|show``: thin wrappers over `promptenv.steps` and `promptenv.policy`."""

from __future__ import annotations

import json
from typing import Annotated

import typer
from rich.console import Console

from flows.options import LLMParallelOpt, PMLMGroup, WorkspaceOpt
from flows.progress import OUTPUT, bar
from pipelines.workspace import Workspace
from promptenv.llm.config import use_llm_parallel
from promptenv.policy_info import ModelTarget

policy_app = typer.Typer(
    cls=PMLMGroup,
    help="The prompt-editing policy: train it with MaskablePPO, apply it with no LLM call.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
)
console = Console()


def _labels(value: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in value.split(",") if part.strip())


def _edit_labels(value: str) -> str:
    from promptenv.editing import UnknownEditError, edit_ids

    try:
        edit_ids(_labels(value))
    except UnknownEditError as exc:  # the full list is `pmlm policy edits`
        raise typer.BadParameter(
            f"unknown edit {exc.label!r}; `pmlm policy edits` lists the edits"
        ) from None
    return value


@policy_app.command("train")
def train_cmd(
    workspace: WorkspaceOpt = None,
    backend: Annotated[str, typer.Option(help="LLM backend spec that answers prompts.")] = "local",
    timesteps: Annotated[int, typer.Option(help="PPO environment steps (edits).")] = 2048,
    max_llm_calls: Annotated[
        int, typer.Option(help="Stop training once this many answers were not in the cache.")
    ] = 800,
    n_train: Annotated[int, typer.Option(help="Training index encounters (episodes).")] = 96,
    n_validation: Annotated[
        int, typer.Option(help="Validation index encounters scored during training.")
    ] = 16,
    eval_freq: Annotated[int, typer.Option(help="Validate every this many steps.")] = 512,
    seed: Annotated[int, typer.Option(help="Seed of the sample, PPO and the environment.")] = 0,
    reward_model: Annotated[
        bool,
        typer.Option(
            "--reward-model/--llm-rewards",
            help="Train PPO against a learned reward model, with LLM calls only between rounds "
            "(--timesteps is then PPO steps per round), or on LLM rewards alone.",
        ),
    ] = False,
    model_rounds: Annotated[
        int, typer.Option(min=1, help="Rounds of the reward-model loop (--reward-model).")
    ] = 4,
    folds: Annotated[
        int,
        typer.Option(
            min=0,
            help="With --reward-model: also decide the fall-back on training patients held out "
            "of this many PPO runs (0: on validation patients alone).",
        ),
    ] = 5,
    model_target: Annotated[
        ModelTarget,
        typer.Option(
            case_sensitive=False,
            help="What the reward model learns: a config's gain over the start prompt, or its "
            "reward.",
        ),
    ] = ModelTarget.gain,
    model_pessimism: Annotated[
        float,
        typer.Option(
            min=0.0,
            help="With --reward-model: take this many sds of the trees' predictions off a "
            "reward the model predicts (0: its mean).",
        ),
    ] = 0.0,
    edits: Annotated[
        str,
        typer.Option(
            callback=_edit_labels,
            help="Only these edits, comma-separated labels ('add self,more peer'; "
            "`pmlm policy edits` lists them); empty: every edit.",
        ),
    ] = "",
    llm_parallel: LLMParallelOpt = None,
) -> None:
    """Train the editing policy on training patients (answers through the cached LLM client)."""
    from promptenv.policy import PolicySettings, training_summary
    from promptenv.steps import train_workspace_policy

    use_llm_parallel(llm_parallel)
    ws = Workspace.at(workspace)
    settings = PolicySettings(
        n_train=n_train,
        n_validation=n_validation,
        timesteps=timesteps,
        max_llm_calls=max_llm_calls,
        eval_freq=eval_freq,
        seed=seed,
        reward_model=reward_model,
        model_rounds=model_rounds,
        model_timesteps=timesteps,
        model_target=model_target.value,
        model_pessimism=model_pessimism,
        folds=folds,
        edits=_labels(edits),
    )
    with bar("policy training: PPO steps") as tick:
        shown = tick if OUTPUT.show_bars() else None  # off a terminal: progress lines instead
        result = train_workspace_policy(ws, backend, settings, progress=console.print, tick=shown)
    console.print(f"{training_summary(result.policy)} → {result.path}", markup=False)


@policy_app.command("apply")
def apply_cmd(
    workspace: WorkspaceOpt = None,
    which: Annotated[
        str,
        typer.Option(help="latest (each patient's current prompt), test, or all index encounters."),
    ] = "latest",
    keep_initial: Annotated[
        bool, typer.Option(help="Also keep the PMLM initial prompts in the table.")
    ] = True,
) -> None:
    """Refine prompts with the trained policy (no LLM call) and write them to the prompt table."""
    from promptenv.steps import apply_workspace_policy

    ws = Workspace.at(workspace)
    table, policy = apply_workspace_policy(ws, which, keep_initial)
    refined = table[table["method"] == "pmlm"]
    edits = refined["provenance"].map(lambda p: len(json.loads(p)["edits"]))
    console.print(
        f"{len(refined)} refined prompts (policy {policy.version}, mean {edits.mean():.1f} edits, "
        f"mean {refined['tokens'].mean():.0f} tokens) → {ws.table_path('prompts')}"
    )


@policy_app.command("edits")
def edits_cmd() -> None:
    """The edits a policy can make, by label (what --edits takes)."""
    from promptenv.editing import EDITS, STOP

    for i, e in enumerate(EDITS):
        if i != STOP:
            console.print(e.label, markup=False)


@policy_app.command("show")
def show_cmd(workspace: WorkspaceOpt = None) -> None:
    """What the workspace's policy was trained with and what training cost."""
    from promptenv.policy import load_policy, policy_dir

    policy = load_policy(policy_dir(Workspace.at(workspace)))
    console.print_json(json.dumps(policy.info.to_json(), default=str))
