"""The ``gato-like`` command line: one console script, one verb per job (see ``gato-like --help``)."""

from __future__ import annotations

import dataclasses
import json
import shlex
import sys
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from jsonargparse import ArgumentParser, set_parsing_settings

from gato_like import __version__
from gato_like import demo as demo_module
from gato_like.training.settings import FinetuneConfig, TrainConfig

# the settings dataclasses document each field in a docstring under it: that is the flag's help
set_parsing_settings(docstring_parse_attribute_docstrings=True)


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
    from gato_like.data_pipelines.generate import generate
    from gato_like.envs.base import Perturbation

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
    source: str,
    out: Path,
    from_: str = "npz",
    spec: Path | None = None,
    task: str | None = None,
    instruction: str = "",
    episodes_per_shard: int = 16,
    overwrite: bool = False,
    max_episodes: int | None = None,
) -> None:
    """Convert demonstrations (a folder of .npz files, a Minari or a LeRobot dataset) into shards of one task.

    ``gato-like data convert --from minari DATASET --out DIR`` or ``--from lerobot PATH --out DIR``
    (the dataset may also be given as --source).

    Args:
        source: npz: a folder of .npz files, one episode each (obs.<key>, actions, rewards); minari: a dataset id in the local Minari store or a dataset folder; lerobot: a LeRobot dataset folder (meta/info.json, data/, videos/).
        out: dataset directory (created, or the task is added to its index).
        from_: the source's format: npz, minari or lerobot (--from).
        spec: the embodiment spec (JSON) the episodes follow; required for npz; for minari and lerobot it is derived from the dataset and this replaces it.
        task: task name (default: the spec's name).
        instruction: text instruction of the task, stored with every episode (lerobot: default the dataset's task text).
        episodes_per_shard: episodes per tar shard.
        overwrite: replace the task if the dataset already has it.
        max_episodes: convert at most this many episodes (minari, lerobot).
    """
    kinds = ("npz", "minari", "lerobot")
    if from_ not in kinds:
        raise ValueError(f"--from: expected one of {', '.join(kinds)}, got {from_!r}")
    if from_ == "npz":
        from gato_like.data_pipelines.convert import convert_npz

        if spec is None:
            raise ValueError("--spec: a folder of .npz episodes needs the embodiment spec (JSON) they follow")
        index = convert_npz(source, spec, out, task, instruction, episodes_per_shard, overwrite)
    elif from_ == "minari":
        from gato_like.data_pipelines.minari_import import convert_minari

        index = convert_minari(
            source, out, task, spec, instruction, episodes_per_shard, overwrite, max_episodes
        )
    else:
        from gato_like.data_pipelines.lerobot_import import convert_lerobot

        index = convert_lerobot(
            source, out, task, spec, instruction, episodes_per_shard, overwrite, max_episodes
        )
    name = task or list(index["tasks"])[-1]
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
    from gato_like.console import print_dataset

    print_dataset(root, montage, animate, verify)


def train(data: Path, out: Path, config: TrainConfig) -> None:
    """Pretrain a model on a dataset (Lightning: one CPU or many GPUs, same code).

    A recipe sets the preset, its departures from Gato and the run settings; every flag given
    overrides it (the flags are the fields of ``TrainConfig``, training/settings.py). At every
    validation the policy is rolled out in the simulators and its expert-normalized score per task
    is logged beside the losses; the best weights by score go to OUT/best.

    Args:
        data: dataset directory or URL (made by `gato-like data generate` or `data convert`).
        out: run directory: best/ and checkpoint/ (safetensors models), lightning/ (trainer state), logs/.
        config: the training settings (their flags follow).
    """
    from gato_like.training.recipes import default_recipe
    from gato_like.training.train import train as run

    config = replace(config, recipe=config.recipe or default_recipe())
    config.resolved()  # an unknown recipe fails before any work
    checkpoint = run(data, out, config, command=shlex.join(["gato-like", *sys.argv[1:]]))
    print(f"checkpoint: {checkpoint}\nlogs: {Path(out) / 'logs'}")


def finetune(from_: Path, data: Path, out: Path, config: FinetuneConfig, task: str | None = None, spec: Path | None = None) -> None:  # fmt: skip
    """Fine-tune a pretrained checkpoint on a few demos of a new embodiment (full, head-only or LoRA).

    The flags besides these are the fields of ``FinetuneConfig`` (training/settings.py).

    Args:
        from_: the base checkpoint directory (--from CKPT).
        data: demos folder made by `gato-like data convert` (or `data generate`).
        out: run directory: checkpoint/ (the adapted model, base format), logs/, losses.png, finetune.json.
        config: the fine-tuning settings (their flags follow).
        task: which task of the folder (default: its only one).
        spec: the embodiment spec the demos must follow (default: the folder's own); checked against every demo.
    """
    from gato_like.training.finetune import finetune as run

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
    from gato_like.envs.registry import TASKS

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
    from gato_like.console import print_evaluation

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


def _settings_class(function: Any) -> type | None:
    """The settings dataclass whose fields are ``function``'s further flags (train, finetune)."""
    return {train: TrainConfig, finetune: FinetuneConfig}.get(function)


def _function_parser(function: Any, positional: bool = False) -> ArgumentParser:
    parser = ArgumentParser(description=_summary(function))
    settings = _settings_class(function)
    if settings is None:
        parser.add_function_arguments(function, fail_untyped=True, as_positional=positional)
        return parser
    # the command's own arguments, then the dataclass's fields as its further flags
    parser.add_function_arguments(function, fail_untyped=True, skip={"config"}, as_group=False)
    parser.add_class_arguments(settings)
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


@dataclasses.dataclass
class _NoSettings:
    pass


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
    } | {
        f"--{field.name}"
        for function in COMMANDS.values()
        for field in dataclasses.fields(_settings_class(function) or _NoSettings)
        if field.type in (bool, "bool")
    }
    out = []
    # `--from` is a Python keyword: finetune's and data convert's parameter is named from_
    argv = [("--from_" + a[6:]) if a == "--from" or a.startswith("--from=") else a for a in argv]
    if argv[:2] == ["data", "convert"]:  # `data convert --from minari DATASET`: the bare word is --source
        bare = [
            i for i in range(2, len(argv)) if not argv[i].startswith("-") and not argv[i - 1].startswith("--")
        ]
        argv = [*argv[: bare[0]], "--source", *argv[bare[0] :]] if len(bare) == 1 else argv
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
    given = arguments.as_dict()
    settings = _settings_class(COMMANDS[path])
    if settings is not None:  # the dataclass's flags become its instance
        names = {f.name for f in dataclasses.fields(settings)}
        given = {k: v for k, v in given.items() if k not in names} | {
            "config": settings(**{k: v for k, v in given.items() if k in names})
        }
    try:
        COMMANDS[path](**given)
    except (OSError, KeyError, ValueError) as error:
        # errors a user can act on: one clear line, no traceback
        message = error.args[0] if isinstance(error, KeyError) and error.args else error
        print(f"gato-like {' '.join(path)}: error: {message}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
