"""The ``gato-like`` command line: one console script, one verb per job (see ``gato-like --help``)."""

from __future__ import annotations

import json
import shlex
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from jsonargparse import ArgumentParser

from gato_like import __version__
from gato_like import demo as demo_module


def data_generate(
    out: Path,
    suite: str = "default",
    tasks: str | None = None,
    episodes: int = 20,
    max_steps: int | None = None,
    seed: int = 0,
    workers: int = 2,
    episodes_per_shard: int = 16,
    normalizer_episodes: int = 20,
    overwrite: bool = False,
    pixels: bool = True,
    noise: float = 0.3,
    random_prob: float = 0.1,
    hold: int = 1,
    task_episodes: str | None = None,
    task_hold: str | None = None,
) -> None:
    """Generate expert episodes of a suite into WebDataset shards, with return normalizers.

    Episodes are DART-style by default: the simulator executes the expert's action plus Gaussian
    noise (or, with probability random_prob, a random action) and the episode records the expert's
    clean action, so the data shows how to recover from states off the expert's path.

    Args:
        out: output directory (shards, embodiment specs, index.json).
        suite: default, control, babyai, heldout or smoke.
        tasks: comma-separated task names instead of a suite (e.g. dmc-reacher-easy,captions).
        episodes: expert episodes per task.
        max_steps: cap on episode length (default: each task's own).
        seed: base seed; the same seed gives the same bytes.
        workers: processes.
        episodes_per_shard: episodes per tar shard.
        normalizer_episodes: expert and random episodes per task for the normalizers.
        overwrite: replace an existing dataset.
        pixels: render camera frames; false writes proprioception-only episodes (no image keys).
        noise: std of the Gaussian added to continuous expert actions (action range scaled to [-1, 1]); 0: none.
        random_prob: probability of executing a uniformly random action instead of the expert's; 0: none.
        hold: a random action is held for 1..hold steps (continuous tasks), a push that leaves the expert's path.
        task_episodes: episodes of particular tasks, e.g. "babyai-GoToLocal=200,babyai-PickupLoc=200".
        task_hold: hold of particular tasks, e.g. "dmc-cartpole-balance=1" beside --hold 50.
    """
    from gato_like.data_pipelines.control import Perturbation
    from gato_like.data_pipelines.generate import generate

    perturbation = Perturbation(noise, random_prob, hold)  # checked before any work starts

    names = _task_list(tasks)
    index = generate(
        out,
        suite,
        names,
        episodes,
        max_steps,
        seed,
        workers,
        episodes_per_shard,
        normalizer_episodes,
        overwrite,
        pixels=pixels,
        perturbation=perturbation,
        task_episodes=_counts(task_episodes),
        task_hold=_counts(task_hold, "--task_hold"),
    )
    timing = index["timing"]
    episodes_total = sum(t["episodes"] for t in index["tasks"].values())
    print(
        f"wrote {episodes_total} episodes of {len(index['tasks'])} task(s) to {out} in {timing['seconds']:.1f}s "
        f"({timing['rendered_frames'] / max(timing['seconds'], 1e-9):.0f} rendered frames/s)"
    )


def data_convert(
    source: Path,
    spec: Path,
    out: Path,
    task: str | None = None,
    instruction: str = "",
    episodes_per_shard: int = 16,
    overwrite: bool = False,
) -> None:
    """Convert a folder of .npz episodes (obs.<key>, actions, rewards) into shards of one task.

    Args:
        source: folder of .npz files, one episode each.
        spec: the embodiment spec (JSON) the episodes follow.
        out: dataset directory (created, or the task is added to its index).
        task: task name (default: the spec's name).
        instruction: text instruction of the task, stored with every episode.
        episodes_per_shard: episodes per tar shard.
        overwrite: replace the task if the dataset already has it.
    """
    from gato_like.data_pipelines.convert import convert_npz

    index = convert_npz(source, spec, out, task, instruction, episodes_per_shard, overwrite)
    name = task or json.loads(Path(spec).read_text())["name"]
    entry = index["tasks"][name]
    print(f"wrote {entry['episodes']} episodes ({entry['timesteps']} timesteps) of task {name!r} to {out}")


