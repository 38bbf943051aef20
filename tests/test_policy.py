"""Checkpoints and the runtime agent: save/load round trip, acting in a real simulator from the KV
cache equals recomputing the window, batched acting equals one environment at a time, and
observations are validated."""

import numpy as np
import pytest
import torch

from gato_like.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from gato_like.config import Config
from gato_like.envs.registry import get_task
from gato_like.model import GatoModel
from gato_like.policy import Policy
from gato_like.tokenizers import SpecMismatchError, TextTokenizer, TokenType
from gato_like.training.recipes import ACTING

TASKS = ("dmc-reacher-easy", "babyai-GoToLocal")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    model = GatoModel(Config.from_name("debug", context_length=320))
    return _save(tmp_path_factory.mktemp("ckpt") / "debug", model)


@pytest.fixture(scope="module")
def perceiver_checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    model = GatoModel(Config.from_name("debug", context_length=24, backbone="perceiver"))
    return _save(tmp_path_factory.mktemp("ckpt") / "perceiver", model)


@pytest.fixture(scope="module")
def pooled_checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    model = GatoModel(Config.from_name("debug", context_length=12, backbone="pooled"))
    return _save(tmp_path_factory.mktemp("ckpt") / "pooled", model)


@pytest.fixture(scope="module")
def acting_checkpoint(tmp_path_factory):
    """The CPU recipes' departures (action tokens never inputs, 2 timesteps) on pooled timesteps:
    every action token is decided in one forward pass."""
    torch.manual_seed(0)
    config = Config.from_name("debug", context_length=24, backbone="pooled", **ACTING)
    return _save(tmp_path_factory.mktemp("ckpt") / "acting", GatoModel(config))


@pytest.fixture(scope="module")
def conditioned_checkpoint(tmp_path_factory):
    """The acting checkpoint's settings with the values folded in the light of the timestep's
    text (``pool_condition="text"``: BabyAI's view read against its mission) and embedding their
    group's size (``value_count_embedding``, its table drawn away from its zero start)."""
    torch.manual_seed(0)
    config = Config.from_name(
        "debug",
        context_length=24,
        backbone="pooled",
        pool_condition="text",
        value_count_embedding=True,
        **ACTING,
    )
    model = GatoModel(config)
    assert model.value_count is not None
    torch.nn.init.normal_(model.value_count.weight, std=0.5)
    return _save(tmp_path_factory.mktemp("ckpt") / "conditioned", model)


def _save(path, model):
    specs = {get_task(t).spec.name: get_task(t).spec for t in TASKS}
    tasks = {t: {"embodiment": get_task(t).spec.name} for t in TASKS}
    return save_checkpoint(path, model, TextTokenizer(), specs, tasks, {"step": 0})


def test_round_trip_is_exact_and_pickle_free(checkpoint) -> None:
    loaded = load_checkpoint(checkpoint)
    assert sorted(p.name for p in checkpoint.iterdir()) == ["config.json", "embodiments", "meta.json", "model.safetensors", "tasks.json", "tokenizer"]  # fmt: skip
    torch.manual_seed(0)
    fresh = GatoModel(Config.from_name("debug", context_length=320))
    for (name, a), b in zip(loaded.model.state_dict().items(), fresh.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)
    assert loaded.spec_for("babyai-GoToLocal").name == "babyai" and loaded.meta == {"step": 0}
    assert Config.from_checkpoint(checkpoint) == loaded.model.config
    with pytest.raises(KeyError, match="knows no task or embodiment 'cartpole'"):
        loaded.spec_for("cartpole")


def test_broken_checkpoints_are_named(tmp_path, checkpoint) -> None:
    with pytest.raises(CheckpointError, match=r"no model\.safetensors"):
        load_checkpoint(tmp_path)
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(checkpoint, bad)
    config = Config.from_file(bad / "config.json")
    Config.from_name("debug", n_layer=3, context_length=config.context_length).save(bad / "config.json")
    with pytest.raises(CheckpointError, match="weights do not fit the config"):
        load_checkpoint(bad)
    # the weights of one timestep representation under another's config: the field is named
    Config.from_name("debug", backbone="pooled", context_length=config.context_length).save(
        bad / "config.json"
    )
    with pytest.raises(
        CheckpointError, match=r"config\.json says backbone 'pooled' but the weights have none"
    ):
        load_checkpoint(bad)


def _training_batch(seq, pad_id: int) -> dict:
    """One window collated as the loader collates training batches (a batch of one)."""
    from gato_like.data_pipelines.loader import collate, sequence_sample

    return collate([sequence_sample(seq, 0, 0, "window")], pad_id)


