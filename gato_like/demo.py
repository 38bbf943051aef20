"""``gato-like demo``: the main job on the embedded default.

For now (the foundation), it runs two real simulators, tokenizes their episodes with the Gato
token scheme and prints what the model will read: the id layout, each timestep's token segments,
and the action round trip. Later stages (training, evaluation, serving) extend it.
"""

from __future__ import annotations

import time
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


def run(steps: int = 8, seed: int = 0) -> None:
    """Tokenize real episodes from the embedded simulators and print the token tables.

    Args:
        steps: timesteps to generate per episode.
        seed: seed of the environments and the random policy.
    """
    from rich.console import Console
    from rich.table import Table

    from gato_like.data_pipelines.sample import babyai_episode, cartpole_episode
    from gato_like.tokenizers import SequenceBuilder, TextTokenizer, TokenType

    console = Console()
    text = TextTokenizer()
    layout = None
    for make in (cartpole_episode, babyai_episode):
        started = time.perf_counter()
        spec, observations, actions = make(steps=steps, seed=seed)
        builder = SequenceBuilder(spec, text)
        layout = builder.layout
        sequence = builder.build(observations, actions)
        elapsed = time.perf_counter() - started
        table = Table(title=f"{spec.name}: one timestep ({spec.description})", title_justify="left")
        for column in ("segment", "kind", "tokens", "ids"):
            table.add_column(column)
        for row in _segments(builder, sequence):
            table.add_row(row[0], row[1], str(row[2]), row[3])
        console.print(table)
        decoded = builder.decode_actions(
            sequence.ids[sequence.types == TokenType.ACTION].reshape(len(actions), -1)
        )
        error = float(np.max(np.abs(decoded.astype(np.float64) - actions)))
        console.print(
            f"  {sequence.num_timesteps} timesteps -> {len(sequence)} tokens "
            f"({len(sequence) / sequence.num_timesteps:.0f} per timestep, {len(sequence.patches)} image patches, "
            f"{int(sequence.loss_mask.sum())} targets); action round trip max error {error:.2g}; "
            f"{elapsed:.1f}s to simulate and tokenize\n"
        )
    assert layout is not None
    ids = Table(title=f"id layout (text vocabulary V = {layout.text_size})", title_justify="left")
    ids.add_column("group")
    ids.add_column("ids [start, stop)")
    for name, (start, stop) in layout.ranges().items():
        ids.add_row(name, f"[{start}, {stop})")
    console.print(ids)