def data_inspect(
    root: Path, montage: Path | None = None, animate: str | None = None, verify: bool = True
) -> None:
    """Per-task counts, lengths, returns and token counts; a PNG montage and a GIF of one episode.

    Args:
        root: dataset directory.
        montage: where to write the frame montage (default: ROOT/montage.png).
        animate: task to animate (default: the first task with images); writes ROOT/<task>.gif.
        verify: re-hash every shard against index.json.
    """
    from rich.table import Table

    from gato_like.data_pipelines import inspect as inspect_module
    from gato_like.data_pipelines.shards import verify as verify_shards

    console = _console()
    if verify:
        problems = verify_shards(root)
        console.print("checksums: all shards match index.json" if not problems else "\n".join(problems))
        if problems:
            raise ValueError(f"{root}: {len(problems)} shard(s) do not match index.json (listed above)")
    rows = inspect_module.summarize(root)
    if animate is not None and animate not in {r["task"] for r in rows}:
        raise KeyError(f"--animate: no task {animate!r} in {root} (tasks: {[r['task'] for r in rows]})")
    table = Table(title=f"dataset {root}", title_justify="left")
    for column in rows[0]:
        table.add_column(column, justify="left" if column == "task" else "right")
    for row in rows:
        table.add_row(*[_cell(v) for v in row.values()])
    console.print(table)
    with_images = [r["task"] for r in rows if inspect_module.frames_of(root, r["task"])]
    if with_images:
        path = inspect_module.write_montage(root, montage or Path(root) / "montage.png")
        console.print(f"montage: {path}")
        task = animate or with_images[0]
        console.print(f"animation: {inspect_module.write_animation(root, task, Path(root) / f'{task}.gif')}")


def train(
    data: Path,
    out: Path,
    recipe: str | None = None,
    preset: str | None = None,
    max_steps: int | None = None,
    batch_size: int | None = None,
    context_length: int | None = None,
    lr: float | None = None,
    warmup_steps: int | None = None,
    accumulate: int = 1,
    clip: float = 1.0,
    workers: int | None = None,
    devices: str = "auto",
    strategy: str = "auto",
    precision: str | None = None,
    val_every: int | None = None,
    seed: int = 0,
    resume: bool = False,
    max_minutes: float | None = None,
    model: dict[str, int | float | str | bool] | None = None,
    rollout_episodes: int | None = None,
    rollout_tasks: str | None = None,
    tasks: str | None = None,
    threads: int | None = None,
    batch_tokens: int | None = None,
    domain_weights: dict[str, float] | None = None,
    goal_every: int | None = None,
) -> None:
    """Pretrain a model on a dataset (Lightning: one CPU or many GPUs, same code).

    A recipe sets the preset, its departures from Gato and the run settings; every flag given
    overrides it. At every validation the policy is rolled out in the simulators and its
    expert-normalized score per task is logged beside the losses; the best weights by score go
    to OUT/best.

    Args:
        data: dataset directory or URL (made by `gato-like data generate` or `data convert`).
        out: run directory: best/ and checkpoint/ (safetensors models), lightning/ (trainer state), logs/.
        recipe: cpu (the default without a GPU: the suite in <= 60 min on 2 cores), cpu-demo, or gato (the default with a GPU).
        preset: debug, tiny, small, gato-79m, gato-364m or gato-1.18b (default: the recipe's).
        max_steps: optimizer steps (default: the recipe's).
        batch_size: sequences per step and device (default: the recipe's).
        context_length: tokens per sequence (default: the preset's).
        lr: peak learning rate (AdamW, linear warm-up, cosine decay; default: the recipe's).
        warmup_steps: warm-up steps (default: the recipe's).
        accumulate: gradient accumulation steps.
        clip: gradient norm clipping.
        workers: data-loader workers per device (default: the recipe's).
        devices: devices per node ("auto", a count, or a list).
        strategy: auto, ddp or fsdp.
        precision: Lightning precision (default: bf16-mixed where the GPU or CPU has bf16 units, else 32-true).
        val_every: validate, roll out and export every this many steps (default: the recipe's).
        seed: seed of the model, the data order and the sampler.
        resume: continue from OUT/lightning/last.ckpt.
        max_minutes: stop after this much wall time even before max_steps (default: the recipe's).
        model: overrides of the preset's fields, e.g. --model.n_layer 8 --model.history_steps 0.
        rollout_episodes: closed-loop episodes per task at each validation (0: none; default: the recipe's).
        rollout_tasks: comma-separated tasks to roll out (default: every task with a simulator).
        tasks: comma-separated tasks of the dataset to train on (default: all).
        threads: torch intra-op threads (default: the cores left after the loader workers).
        batch_tokens: about this many tokens a batch at most, each batch one task (0: batch_size sequences; default: the recipe's).
        domain_weights: each task's share of the optimizer steps, e.g. --domain_weights '{"dmc-reacher-easy": 2}' (default: the recipe's for the tasks it names, 1 for the rest).
        goal_every: train the goal head every this many steps (0: never; default: the recipe's).
    """
    from gato_like.training.recipes import default_recipe, get_recipe
    from gato_like.training.train import train as run

    chosen = get_recipe(recipe or default_recipe())  # an unknown name fails before any work

    def pick(value: Any, default: Any) -> Any:
        return default if value is None else value

    parsed: int | str = int(devices) if devices.isdigit() else devices
    weights = dict(chosen.domain_weights)
    if weights:  # a recipe's weights apply to the tasks this dataset has; a user's must all exist
        from gato_like.data_pipelines.loader import DatasetSource

        present = set(DatasetSource.open(str(data), _task_list(tasks)).tasks)
        weights = {k: v for k, v in weights.items() if k in present}
    weights |= dict(domain_weights or {})
    checkpoint = run(
        data, out, pick(preset, chosen.preset), pick(max_steps, chosen.max_steps), pick(batch_size, chosen.batch_size),
        context_length, pick(lr, chosen.lr), pick(warmup_steps, chosen.warmup_steps), accumulate, clip,
        pick(workers, chosen.workers), parsed, "auto", strategy, precision, pick(val_every, chosen.val_every),
        seed=seed, resume=resume, max_minutes=pick(max_minutes, chosen.max_minutes),
        overrides=dict(chosen.model) | dict(model or {}), command=shlex.join(["gato-like", *sys.argv[1:]]),
        rollout_episodes=pick(rollout_episodes, chosen.rollout_episodes), rollout_tasks=_task_list(rollout_tasks),
        tasks=_task_list(tasks), threads=threads, recipe=chosen.name, batch_tokens=pick(batch_tokens, chosen.batch_tokens),
        domain_weights=weights or None, goal_every=pick(goal_every, chosen.goal_every),
    )  # fmt: skip
    print(f"checkpoint: {checkpoint}\nlogs: {Path(out) / 'logs'}")