def _reference_action_logits(
    policy: Policy, history: list, observation: dict, action: np.ndarray
) -> torch.Tensor:
    """Logits ``(A, n)`` over the action ids of every action token of the last timestep from one full forward pass
    over the same window (the training path), with the action the policy took."""
    builder = policy.builder
    obs = {k: np.stack([h[0][k] for h in history] + [observation[k]]) for k in observation}
    actions = np.stack([h[1] for h in history] + [action])
    seq = builder.build(obs, actions)
    batch = _training_batch(seq, builder.layout.pad_id)
    with torch.no_grad():
        logits = policy.model(batch, logits=True)["policy_logits"][0]
    # action token j is predicted at the position before it (the separator for j = 0)
    low, high = builder.action_id_range()  # acting computes the action ids' logits only
    return logits[len(seq) - 1 - builder.action_size : len(seq) - 1, low:high]


@pytest.mark.parametrize("backbone", ["decoder", "perceiver", "pooled", "acting", "conditioned"])
@pytest.mark.parametrize("task", TASKS)
def test_acting_in_the_simulator_matches_recomputation(request, task: str, backbone: str) -> None:
    checkpoint = request.getfixturevalue("checkpoint" if backbone == "decoder" else f"{backbone}_checkpoint")
    policy = Policy.from_checkpoint(checkpoint)
    spec = policy.reset(task)
    # BabyAI's expert ends in ~5 steps of ~59 tokens; random moves run all 12 (708 tokens)
    episode = get_task(task).rollout(4, "random" if task.startswith("babyai") else "expert", max_steps=12)
    history = []
    rolled = False
    for t in range(episode.length):
        observation = {k: v[t] for k, v in episode.observations.items()}
        window = list(history)
        # the policy keeps at most half the context after a roll-over; mirror its window
        action = policy.act(observation)
        assert action.shape == spec.action.shape
        kept = len(policy.envs[0].steps) - 1  # timesteps kept before this one
        rolled |= kept < len(window)
        # every action token's logits (not only an argmax) equal the training pass's
        acted = torch.cat(policy.last_logits)  # (A, n)
        reference = _reference_action_logits(
            policy, window[len(window) - kept :] if kept else [], observation, action
        )
        torch.testing.assert_close(acted, reference, rtol=1e-4, atol=1e-4)
        history.append((observation, action))
    # decoder: 12 BabyAI steps of ~59 tokens roll the 320-token context; perceiver: 4 latents + 3 a step,
    # pooled: 1-2 group tokens + 2-3 a step, context 12; acting: a window of 2 timesteps
    assert rolled == (task == "babyai-GoToLocal" or backbone != "decoder")


def test_batched_acting_equals_one_at_a_time(checkpoint) -> None:
    task = get_task("babyai-GoToLocal")
    episodes = [task.rollout(seed, "expert", max_steps=4) for seed in (1, 2, 3)]
    batched = Policy.from_checkpoint(checkpoint)
    batched.reset("babyai-GoToLocal", num_envs=3)
    singles = [Policy.from_checkpoint(checkpoint) for _ in episodes]
    for single in singles:
        single.reset("babyai-GoToLocal")
    for t in range(min(e.length for e in episodes)):
        observations = [{k: v[t] for k, v in e.observations.items()} for e in episodes]
        together = batched.act_batch(observations)
        for single, observation, action in zip(singles, observations, together, strict=True):
            np.testing.assert_array_equal(single.act(observation), action)


def test_observations_are_validated_and_prompt_goal_accepted(checkpoint) -> None:
    policy = Policy.from_checkpoint(checkpoint)
    task = get_task("dmc-reacher-easy")
    episode = task.rollout(0, "expert", max_steps=3)
    spec = policy.reset("dmc-reacher-easy", prompt=(episode.observations, episode.actions))
    observation = {k: v[0] for k, v in episode.observations.items()}
    bad = dict(observation, position=np.array([0.1, np.nan], np.float32))
    with pytest.raises(
        SpecMismatchError,
        match=r"position: non-finite value: expected finite values, got nan at index \(1,\)",
    ):
        policy.act(bad)
    assert policy.act(observation).shape == spec.action.shape  # still usable after the error
    policy.reset("dmc-reacher-easy", goal={k: v[-1] for k, v in episode.observations.items()})
    assert policy.head == "goal" and policy.act(observation).shape == (2,)
    with pytest.raises(RuntimeError, match="call reset"):
        Policy.from_checkpoint(checkpoint).act(observation)


