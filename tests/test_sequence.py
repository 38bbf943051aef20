"""The sequence builder: exact layout on a hand-made episode, property tests over random specs and
episodes against a timestep-by-timestep reference, and real simulator episodes."""

import pickle

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gato_like.tokenizers import (
    ContinuousTokenizer,
    DiscreteTokenizer,
    EmbodimentSpec,
    ImageTokenizer,
    SequenceBuilder,
    SpecMismatchError,
    TextTokenizer,
    TokenSequence,
    TokenType,
)

TEXT = TextTokenizer()
V = TEXT.vocab_size  # 1024: continuous [1024, 2048), discrete [2048, 3072), separator 3072


def test_exact_tokens_of_a_hand_made_episode() -> None:
    spec = EmbodimentSpec.from_dict(
        {
            "name": "toy",
            "control_hz": 10,
            "observations": {
                "b_state": {"kind": "proprio", "shape": [2]},
                "a_button": {"kind": "discrete", "shape": [], "num_values": 4},
                "cam": {"kind": "image", "shape": [16, 32, 1]},
                "say": {"kind": "text"},
            },
            "action": {"kind": "continuous", "shape": [2], "low": [-2, 0], "high": [2, 10]},
        }
    )
    builder = SequenceBuilder(spec, TEXT)
    say = TEXT.encode("go to the red ball").tolist()
    obs = {
        "b_state": np.array([[0.0, 256.0], [1.0, -1.0]], np.float32),
        "a_button": np.array([3, 0]),
        "cam": np.zeros((2, 16, 32, 1), np.uint8),
        "say": np.array(["go to the red ball", "go to the red ball"]),
    }
    actions = np.array([[0.0, 10.0], [-2.0, 7.5]], np.float32)
    seq = builder.build(obs, actions)
    # text | 2 image patches | a_button | b_state (mu-law bins 512, 1023 / 744, 279) | sep | actions
    # actions scale to [-1, 1]: 0 -> 0 (bin 512), 10 -> 1 (1023); -2 -> -1 (0), 7.5 -> 0.5 (768)
    step0 = [*say, 3074, 3074, 2048 + 3, 1024 + 512, 1024 + 1023, 3072, 1024 + 512, 1024 + 1023]
    step1 = [*say, 3074, 3074, 2048 + 0, 1024 + 744, 1024 + 279, 3072, 1024 + 0, 1024 + 768]
    assert seq.ids.tolist() == step0 + step1
    n = len(say)
    T = TokenType
    types0 = (
        [T.TEXT] * n
        + [T.IMAGE] * 2
        + [T.DISCRETE, T.CONTINUOUS, T.CONTINUOUS, T.SEPARATOR, T.ACTION, T.ACTION]
    )
    assert seq.types.tolist() == types0 * 2
    assert seq.timesteps.tolist() == [0] * len(step0) + [1] * len(step1)
    assert seq.local_positions.tolist() == list(range(len(step0))) * 2
    assert seq.loss_mask.tolist() == [t in (T.TEXT, T.ACTION) for t in types0] * 2
    assert seq.patches.shape == (4, 3, 16, 16)  # gray repeated to 3 channels
    assert np.allclose(seq.patches, -0.25)
    assert seq.patch_positions.tolist() == [[0, 0, 1, 2], [0, 1, 1, 2]] * 2
    np.testing.assert_allclose(
        builder.decode_actions(seq.ids[seq.types == T.ACTION].reshape(2, 2)),
        [[2 / 1024, 10 - 10 / 2048], [-2 + 2 / 1024, 7.5 + 10 / 2048]],
        rtol=1e-6,
    )
    # acting: the last timestep ends at its separator
    pending = builder.build(obs, actions[:1])
    assert pending.ids.tolist() == step0 + step1[:-2]
    single = builder.build_step({k: v[1] for k, v in obs.items()})
    assert single.ids.tolist() == step1[:-2]
    assert seq.dynamics_ids is None  # only built when the previous timestep is given
    # the dynamics head's change targets: b_state minus the step before (step 0: itself); the
    # change (1, -257) is bin 744 and (clipped) bin 0; every other token is its own id
    previous = {"b_state": np.array([[0.0, 256.0], [0.0, 256.0]], np.float32), "a_button": np.array([3, 3])}
    seq = builder.build(obs, actions, previous=previous)
    assert seq.ids.tolist() == step0 + step1
    delta0 = [*say, 3074, 3074, 2048 + 3, 1024 + 512, 1024 + 512, 3072, 1024 + 512, 1024 + 1023]
    delta1 = [*say, 3074, 3074, 2048 + 0, 1024 + 744, 1024 + 0, 3072, 1024 + 0, 1024 + 768]
    assert seq.dynamics_ids is not None and seq.dynamics_ids.tolist() == delta0 + delta1
    second = seq.window(1, 2)
    assert second.dynamics_ids is not None and second.dynamics_ids.tolist() == delta1
    joined = TokenSequence.concatenate([builder.build(obs, actions), second])  # a prompt without targets
    assert joined.dynamics_ids is not None and joined.dynamics_ids.tolist() == step0 + step1 + delta1
    # the dynamics head's inputs: the executed actions at the action positions, every other id as is
    assert seq.executed_ids is None
    executed = np.array([[-2.0, 10.0], [0.0, 7.5]], np.float32)  # another action than each label
    run = builder.build(obs, actions, executed=executed)
    exec0 = [*step0[:-2], 1024 + 0, 1024 + 1023]
    exec1 = [*step1[:-2], 1024 + 512, 1024 + 768]
    assert run.ids.tolist() == step0 + step1 and run.executed_ids is not None
    assert run.executed_ids.tolist() == exec0 + exec1
    assert run.window(1, 2).executed_ids.tolist() == exec1  # type: ignore[union-attr]
    joined = TokenSequence.concatenate([builder.build(obs, actions), run.window(1, 2)])
    assert joined.executed_ids is not None and joined.executed_ids.tolist() == step0 + step1 + exec1
    with pytest.raises(ValueError, match="expected 2 executed actions, got 1"):
        builder.build(obs, actions, executed=executed[:1])