def finetune(
    from_: Path,
    data: Path,
    out: Path,
    mode: str = "lora",
    task: str | None = None,
    spec: Path | None = None,
    lr: float | None = None,
    max_steps: int | None = None,
    batch_size: int = 8,
    val_every: int | None = None,
    patience: int = 4,
    holdout: int | None = None,
    lora_rank: int = 8,
    goal_every: int = 4,
    monitor: str = "policy",
    seed: int = 0,
    max_minutes: float | None = None,
) -> None:
    """Fine-tune a pretrained checkpoint on a few demos of a new embodiment (full, head-only or LoRA).

    Args:
        from_: the base checkpoint directory (--from CKPT).
        data: demos folder made by `gato-like data convert` (or `data generate`).
        out: run directory: checkpoint/ (the adapted model, base format), logs/, losses.png, finetune.json.
        mode: lora (adapters on attention and MLP + norms + the heads' adapters), head (output layer, final norm, head adapters) or full.
        task: which task of the folder (default: its only one).
        spec: the embodiment spec the demos must follow (default: the folder's own); checked against every demo.
        lr: peak learning rate (default per mode: lora/head 2e-3, full 5e-4).
        max_steps: optimizer steps at most (default: ~30 passes over the demos, 100 to 1500).
        batch_size: sequences per step.
        val_every: validate on the held-out demo(s) every this many steps (default: max_steps / 15).
        patience: validations without improvement before stopping early.
        holdout: demos held out for early stopping (default: 10 %, at least 1).
        lora_rank: rank of the LoRA adapters.
        goal_every: train the goal head on hindsight goals every this many steps (1 for goal-reaching demos; 0: never).
        monitor: what early stopping follows on the held-out demos: policy (its loss) or goal (the goal head's loss, each demo's last observation as its goal: goal-reaching demos).
        seed: seed of the split, the data order and the adapters.
        max_minutes: wall-time cap (the best weights so far are exported).
    """
    from gato_like.training.finetune import FinetuneConfig
    from gato_like.training.finetune import finetune as run

    config = FinetuneConfig(
        mode=mode,
        lr=lr,
        max_steps=max_steps,
        batch_size=batch_size,
        val_every=val_every,
        patience=patience,
        holdout=holdout,
        lora_rank=lora_rank,
        goal_every=goal_every,
        monitor=monitor,  # checked by finetune
        seed=seed,
        max_minutes=max_minutes,
    )
    checkpoint = run(from_, data, out, config, task, spec, command=shlex.join(["gato-like", *sys.argv[1:]]))
    summary = json.loads((Path(out) / "finetune.json").read_text())
    monitor = summary["monitor"]
    best = summary[f"best_held_out_{monitor}_loss"]
    print(
        f"fine-tuned {summary['mode']} on {summary['demos']} demos of {summary['task']} "
        f"({summary['held_out']} held out): best held-out {monitor} loss {best} "
        f"at step {summary['best_step']} of {summary['steps_run']}"
        f"{' (stopped early)' if summary['early_stopped'] else ''}\ncheckpoint: {checkpoint}\n"
        f"evaluate: gato-like eval --ckpt {checkpoint} --tasks {summary['task']} --prompt {data}"
        + _gym_hint(summary["task"])
    )


