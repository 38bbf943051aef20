"""Episode arrays + embodiment spec -> one flat token sequence (Gato section 2.1, 2.2).

Inside every timestep the order is fixed::

    [text keys, sorted] [image keys, sorted: patches in raster order] [proprio/discrete keys, sorted]
    [SEPARATOR] [action tokens, row-major]

and timesteps follow each other in time order. Beside the ids the builder returns, per position,
the token type (:class:`~gato_like.tokenizers.vocab.TokenType`), the timestep, the local position
(index of the token inside its timestep) and the loss mask (action and text tokens only). Image
positions hold the ``IMAGE_PATCH`` placeholder id; their patches travel in ``patches`` (one row per
image position, in sequence order) with their (row, col, rows, cols) in ``patch_positions``.
Single-channel images are repeated to 3 channels so every patch has the same shape.
"""

from __future__ import annotations

import operator
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from gato_like.tokenizers.continuous import ContinuousTokenizer
from gato_like.tokenizers.discrete import DiscreteTokenizer
from gato_like.tokenizers.image import ImageTokenizer
from gato_like.tokenizers.spec import EmbodimentSpec
from gato_like.tokenizers.text import TextTokenizer
from gato_like.tokenizers.vocab import PATCH_SIZE, TokenType, VocabLayout

#: Channels of every patch (grayscale images are repeated to RGB).
PATCH_CHANNELS = 3

#: Scaled actions may exceed [-1, 1] by this much (float rounding of the bounds) before it is an error.
ACTION_ROUNDING = 1e-6


@dataclass
class TokenSequence:
    """One tokenized episode (or a window of one). L = tokens, P = image patches.

    Attributes:
        ids: int64 ``(L,)`` ids of the vocabulary layout.
        types: int8 ``(L,)`` :class:`TokenType` of each position.
        timesteps: int32 ``(L,)`` timestep of each position, from 0.
        local_positions: int32 ``(L,)`` index of the token inside its timestep.
        loss_mask: bool ``(L,)`` True on targets (action and text tokens).
        patches: float32 ``(P, 3, 16, 16)``, one per ``TokenType.IMAGE`` position, in order.
        patch_positions: int64 ``(P, 4)``: patch row, column, rows, columns in its image.
        dynamics_ids: int64 ``(L,)`` or None: what the dynamics head learns to predict at each
            position when it predicts changes (``Config.dynamics_target="delta"``): ``ids``, except
            that a proprio token holds the token of its value minus the previous timestep's. Only
            built when :meth:`SequenceBuilder.build` is given the previous timestep.
        executed_ids: int64 ``(L,)`` or None: what the dynamics head reads as its inputs:
            ``ids``, except that action tokens hold the actions the environment executed (which
            a perturbed rollout records apart from its labels). None: the labels were executed.
    """

    ids: np.ndarray
    types: np.ndarray
    timesteps: np.ndarray
    local_positions: np.ndarray
    loss_mask: np.ndarray
    patches: np.ndarray
    patch_positions: np.ndarray
    dynamics_ids: np.ndarray | None = None
    executed_ids: np.ndarray | None = None

    def __len__(self) -> int:
        return int(self.ids.shape[0])

    @property
    def num_timesteps(self) -> int:
        return int(self.timesteps[-1]) + 1 if len(self) else 0

    def timestep_bounds(self) -> np.ndarray:
        """int64 ``(T + 1,)``: timestep t spans positions ``[bounds[t], bounds[t + 1])``."""
        return np.searchsorted(self.timesteps, np.arange(self.num_timesteps + 1), side="left")

    def window(self, start: int, stop: int) -> TokenSequence:
        """Whole timesteps ``[start, stop)``, renumbered from 0 (for context windows)."""
        return self.windows([(start, stop)])[0]

    def windows(self, spans: list[tuple[int, int]]) -> list[TokenSequence]:
        """:meth:`window` of each ``(start, stop)`` span (views, not copies), the bounds found once."""
        steps = self.num_timesteps
        bounds = self.timestep_bounds()
        images = np.concatenate([[0], np.cumsum(self.types == TokenType.IMAGE)])
        out = []
        for start, stop in spans:
            start, stop = operator.index(start), operator.index(stop)
            if not 0 <= start < stop <= steps:
                raise ValueError(f"window: expected 0 <= start < stop <= {steps}, got [{start}, {stop})")
            lo, hi = int(bounds[start]), int(bounds[stop])
            p_lo, p_hi = int(images[lo]), int(images[hi])
            out.append(
                TokenSequence(
                    ids=self.ids[lo:hi],
                    types=self.types[lo:hi],
                    timesteps=(self.timesteps[lo:hi] - start).astype(np.int32),
                    local_positions=self.local_positions[lo:hi],
                    loss_mask=self.loss_mask[lo:hi],
                    patches=self.patches[p_lo:p_hi],
                    patch_positions=self.patch_positions[p_lo:p_hi],
                    dynamics_ids=None if self.dynamics_ids is None else self.dynamics_ids[lo:hi],
                    executed_ids=None if self.executed_ids is None else self.executed_ids[lo:hi],
                )
            )
        return out

    @staticmethod
    def concatenate(parts: list[TokenSequence]) -> TokenSequence:
        """Sequences one after another in time (e.g. a prompt before an episode window)."""
        if not parts:
            raise ValueError("concatenate: expected at least one sequence")
        offsets = np.cumsum([0] + [p.num_timesteps for p in parts[:-1]])
        return TokenSequence(
            ids=np.concatenate([p.ids for p in parts]),
            types=np.concatenate([p.types for p in parts]),
            timesteps=np.concatenate([p.timesteps + o for p, o in zip(parts, offsets, strict=True)]).astype(
                np.int32
            ),
            local_positions=np.concatenate([p.local_positions for p in parts]),
            loss_mask=np.concatenate([p.loss_mask for p in parts]),
            patches=np.concatenate([p.patches for p in parts]),
            patch_positions=np.concatenate([p.patch_positions for p in parts]),
            dynamics_ids=None
            if all(p.dynamics_ids is None for p in parts)
            else np.concatenate([p.ids if p.dynamics_ids is None else p.dynamics_ids for p in parts]),
            executed_ids=None
            if all(p.executed_ids is None for p in parts)
            else np.concatenate([p.ids if p.executed_ids is None else p.executed_ids for p in parts]),
        )


