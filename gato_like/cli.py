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
from gato_like.data_pipelines.convert import ConvertConfig
from gato_like.data_pipelines.generate import GenerateConfig
from gato_like.envs.base import Perturbation
from gato_like.envs.control import DEFAULT_PERTURBATION
from gato_like.serving.config import EngineConfig, ServerConfig
from gato_like.serving.loadgen import LoadConfig
from gato_like.training.settings import EvalConfig, FinetuneConfig, TrainConfig

# the settings dataclasses document each field in a docstring under it: that is the flag's help
set_parsing_settings(docstring_parse_attribute_docstrings=True)


def data_generate(out: Path, config: GenerateConfig, perturbation: Perturbation) -> None:
    """Generate expert episodes of a suite into WebDataset shards, with return normalizers.

    Episodes are DART-style by default: the simulator executes the expert's action plus Gaussian
    noise (or, with probability random_prob, a random action) and the episode records the expert's
    clean action, so the data shows how to recover from states off the expert's path. The flags
    are the fields of ``GenerateConfig`` (data_pipelines/generate.py) and ``Perturbation``
    (gato_like/envs/base.py).

    Args:
        out: output directory (shards, embodiment specs, index.json).
        config: what to generate (its flags follow).
        perturbation: the DART perturbation of the data episodes (--noise, --random_prob, --hold).
    """
    from gato_like.data_pipelines.generate import generate

    index = generate(out, config, perturbation=perturbation)
    timing = index["timing"]
    episodes_total = sum(t["episodes"] for t in index["tasks"].values())
    print(
        f"wrote {episodes_total} episodes of {len(index['tasks'])} task(s) to {out} in {timing['seconds']:.1f}s "
        f"({timing['rendered_frames'] / max(timing['seconds'], 1e-9):.0f} rendered frames/s)"
    )


def data_convert(source: str, out: Path, config: ConvertConfig) -> None:
    """Convert demonstrations (a folder of .npz files, a Minari or a LeRobot dataset) into shards of one task.

    ``gato-like data convert --from minari DATASET --out DIR`` or ``--from lerobot PATH --out DIR``
    (the dataset may also be given as --source). The flags besides these are the fields of
    ``ConvertConfig`` (data_pipelines/convert.py).

    Args:
        source: npz: a folder of .npz files, one episode each (obs.<key>, actions, rewards); minari: a dataset id in the local Minari store or a dataset folder; lerobot: a LeRobot dataset folder (meta/info.json, data/, videos/).
        out: dataset directory (created, or the task is added to its index).
        config: how to read the source (its flags follow).
    """
    from gato_like.data_pipelines.convert import convert

    index, name = convert(source, out, config)
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


def evaluate(ckpt: Path, config: EvalConfig, out: Path | None = None) -> None:
    """Roll a checkpoint's policy out in the real simulators: expert-normalized scores, success rates, plot, GIFs.

    The flags besides these are the fields of ``EvalConfig`` (training/settings.py).

    Args:
        ckpt: checkpoint directory (e.g. RUN/checkpoint).
        config: what to evaluate (its flags follow).
        out: where eval.json, scores.png and the GIFs go (default: CKPT/../eval).
    """
    from gato_like.console import print_evaluation
    from gato_like.training.evaluate import evaluate as run

    destination = out or Path(ckpt).resolve().parent / "eval"
    summary = run(ckpt, destination, config, command=shlex.join(["gato-like", *sys.argv[1:]]))
    print_evaluation(summary, destination)


