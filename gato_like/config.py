"""Model configuration: one typed dataclass, named presets (litgpt-style ``Config.from_name``).

Presets ``debug`` (tests, seconds on a CPU), ``tiny`` and ``small`` (train on a CPU in minutes) and
the paper's ``gato-79m``, ``gato-364m``, ``gato-1.18b`` (Reed et al., 2022, table 1). The ``gato-*``
presets assume Gato's text vocabulary, V = 32000 (so 34,051 ids in all); the CPU presets use the
shipped SentencePiece model, V = 1024.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from gato_like.timestep import history_of
from gato_like.tokenizers.vocab import (
    GATO_TEXT_VOCAB_SIZE,
    PATCH_POSITION_RESOLUTION,
    PATCH_SIZE,
    VocabLayout,
)

CONFIG_FILE = "config.json"
BACKBONES = ("decoder", "perceiver", "pooled")
"""The timestep representations (``Config.backbone``)."""


@dataclass
class Config:
    """Everything that shapes the network. Attribute docstrings are the ``--help`` text."""

    name: str = "debug"
    """Preset name."""
    backbone: Literal["decoder", "perceiver", "pooled"] = "decoder"
    """How a timestep reaches the causal transformer. ``decoder``: every token is an input (Gato).
    ``perceiver``: each timestep's observation tokens cross-attended into ``perceiver_latents``
    latents. ``pooled``: each timestep's observation tokens of one group (text, image patches,
    proprio and discrete values) become one token, a sum of a shared MLP over each token's
    embedding (its id, its value and its position inside the group: DeepSets), so a control
    timestep is one input and a new body needs no new parameters (docs/model.md). The separator
    and action tokens stay inputs in the last two; the token ids and layout are Gato's in all
    three."""
    n_layer: int = 2
    """Transformer blocks."""
    n_embd: int = 64
    """Width."""
    n_head: int = 4
    """Attention heads."""
    ff_dim: int = 256
    """Feed-forward hidden size."""
    text_vocab_size: int = 1024
    """V: text ids are [0, V); every other id range follows (gato_like.tokenizers.vocab)."""
    context_length: int = 256
    """Tokens the model attends over (prompt included)."""
    max_local_positions: int = 512
    """Learned local positions: the most tokens one timestep may have."""
    image_encoder: Literal["resnet", "strided", "timm"] = "resnet"
    """Patch encoder: Gato's ResNet v2 block at the patch's full 16x16 resolution (``resnet``);
    the same block after a 4x4 stride-4 stem, at 4x4 (``strided``: about 15x fewer FLOPs per
    patch, for serving many robots with pixels on a CPU; see docs/serving.md); or a timm model
    (needs the ``timm`` extra)."""
    timm_model: str = "resnet18"
    """timm model name when ``image_encoder == "timm"``."""
    patch_size: int = PATCH_SIZE
    patch_channels: int = 3
    patch_position_resolution: int = PATCH_POSITION_RESOLUTION
    """Quantization levels of the within-image row/column position intervals."""
    perceiver_latents: int = 4
    """Latents per timestep for the Perceiver backbone."""
    dropout: float = 0.0
    policy_weight: float = 1.0
    """Loss weight of the policy head (action and text tokens)."""
    dynamics_weight: float = 0.5
    """Loss weight of the dynamics head (next timestep's proprio/discrete observation tokens)."""
    dynamics_on_discrete: bool = True
    """Train the dynamics head on bodies whose actions are discrete choices (BabyAI) too. Off
    (the `cpu` recipe): their windows give the dynamics head no targets, so a 147-value view's
    next frame does not compete with the policy for a narrow trunk (BabyAI alone, 2000 steps:
    policy loss 0.63 against 0.91; docs/results.md); the control bodies keep theirs."""
    dynamics_target: Literal["absolute", "delta"] = "absolute"
    """What the dynamics head predicts for a proprio value: its change since the previous
    timestep, tokenized like any proprio value (``delta``: the prediction is the last value plus
    the decoded change), or the next value's own bin (``absolute``, the default: a plain
    next-token objective; checkpoints without this field were trained with it). ``delta`` is
    opt-in until its effect on the policy is measured: on the closed-loop test's ``debug``
    cartpole run it lowered the policy's score from >= 0.5 to 0.37.
    Mu-law bins are fine near zero and coarse far from it (0.0002 wide at 0, 0.1 at 5), so an
    absolute bin of a velocity near 5 is coarser than a control step's change; see
    docs/heads.md. Discrete observations are predicted as they are either way."""
    dynamics_inputs: Literal["masked", "executed"] = "masked"
    """What the dynamics head reads at the action positions. ``masked``: it shares the policy's
    pass, so with ``action_input_dropout`` it never sees the action whose outcome it predicts
    (checkpoints without this field were trained so). ``executed``: its loss comes from a second
    pass over the first ``dynamics_rows`` share of the batch's rows in which every action token is
    an input holding the action the environment executed (``executed_ids``: a perturbed rollout
    executes a noisy or random action and records the expert's as the label), as a dynamics model
    conditions on the action taken; ``Policy.rollout`` feeds its actions the same way."""
    dynamics_rows: float = 1.0
    """Share of a batch's rows (the first ones; windows come in random order) in the dynamics
    head's own pass with ``dynamics_inputs="executed"``; each row costs another forward and
    backward through the trunk."""
    dynamics_max_targets: int = 0
    """At most this many dynamics targets per batch for pooled timesteps (a uniform random subset,
    so the loss stays an unbiased estimate of the mean over all; 0: every one). Each target is a
    softmax over the whole vocabulary, and a BabyAI timestep has 147 of them: in a batch of 200
    one-timestep BabyAI windows they were ~40 % of the step."""
    dynamics_readout: Literal["adapter", "mlp"] = "adapter"
    """Pooled timesteps: how the dynamics head reads each next value from one hidden state plus
    the value's position embedding. ``adapter`` (checkpoints without this field): the dynamics
    head's small adapter alone; ``mlp``: first a residual MLP of the feed-forward width over that
    sum, so different positions can read different functions of the state."""
    pool_width: int = 0
    """Pooled timesteps: the width of the fold's sum. 0 (checkpoints without this field): the
    per-token MLP maps to ``n_embd`` and the normalized sum is the token. W > 0: the per-token
    MLP maps to W, and the token is ``Linear(W, n_embd)(GELU(LayerNorm(sum)))`` (DeepSets' outer
    function), so a group of many values (a BabyAI view: 147) is summed in W dimensions, as a
    plain MLP's first layer sums them, before it is narrowed to the backbone's width."""
    pool_condition: Literal["none", "text"] = "none"
    """Pooled timesteps: what the values group's fold reads besides each value. ``none``
    (checkpoints without this field): each value alone, through the fold's per-token MLP.
    ``text``: in a timestep that has text (BabyAI's mission), every value also goes through a
    small MLP whose hidden layer a projection of the timestep's folded text shifts (FiLM's
    shift), and those outputs join the values' sum, so the token can hold "the object ahead is
    the one the mission names", a match of words and cells that a sum of per-value terms cannot
    form and the trunk after it learned slowly (BabyAI's own baselines condition the view on the
    instruction with FiLM for this reason). Timesteps without text fold as with ``none``."""
    value_count_embedding: bool = False
    """Pooled timesteps: every value of a timestep's values group also embeds how many values the
    group holds (a shared table of 64 rows, zero at initialization; larger groups share the last
    row). False (checkpoints without this field): a value embeds its id and its index in the
    group only, so value 0 of a point mass (its x) and value 0 of a cartpole (its cart position)
    enter the fold alike and the per-value MLP cannot route them apart; the body then shows only
    in the sum, and a policy trained on both learned the point mass's y and not its x. The count
    tells bodies of different sizes apart inside each value's own term, and a new body needs no
    new parameters (a count never trained embeds as zero)."""
    goal_weight: float = 0.5
    """Loss weight of the goal-conditioned policy head."""
    goal_placement: Literal["prefix", "timestep", "relative"] = "prefix"
    """Where the goal head reads the goal observation. ``prefix``: a segment before the first
    timestep, with its own segment vector (Gato's prompt position; checkpoints without this field
    were trained so). ``timestep`` (pooled timesteps only): the goal's tokens, with the segment
    vector, join every timestep's fold, each group into that timestep's token of the same group,
    so the goal and the current observation meet in one token, as a goal-conditioned MLP reads
    them side by side (the prefix scored 0/20 on the point-mass goals where that MLP scored 20/20:
    docs/results.md). ``relative`` (pooled only): as ``timestep``, and each continuous
    observation value whose goal has a value at the same (group, position) also carries the
    embedding of their difference (goal minus observation, in the bins' [-1, 1] scale) into the
    fold's per-token MLP, so "which way, how far" is one token's feature, as a point-mass target's
    offset is, instead of a relation the backbone must learn between two summed features (``timestep``
    also scored 0/20)."""
    goal_offset_octaves: float = 2.0
    """``relative`` only: the offset embedding's Fourier frequencies run from 1 to 2**this (16 in
    equal ratios). 2 (up to 4): smooth in the offset, so the way to a goal seen at few training
    states carries over to unseen ones; 8 (up to 256, checkpoints without this field) tells
    offsets a bin apart, and scored below it on the point-mass goals (docs/results.md)."""
    value_embedding: Literal["off", "add", "replace"] = "add"
    """Departure from Gato: an ordinal embedding of a continuous token's bin (Fourier features of
    its position in [-1, 1] through a linear layer), so neighbouring bins start out close and
    rarely seen bins are not unknown tokens: ``add`` it to the per-bin row, ``replace`` the row
    by it on the input side (the rows stay the tied output layer), or ``off`` (Gato). Token ids
    are unchanged."""
    value_frequencies: Literal["linear", "geometric"] = "linear"
    """Frequencies of the value embedding's Fourier features: ``linear`` (1..16, the default; older
    checkpoints have it) resolves bins ~32 apart, about 4 cm at 0.1 m; ``geometric`` (1..512 in
    equal ratios) resolves neighbouring bins, so two values a few bins apart (a position and its
    goal) embed apart."""
    target_sigma_bins: float = 8.0
    """Departure from Gato: continuous targets (actions, and proprio for the dynamics head) are a
    Gaussian over neighbouring bins with this standard deviation in bins (HL-Gauss, Imani & White
    2018) instead of one-hot; 0 gives Gato's one-hot cross-entropy."""
    dynamics_sigma_bins: float | None = None
    """HL-Gauss standard deviation (bins) of the dynamics head's continuous targets; None: as
    ``target_sigma_bins``. A control step's change is a few bins from zero after mu-law (point
    mass: ~6), so the actions' 8 bins blur the very signal of a change target."""
    text_weight: float = 0.1
    """Departure from Gato: weight of a text target relative to an action target in the policy
    loss (captions and repeated missions otherwise outnumber the actions); 1 is Gato's plain mean."""
    action_input_dropout: float = 0.0
    """Departure from Gato: in training, each action token's input embedding is replaced by a
    learned mask embedding with this probability (its target stays), so the model cannot predict
    an action by copying the previous one and must read the state (against copycat behaviour).
    1.0 masks every action token in training and when acting alike: actions are then targets
    only, never inputs."""
    history_steps: int = 0
    """Departure from Gato: the most timesteps a training window and the acting history hold
    (the current one included; prompt and goal come on top); 0 fills the context as Gato does.
    A short history leaves less to copy: on point mass, 4 steps scored 1.0 where 16 scored 0.74."""
    discrete_history_steps: int = 0
    """Departure from Gato: ``history_steps`` for bodies whose actions are discrete choices (BabyAI);
    0: ``history_steps``. BabyAI alone scored 0.34 after 5000 steps of one-timestep windows
    against 0.21 with two (docs/results.md); point mass needs two to read its motion."""
    action_decoding: Literal["argmax", "mean", "median"] = "mean"
    """How the policy turns its distribution over a continuous action's bins into a bin: the most
    likely bin (Gato), or the bin of the distribution's mean or median."""
    discrete_decoding: Literal["argmax", "sample"] = "argmax"
    """How the policy picks a discrete action (e.g. BabyAI's moves): the most likely one, or a
    sample from its distribution, as Gato samples its actions. A policy that sees a few partial
    views can lock into a loop under argmax (turn, turn, forward, ...); sampling breaks it. Seeded:
    the same seed and observations give the same actions."""
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        problems = []
        for name in ("n_layer", "n_embd", "n_head", "ff_dim", "text_vocab_size", "context_length", "max_local_positions", "perceiver_latents"):  # fmt: skip
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                problems.append(f"{name}: expected a positive integer, got {value!r}")
        if not problems and self.n_embd % self.n_head:
            problems.append(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        if self.backbone not in BACKBONES:
            problems.append(
                f"backbone: expected one of {', '.join(map(repr, BACKBONES))}, got {self.backbone!r}"
            )
        if self.value_frequencies not in ("linear", "geometric"):
            problems.append(
                f"value_frequencies: expected 'linear' or 'geometric', got {self.value_frequencies!r}"
            )
        if self.dynamics_inputs not in ("masked", "executed"):
            problems.append(f"dynamics_inputs: expected 'masked' or 'executed', got {self.dynamics_inputs!r}")
        if self.goal_placement not in ("prefix", "timestep", "relative"):
            problems.append(
                f"goal_placement: expected 'prefix', 'timestep' or 'relative', got {self.goal_placement!r}"
            )
        elif self.goal_placement != "prefix" and self.backbone != "pooled":
            problems.append(
                f"goal_placement {self.goal_placement!r} folds the goal into pooled timesteps: it needs "
                f"backbone 'pooled', got {self.backbone!r}"
            )
        if self.dynamics_readout not in ("adapter", "mlp"):
            problems.append(f"dynamics_readout: expected 'adapter' or 'mlp', got {self.dynamics_readout!r}")
        if not 0.0 <= self.goal_offset_octaves <= 10.0:
            problems.append(
                f"goal_offset_octaves: expected 0 to 10 (frequencies up to 2**octaves), got {self.goal_offset_octaves}"
            )
        if self.pool_width < 0:
            problems.append(
                f"pool_width: expected 0 (the fold sums in n_embd) or a width > 0, got {self.pool_width}"
            )
        elif self.pool_width and self.backbone != "pooled":
            problems.append(
                f"pool_width widens the pooled fold: it needs backbone 'pooled', got {self.backbone!r}"
            )
        if self.pool_condition not in ("none", "text"):
            problems.append(f"pool_condition: expected 'none' or 'text', got {self.pool_condition!r}")
        elif self.pool_condition != "none" and self.backbone != "pooled":
            problems.append(
                f"pool_condition conditions the pooled fold: it needs backbone 'pooled', got {self.backbone!r}"
            )
        if self.value_count_embedding and self.backbone != "pooled":
            problems.append(
                f"value_count_embedding joins the pooled fold: it needs backbone 'pooled', got {self.backbone!r}"
            )
        if self.dynamics_max_targets < 0:
            problems.append(
                f"dynamics_max_targets: expected >= 0 (0: every target), got {self.dynamics_max_targets}"
            )
        if not (0.0 < self.dynamics_rows <= 1.0):
            problems.append(f"dynamics_rows: expected a share in (0, 1], got {self.dynamics_rows!r}")
        if self.dynamics_target not in ("absolute", "delta"):
            problems.append(f"dynamics_target: expected 'absolute' or 'delta', got {self.dynamics_target!r}")
        if self.image_encoder not in ("resnet", "strided", "timm"):
            problems.append(
                f"image_encoder: expected 'resnet', 'strided' or 'timm', got {self.image_encoder!r}"
            )
        if self.dynamics_sigma_bins is not None and not (self.dynamics_sigma_bins >= 0.0):
            problems.append(f"dynamics_sigma_bins: expected >= 0 or None, got {self.dynamics_sigma_bins}")
        if not (self.target_sigma_bins >= 0.0):
            problems.append(f"target_sigma_bins: expected >= 0, got {self.target_sigma_bins}")
        if self.value_embedding is True or self.value_embedding is False:  # older configs: a flag
            self.value_embedding = "add" if self.value_embedding else "off"
        if self.value_embedding not in ("off", "add", "replace"):
            problems.append(
                f"value_embedding: expected 'off', 'add' or 'replace', got {self.value_embedding!r}"
            )
        if not 0.0 <= self.action_input_dropout <= 1.0:
            problems.append(f"action_input_dropout: expected [0, 1], got {self.action_input_dropout}")
        for name in ("history_steps", "discrete_history_steps"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                problems.append(f"{name}: expected an integer >= 0 (0: no limit), got {value!r}")
        if not (self.text_weight >= 0.0):
            problems.append(f"text_weight: expected >= 0, got {self.text_weight}")
        if self.action_decoding not in ("argmax", "mean", "median"):
            problems.append(
                f"action_decoding: expected 'argmax', 'mean' or 'median', got {self.action_decoding!r}"
            )
        if self.discrete_decoding not in ("argmax", "sample"):
            problems.append(
                f"discrete_decoding: expected 'argmax' or 'sample', got {self.discrete_decoding!r}"
            )
        if not 0.0 <= self.dropout < 1.0:
            problems.append(f"dropout: expected [0, 1), got {self.dropout}")
        if problems:
            raise ValueError(f"invalid config {self.name!r}: " + "; ".join(problems))

    def history_for(self, action_kind: str) -> int:
        """The most timesteps a window and the acting history hold for a body whose action is of
        ``action_kind`` (``continuous`` or ``discrete``); 0: as many as fit the context."""
        return history_of(self.history_steps, self.discrete_history_steps, action_kind)

    @property
    def layout(self) -> VocabLayout:
        return VocabLayout(self.text_vocab_size)

    @property
    def vocab_size(self) -> int:
        """Rows of the token embedding (and of the tied output layer)."""
        return self.layout.size

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @classmethod
    def from_name(cls, name: str, **overrides: Any) -> Config:
        """A preset, with fields overridden; a mistyped name suggests the closest preset."""
        if name not in PRESETS:
            close = difflib.get_close_matches(name, PRESETS, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise KeyError(f"unknown preset {name!r}{hint} (presets: {', '.join(PRESETS)})")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            hints = [f"{u!r} (did you mean {c[0]!r}?)" if (c := difflib.get_close_matches(u, known, n=1)) else repr(u) for u in unknown]  # fmt: skip
            raise ValueError(f"unknown model field(s) {', '.join(hints)}; fields: {', '.join(sorted(known))}")
        return dataclasses.replace(PRESETS[name], **overrides)

    @classmethod
    def from_file(cls, path: str | Path) -> Config:
        data = json.loads(Path(path).read_text())
        data.setdefault("dynamics_target", "absolute")  # written before the field existed
        data.setdefault("dynamics_inputs", "masked")  # likewise
        data.setdefault("value_frequencies", "linear")
        data.setdefault("goal_offset_octaves", 8.0)  # the offset embedding's frequencies before the field
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"{path}: unknown config field(s) {unknown}")
        return cls(**data)

    @classmethod
    def from_checkpoint(cls, directory: str | Path) -> Config:
        return cls.from_file(Path(directory) / CONFIG_FILE)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")


_GATO: dict[str, Any] = {"text_vocab_size": GATO_TEXT_VOCAB_SIZE, "context_length": 1024}
PRESETS: dict[str, Config] = {
    c.name: c
    for c in [
        Config("debug", n_layer=2, n_embd=64, n_head=4, ff_dim=256, context_length=256),
        Config("tiny", n_layer=4, n_embd=128, n_head=4, ff_dim=512, context_length=512),
        Config("small", n_layer=6, n_embd=384, n_head=6, ff_dim=1536, context_length=1024),
        Config("gato-79m", n_layer=8, n_embd=768, n_head=24, ff_dim=3072, **_GATO),
        Config("gato-364m", n_layer=12, n_embd=1536, n_head=12, ff_dim=6144, **_GATO),
        Config("gato-1.18b", n_layer=24, n_embd=2048, n_head=16, ff_dim=8192, **_GATO),
    ]
}