def _gym_hint(task: str) -> str:
    """Demos recorded in a gymnasium environment (task ``gym-<id>``, no built-in simulator) are
    evaluated in that environment."""
    from gato_like.data_pipelines.tasks import TASKS

    return f" --gym {task[4:]}" if task.startswith("gym-") and task not in TASKS else ""


def evaluate(ckpt: Path, out: Path | None = None, tasks: str | None = None, episodes: int = 10, max_steps: int | None = None, seed: int = 0, prompt: Path | None = None, gym: str | None = None) -> None:  # fmt: skip
    """Roll a checkpoint's policy out in the real simulators: expert-normalized scores, success rates, plot, GIFs.

    Args:
        ckpt: checkpoint directory (e.g. RUN/checkpoint).
        out: where eval.json, scores.png and the GIFs go (default: CKPT/../eval).
        tasks: comma-separated task names (default: every task the checkpoint was trained on).
        episodes: episodes per task.
        max_steps: episode length cap (default: the training data's).
        seed: seed of the evaluation episodes (disjoint from the training seeds).
        prompt: a demos folder: prompt every episode with the end of one of its demos of the task.
        gym: a gymnasium environment id (e.g. InvertedPendulum-v5): roll the checkpoint's task with
            that environment's spaces out in it; mean return beside a uniform-random policy's.
    """

    from gato_like.training.evaluate import evaluate as run

    names = _task_list(tasks)
    destination = out or Path(ckpt).resolve().parent / "eval"
    summary = run(
        ckpt,
        destination,
        names,
        episodes,
        max_steps,
        seed,
        command=shlex.join(["gato-like", *sys.argv[1:]]),
        prompt=prompt,
        gym=gym,
    )
    print_evaluation(summary, destination)