def test_dynamics_rollout_predicts_observations_and_leaves_the_policy_untouched(checkpoint) -> None:
    task = get_task("dmc-reacher-easy")
    episode = task.rollout(1, "expert", max_steps=4)
    observations = [{k: v[t] for k, v in episode.observations.items()} for t in range(4)]
    policy, twin = Policy.from_checkpoint(checkpoint), Policy.from_checkpoint(checkpoint)
    policy.reset("dmc-reacher-easy")
    twin.reset("dmc-reacher-easy")
    for t in range(2):
        np.testing.assert_array_equal(policy.act(observations[t]), twin.act(observations[t]))
    predicted = policy.rollout(observations[2], episode.actions[2:4])
    assert len(predicted) == 2
    for step in predicted:
        assert sorted(step) == ["position", "to_target", "velocity"]
        assert step["position"].shape == (2,) and step["velocity"].shape == (2,)
        assert all(np.isfinite(v).all() for v in step.values())
    np.testing.assert_array_equal(policy.act(observations[2]), twin.act(observations[2]))  # state untouched
    assert sorted(policy.predict(observations[3], episode.actions[3])) == [
        "position",
        "to_target",
        "velocity",
    ]


def test_delta_dynamics_add_the_decoded_changes_to_the_observation(checkpoint, monkeypatch) -> None:
    """With change targets (the default), each predicted proprio value is the previous one plus the
    decoded change, kept in float; with absolute targets it is the predicted bin's centre."""
    episode = get_task("dmc-reacher-easy").rollout(2, "expert", max_steps=3)
    observation = {k: v[0] for k, v in episode.observations.items()}
    monkeypatch.setattr(Policy, "_predicted_bin", staticmethod(lambda logits, kind, decode: 600))
    policy = Policy.from_checkpoint(checkpoint)
    policy.model.config.dynamics_target = "delta"
    policy.reset("dmc-reacher-easy")
    change = float(
        policy.builder.continuous.decode(np.array([policy.builder.layout.continuous_offset + 600]))[0]
    )
    predicted = policy.rollout(observation, episode.actions[:3])
    for k, step in enumerate(predicted, start=1):
        for key in ("position", "to_target", "velocity"):
            np.testing.assert_allclose(
                step[key], observation[key].astype(np.float64) + k * change, rtol=0, atol=1e-6
            )
    policy.model.config.dynamics_target = "absolute"
    for step in policy.rollout(observation, episode.actions[:3]):
        np.testing.assert_allclose(step["velocity"], [change, change], rtol=1e-6)


def _record_dynamics_logits(monkeypatch) -> list[torch.Tensor]:
    """Every logits vector ``rollout`` decodes, in order; each decodes to bin 600."""
    seen: list[torch.Tensor] = []

    def record(logits: torch.Tensor, kind: int, decode: str) -> int:
        seen.append(logits.clone())
        return 600

    monkeypatch.setattr(Policy, "_predicted_bin", staticmethod(record))
    return seen


def test_rollout_reads_its_actions_when_the_dynamics_head_was_trained_on_them(tmp_path, monkeypatch) -> None:
    """A policy that masks every action input still rolls its dynamics head out on the given
    actions with ``dynamics_inputs="executed"``; with ``masked`` the actions cannot matter."""
    episode = get_task("dmc-reacher-easy").rollout(2, "expert", max_steps=3)
    observation = {k: v[0] for k, v in episode.observations.items()}
    seen = _record_dynamics_logits(monkeypatch)
    for inputs in ("executed", "masked"):
        torch.manual_seed(0)
        model = GatoModel(Config.from_name("debug", action_input_dropout=1.0, dynamics_inputs=inputs))
        torch.nn.init.normal_(model.masked_action)  # (trained weights: not the zero vector)
        policy = Policy.from_checkpoint(_save(tmp_path / inputs, model))
        policy.reset("dmc-reacher-easy")
        seen.clear()
        policy.rollout(observation, np.ones((2, 2), np.float32))
        push = torch.stack(seen)
        seen.clear()
        policy.rollout(observation, -np.ones((2, 2), np.float32))
        pull = torch.stack(seen)
        assert torch.equal(push, pull) == (inputs == "masked"), inputs