@st.composite
def spec_and_episode(draw):
    observations: dict = {}
    for i in range(draw(st.integers(0, 2))):
        shape = draw(st.lists(st.integers(1, 3), min_size=0, max_size=2))
        entry = {"kind": "proprio", "shape": shape}
        if draw(st.booleans()):
            entry.update(low=-1000.0, high=1000.0)
        observations[f"p{i}"] = entry
    if draw(st.booleans()):
        observations["img"] = {
            "kind": "image",
            "shape": [draw(st.integers(1, 40)), draw(st.integers(1, 40)), draw(st.sampled_from([1, 3]))],
        }
    if draw(st.booleans()):
        observations["words"] = {"kind": "text"}
    if draw(st.booleans()) or not observations:
        observations["d"] = {
            "kind": "discrete",
            "shape": draw(st.lists(st.integers(1, 3), max_size=2)),
            "num_values": draw(st.integers(1, 1024)),
        }
        if observations["d"]["shape"] and draw(st.booleans()):  # one token per cell of the last axis
            entries = observations["d"]["shape"][-1]
            radix = st.integers(1, min(10, observations["d"]["num_values"]))
            observations["d"]["cell_values"] = draw(st.lists(radix, min_size=entries, max_size=entries))
    action_shape = draw(st.lists(st.integers(1, 3), min_size=1, max_size=2))
    if draw(st.booleans()):
        low = draw(st.floats(-100, 99, allow_nan=False))
        high = low + draw(st.floats(0.01, 100))
        action = {"kind": "continuous", "shape": action_shape, "low": low, "high": high}
    else:
        action = {"kind": "discrete", "shape": action_shape, "num_choices": draw(st.integers(1, 1024))}
    spec = EmbodimentSpec.from_dict(
        {"name": "random", "control_hz": 5, "observations": observations, "action": action}
    )
    steps = draw(st.integers(1, 4))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    obs: dict = {}
    for key, o in spec.observations.items():
        if o.kind == "proprio":
            obs[key] = (rng.standard_cauchy((steps, *o.shape)) * 10).clip(-999, 999).astype(np.float32)
        elif o.kind == "image":
            obs[key] = rng.integers(0, 256, (steps, *o.shape), dtype=np.uint8)
        elif o.kind == "text":
            obs[key] = np.array(
                draw(st.lists(st.text(max_size=12), min_size=steps, max_size=steps)), dtype=object
            )
        elif o.cell_values:
            obs[key] = rng.integers(0, o.cell_values, (steps, *o.shape))
        else:
            obs[key] = rng.integers(0, o.num_values, (steps, *o.shape))
    a = spec.action
    if a.kind == "continuous":
        actions = rng.uniform(a.low, a.high, (steps, *a.shape)).astype(np.float32)
        actions.reshape(-1)[0] = a.high.reshape(-1)[0]  # a bound itself must tokenize too
    else:
        actions = rng.integers(0, a.num_choices, (steps, *a.shape))
    return spec, obs, actions