def serve(
    ckpt: Path,
    host: str = "127.0.0.1",
    port: int = 8765,
    token: str | None = None,
    max_sessions: int = 64,
    max_batch: int = 64,
    queue_size: int = 256,
    step_deadline_ms: float = 1000.0,
    idle_timeout_s: float = 300.0,
    device: str = "cpu",
    log_level: str = "info",
    threads: int | None = None,
    detached_grace_s: float = 10.0,
    hello_timeout_s: float = 10.0,
    max_pending_connections: int = 64,
    send_timeout_s: float = 10.0,
) -> None:
    """Serve a checkpoint's policy over WebSocket (msgpack frames; see docs/protocol.md).

    Args:
        ckpt: checkpoint directory.
        host: interface to bind (0.0.0.0 exposes the server to the network: set a token).
        port: TCP port (also /healthz, /readyz and /metrics).
        token: bearer token required at the WebSocket upgrade (default: $GATO_LIKE_TOKEN, else none).
        max_sessions: live sessions at most.
        max_batch: steps per forward pass at most (1: no batching).
        queue_size: steps waiting for the model at most; more are answered OVERLOADED.
        step_deadline_ms: how long a step may wait for its forward pass before DEADLINE_EXCEEDED.
        idle_timeout_s: sessions with no message for this long are closed.
        device: where the model runs (cpu, cuda).
        log_level: debug, info, warning or error (JSON lines on stderr).
        threads: intra-op threads of the model's worker (default: 1 up to 4 cores, else half, at most 8).
        detached_grace_s: a dropped connection's session may be resumed this long, then it is closed.
        hello_timeout_s: a new connection must say hello within this long.
        max_pending_connections: connections that have not said hello yet, at most.
        send_timeout_s: a client that does not read its replies for this long is disconnected.
    """
    import os

    from gato_like.serving.engine import EngineConfig
    from gato_like.serving.server import ServerConfig, configure_logging, serve_checkpoint

    configure_logging(log_level)
    engine = EngineConfig(
        max_sessions=max_sessions, max_batch=max_batch, queue_size=queue_size, step_deadline_ms=step_deadline_ms,
        idle_timeout_s=idle_timeout_s, device=device, detached_grace_s=detached_grace_s, threads=threads,
    )  # fmt: skip
    config = ServerConfig(
        host, port, token or os.environ.get("GATO_LIKE_TOKEN") or None, hello_timeout_s=hello_timeout_s,
        max_pending_connections=max_pending_connections, send_timeout_s=send_timeout_s,
    )  # fmt: skip
    serve_checkpoint(ckpt, config, engine)


def bench_serve(
    ckpt: Path | None = None,
    out: Path = Path("serve_bench"),
    sessions: str = "1,4,16,32,64",
    hz: float = 20.0,
    duration: float = 10.0,
    task: str | None = None,
    unbatched: bool = True,
    url: str | None = None,
    token: str | None = None,
    threads: int | None = None,
) -> None:
    """Load test: N simulated robots at a fixed rate; latency p50/p90/p99/max, missed deadlines, throughput.

    Args:
        ckpt: checkpoint to serve (a server is launched per mode); or give --url.
        out: where serve_load.json and serve_load.png go.
        sessions: comma-separated robot counts to sweep.
        hz: steps per second per robot.
        duration: seconds per robot count.
        task: task (or embodiment) the robots act in (default: the first embodiment).
        unbatched: also measure the same model served one request at a time (--max-batch 1).
        url: a running server (ws://host:port) instead of launching one.
        token: bearer token (default: $GATO_LIKE_TOKEN).
        threads: the launched servers' worker threads (default: theirs, from the cores).
    """
    import os

    from gato_like.serving.loadgen import sweep

    counts = [int(n) for n in sessions.split(",") if n.strip()]
    modes = ("batched", "unbatched") if unbatched else ("batched",)
    sweep(
        ckpt, out, counts, hz, duration, task, modes, url, token or os.environ.get("GATO_LIKE_TOKEN") or None,
        ["--threads", str(threads)] if threads else [],
    )  # fmt: skip
    print(f"results: {Path(out) / 'serve_load.json'}, plot: {Path(out) / 'serve_load.png'}")


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
            _cell(result["mean_return"]),
            _cell(random.get("mean")),  # the reference where there is no expert (eval --gym)
            _cell(result["expert_normalized_score"]),
            _cell(result["success_rate"]),
        )
    console = _console()
    console.print(table)
    console.print(
        f"mean score {_cell(summary['mean_score'])}; results in {destination} (eval.json, scores.png, GIFs, model_card.md)"
    )


def _counts(text: str | None, flag: str = "--task_episodes") -> dict[str, int] | None:
    """``"a=200, b=50"`` -> ``{"a": 200, "b": 50}``; a malformed entry is named with its ``flag``."""
    if not text:
        return None
    out = {}
    for part in (p.strip() for p in text.split(",") if p.strip()):
        name, _, count = part.partition("=")
        if not count.strip().isdigit():
            raise ValueError(f"{flag}: expected TASK=COUNT, got {part!r}")
        out[name.strip()] = int(count)
    return out


def _task_list(tasks: str | None) -> list[str] | None:
    """``"a, b"`` -> ``["a", "b"]``; None stays None (every task)."""
    return [t.strip() for t in tasks.split(",") if t.strip()] if tasks else None


