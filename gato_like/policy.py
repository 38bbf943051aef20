"""The runtime agent: ``Policy.from_checkpoint(path)``, ``reset(...)``, ``act(observation)``.

Each environment keeps its token history and its rows of a shared KV cache, so acting for one
more timestep feeds only that timestep's tokens. When the context is full, the oldest whole
timesteps are dropped (the prompt and goal stay) and the kept window is re-encoded once; acting
then continues from the cache. Observations are checked against the embodiment spec first; the
error names the key, the expected and the received value.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from gato_like.acting import ActingCore, Row, episode_seed, pick_action, pick_bin, sample_bin
from gato_like.checkpoint import Checkpoint, load_checkpoint
from gato_like.tokenizers import EmbodimentSpec, SequenceBuilder, SpecMismatchError, TokenSequence, TokenType

__all__ = [
    "Policy",
    "episode_seed",
    "pick_action",
    "pick_bin",
    "sample_bin",
]  # the last four: gato_like.acting's


class Policy:
    """Acts for one or many environments of one embodiment with a trained model: a single-user
    layer over :class:`gato_like.acting.ActingCore` (one cache row per environment).

    Args:
        checkpoint: a loaded checkpoint.
        device: where the model runs.
        temperature: 0 picks the action token as the config decodes (greedy); > 0 samples.
        seed: seed of the sampler.
    """

    def __init__(self, checkpoint: Checkpoint, device: str | torch.device = "cpu", temperature: float = 0.0, seed: int = 0) -> None:  # fmt: skip
        if not temperature >= 0:
            raise ValueError(f"temperature: expected a number >= 0, got {temperature!r}")
        self.checkpoint = checkpoint
        self.core = ActingCore(checkpoint.model, checkpoint.text, device)
        self.model = self.core.model
        self.device = self.core.device
        self.temperature = float(temperature)
        self.seed = seed
        self.episodes = 0
        """Resets so far; the ``e``-th reset seeds environment 0's sampler with
        ``episode_seed(seed, e)`` (a server session's first episode is a new policy's first)."""
        self.spec: EmbodimentSpec | None = None
        self.builder: SequenceBuilder | None = None
        self.envs: list[Row] = []
        self.head = "policy"
        self.last_logits: list[Tensor] = []
        """The logits ``(N, n)`` each action token of the last :meth:`act_batch` was chosen from,
        over the action's ids ``builder.action_id_range()``."""

    @classmethod
    def from_checkpoint(cls, path: str | Path, device: str | torch.device = "cpu", **kwargs: Any) -> Policy:
        return cls(load_checkpoint(path, device), device, **kwargs)

    # -- episodes ------------------------------------------------------------------------------

    def reset(
        self,
        task: str | None = None,
        prompt: tuple[Mapping[str, Any], np.ndarray] | None = None,
        goal: Mapping[str, Any] | None = None,
        num_envs: int = 1,
        embodiment: str | None = None,
    ) -> EmbodimentSpec:
        """Start new episodes.

        Args:
            task: a task (or embodiment) name the checkpoint knows.
            prompt: a demonstration ``(observations {key: (T, ...)}, actions (T, ...))`` to condition on.
            goal: a goal observation ``{key: array}`` (one timestep); acting then uses the goal head.
            num_envs: environments acted for together by :meth:`act_batch`.
            embodiment: the embodiment name, when no task is given.

        Returns:
            The embodiment spec observations must follow.
        """
        name = task or embodiment
        if name is None:
            if len(self.checkpoint.specs) != 1:
                raise ValueError(f"reset: name a task or embodiment (known: {sorted(self.checkpoint.specs)})")
            name = next(iter(self.checkpoint.specs))
        if num_envs < 1:
            raise ValueError(f"reset: num_envs: expected at least 1, got {num_envs}")
        spec = self.checkpoint.spec_for(name)
        old = list(self.core.rows)
        rows = [self.core.allocate() for _ in range(num_envs)]
        seed = episode_seed(self.seed, self.episodes)
        seeds = [seed + i * 7_919 for i in range(num_envs)]  # environment 0: the session's seed
        errors = self.core.reset([(row, spec, prompt, goal) for row in rows], seeds, self.temperature)
        # a bad prompt or goal leaves the previous episodes as they were
        for row in rows if any(errors) else old:
            self.core.release(row)
        for error in errors:
            if error is not None:
                raise error
        self.envs = rows
        builder = rows[0].builder
        assert builder is not None
        self.episodes += 1
        self.spec, self.builder = spec, builder
        self.head = "goal" if goal is not None else "policy"
        return spec

    def act(self, observation: Mapping[str, Any]) -> np.ndarray:
        """The action for one environment's observation ``{key: array}`` (shape ``action.shape``)."""
        if self.builder is None:
            raise RuntimeError("act: call reset() first")
        if len(self.envs) != 1:
            raise ValueError(f"act: {len(self.envs)} environments were reset; use act_batch")
        return self.act_batch([observation])[0]

    @torch.no_grad()
    def act_batch(self, observations: Sequence[Mapping[str, Any]]) -> list[np.ndarray]:
        """Actions for every environment, in one forward pass per action token."""
        if self.builder is None:
            raise RuntimeError("act: call reset() first")
        if len(observations) != len(self.envs):
            raise ValueError(
                f"act_batch: expected {len(self.envs)} observations (one per env), got {len(observations)}"
            )
        # atomic: an observation refused (spec, context) leaves every environment unchanged
        results = self.core.act(list(zip(self.envs, observations, strict=True)), atomic=True)
        errors = [r for r in results if isinstance(r, Exception)]
        if errors:
            raise next((e for e in errors if not str(e).startswith("not acted")), errors[0])
        per_row = [self.core.last_logits[row.index] for row in self.envs]
        self.last_logits = [torch.cat(tokens) for tokens in zip(*per_row, strict=True)]
        return [np.asarray(r) for r in results]

    @torch.no_grad()
    def rollout(
        self, observation: Mapping[str, Any], actions: np.ndarray, decode: str = "median"
    ) -> list[dict[str, np.ndarray]]:
        """Open-loop dynamics: predicted observations after each of ``actions`` (k, *action.shape),
        starting from the current history and ``observation``; the policy's own state is untouched.

        With ``Config.dynamics_inputs="executed"`` the head reads ``actions`` as inputs (as it
        was trained to: the actions executed), else as the policy's masked inputs.
        With ``Config.dynamics_target="delta"`` the head predicts each proprio value's change: the
        prediction is the previous value plus the decoded change (kept in float; its bin is fed
        back). ``decode``: a continuous value is the median bin of the head's distribution over the 1024
        bins (``median``, the default: robust to the long tails of an uncertain head, where the
        most likely bin can sit far out), its mean in mu-law space (``mean``) or its most likely
        bin (``argmax``); that bin is fed back. Discrete values are always the most likely one.

        Proprioceptive and discrete keys are predicted by the dynamics head; text and images are
        carried over from ``observation`` (the model does not generate pixels). With pooled
        timesteps every value of the next observation is read at once from the last action
        token's readout (as trained); the Perceiver folds its observations and predicts none.
        With ``Config.history_steps`` the context keeps the newest that many timesteps at every
        step (prompt and goal stay), as in training and in :meth:`act`.

        Returns:
            k dicts ``{key: array}`` of the predicted proprio/discrete observations.
        """
        if self.builder is None or not self.envs or self.spec is None:
            raise RuntimeError("rollout: call reset() first")
        if self.model.config.backbone == "perceiver":
            raise NotImplementedError(
                "rollout: the Perceiver folds observations and its dynamics head predicts none; "
                "use a decoder or pooled checkpoint"
            )
        if len(self.envs) != 1:
            raise ValueError("rollout: reset with num_envs=1")
        builder, spec = self.builder, self.spec
        actions = np.asarray(actions)
        problems = spec.action.violations(actions, (len(actions),))
        if problems:
            raise SpecMismatchError(spec.name, problems, what="rollout actions")
        template = builder.build_step(observation)
        per_step = self.core.embed(template).shape[1] + builder.action_size  # backbone inputs
        row, history = self.envs[0], self.model.config.history_for(spec.action.kind)
        assert row.prefix is not None
        if history:  # each step re-encodes the prefix and the newest history_steps timesteps
            if row.prefix.shape[1] + history * per_step > self.model.config.context_length:
                raise ValueError(f"rollout: {history} timesteps of {per_step} inputs do not fit the context")
        elif (
            per_step * len(actions)  # pooled: the last prediction is not fed back
            if self.model.config.backbone == "pooled"
            else per_step * (len(actions) + 1) + 1
        ) > self.model.config.context_length - row.length:
            raise ValueError(f"rollout: {len(actions)} steps do not fit in the remaining context; use fewer")
        saved = self.core.save(row)
        self.core.flush(row)  # the last action token, held back by act(), joins the history
        layout = builder.layout
        generated = (template.types == TokenType.CONTINUOUS) | (template.types == TokenType.DISCRETE)
        ranges = {
            int(TokenType.CONTINUOUS): layout.ranges()["continuous"],
            int(TokenType.DISCRETE): layout.ranges()["discrete"],
        }
        delta = self.model.config.dynamics_target == "delta"
        continuous_at = np.flatnonzero(template.types == TokenType.CONTINUOUS)
        # the proprio values in token order; with delta targets the head's changes add up on them
        values = np.concatenate(
            [np.asarray(observation[k], np.float64).reshape(-1) for k in builder.tensor_keys
             if spec.observations[k].kind == "proprio"] or [np.zeros(0)]
        )  # fmt: skip
        done = list(row.steps)  # whole timesteps (1, n, D) before the current one
        current = self.core.embed(template, fold=row.fold)  # the current observation and separator
        if self.model.config.backbone == "pooled":
            return self._rollout_readout(template, actions, values, delta, decode, done, current, saved)
        try:
            if not history:
                self._feed(current)
            predictions = []
            for action in actions:
                tokens = self._action_tokens(template, action, done, current)
                logits = self._feed(tokens, head="dynamics")
                ids = template.ids.copy()
                position, last = 0, len(template) - 1  # the last template token is the separator
                while position < last:
                    end = position + 1
                    if generated[position]:
                        low, high = ranges[int(template.types[position])]
                        ids[position] = (
                            self._predicted_bin(logits[0, low:high], int(template.types[position]), decode)
                            + low
                        )
                        if delta and template.types[position] == TokenType.CONTINUOUS:
                            j = int(np.searchsorted(continuous_at, position))
                            values[j] += float(builder.continuous.decode(ids[position : position + 1])[0])
                            ids[position] = int(builder.continuous.encode(values[j : j + 1])[0])
                    else:  # a run of carried-over text or image tokens
                        while end < last and not generated[end]:
                            end += 1
                    logits = self._feed(self.core.embed(_part(template, ids, position, end)), head="dynamics")
                    position = end
                self._feed(self.core.embed(_part(template, ids, last, last + 1)))
                if history:
                    done.append(torch.cat([current, tokens], dim=1))
                    current = self.core.embed(_part(template, ids, 0, last + 1))
                predictions.append(self._decode_observation(ids, template, values if delta else None))
            return predictions
        finally:
            self.core.restore(row, saved)

    def _action_tokens(self, template: TokenSequence, action: np.ndarray, done: list[Tensor], current: Tensor) -> Tensor:  # fmt: skip
        """One planned action's tokens ``(1, A, D)`` as the dynamics head reads them, after
        re-encoding the window when ``history_steps`` is set (as trained and as :meth:`act` keeps
        it: the prompt and goal, the newest timesteps, then ``current``)."""
        assert self.builder is not None
        builder = self.builder
        history = self.model.config.history_for(builder.spec.action.kind)
        if history:
            self.core.refill(self.envs[0], [*(done[len(done) - (history - 2) :] if history > 2 else []), current])  # fmt: skip
        ids = torch.from_numpy(builder.encode_actions(action[None])[0])[None].to(self.core.device)
        first = self.core.action_position(template)
        local = torch.arange(first, first + builder.action_size, device=self.core.device)[None]
        return self.model.embed(
            ids, torch.full_like(ids, int(TokenType.ACTION)), local,
            show_actions=self.model.config.dynamics_inputs == "executed",
        )  # fmt: skip

    def _rollout_readout(
        self,
        template: TokenSequence,
        actions: np.ndarray,
        values: np.ndarray,
        delta: bool,
        decode: str,
        done: list[Tensor],
        current: Tensor,
        saved: Any,
    ) -> list[dict[str, np.ndarray]]:
        """:meth:`rollout` for pooled timesteps: after each action's tokens, every value of the
        next observation from one readout; the predicted observation is folded and fed back."""
        assert self.builder is not None
        builder, row, model = self.builder, self.envs[0], self.model
        history = model.config.history_for(builder.spec.action.kind)
        types = torch.from_numpy(np.asarray(template.types, np.int64))[None]
        local = torch.from_numpy(np.asarray(template.local_positions, np.int64))[None]
        generated = (template.types == TokenType.CONTINUOUS) | (template.types == TokenType.DISCRETE)
        at = np.flatnonzero(generated)
        positions = model.input_positions(types, local)[0, torch.from_numpy(at)].to(self.core.device)
        ranges = builder.layout.ranges()
        continuous_at = np.flatnonzero(template.types == TokenType.CONTINUOUS)
        last = len(template) - 1  # the separator
        try:
            if not history:
                self._feed(current)
            predictions: list[dict[str, np.ndarray]] = []
            for action in actions:
                tokens = self._action_tokens(template, action, done, current)
                hidden = self._feed(tokens, head="hidden")[0]  # (D,)
                logits = model.readout_logits(hidden, positions).float()  # (n, V)
                ids = template.ids.copy()
                for j, position in enumerate(at):
                    kind = int(template.types[position])
                    low, high = ranges["continuous" if kind == int(TokenType.CONTINUOUS) else "discrete"]
                    ids[position] = self._predicted_bin(logits[j, low:high], kind, decode) + low
                    if delta and kind == int(TokenType.CONTINUOUS):
                        k = int(np.searchsorted(continuous_at, position))
                        values[k] += float(builder.continuous.decode(ids[position : position + 1])[0])
                        ids[position] = int(builder.continuous.encode(values[k : k + 1])[0])
                predicted = self.core.embed(_part(template, ids, 0, last + 1), fold=row.fold)
                if history:
                    done.append(torch.cat([current, tokens], dim=1))
                elif len(predictions) + 1 < len(actions):  # the next action follows it
                    self._feed(predicted)
                current = predicted
                predictions.append(self._decode_observation(ids, template, values if delta else None))
            return predictions
        finally:
            self.core.restore(row, saved)

    def predict(
        self, observation: Mapping[str, Any], action: np.ndarray, decode: str = "median"
    ) -> dict[str, np.ndarray]:
        """The next observation's proprio/discrete keys after ``action`` (see :meth:`rollout`)."""
        return self.rollout(observation, np.asarray(action)[None], decode)[0]

    @staticmethod
    def _predicted_bin(logits: Tensor, token_type: int, decode: str) -> int:
        """The bin (offset inside its id range) the dynamics head predicts from ``logits`` (n,)."""
        if decode not in ("median", "mean", "argmax"):
            raise ValueError(f"decode: expected 'median', 'mean' or 'argmax', got {decode!r}")
        if token_type != int(TokenType.CONTINUOUS):
            return int(logits.argmax())
        return int(pick_bin(logits[None], decode)[0])  # the decoding acting uses for action bins

    # -- building blocks -----------------------------------------------------------------------

    def encode_prefix(
        self,
        builder: SequenceBuilder,
        prompt: tuple[Mapping[str, Any], np.ndarray] | None = None,
        goal: Mapping[str, Any] | None = None,
    ) -> Tensor:
        """Backbone inputs ``(1, p, D)`` of a goal and a prompt (:meth:`ActingCore.encode_prefix`)."""
        return self.core.encode_prefix(builder, prompt, goal)

    def embed_tokens(self, tokens: TokenSequence, goal: bool = False) -> Tensor:
        """Backbone inputs ``(1, n, D)`` of a token sequence (``goal``: as the goal segment)."""
        return self.core.embed(tokens, goal)

    # -- internals -----------------------------------------------------------------------------

    def _decode_observation(
        self, ids: np.ndarray, template: TokenSequence, proprio: np.ndarray | None = None
    ) -> dict[str, np.ndarray]:
        """Predicted proprio/discrete keys from the ids of one generated observation; ``proprio``
        (the proprio values in token order, float) replaces the proprio tokens' bin centres."""
        assert self.builder is not None and self.spec is not None
        builder, out = self.builder, {}
        tensors = (template.types == TokenType.CONTINUOUS) | (template.types == TokenType.DISCRETE)
        values = ids[tensors]
        at, at_proprio = 0, 0
        for key in builder.tensor_keys:
            obs = self.spec.observations[key]
            n = obs.tokens
            chunk = values[at : at + n]
            if obs.kind == "proprio":
                decoded = (
                    builder.continuous.decode(chunk)
                    if proprio is None
                    else proprio[at_proprio : at_proprio + n]
                )
                out[key] = np.asarray(decoded, np.float32).reshape(obs.shape)
                at_proprio += n
            else:
                out[key] = obs.from_cells(builder.discrete.decode(chunk).reshape(obs.token_shape))
            at += n
        return out

    def _feed(self, chunk: Tensor, head: str | None = None) -> Tensor:
        """Append ``chunk`` (1, n, D) to environment 0's cache row; its logits ``(1, V)``."""
        row = self.envs[0]
        lo, logits = self.core.feed({row.index: chunk}, head or self.head)
        return logits[row.index - lo : row.index - lo + 1]


def _part(template: TokenSequence, ids: np.ndarray, start: int, end: int) -> TokenSequence:
    """Positions ``[start, end)`` of one timestep's tokens, with ``ids`` in place of its ids."""
    image = template.types == TokenType.IMAGE
    patches = slice(int(image[:start].sum()), int(image[:end].sum()))
    return TokenSequence(
        ids[start:end], template.types[start:end], template.timesteps[start:end],
        template.local_positions[start:end], template.loss_mask[start:end],
        template.patches[patches], template.patch_positions[patches],
    )  # fmt: skip
