"""What the commands print: rich tables on a terminal, wide plain tables in a file or a CI log.
Shared by the command line (:mod:`gato_like.cli`) and the demo (:mod:`gato_like.demo`)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any


def console() -> Any:
    """A rich console; wide when writing to a file or pipe, so tables stay readable in logs."""
    from rich.console import Console

    return Console() if sys.stdout.isatty() else Console(width=160)


def cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.2f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def print_evaluation(summary: dict[str, Any], destination: Path) -> None:
    """The per-task table of an evaluation summary (``eval.json``), and where its files went."""
    from rich.table import Table

    first = next(iter(summary["tasks"].values()), {"episodes": 0})
    table = Table(
        title=f"evaluation of {summary['checkpoint']} ({first['episodes']} episodes per task)",
        title_justify="left",
    )
    for column in ("task", "mean return", "random policy's", "expert-normalized score", "success"):
        table.add_column(column, justify="left" if column == "task" else "right")
    for name, result in summary["tasks"].items():
        random = (result.get("normalizers") or {}).get("random") or {}
        table.add_row(
            name,
            cell(result["mean_return"]),
            cell(random.get("mean")),  # the reference where there is no expert (eval --gym)
            cell(result["expert_normalized_score"]),
            cell(result["success_rate"]),
        )
    out = console()
    out.print(table)
    out.print(
        f"mean score {cell(summary['mean_score'])}; results in {destination} (eval.json, scores.png, GIFs, model_card.md)"
    )


def print_dataset(
    root: Path, montage: Path | None = None, animate: str | None = None, verify: bool = True
) -> None:
    """``gato-like data inspect``: checksums, the per-task table, a frame montage and a GIF."""
    from rich.table import Table

    from gato_like.data_pipelines import inspect as inspect_module
    from gato_like.data_pipelines.shards import verify as verify_shards

    out = console()
    if verify:
        problems = verify_shards(root)
        out.print("checksums: all shards match index.json" if not problems else "\n".join(problems))
        if problems:
            raise ValueError(f"{root}: {len(problems)} shard(s) do not match index.json (listed above)")
    rows = inspect_module.summarize(root)
    if animate is not None and animate not in {r["task"] for r in rows}:
        raise KeyError(f"--animate: no task {animate!r} in {root} (tasks: {[r['task'] for r in rows]})")
    table = Table(title=f"dataset {root}", title_justify="left")
    for column in rows[0]:
        table.add_column(column, justify="left" if column == "task" else "right")
    for row in rows:
        table.add_row(*[cell(v) for v in row.values()])
    out.print(table)
    with_images = [r["task"] for r in rows if inspect_module.frames_of(root, r["task"])]
    if with_images:
        path = inspect_module.write_montage(root, montage or Path(root) / "montage.png")
        out.print(f"montage: {path}")
        task = animate or with_images[0]
        out.print(f"animation: {inspect_module.write_animation(root, task, Path(root) / f'{task}.gif')}")