def _console() -> Any:
    """A rich console; wide when writing to a file or pipe, so tables stay readable in logs."""
    from rich.console import Console

    return Console() if sys.stdout.isatty() else Console(width=160)


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.2f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def _function_parser(function: Any, positional: bool = False) -> ArgumentParser:
    parser = ArgumentParser(description=_summary(function))
    parser.add_function_arguments(function, fail_untyped=True, as_positional=positional)
    return parser


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(
        prog="gato-like",
        description="A Gato-style generalist agent: tokenize episodes, train, evaluate and serve one "
        "transformer for many embodiments.",
    )
    parser.add_argument("--version", action="version", version=f"gato-like {__version__}")
    commands = parser.add_subcommands(dest="command", required=True)
    commands.add_subcommand(
        "demo", _function_parser(demo_module.run), help="the main job end to end on the embedded default"
    )
    commands.add_subcommand("train", _function_parser(train), help=_summary(train))
    commands.add_subcommand("finetune", _function_parser(finetune), help=_summary(finetune))
    commands.add_subcommand("eval", _function_parser(evaluate), help=_summary(evaluate))
    data = ArgumentParser(description="make, convert and look at episode datasets")
    commands.add_subcommand("data", data, help="make, convert and inspect episode datasets")
    data_commands = data.add_subcommands(dest="action", required=True)
    for name, function in (("generate", data_generate), ("convert", data_convert)):
        data_commands.add_subcommand(name, _function_parser(function), help=_summary(function))
    data_commands.add_subcommand(
        "inspect", _function_parser(data_inspect, positional=True), help=_summary(data_inspect)
    )
    commands.add_subcommand("serve", _function_parser(serve), help=_summary(serve))
    bench = ArgumentParser(description="benchmarks")
    commands.add_subcommand("bench", bench, help="benchmarks (bench serve: load test of the policy server)")
    bench_commands = bench.add_subcommands(dest="action", required=True)
    bench_commands.add_subcommand("serve", _function_parser(bench_serve), help=_summary(bench_serve))
    return parser


def _summary(function: Callable[..., Any]) -> str:
    return (function.__doc__ or "").strip().split("\n")[0]


COMMANDS: dict[tuple[str, ...], Callable[..., None]] = {
    ("demo",): demo_module.run,
    ("train",): train,
    ("finetune",): finetune,
    ("eval",): evaluate,
    ("data", "generate"): data_generate,
    ("data", "convert"): data_convert,
    ("data", "inspect"): data_inspect,
    ("serve",): serve,
    ("bench", "serve"): bench_serve,
}


def _underscored(argument: str) -> str:
    """``--max-steps=5`` -> ``--max_steps=5``: options take dashes or underscores alike."""
    if not argument.startswith("--"):
        return argument
    name, equals, value = argument.partition("=")
    return "--" + name[2:].replace("-", "_") + equals + value


def _normalized(argv: list[str]) -> list[str]:
    """Dashes or underscores in option names; a boolean option given alone means true."""
    import inspect

    flags = {
        f"--{name}"
        for function in COMMANDS.values()
        for name, parameter in inspect.signature(function).parameters.items()
        if parameter.annotation in (bool, "bool")
    }
    out = []
    # `--from` is a Python keyword: finetune's parameter is named from_
    argv = [("--from_" + a[6:]) if a == "--from" or a.startswith("--from=") else a for a in argv]
    for i, argument in enumerate(map(_underscored, argv)):
        following = argv[i + 1] if i + 1 < len(argv) else None
        if argument in flags and (following is None or following.startswith("-")):
            argument += "=true"
        out.append(argument)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    config = parser.parse_args(_normalized(sys.argv[1:] if argv is None else argv))
    path: tuple[str, ...] = (config.command,)
    arguments = config[config.command]
    if config.command in ("data", "bench"):
        path += (arguments.action,)
        arguments = arguments[arguments.action]
    try:
        COMMANDS[path](**arguments.as_dict())
    except (OSError, KeyError, ValueError) as error:
        # errors a user can act on: one clear line, no traceback
        message = error.args[0] if isinstance(error, KeyError) and error.args else error
        print(f"gato-like {' '.join(path)}: error: {message}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