def serve(ckpt: Path, engine: EngineConfig, server: ServerConfig, log_level: str = "info") -> None:
    """Serve a checkpoint's policy over WebSocket (msgpack frames; see docs/protocol.md).

    The flags besides these are the fields of ``EngineConfig`` and ``ServerConfig``
    (gato_like/serving/config.py).

    Args:
        ckpt: checkpoint directory.
        engine: sessions, batching, deadlines and threads of the model's engine (flags follow).
        server: the socket and its limits (flags follow; --token default: $GATO_LIKE_TOKEN, else none).
        log_level: debug, info, warning or error (JSON lines on stderr).
    """
    import os

    from gato_like.serving.server import configure_logging, serve_checkpoint

    configure_logging(log_level)
    if server.token is None and os.environ.get("GATO_LIKE_TOKEN"):
        server = replace(server, token=os.environ["GATO_LIKE_TOKEN"])
    serve_checkpoint(ckpt, server, engine)


def bench_serve(config: LoadConfig, ckpt: Path | None = None, out: Path = Path("serve_bench")) -> None:
    """Load test: N simulated robots at a fixed rate; latency p50/p90/p99/max, missed deadlines, throughput.

    The flags besides these are the fields of ``LoadConfig`` (gato_like/serving/loadgen.py).

    Args:
        config: what the load test runs (its flags follow).
        ckpt: checkpoint to serve (a server is launched per mode); or give --url.
        out: where serve_load.json and serve_load.png go.
    """
    from gato_like.serving.loadgen import sweep

    sweep(ckpt, out, config)
    print(f"results: {Path(out) / 'serve_load.json'}, plot: {Path(out) / 'serve_load.png'}")


def _settings(function: Any) -> dict[str, tuple[type, Any]]:
    """The settings dataclasses whose fields are ``function``'s further flags: parameter name ->
    (dataclass, the instance whose values are the flags' defaults, or None for the class's own)."""
    return SETTINGS.get(function, {})


def _instance(cls: type, values: dict[str, Any]) -> Any:
    """``cls(**values)``, building nested dataclass fields (``--limits.max_keys``) from their dicts."""
    import typing

    hints = typing.get_type_hints(cls)
    nested = {
        k: _instance(hints[k], v) for k, v in values.items() if isinstance(v, dict) and dataclasses.is_dataclass(hints[k])
    }  # fmt: skip
    return cls(**(values | nested))


def _function_parser(function: Any, positional: bool = False) -> ArgumentParser:
    parser = ArgumentParser(description=_summary(function))
    settings = _settings(function)
    # the command's own arguments, then each dataclass's fields as further flags, as it declares them
    parser.add_function_arguments(function, fail_untyped=True, as_positional=positional, skip=set(settings), as_group=not settings)  # fmt: skip
    for cls, defaults in settings.values():
        parser.add_class_arguments(cls)
        if defaults is not None:
            parser.set_defaults({f.name: getattr(defaults, f.name) for f in dataclasses.fields(cls)})
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


SETTINGS: dict[Callable[..., None], dict[str, tuple[type, Any]]] = {
    train: {"config": (TrainConfig, None)},
    finetune: {"config": (FinetuneConfig, None)},
    evaluate: {"config": (EvalConfig, None)},
    data_convert: {"config": (ConvertConfig, None)},
    data_generate: {"config": (GenerateConfig, None), "perturbation": (Perturbation, DEFAULT_PERTURBATION)},
    serve: {"engine": (EngineConfig, None), "server": (ServerConfig, None)},
    bench_serve: {"config": (LoadConfig, None)},
}


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
    } | {
        f"--{field.name}"
        for function in COMMANDS.values()
        for cls, _ in _settings(function).values()
        for field in dataclasses.fields(cls)
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
    try:
        for name, (cls, _) in _settings(COMMANDS[path]).items():  # each dataclass's flags become its instance
            fields = {f.name for f in dataclasses.fields(cls)}
            # __post_init__ checks the values here: a bad one exits 2 with its message
            values = {k: v for k, v in given.items() if k in fields}
            given = {k: v for k, v in given.items() if k not in fields} | {name: _instance(cls, values)}
        COMMANDS[path](**given)
    except (OSError, KeyError, ValueError) as error:
        # errors a user can act on: one clear line, no traceback
        message = error.args[0] if isinstance(error, KeyError) and error.args else error
        print(f"gato-like {' '.join(path)}: error: {message}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