class SequenceBuilder:
    """Tokenizes episodes of one embodiment. Pure and picklable: safe in data-loader workers.

    Args:
        spec: the embodiment.
        text: the text tokenizer; its vocabulary size V sets every other id range.
        image: the image tokenizer (16x16 patches by default).
    """

    def __init__(
        self, spec: EmbodimentSpec, text: TextTokenizer | None = None, image: ImageTokenizer | None = None
    ) -> None:
        self.spec = spec
        self.text = text if text is not None else TextTokenizer()
        self.image = image if image is not None else ImageTokenizer(PATCH_SIZE)
        self.layout = VocabLayout(self.text.vocab_size)
        self.continuous = ContinuousTokenizer(self.layout.continuous_offset)
        self.action_continuous = ContinuousTokenizer(self.layout.continuous_offset, mu_law=False)
        self.discrete = DiscreteTokenizer(self.layout.discrete_offset, self.layout.discrete_values)
        self.text_keys = spec.keys_by_kind("text")
        self.image_keys = spec.keys_by_kind("image")
        self.tensor_keys = sorted(
            k for k, v in spec.observations.items() if v.kind in ("proprio", "discrete")
        )

    @property
    def action_size(self) -> int:
        """Action tokens per timestep."""
        return self.spec.action.size

    def action_id_range(self) -> tuple[int, int]:
        """The ids ``[low, high)`` an action token of this embodiment may take: every continuous
        bin, or the discrete ids of ``0 .. num_choices - 1``."""
        return self.layout.action_range(self.spec.action.kind, self.spec.action.num_choices)

    def fixed_observation_size(self) -> int:
        """Observation tokens per timestep, text excluded (text length varies with the string)."""
        size = 0
        for key in self.image_keys:
            height, width, _ = self.spec.observations[key].shape
            size += self.image.num_patches(height, width)
        return size + sum(self.spec.observations[k].tokens for k in self.tensor_keys)

    def group_sizes(self) -> dict[str, int]:
        """Tokens per timestep of each group whose size the spec fixes: ``image`` (patches of every
        image key), ``values`` (proprio and discrete values) and ``action`` (the separator and the
        action tokens). Text is left out: its length varies with the string."""
        images = 0
        for key in self.image_keys:
            height, width, _ = self.spec.observations[key].shape
            images += self.image.num_patches(height, width)
        values = sum(self.spec.observations[k].tokens for k in self.tensor_keys)
        return {"image": images, "values": values, "action": 1 + self.action_size}

    # -- actions ---------------------------------------------------------------------------------

    def encode_actions(self, actions: np.ndarray) -> np.ndarray:
        """Actions ``(T, *action.shape)`` (already checked against the spec) to ids ``(T, A)``."""
        action = self.spec.action
        rows = np.asarray(actions).reshape(len(actions), -1)
        if action.kind == "discrete":
            return self.discrete.encode(rows.astype(np.int64)).reshape(rows.shape)
        assert action.low is not None and action.high is not None
        low, high = action.low.reshape(-1), action.high.reshape(-1)
        scaled = 2.0 * (rows.astype(np.float64) - low) / (high - low) - 1.0
        # float32 rounding of a value at a bound, seen through a narrow range, may exceed 1 a little
        rounding = ACTION_ROUNDING + 4.0 * np.finfo(np.float32).eps * np.maximum(np.maximum(np.abs(low), np.abs(high)), 1.0) / (high - low)  # fmt: skip
        outside = ~(np.abs(scaled) <= 1.0 + rounding)  # NaN counts as outside
        if outside.any():
            at = tuple(int(i) for i in np.argwhere(outside)[0])
            raise ValueError(
                f"encode_actions: action {float(rows[at])!r} at index {at} is outside the action bounds "
                f"[{float(low[at[1]])}, {float(high[at[1]])}] of {self.spec.name!r} (scaled {scaled[at]:.6g}, expected "
                "[-1, 1]); actions are never clipped silently"
            )
        scaled = np.clip(scaled, -1.0, 1.0)  # float rounding only
        return self.action_continuous.encode(scaled).reshape(rows.shape)

    def decode_actions(self, ids: np.ndarray) -> np.ndarray:
        """Action ids ``(..., A)`` back to actions ``(..., *action.shape)`` (within one bin of the
        original: ``(high - low) / 1024`` per element for continuous actions, exact for discrete)."""
        action = self.spec.action
        ids = np.asarray(ids)
        if ids.shape[-1:] != (self.action_size,):
            raise ValueError(
                f"decode_actions: expected ids of shape (..., {self.action_size}), got {ids.shape}"
            )
        shape = ids.shape[:-1] + action.shape
        if action.kind == "discrete":
            values = self.discrete.decode(ids)
            assert action.num_choices is not None
            if (values >= action.num_choices).any():
                raise ValueError(f"decode_actions: ids decode to choices >= num_choices={action.num_choices}")
            return values.reshape(shape)
        assert action.low is not None and action.high is not None
        unit = self.action_continuous.decode(ids)
        low, high = action.low.reshape(-1), action.high.reshape(-1)
        return (low + (unit + 1.0) / 2.0 * (high - low)).astype(np.float32).reshape(shape)

    # -- episodes --------------------------------------------------------------------------------

    def _patches(self, frames: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """uint8 ``(T, H, W, C)`` -> patches ``(T, N, 3, P, P)`` and positions ``(T, N, 4)``."""
        steps, height, width, channels = frames.shape
        p = self.image.patch_size
        rows, cols = self.image.grid(height, width)
        if height % p == 0:
            # frames stacked vertically keep each frame's raster order when H is a multiple of P
            patches, _ = self.image.encode(frames.reshape(steps * height, width, channels))
        else:
            patches = np.concatenate([self.image.encode(frame)[0] for frame in frames])
        patches = patches.reshape(steps, rows * cols, channels, p, p)
        if channels == 1:
            patches = np.repeat(patches, PATCH_CHANNELS, axis=2)
        positions = self.image.positions(height, width)
        return patches, np.broadcast_to(positions, (steps, *positions.shape))

    def build(
        self,
        observations: Mapping[str, Any],
        actions: np.ndarray | None = None,
        checked: bool = False,
        previous: Mapping[str, np.ndarray] | None = None,
        executed: np.ndarray | None = None,
    ) -> TokenSequence:
        """Tokenize an episode.

        Args:
            observations: per observation key an array ``(T, *shape)`` (text: ``T`` strings).
            actions: ``(T, *action.shape)``; or ``(T - 1, ...)`` / None with T = 1 when the last
                timestep awaits its action (acting): that timestep then ends at its separator.
            checked: the caller already checked these arrays against the spec (e.g. a window
                of an episode the loader checked when it decoded it): skip the check, which cost
                ~15 % of the loader's time when done again for every window.
            previous: per proprio key ``(T, *shape)``, the observation one timestep before each
                of ``observations`` (an episode's first timestep: itself). Fills the sequence's
                ``dynamics_ids``: each proprio token's change since that timestep, tokenized.
            executed: ``(len(actions), *action.shape)``, the actions the environment executed
                where they differ from ``actions`` (the labels). Fills ``executed_ids``.

        Raises:
            SpecMismatchError: naming every key that does not match the spec (unless ``checked``).
        """
        if checked:
            steps = len(next(iter(observations.values())))
        else:
            steps = self.spec.check_episode(observations, actions)
        num_actions = 0 if actions is None else len(actions)
        if actions is None and steps != 1:
            raise ValueError(f"build: actions may be None only for a single timestep, got {steps} timesteps")

        # Fixed-size blocks (T, n) of ids, types and loss mask, in the timestep's order.
        id_blocks: list[np.ndarray] = []
        delta_blocks: list[np.ndarray] = []  # id_blocks with proprio changes (``previous`` given)
        type_blocks: list[np.ndarray] = []
        patch_list: list[np.ndarray] = []
        position_list: list[np.ndarray] = []
        for key in self.image_keys:
            patches, positions = self._patches(np.asarray(observations[key]))
            patch_list.append(patches)
            position_list.append(positions)
            id_blocks.append(np.full(patches.shape[:2], self.layout.image_patch_id, dtype=np.int64))
            delta_blocks.append(id_blocks[-1])
            type_blocks.append(np.full(patches.shape[:2], TokenType.IMAGE, dtype=np.int8))
        for key in self.tensor_keys:
            obs = self.spec.observations[key]
            array = obs.to_cells(np.asarray(observations[key])).reshape(steps, -1)
            if obs.kind == "proprio":
                block, kind = self.continuous.encode(array).reshape(array.shape), TokenType.CONTINUOUS
                if previous is not None:
                    before = np.asarray(previous[key], dtype=np.float64).reshape(array.shape)
                    delta_blocks.append(self.continuous.encode(array - before).reshape(array.shape))
            else:
                block, kind = self.discrete.encode(array).reshape(array.shape), TokenType.DISCRETE
                delta_blocks.append(block)
            id_blocks.append(block)
            type_blocks.append(np.full(block.shape, kind, dtype=np.int8))
        id_blocks.append(np.full((steps, 1), self.layout.separator_id, dtype=np.int64))
        type_blocks.append(np.full((steps, 1), TokenType.SEPARATOR, dtype=np.int8))
        action_ids = np.full((steps, self.action_size), -1, dtype=np.int64)
        if num_actions:
            action_ids[:num_actions] = self.encode_actions(np.asarray(actions))
        id_blocks.append(action_ids)
        type_blocks.append(np.full(action_ids.shape, TokenType.ACTION, dtype=np.int8))
        fixed_ids = np.concatenate(id_blocks, axis=1)
        if executed is not None and len(executed) != num_actions:
            raise ValueError(f"build: expected {num_actions} executed actions, got {len(executed)}")
        fixed_types = np.concatenate(type_blocks, axis=1)
        fixed_deltas = (
            np.concatenate([*delta_blocks, *id_blocks[len(delta_blocks) :]], axis=1)
            if previous is not None
            else None
        )

        text_ids = [
            np.concatenate([self.text.encode(str(observations[k][t])) for k in self.text_keys])
            if self.text_keys
            else np.zeros(0, dtype=np.int64)
            for t in range(steps)
        ]
        dynamics_ids = None
        if num_actions == steps and len({len(x) for x in text_ids}) == 1:
            # every timestep the same width (the loader's windows): the (T, width) blocks side by
            # side, flattened; one concatenation per timestep was ~10 % of the loader's time
            text_block = np.stack(text_ids).astype(np.int64, copy=False)
            ids = np.concatenate([text_block, fixed_ids], axis=1).reshape(-1)
            text_types = np.full(text_block.shape, TokenType.TEXT, dtype=np.int8)
            types = np.concatenate([text_types, fixed_types], axis=1).reshape(-1)
            if fixed_deltas is not None:
                dynamics_ids = np.concatenate([text_block, fixed_deltas], axis=1).reshape(-1)
            lengths = np.full(steps, text_block.shape[1] + fixed_ids.shape[1])
        else:  # a timestep awaiting its action, or text of several lengths
            ids_per_step, types_per_step, deltas_per_step = [], [], []
            for t in range(steps):
                width = fixed_ids.shape[1] - (self.action_size if t >= num_actions else 0)
                ids_per_step.append(np.concatenate([text_ids[t], fixed_ids[t, :width]]))
                if fixed_deltas is not None:
                    deltas_per_step.append(np.concatenate([text_ids[t], fixed_deltas[t, :width]]))
                types_per_step.append(
                    np.concatenate(
                        [np.full(len(text_ids[t]), TokenType.TEXT, dtype=np.int8), fixed_types[t, :width]]
                    )
                )
            lengths = np.array([len(x) for x in ids_per_step])
            ids = np.concatenate(ids_per_step)
            types = np.concatenate(types_per_step)
            if fixed_deltas is not None:
                dynamics_ids = np.concatenate(deltas_per_step)
        timesteps = np.repeat(np.arange(steps, dtype=np.int32), lengths)
        starts = np.repeat(np.cumsum(lengths) - lengths, lengths)
        local_positions = (np.arange(len(ids)) - starts).astype(np.int32)
        loss_mask = (types == TokenType.TEXT) | (types == TokenType.ACTION)
        if patch_list:
            # (T, N_key, ...) per key -> per timestep, keys in order -> flat (P, ...)
            patches = np.concatenate(patch_list, axis=1).reshape(
                -1, PATCH_CHANNELS, *patch_list[0].shape[-2:]
            )
            positions = np.concatenate(position_list, axis=1).reshape(-1, 4)
        else:
            p = self.image.patch_size
            patches = np.zeros((0, PATCH_CHANNELS, p, p), dtype=np.float32)
            positions = np.zeros((0, 4), dtype=np.int64)
        executed_ids = None
        if executed is not None:  # the action positions, in order, hold the executed actions
            executed_ids = ids.copy()
            executed_ids[types == TokenType.ACTION] = self.encode_actions(np.asarray(executed)).reshape(-1)
        return TokenSequence(
            ids, types, timesteps, local_positions, loss_mask, patches, positions, dynamics_ids, executed_ids
        )

    def build_step(self, observation: Mapping[str, Any], checked: bool = False) -> TokenSequence:
        """One timestep awaiting its action (observation tokens + separator), for acting.
        ``checked``: the caller already checked it against the spec (the server validates every
        observation before queueing it); skip the check."""
        if not checked:
            self.spec.check_step(observation)
        batched = {
            k: np.asarray(v, dtype=object).reshape(1)
            if self.spec.observations[k].kind == "text"
            else np.asarray(v)[None]
            for k, v in observation.items()
        }
        return self.build(batched, None, checked=True)