def test_rollout_keeps_the_newest_history_steps_timesteps(tmp_path, monkeypatch) -> None:
    """With ``history_steps=2`` each open-loop step sees only the timestep before it, as the
    training windows do: step 2 of a rollout equals a fresh rollout from step 1's prediction."""
    episode = get_task("dmc-reacher-easy").rollout(2, "expert", max_steps=3)
    observation = {k: v[0] for k, v in episode.observations.items()}
    seen = _record_dynamics_logits(monkeypatch)
    torch.manual_seed(0)
    model = GatoModel(Config.from_name("debug", history_steps=2))
    policy = Policy.from_checkpoint(_save(tmp_path / "h2", model))
    policy.reset("dmc-reacher-easy")
    policy.act(observation)  # a history before the rollout: outside the window too
    first, _ = policy.rollout(observation, episode.actions[:2])
    per_step = len(seen) // 2
    second_logits = torch.stack(seen[per_step:])
    policy.reset("dmc-reacher-easy")
    seen.clear()
    policy.rollout(first | {"pixels": observation["pixels"]}, episode.actions[1:2])
    torch.testing.assert_close(torch.stack(seen), second_logits, rtol=1e-4, atol=1e-4)


def test_rollout_first_token_matches_a_full_forward(checkpoint) -> None:
    task = get_task("babyai-GoToLocal")
    episode = task.rollout(3, "expert", max_steps=2)
    observation = {k: v[0] for k, v in episode.observations.items()}
    policy = Policy.from_checkpoint(checkpoint)
    policy.reset("babyai-GoToLocal")
    predicted = policy.predict(observation, episode.actions[0])
    builder = policy.builder
    # reference: [o_0, sep, a_0, the carried-over mission of step 1] -> dynamics head at the last position
    step = builder.build({k: np.asarray(v)[None] for k, v in observation.items()}, episode.actions[:1])
    mission = builder.text.encode(str(observation["mission"]))
    ids = np.concatenate([step.ids, mission])
    types = np.concatenate([step.types, np.full(len(mission), int(TokenType.TEXT))])
    local = np.concatenate([step.local_positions, np.arange(len(mission))])
    batch = {"ids": torch.from_numpy(ids)[None], "dynamics_ids": torch.from_numpy(ids)[None], "types": torch.from_numpy(types).long()[None],
             "local_positions": torch.from_numpy(local).long()[None],
             "timesteps": torch.from_numpy(np.r_[step.timesteps, np.ones(len(mission), int)]).long()[None],
             "loss_mask": torch.zeros(1, len(ids), dtype=torch.bool), "attention_mask": torch.ones(1, len(ids), dtype=torch.bool)}  # fmt: skip
    with torch.no_grad():
        logits = policy.model(batch, logits=True)["dynamics_logits"][0, -1]
    layout = builder.layout
    expected = int(
        logits[layout.discrete_offset : layout.separator_id].argmax()
    )  # the heading, a discrete value
    assert int(predicted["direction"]) == expected


def test_rollout_is_refused_for_the_perceiver(perceiver_checkpoint) -> None:
    policy = Policy.from_checkpoint(perceiver_checkpoint)
    policy.reset("dmc-reacher-easy")
    episode = get_task("dmc-reacher-easy").rollout(0, "expert", max_steps=1)
    with pytest.raises(NotImplementedError, match="Perceiver folds observations"):
        policy.rollout({k: v[0] for k, v in episode.observations.items()}, episode.actions)


