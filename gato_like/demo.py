"""``gato-like demo``: the main job on the embedded default, end to end.

1. generate the default suite in the real simulators (scripted experts, short episodes) and shard it;
2. inspect it (table, checksums, montage, GIF) and show how each embodiment is tokenized;
3. generate the acting data: full-length DART-perturbed expert episodes of the demo's tasks
   (proprioception and BabyAI's symbolic view), and train a ``debug`` model on them with the
   ``cpu-demo`` recipe for a few minutes, rolling it out in the simulators at each validation;
4. evaluate the best checkpoint by score in the simulators (expert-normalized scores,
   ``scores.png``, GIFs) and write its card;
5. start the policy server on a loopback port and drive one simulated robot through it.

Everything goes under ``OUT`` (default ``demo_out``); the last lines say where.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

#: The demo's agent: tasks a debug model learns to act in within minutes on 2 cores.
DEMO_TASKS = ("dmc-cartpole-balance", "babyai-GoToRedBall")

if TYPE_CHECKING:
    from gato_like.tokenizers import SequenceBuilder, TokenSequence


def _segments(builder: SequenceBuilder, sequence: TokenSequence) -> list[tuple[str, str, int, str]]:
    """(what, type, tokens, ids) rows for the first timestep of ``sequence``."""
    from gato_like.tokenizers import TokenType

    first = sequence.window(0, 1)
    rows: list[tuple[str, str, int, str]] = []
    spec = builder.spec
    order = [(k, "text") for k in builder.text_keys] + [(k, "image") for k in builder.image_keys]
    order += [(k, spec.observations[k].kind) for k in builder.tensor_keys]
    position = 0
    for key, kind in order:
        if kind == "text":
            count = int(np.sum(first.types == TokenType.TEXT))
        elif kind == "image":
            h, w, _ = spec.observations[key].shape
            count = builder.image.num_patches(h, w)
        else:
            count = spec.observations[key].tokens
        ids = first.ids[position : position + count]
        shown = (
            "patch placeholders"
            if kind == "image"
            else " ".join(map(str, ids[:6])) + (" …" if count > 6 else "")
        )
        rows.append((f"obs.{key}", kind, count, shown))
        position += count
    rows.append(("separator", "separator", 1, str(first.ids[position])))
    actions = first.ids[position + 1 :]
    rows.append(("actions", spec.action.kind, len(actions), " ".join(map(str, actions))))
    return rows


def run(
    out: Path = Path("demo_out"),
    episodes: int = 10,
    max_steps: int = 200,
    normalizer_episodes: int = 5,
    workers: int = 2,
    seed: int = 0,
    tasks: str = ",".join(DEMO_TASKS),
    act_episodes: int = 20,
    act_max_steps: int | None = None,
    train_steps: int | None = None,
    train_minutes: float | None = None,
    eval_episodes: int = 3,
    serve_task: str = "dmc-cartpole-balance",
) -> None:
    """Generate the default suite, inspect it, train a small model on it, evaluate it, write its card.

    Args:
        out: where everything goes (OUT/data, OUT/run, OUT/run/eval).
        episodes: expert episodes per task.
        max_steps: episode length cap (short, so the demo is quick).
        normalizer_episodes: expert and random episodes per task for the score normalizers.
        workers: processes for generation.
        seed: base seed.
        tasks: the tasks the agent is trained on and scored in (comma-separated).
        act_episodes: expert episodes per control task of the acting data (BabyAI: 15x as many, they are short).
        act_max_steps: episode length of the acting data and the evaluation (default: each task's full length).
        train_steps: optimizer steps (default: the cpu-demo recipe's).
        train_minutes: wall-time cap of training (default: the cpu-demo recipe's).
        eval_episodes: evaluation episodes per task.
        serve_task: the task of the simulated robot driven through the policy server.
    """
    from rich.table import Table

    from gato_like.console import console as make_console
    from gato_like.console import print_dataset
    from gato_like.data_pipelines.generate import GenerateConfig, generate
    from gato_like.data_pipelines.shards import iter_shard, load_spec, read_index
    from gato_like.tokenizers import SequenceBuilder, TextTokenizer, TokenType

    console = make_console()
    root = Path(out) / "data"
    started = time.perf_counter()
    console.rule("1. generate the default suite (real simulators, scripted experts)")
    index = generate(
        root, GenerateConfig(suite="default", episodes=episodes, max_steps=max_steps, seed=seed, workers=workers,
                             episodes_per_shard=8, normalizer_episodes=normalizer_episodes, overwrite=True)
    )  # fmt: skip
    console.print(
        f"{sum(t['episodes'] for t in index['tasks'].values())} episodes in {index['timing']['seconds']:.1f}s -> {root}"
    )
    console.rule("2. inspect it")
    print_dataset(root)
    console.rule("3. one timestep of each embodiment, as the model reads it")
    text = TextTokenizer()
    layout = None
    seen: set[str] = set()
    for task, entry in sorted(read_index(root)["tasks"].items()):
        spec = load_spec(root, task)
        if spec.name in seen:
            continue
        seen.add(spec.name)
        episode = next(iter_shard(root / entry["shards"][0]["path"]))
        builder = SequenceBuilder(spec, text)
        layout = builder.layout
        sequence = builder.build(episode.observations, episode.actions)
        table = Table(title=f"{task} ({spec.name}): {spec.description}", title_justify="left")
        for column in ("segment", "kind", "tokens", "ids"):
            table.add_column(column)
        for row in _segments(builder, sequence):
            table.add_row(row[0], row[1], str(row[2]), row[3])
        console.print(table)
        decoded = builder.decode_actions(
            sequence.ids[sequence.types == TokenType.ACTION].reshape(episode.length, -1)
        )
        error = float(np.max(np.abs(decoded.astype(np.float64) - episode.actions)))
        console.print(
            f"  {sequence.num_timesteps} timesteps -> {len(sequence)} tokens, {len(sequence.patches)} image patches, "
            f"{int(sequence.loss_mask.sum())} targets; action round trip max error {error:.2g}\n"
        )
    assert layout is not None
    ids = Table(title=f"id layout (text vocabulary V = {layout.text_size})", title_justify="left")
    ids.add_column("group")
    ids.add_column("ids [start, stop)")
    for name, (start, stop) in layout.ranges().items():
        ids.add_row(name, f"[{start}, {stop})")
    console.print(ids)
    from gato_like.training.recipes import get_recipe

    recipe = get_recipe("cpu-demo")
    names = [t.strip() for t in tasks.split(",") if t.strip()]
    act_root = Path(out) / "act_data"
    console.rule(f"4. generate the acting data ({', '.join(names)}) and train on it")
    babyai = [n for n in names if n.startswith("babyai")]
    act_index = generate(
        act_root, GenerateConfig(suite=None, tasks=names, episodes=act_episodes, max_steps=act_max_steps, seed=seed,
                                 workers=workers, normalizer_episodes=normalizer_episodes, overwrite=True, pixels=False,
                                 task_episodes={n: 15 * act_episodes for n in babyai}),
    )  # fmt: skip
    entry = next(iter(act_index["tasks"].values()))
    console.print(
        f"{sum(t['timesteps'] for t in act_index['tasks'].values()):,} timesteps in {act_index['timing']['seconds']:.1f}s "
        f"-> {act_root} (DART: the expert's action plus noise is executed, its clean action recorded: "
        f"{entry['perturbation']})"
    )
    steps = train_steps or recipe.max_steps
    minutes = train_minutes if train_minutes is not None else float(recipe.max_minutes or 6.0)
    console.print(
        f"recipe cpu-demo: {recipe.preset} model, {recipe.model}, {steps} steps or {minutes:g} minutes"
    )
    run_dir = Path(out) / "run"
    checkpoint = _train(act_root, run_dir, recipe, steps, minutes, seed)
    meta = json.loads((checkpoint / "meta.json").read_text())
    console.print(
        f"{meta['step']} steps, {meta['tokens']:,} tokens in {meta['training_seconds'] / 60:.1f} min "
        f"({meta['tokens_per_second']:,.0f} tokens/s); final policy loss "
        f"{meta['metrics'].get('train/policy_loss', float('nan')):.3f}"
    )
    console.rule(f"5. evaluate it in the simulators ({eval_episodes} unseen episodes per task)")
    from gato_like.console import print_evaluation
    from gato_like.training.evaluate import evaluate

    summary = evaluate(checkpoint, run_dir / "eval", episodes=eval_episodes, seed=seed)
    if summary["mean_score"] is not None:
        console.print(
            f"mean expert-normalized score {summary['mean_score']:.2f} (1 = the expert, 0 = uniform random; "
            "full-length episodes on seeds no training episode used)"
        )
    print_evaluation(summary, run_dir / "eval")
    console.rule("6. serve it, and drive one simulated robot through the server")
    served = _serve_one_episode(checkpoint, serve_task, act_max_steps, seed)
    console.print(served)
    console.rule("done")
    console.print(
        f"in {(time.perf_counter() - started) / 60:.1f} min. Where everything went:\n"
        f"  dataset     {root} (index.json, one folder of shards per task, montage.png)\n"
        f"  acting data {act_root} (the tasks the agent was trained on)\n"
        f"  checkpoint  {checkpoint} (model.safetensors, config, tokenizer, specs)\n"
        f"  trainer     {run_dir / 'lightning' / 'last.ckpt'} (resume with gato-like train --resume true)\n"
        f"  logs        {run_dir / 'logs' / 'metrics.csv'}, curves {run_dir / 'losses.png'}\n"
        f"  evaluation  {run_dir / 'eval'} (eval.json, scores.png, one GIF per task)\n"
        f"  model card  {run_dir / 'eval' / 'model_card.md'}\n"
        f"  serve it    gato-like serve --ckpt {checkpoint}   (protocol: docs/protocol.md)"
    )


def _serve_one_episode(checkpoint: Path, task_name: str, max_steps: int | None, seed: int) -> str:
    """Start ``gato-like serve`` on a free loopback port, run one episode of ``task_name`` in the
    simulator with the light client acting through it, stop the server; a one-line summary."""
    from gato_like.envs.registry import get_task
    from gato_like.serving.client import PolicyClient
    from gato_like.serving.loadgen import free_port, launch_server

    port = free_port()
    server = launch_server(checkpoint, port, max_batch=None, max_sessions=4)  # returns once /readyz is 200
    try:
        latencies: list[float] = []
        with PolicyClient(f"ws://127.0.0.1:{port}", task=task_name) as client:

            def act(observation: dict) -> np.ndarray:
                started = time.perf_counter()
                action = client.act(observation)
                latencies.append(time.perf_counter() - started)
                return action

            episode = get_task(task_name).rollout(seed + 7_000_000, act, render=False, max_steps=max_steps)
        ms = np.asarray(latencies) * 1000
        return (
            f"{task_name}: {episode.length} steps through ws://127.0.0.1:{port}, return {episode.episode_return:.2f}; "
            f"round trip p50 {np.percentile(ms, 50):.1f} ms, p99 {np.percentile(ms, 99):.1f} ms"
        )
    finally:
        server.terminate()
        server.wait(timeout=30)


def _train(data: Path, run_dir: Path, recipe: Any, steps: int, minutes: float, seed: int) -> Path:
    """Train with the recipe quietly (Lightning's banner and warnings off, the progress bar on)."""
    import logging
    import warnings

    from gato_like.training.settings import TrainConfig
    from gato_like.training.train import train

    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        config = TrainConfig(
            recipe=recipe.name,
            max_steps=steps,
            max_minutes=minutes,
            seed=seed,
            warmup_steps=min(recipe.warmup_steps, max(steps // 10, 1)),
            val_every=max(min(recipe.val_every, steps // 2), 1),
        )  # the rest: the recipe's
        return train(data, run_dir, config,
                     command=f"gato-like train --data {data} --out {run_dir} --recipe {recipe.name} "
                     f"--max_steps {steps} --max_minutes {minutes:g}")  # fmt: skip