def reference_ids(spec: EmbodimentSpec, obs: dict, actions: np.ndarray) -> list[int]:
    """Timestep by timestep, straight from the design's order, with the single-value tokenizers."""
    cont, disc = ContinuousTokenizer(V), DiscreteTokenizer(V + 1024)
    unit = ContinuousTokenizer(V, mu_law=False)
    image = ImageTokenizer()
    out: list[int] = []
    keys = sorted(spec.observations)
    for t in range(len(actions)):
        for key in (k for k in keys if spec.observations[k].kind == "text"):
            out += TEXT.encode(str(obs[key][t])).tolist()
        for key in (k for k in keys if spec.observations[k].kind == "image"):
            out += [V + 2050] * len(image.encode(obs[key][t])[0])
        for key in (k for k in keys if spec.observations[k].kind in ("proprio", "discrete")):
            o = spec.observations[key]
            if o.cell_values:  # one token per cell: its entries as digits, the last least significant
                for cell in np.asarray(obs[key][t]).reshape(-1, len(o.cell_values)).tolist():
                    number = 0
                    for entry, radix in zip(cell, o.cell_values, strict=True):
                        number = number * radix + entry
                    out.append(V + 1024 + number)
                continue
            tok = cont if o.kind == "proprio" else disc
            out += tok.encode(obs[key][t]).tolist()
        out.append(V + 2048)
        a = spec.action
        if a.kind == "continuous":
            scaled = (actions[t].astype(np.float64) - a.low) / (a.high - a.low) * 2 - 1
            out += unit.encode(np.clip(scaled, -1, 1)).tolist()
        else:
            out += disc.encode(actions[t]).tolist()
    return out


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(spec_and_episode())
def test_builder_matches_reference_and_invariants(case) -> None:
    spec, obs, actions = case
    builder = SequenceBuilder(spec, TEXT)
    seq = builder.build(obs, actions)
    steps = len(actions)
    assert seq.ids.tolist() == reference_ids(spec, obs, actions)
    assert seq.num_timesteps == steps
    # every field has one entry per position; types agree with the id ranges
    for field in (seq.types, seq.timesteps, seq.local_positions, seq.loss_mask):
        assert field.shape == seq.ids.shape
    ranges = {
        TokenType.TEXT: (0, V),
        TokenType.CONTINUOUS: (V, V + 1024),
        TokenType.DISCRETE: (V + 1024, V + 2048),
        TokenType.SEPARATOR: (V + 2048, V + 2049),
        TokenType.IMAGE: (V + 2050, V + 2051),
        TokenType.ACTION: (V, V + 1024) if spec.action.kind == "continuous" else (V + 1024, V + 2048),
    }
    for kind, (lo, hi) in ranges.items():
        ids = seq.ids[seq.types == kind]
        assert ((ids >= lo) & (ids < hi)).all(), kind
    assert (seq.loss_mask == np.isin(seq.types, [TokenType.TEXT, TokenType.ACTION])).all()
    assert (np.diff(seq.timesteps) >= 0).all()
    bounds = seq.timestep_bounds()
    for t in range(steps):
        local = seq.local_positions[bounds[t] : bounds[t + 1]]
        assert local.tolist() == list(range(len(local)))
        types = seq.types[bounds[t] : bounds[t + 1]].tolist()
        sep = types.index(TokenType.SEPARATOR)
        assert types[sep + 1 :] == [TokenType.ACTION] * spec.action.size
        rank = {TokenType.TEXT: 0, TokenType.IMAGE: 1, TokenType.CONTINUOUS: 2, TokenType.DISCRETE: 2}
        ranks = [rank[TokenType(t)] for t in types[:sep]]
        assert ranks == sorted(ranks)  # text, then image patches, then tensors
    # patches: one per image position, equal to the image tokenizer's, gray repeated to RGB
    assert len(seq.patches) == int((seq.types == TokenType.IMAGE).sum()) == len(seq.patch_positions)
    if "img" in obs:
        per_step = np.concatenate([ImageTokenizer().encode(frame)[0] for frame in obs["img"]])
        np.testing.assert_array_equal(seq.patches, np.repeat(per_step, 3 // per_step.shape[1], axis=1))
    # actions come back within one bin
    decoded = builder.decode_actions(seq.ids[seq.types == TokenType.ACTION].reshape(steps, -1))
    assert decoded.shape == actions.shape
    if spec.action.kind == "continuous":
        width = (spec.action.high - spec.action.low) / 1024
        assert (np.abs(decoded - actions) <= width * (0.5 + 1e-3) + 1e-5).all()
    else:
        assert (decoded == actions).all()
    # a window of whole timesteps is the sequence of the sub-episode
    start = steps // 2
    window = seq.window(start, steps)
    sub = builder.build({k: v[start:] for k, v in obs.items()}, actions[start:])
    # ... and a window the loader builds without checking its (already checked) episode again is the same
    unchecked = builder.build({k: v[start:] for k, v in obs.items()}, actions[start:], checked=True)
    for name in ("ids", "types", "timesteps", "local_positions", "loss_mask", "patches", "patch_positions"):
        np.testing.assert_array_equal(getattr(window, name), getattr(sub, name))
        np.testing.assert_array_equal(getattr(unchecked, name), getattr(sub, name))


def test_builder_is_picklable() -> None:
    from gato_like.envs.babyai import BABYAI_SPEC

    builder = SequenceBuilder(EmbodimentSpec.from_dict(BABYAI_SPEC), TEXT)
    clone = pickle.loads(pickle.dumps(builder))
    obs = {
        "mission": np.array(["go to the red ball"]),
        "image": np.zeros((1, 7, 7, 3), np.uint8),
        "direction": np.array([2]),
    }
    assert clone.build(obs, np.array([[1]])).ids.tolist() == builder.build(obs, np.array([[1]])).ids.tolist()


def test_build_reports_spec_mismatch_with_key() -> None:
    from gato_like.envs.babyai import BABYAI_SPEC

    builder = SequenceBuilder(EmbodimentSpec.from_dict(BABYAI_SPEC), TEXT)
    obs = {"mission": np.array(["go"]), "image": np.zeros((1, 7, 7), np.uint8), "direction": np.array([7])}
    with pytest.raises(SpecMismatchError) as error:
        builder.build(obs, np.array([[9]]))
    text = str(error.value)
    assert "obs.image: wrong shape: expected (1, 7, 7, 3), got (1, 7, 7)" in text
    assert "obs.direction: out of range: expected integers in [0, 4), got 7" in text
    assert "actions: out of range: expected integers in [0, 7), got 9" in text
    with pytest.raises(ValueError, match=r"expected ids of shape \(\.\.\., 1\)"):
        builder.decode_actions(np.array([2048, 2049]))


def test_real_simulator_episodes_tokenize() -> None:
    from gato_like.envs.registry import get_task

    task = get_task("dmc-cartpole-swingup")
    episode = task.rollout(1, "random", max_steps=5)
    spec, obs, actions = task.spec, episode.observations, episode.actions
    assert obs["pixels"].shape == (5, 64, 64, 3) and obs["pixels"].std() > 0  # really rendered
    seq = SequenceBuilder(spec, TEXT).build(obs, actions)
    assert len(seq) == 5 * (16 + 3 + 2 + 1 + 1)
    assert seq.ids.tolist() == reference_ids(spec, obs, actions)
    task = get_task("babyai-GoToLocal")
    episode = task.rollout(3, "expert", max_steps=12)
    spec, obs, actions = task.spec, episode.observations, episode.actions
    seq = SequenceBuilder(spec, TEXT).build(obs, actions)
    assert seq.ids.tolist() == reference_ids(spec, obs, actions)
    assert TEXT.decode(seq.ids[(seq.timesteps == 0) & (seq.types == TokenType.TEXT)]) == obs["mission"][0]


def test_build_step_text_and_window_arguments() -> None:
    from gato_like.envs.babyai import BABYAI_SPEC

    builder = SequenceBuilder(EmbodimentSpec.from_dict(BABYAI_SPEC), TEXT)
    step = {"mission": np.array("go to the red ball"), "image": np.zeros((7, 7, 3), np.uint8), "direction": 1}
    seq = builder.build_step(step)
    assert TEXT.decode(seq.ids[seq.types == TokenType.TEXT]) == "go to the red ball"
    assert seq.ids[-1] == V + 2048  # ends at the separator, awaiting the action
    obs = {k: np.stack([np.asarray(v)] * 3) for k, v in step.items()}
    full = builder.build(obs, np.array([[0], [1], [2]]))
    window = full.window(np.int64(1), 3)
    assert window.timesteps.dtype == np.int32 and window.num_timesteps == 2
    with pytest.raises(TypeError):
        full.window(1.0, 2)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"expected 0 <= start < stop <= 3, got \[2, 2\)"):
        full.window(2, 2)


def test_cells_are_one_token_each_and_decode_back() -> None:
    """A BabyAI view with ``cell_values`` (object, colour, state): 49 tokens, not 147, each the
    cell's mixed-radix number; the spec turns them back into the view exactly."""
    from gato_like.envs.babyai import BABYAI_SPEC

    observations = dict(BABYAI_SPEC["observations"])
    observations["image"] = {**observations["image"], "cell_values": [11, 6, 3]}
    spec = EmbodimentSpec.from_dict({**BABYAI_SPEC, "observations": observations})
    view = np.zeros((2, 7, 7, 3), np.uint8)
    view[0, 3, 6] = (5, 4, 0)  # a key (5), purple (4): 5 * 18 + 4 * 3 + 0 = 102
    view[1, 0, 0] = (4, 2, 2)  # a locked (2) blue (2) door (4): 72 + 6 + 2 = 80
    view[1, 6, 6] = (10, 0, 0)  # the agent: 180
    obs = {"mission": np.array(["pick up the key"] * 2), "image": view, "direction": np.array([0, 3])}
    builder = SequenceBuilder(spec, TEXT)
    seq = builder.build(obs, np.array([[3], [1]]))
    image = spec.observations["image"]
    assert image.tokens == 49 and builder.group_sizes()["values"] == 50
    values = seq.ids[seq.types == TokenType.DISCRETE].reshape(2, 50) - (V + 1024)
    assert values[:, 0].tolist() == [0, 3]  # keys in sorted order: direction, then the view
    cells = values[:, 1:]
    assert cells[0, 3 * 7 + 6] == 102 and cells[1, 0] == 80 and cells[1, 48] == 180
    assert (np.delete(cells[0], 3 * 7 + 6) == 0).all()
    assert seq.ids.tolist() == reference_ids(spec, obs, np.array([[3], [1]]))
    np.testing.assert_array_equal(image.from_cells(cells.reshape(2, 7, 7)), view)
    np.testing.assert_array_equal(image.to_cells(view), cells.reshape(2, 7, 7))
    # a value beyond the symbols (198 and up) stays out of range instead of wrapping into a cell
    assert image.from_cells(np.array([197, 198, 1000])).tolist() == [[10, 5, 2], [11, 0, 0], [55, 3, 1]]
    # an entry beyond its own radix (a colour of 6) is refused before tokenizing
    view[0, 1, 1] = (1, 6, 0)
    with pytest.raises(
        SpecMismatchError,
        match=r"obs\.image: out of range: expected a cell's entry k in \[0, cell_values\[k\]\) = \[11, 6, 3\], got 6 at index \(0, 1, 1, 1\)",
    ):
        builder.build(obs, np.array([[3], [1]]))
