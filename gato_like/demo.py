"""``gato-like demo``: the main job on the embedded default.

So far: generate the default suite in the real simulators (short episodes), inspect it (table,
checksums, montage, GIF), and print how one timestep of every embodiment is tokenized. Training,
evaluation and serving extend it as they land.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

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
            count = int(np.prod(spec.observations[key].shape))
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
    episodes: int = 2,
    max_steps: int = 100,
    normalizer_episodes: int = 5,
    workers: int = 2,
    seed: int = 0,
) -> None:
    """Generate the default suite, inspect it, and show how each embodiment is tokenized.

    Args:
        out: where everything goes (the dataset in OUT/data).
        episodes: expert episodes per task.
        max_steps: episode length cap (short, so the demo is quick).
        normalizer_episodes: expert and random episodes per task for the score normalizers.
        workers: processes for generation.
        seed: base seed.
    """
    from rich.table import Table

    from gato_like.cli import _console, data_inspect
    from gato_like.data_pipelines.generate import generate
    from gato_like.data_pipelines.shards import iter_shard, load_spec, read_index
    from gato_like.tokenizers import SequenceBuilder, TextTokenizer, TokenType

    console = _console()
    root = Path(out) / "data"
    started = time.perf_counter()
    console.rule("1. generate the default suite (real simulators, scripted experts)")
    index = generate(
        root, "default", None, episodes, max_steps, seed, workers, 8, normalizer_episodes, overwrite=True
    )
    console.print(
        f"{sum(t['episodes'] for t in index['tasks'].values())} episodes in {index['timing']['seconds']:.1f}s -> {root}"
    )
    console.rule("2. inspect it")
    data_inspect(root)
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
    console.rule("done")
    console.print(
        f"in {time.perf_counter() - started:.0f}s. Dataset: {root} (index.json, one folder per task); "
        f"montage: {root / 'montage.png'}. Training, evaluation and serving join this demo as they land."
    )