@pytest.mark.parametrize("fixture", ["pooled_checkpoint", "acting_checkpoint"])
def test_a_pooled_rollout_reads_every_value_from_the_training_readout(request, fixture: str, monkeypatch) -> None:  # fmt: skip
    """Pooled timesteps: each rollout step's logits for every value of the next observation equal
    the training pass's readout (the last action token's hidden state plus the value's position in
    its group) over the same window, whose last observation is the previous prediction; with
    ``history_steps`` the window is the newest timesteps only. The policy's own history is kept."""
    seen = _record_dynamics_logits(monkeypatch)  # every value decodes to bin 600
    task = "dmc-reacher-easy"
    policy = Policy.from_checkpoint(request.getfixturevalue(fixture))
    policy.reset(task)
    episode = get_task(task).rollout(2, "expert", max_steps=4)
    observations = [{k: v[t] for k, v in episode.observations.items()} for t in range(4)]
    before = policy.act(observations[0])
    model, builder = policy.model, policy.builder
    history = model.config.history_steps
    horizon = 2 if history else 1  # a 12-input context holds o_0, a_0, o_1, a_1 and no more
    predicted = policy.rollout(observations[1], episode.actions[1 : 1 + horizon])
    # the windows the rollout saw: [o_0, a_0,] o_1, a_1 | then o_2 = the prediction, a_2
    guessed = predicted[0] | {k: v for k, v in observations[1].items() if k not in predicted[0]}
    steps = [observations[0], observations[1], guessed]
    actions = [before, episode.actions[1], episode.actions[2]]
    template = builder.build_step(observations[1])
    at = np.flatnonzero(np.isin(template.types, [TokenType.CONTINUOUS, TokenType.DISCRETE]))
    values = len(at)
    assert len(seen) == horizon * values
    for k in range(horizon):
        # as trained: a window's readout of the timestep after it (outside it) is never a target,
        # so a value is read after the newest history_steps - 1 timesteps
        first = max(0, k + 2 - (history - 1)) if history else 0
        obs = {key: np.stack([o[key] for o in steps[first : k + 2]]) for key in observations[0]}
        seq = builder.build(obs, np.stack(actions[first : k + 2]))
        batch = _training_batch(seq, builder.layout.pad_id)
        with torch.no_grad():
            hidden = model(batch, logits=True)["hidden"][0, -1]  # the last action token
            positions = model.input_positions(batch["types"], batch["local_positions"])[0, at]
            reference = model.readout_logits(hidden, positions)
        low, high = builder.layout.ranges()["continuous"]
        for j in range(values):
            torch.testing.assert_close(
                seen[k * values + j], reference[j, low:high].float(), rtol=1e-4, atol=1e-4
            )
    fresh = Policy.from_checkpoint(request.getfixturevalue(fixture))
    fresh.reset(task)
    fresh.act(observations[0])
    np.testing.assert_array_equal(policy.act(observations[1]), fresh.act(observations[1]))


def test_evaluate_rolls_out_in_the_simulator_with_a_video(checkpoint, tmp_path) -> None:
    from gato_like.training.evaluate import evaluate

    summary = evaluate(checkpoint, tmp_path, tasks=["dmc-reacher-easy"], episodes=2, max_steps=15)
    result = summary["tasks"]["dmc-reacher-easy"]
    assert len(result["returns"]) == 2 and result["max_steps"] == 15
    assert result["expert_normalized_score"] is None  # this checkpoint carries no normalizers
    assert (tmp_path / "dmc-reacher-easy.gif").stat().st_size > 0 and (tmp_path / "eval.json").is_file()


def test_evaluate_runs_with_the_threads_it_is_given_and_refuses_a_bad_count(checkpoint, tmp_path) -> None:
    """``threads`` sets torch's intra-op threads for the rollouts (evaluations side by side on a
    small machine); a count below 1 is refused before any rollout, naming the field."""
    from gato_like.training.evaluate import evaluate

    before = torch.get_num_threads()
    try:
        summary = evaluate(checkpoint, tmp_path, tasks=["dmc-reacher-easy"], episodes=1, max_steps=5,
                           threads=1, write_card_file=False, media=False)  # fmt: skip
        assert torch.get_num_threads() == 1 and "--threads 1" in summary["command"]
        for bad in (0, -2, True, 1.5):
            with pytest.raises(ValueError, match="threads: expected a count of torch threads >= 1"):
                evaluate(checkpoint, tmp_path / "bad", episodes=1, threads=bad)
        assert not (tmp_path / "bad").exists()
    finally:
        torch.set_num_threads(before)


def test_dynamics_decoding_of_a_continuous_distribution() -> None:
    """median: robust to a far-off mode; mean: the centre of mass; argmax: the mode."""
    continuous = int(TokenType.CONTINUOUS)
    logits = torch.full((1024,), -30.0)
    logits[300:310] = 0.0  # 10 bins, half the mass below 305
    logits[1000] = 2.5  # a single bin more likely than any of the ten, with ~55 % of the mass
    assert Policy._predicted_bin(logits, continuous, "argmax") == 1000
    assert Policy._predicted_bin(logits, continuous, "median") == 1000  # 55 % > 50 %: the median is there
    logits[1000] = 1.0  # now ~21 %: the median stays in the bulk
    assert 300 <= Policy._predicted_bin(logits, continuous, "median") < 310
    assert Policy._predicted_bin(logits, continuous, "argmax") == 1000
    mean = Policy._predicted_bin(logits, continuous, "mean")
    assert 310 < mean < 1000  # pulled between the two
    discrete = int(TokenType.DISCRETE)
    assert Policy._predicted_bin(logits, discrete, "median") == 1000  # discrete values: the most likely
    with pytest.raises(ValueError, match="decode: expected"):
        Policy._predicted_bin(logits, continuous, "mode")
