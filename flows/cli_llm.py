"""``pmlm llm``: ask an LLM backend one question, and read the call ledger.

Thin wrappers over :mod:`promptenv.llm`; mounted by ``flows.cli`` as
``app.add_typer(llm_app, name="llm")``.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from typing import Annotated

import typer

from flows.options import PMLMGroup, WorkspaceOpt
from pipelines.workspace import Workspace

llm_app = typer.Typer(
    cls=PMLMGroup,
    help="The LLM client: ask a backend (local, openai:MODEL, anthropic:MODEL, optionally "
    "@URL) through the cache, retries, budget and privacy guard; read the spend ledger.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
)


@llm_app.command()
def ask(
    question: Annotated[str, typer.Argument(help="The user message.")],
    backend: Annotated[
        str,
        typer.Option(
            "--backend",
            "-b",
            help="local, local:/path.gguf, openai:MODEL, openai:MODEL@URL, anthropic:MODEL "
            "or anthropic:MODEL@URL",
        ),
    ] = "local",
    workspace: WorkspaceOpt = None,
    system: Annotated[str, typer.Option(help="System message.")] = "",
    max_tokens: Annotated[int, typer.Option(min=1, help="Upper bound on generated tokens.")] = 256,
    temperature: Annotated[float, typer.Option(min=0.0)] = 0.0,
    seed: Annotated[int, typer.Option(help="Sampling seed.")] = 0,
    no_cache: Annotated[bool, typer.Option("--no-cache", help="Always call the backend.")] = False,
    run_id: Annotated[
        str | None, typer.Option(help="Ledger run id (default: a new one).", show_default=False)
    ] = None,
) -> None:
    """Answer QUESTION and print the answer, then tokens, latency, cache and cost."""
    from promptenv.llm import GenerationParams, LLMClient

    client = LLMClient(
        backend, workspace=Workspace.at(workspace), run_id=run_id, use_cache=not no_cache
    )
    params = GenerationParams(max_tokens=max_tokens, temperature=temperature, seed=seed)
    completion = client.generate(system, question, params)
    typer.echo(completion.text)
    redacted = f" | redacted: {completion.redactions}" if completion.redactions else ""
    typer.echo(
        f"[{client.label}] tokens in: {completion.usage.input_tokens} out: "
        f"{completion.usage.output_tokens} | latency: {completion.latency_s:.2f} s | "
        f"cached: {'yes' if completion.cached else 'no'} | cost: {completion.cost:.6f} | "
        f"attempts: {completion.attempts} | run: {client.run_id}{redacted}"
    )


@llm_app.command()
def ledger(
    workspace: WorkspaceOpt = None,
    run: Annotated[str | None, typer.Option(help="Only this run id.", show_default=False)] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON rows instead.")] = False,
) -> None:
    """Spend per run and model: calls, attempts, retries, cache hit rate, tokens, cost."""
    from promptenv.llm import Ledger, workspace_paths

    ws = Workspace.at(workspace)
    _, path = workspace_paths(ws)
    if not path.exists():
        typer.echo(f"no LLM calls recorded in {ws.root} yet ({path} does not exist)")
        return
    rows = Ledger(path).summary(run)
    if as_json:
        typer.echo(
            json.dumps(
                [{**asdict(r), "cache_hit_rate": round(r.cache_hit_rate, 4)} for r in rows],
                indent=2,
            )
        )
        return
    if not rows:
        typer.echo(f"no LLM calls recorded for run {run!r}" if run else "no LLM calls recorded")
        return
    header = (
        "| run | backend | model | calls | attempts | retries | errors | cache hits | hit rate "
        "| tokens in | tokens out | cost |"
    )
    typer.echo(header)
    typer.echo("|" + "---|" * 12)
    for r in rows:
        typer.echo(
            f"| {r.run_id} | {r.backend} | {r.model} | {r.calls} | {r.attempts} | {r.retries} "
            f"| {r.errors} | {r.cache_hits} | {r.cache_hit_rate:.0%} | {r.tokens_in} "
            f"| {r.tokens_out} | {r.cost:.6f} |"
        )
    calls = sum(r.calls for r in rows)
    hits = sum(r.cache_hits for r in rows)
    typer.echo(
        f"total: {len({r.run_id for r in rows})} runs, {calls} calls, "
        f"{sum(r.attempts for r in rows)} backend attempts, "
        f"cache hit rate {hits / calls if calls else 0:.0%}, "
        f"{sum(r.tokens_in + r.tokens_out for r in rows)} tokens billed, "
        f"cost {sum(r.cost for r in rows):.6f}"
    )
