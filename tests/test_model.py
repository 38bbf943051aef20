"""The network: presets and parameter counts, forward/backward on real batches, heads, and the KV
cache against full recomputation (including a context-window roll-over)."""

import itertools
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from gato_like.config import PRESETS, Config
from gato_like.envs.registry import get_task
from gato_like.model import (
    GatoModel,
    KVCache,
    group_positions,
    patch_intervals,
    position_problem,
    value_counts,
)
from gato_like.tokenizers import SequenceBuilder, TokenType, patch_position_intervals


@pytest.mark.parametrize(
    ("name", "target"), [("gato-79m", 79e6), ("gato-364m", 364e6), ("gato-1.18b", 1.18e9)]
)
def test_gato_presets_have_the_papers_size(name: str, target: float) -> None:
    config = Config.from_name(name)
    assert config.text_vocab_size == 32000 and config.vocab_size == 34051
    with torch.device("meta"):
        model = GatoModel(config)
    assert abs(model.num_parameters() / target - 1) < 0.10, model.num_parameters()


def test_preset_names_and_files(tmp_path) -> None:
    assert set(PRESETS) >= {"debug", "tiny", "small", "gato-79m", "gato-364m", "gato-1.18b"}
    with pytest.raises(KeyError, match="did you mean 'small'"):
        Config.from_name("smal")
    config = Config.from_name("tiny", context_length=128)
    config.save(tmp_path / "config.json")
    assert Config.from_file(tmp_path / "config.json") == config
    with pytest.raises(ValueError, match=r"n_embd \(65\) must be divisible by n_head \(4\)"):
        Config.from_name("debug", n_embd=65)


def test_patch_intervals_match_the_tokenizer() -> None:
    positions = np.array([[r, c, 3, 5] for r in range(3) for c in range(5)] + [[0, 0, 1, 1], [6, 7, 200, 9]])
    expected = patch_position_intervals(positions, 128)
    np.testing.assert_array_equal(patch_intervals(torch.from_numpy(positions), 128).numpy(), expected)


def _episode_tokens(task: str, steps: int, seed: int = 0) -> tuple[SequenceBuilder, dict]:
    t = get_task(task)
    episode = t.rollout(seed, "expert", max_steps=steps)
    builder = SequenceBuilder(t.spec)
    before = np.maximum(np.arange(episode.length) - 1, 0)
    previous = {k: episode.observations[k][before] for k in builder.tensor_keys}
    seq = builder.build(episode.observations, episode.actions, previous=previous)
    assert seq.dynamics_ids is not None
    batch = {
        "ids": torch.from_numpy(seq.ids)[None],
        "dynamics_ids": torch.from_numpy(seq.dynamics_ids)[None],
        "types": torch.from_numpy(seq.types).long()[None],
        "local_positions": torch.from_numpy(seq.local_positions).long()[None],
        "timesteps": torch.from_numpy(seq.timesteps).long()[None],
        "loss_mask": torch.from_numpy(seq.loss_mask)[None],
        "attention_mask": torch.ones(1, len(seq), dtype=torch.bool),
        "patches": torch.from_numpy(seq.patches)[None],
        "patch_positions": torch.from_numpy(seq.patch_positions)[None],
        "patch_mask": torch.ones(1, len(seq.patches), dtype=torch.bool),
    }
    return builder, batch


def _slice(batch: dict, start: int, stop: int) -> dict:
    """Token positions [start, stop) of a one-row batch, with the matching patches."""
    image = batch["types"][0] == int(TokenType.IMAGE)
    p0, p1 = int(image[:start].sum()), int(image[:stop].sum())
    out = {
        k: v[:, start:stop] for k, v in batch.items() if k not in ("patches", "patch_positions", "patch_mask")
    }
    out |= {k: batch[k][:, p0:p1] for k in ("patches", "patch_positions", "patch_mask")}
    return out


@pytest.mark.parametrize("backbone", ["decoder", "perceiver", "pooled"])
def test_forward_backward_and_initial_loss(backbone: str) -> None:
    torch.manual_seed(0)
    model = GatoModel(Config.from_name("debug", backbone=backbone))
    _, batch = _episode_tokens("dmc-reacher-easy", 8)
    out = model(batch, logits=True)
    assert out["policy_logits"].shape == (1, 8 * 25, model.config.vocab_size)
    # an untrained model is uniform-ish over the 3075 ids: loss near log(3075) = 8.03
    assert 7.5 < float(out["policy_loss"]) < 8.6
    if backbone != "perceiver":  # next-token (decoder), or every value from the last action (pooled)
        assert 7.5 < float(out["dynamics_loss"]) < 8.6
    else:  # observation tokens are folded: no next-observation-token targets after an image
        assert float(out["dynamics_loss"]) == 0.0
    out["loss"].backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    assert model.patches.stem.weight.grad.abs().sum() > 0  # images reach the loss


@pytest.mark.parametrize("backbone", ["decoder", "perceiver", "pooled"])
@pytest.mark.parametrize(("task", "context"), [("dmc-cartpole-swingup", 400), ("babyai-GoToLocal", 240)])
def test_cached_acting_matches_recomputation_across_a_roll_over(
    task: str, context: int, backbone: str
) -> None:
    torch.manual_seed(0)
    if (
        backbone != "decoder"
    ):  # a timestep is a few folded tokens + separator + actions: a shorter context rolls
        context = (24 if task.startswith("dmc") else 28) if backbone == "perceiver" else 16
    config = Config.from_name("debug", context_length=context, backbone=backbone)
    model = GatoModel(config).eval()
    _, batch = _episode_tokens(task, 30 if task.startswith("dmc") else 12, seed=2)
    ts = batch["timesteps"][0]
    bounds = [0, *(torch.nonzero(torch.diff(ts)).flatten() + 1).tolist(), len(ts)]
    local = model.input_positions(batch["types"], batch["local_positions"])
    x_all = model.embed(batch["ids"], batch["types"], local, batch["patches"],
                        batch["patch_positions"], batch["patch_mask"])  # fmt: skip
    inputs = [model.backbone_inputs(x_all[:, a:b], batch["types"][:, a:b], ts[None, a:b]) for a, b in itertools.pairwise(bounds)]  # fmt: skip
    sizes = [i.shape[1] for i in inputs]
    cache = KVCache.empty(config, 1, x_all.device, x_all.dtype)
    window_start, rolled, steps_since_roll = 0, 0, []
    for t, (_, b) in enumerate(itertools.pairwise(bounds)):
        if int(cache.lengths[0]) + sizes[t] > config.context_length:
            # roll over: keep the newest whole timesteps (at most half the context), re-encode them
            first = t
            while first > 0 and sum(sizes[first - 1 : t]) <= config.context_length // 2:
                first -= 1
            window_start = bounds[first]
            cache = KVCache.empty(config, 1, x_all.device, x_all.dtype)
            if first < t:
                kept = torch.cat(inputs[first:t], dim=1)
                model.step(kept, torch.ones(1, kept.shape[1], dtype=torch.bool), cache)
            rolled += 1
        cached = model.step(inputs[t], torch.ones(1, sizes[t], dtype=torch.bool), cache)
        with torch.no_grad():
            full = model(_slice(batch, window_start, b), logits=True)["policy_logits"][0, -1]
        torch.testing.assert_close(cached[0], full, rtol=1e-4, atol=1e-4)
        steps_since_roll.append(rolled)
    assert rolled > 0  # the window really rolled over
    assert steps_since_roll.count(rolled) > 1  # and kept acting from the cache after it


def test_batched_step_with_ragged_rows_matches_single_rows() -> None:
    torch.manual_seed(0)
    config = Config.from_name("debug", context_length=1024)
    model = GatoModel(config).eval()
    _, a = _episode_tokens("babyai-GoToRedBall", 3, seed=0)
    _, b = _episode_tokens("babyai-GoToLocal", 3, seed=5)
    xa = model.embed(a["ids"], a["types"], a["local_positions"])
    xb = model.embed(b["ids"], b["types"], b["local_positions"])
    n = max(xa.shape[1], xb.shape[1])
    x = torch.zeros(2, n, config.n_embd)
    x[0, : xa.shape[1]], x[1, : xb.shape[1]] = xa[0], xb[0]
    valid = torch.zeros(2, n, dtype=torch.bool)
    valid[0, : xa.shape[1]], valid[1, : xb.shape[1]] = True, True
    both = model.step(x, valid, KVCache.empty(config, 2, x.device, x.dtype))
    alone_a = model.step(
        xa, torch.ones(1, xa.shape[1], dtype=torch.bool), KVCache.empty(config, 1, x.device, x.dtype)
    )
    alone_b = model.step(
        xb, torch.ones(1, xb.shape[1], dtype=torch.bool), KVCache.empty(config, 1, x.device, x.dtype)
    )
    torch.testing.assert_close(both[0], alone_a[0], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(both[1], alone_b[0], rtol=1e-4, atol=1e-4)


def test_goal_conditioned_forward() -> None:
    torch.manual_seed(0)
    model = GatoModel(Config.from_name("debug"))
    _, batch = _episode_tokens("dmc-point_mass-easy", 4)
    goal = _slice(batch, 0, 5)  # 4 proprio + ... the first observation tokens as a goal
    batch |= {"goal_ids": goal["ids"], "goal_types": goal["types"], "goal_local_positions": goal["local_positions"],
              "goal_attention_mask": torch.ones_like(goal["ids"], dtype=torch.bool),
              "goal_patches": goal["patches"], "goal_patch_positions": goal["patch_positions"], "goal_patch_mask": goal["patch_mask"]}  # fmt: skip
    out = model(batch, goal=True, logits=True)
    assert out["goal_logits"].shape[1] == batch["ids"].shape[1]
    out["loss"].backward()
    assert model.goal_adapter[-1].weight.grad.abs().sum() > 0


def test_timm_patch_encoder_when_timm_imports() -> None:
    pytest.importorskip(
        "timm", reason="timm needs a torchvision that imports beside this torch (GPU installs)"
    )
    torch.manual_seed(0)
    model = GatoModel(Config.from_name("debug", image_encoder="timm", timm_model="resnet18"))
    _, batch = _episode_tokens("dmc-reacher-easy", 2)
    out = model(batch)
    out["loss"].backward()
    assert torch.isfinite(out["loss"])


def test_timm_encoder_without_timm_says_how_to_install(monkeypatch) -> None:
    import builtins

    real_import = builtins.__import__

    def no_timm(name, *args, **kwargs):  # type: ignore[no-untyped-def]
        if name == "timm":
            raise ImportError("No module named 'timm'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_timm)
    with pytest.raises(ImportError, match=r"pip install 'gato-like\[timm\]'"):
        GatoModel(Config.from_name("debug", image_encoder="timm"))


def test_a_padded_goal_ends_where_its_episode_starts() -> None:
    """Goals of different lengths in one batch: a row's goal-head logits equal those of the row
    alone, so training sees the goal right before the episode, as acting does (no position gap)."""
    from gato_like.data_pipelines.generate import without_images
    from gato_like.data_pipelines.loader import collate, sequence_sample

    torch.manual_seed(0)
    model = GatoModel(Config.from_name("debug")).eval()
    spec = without_images(get_task("dmc-point_mass-easy").spec)
    builder = SequenceBuilder(spec)
    episode = get_task("dmc-point_mass-easy").rollout(3, "expert", render=False, max_steps=6)
    samples = []
    for goal_tokens in (2, 4):  # two goals of different lengths (the first 2 or all 4 proprio tokens)
        seq = builder.build({k: v[:4] for k, v in episode.observations.items()}, episode.actions[:4])
        goal = builder.build_step({k: v[5] for k, v in episode.observations.items()})
        sample = sequence_sample(seq, 0, 0, "e")
        sample |= {"goal_ids": goal.ids[:goal_tokens], "goal_types": goal.types[:goal_tokens],
                   "goal_local_positions": goal.local_positions[:goal_tokens],
                   "goal_patches": goal.patches, "goal_patch_positions": goal.patch_positions}  # fmt: skip
        samples.append(sample)
    pad = builder.layout.pad_id
    with torch.no_grad():
        together = model(collate(samples, pad), goal=True, logits=True)["goal_logits"]
        alone = model(collate(samples[:1], pad), goal=True, logits=True)["goal_logits"]
    torch.testing.assert_close(together[0], alone[0], rtol=1e-4, atol=1e-4)


def test_dynamics_head_reads_the_executed_actions_in_its_own_pass() -> None:
    """With ``dynamics_inputs="executed"`` the dynamics loss changes with the executed actions and
    the policy loss does not; with ``masked`` (and every action masked) neither does."""
    torch.manual_seed(0)
    _, batch = _episode_tokens("dmc-cartpole-balance", 6)
    action = batch["types"] == int(TokenType.ACTION)
    other = batch["ids"].clone()
    other[action] = torch.where(batch["ids"][action] > 1024 + 512, 1024 + 10, 1024 + 1000)
    for inputs in ("executed", "masked"):
        model = GatoModel(Config.from_name("debug", dynamics_inputs=inputs, action_input_dropout=1.0)).eval()
        with torch.no_grad():
            a = model(batch | {"executed_ids": batch["ids"]})
            b = model(batch | {"executed_ids": other})
        assert torch.equal(a["policy_loss"], b["policy_loss"])
        assert (a["dynamics_loss"] != b["dynamics_loss"]) == (inputs == "executed"), inputs
    # a share of the rows: the dynamics pass sees the first rows only
    two = {k: torch.cat([v, v]) if torch.is_tensor(v) else v for k, v in batch.items()}
    two["executed_ids"] = torch.cat([batch["ids"], other])
    model = GatoModel(Config.from_name("debug", dynamics_inputs="executed", dynamics_rows=0.5)).eval()
    with torch.no_grad():
        half = model(two)["dynamics_loss"]
        first = model(batch | {"executed_ids": batch["ids"]})["dynamics_loss"]
    torch.testing.assert_close(half, first)


def test_geometric_value_frequencies_tell_neighbouring_bins_apart() -> None:
    """Linear frequencies (1..16) barely move between neighbouring bins; geometric ones (1..512)
    move by about a half turn, so a position and a goal a few bins apart embed apart."""
    from torch import nn

    from gato_like.model import ValueEmbedding

    bins = torch.tensor([600, 601])
    for spacing, low, high in (("linear", 0.0, 0.1), ("geometric", 1.0, 2.01)):
        embedding = ValueEmbedding(8, 1024, spacing=spacing)
        embedding.proj = nn.Identity()  # the Fourier features themselves
        features = embedding(bins)
        assert low < float((features[0] - features[1]).abs().max()) < high, spacing
    with pytest.raises(ValueError, match="value_frequencies: expected 'linear' or 'geometric'"):
        Config.from_name("debug", value_frequencies="log")


def test_goal_offset_octaves_set_the_offset_embedding_and_older_checkpoints_keep_theirs(
    tmp_path: Path,
) -> None:
    """``goal_offset_octaves`` bounds the offset embedding's frequencies (2**octaves); a config
    written before the field (``relative`` checkpoints of the first version) loads with 8, the
    frequencies it was trained with; out of range is refused, naming the field."""
    import json

    config = Config.from_name("debug", backbone="pooled", goal_placement="relative")
    model = GatoModel(config)
    assert model.goal_offset is not None
    top = float(model.goal_offset.get_buffer("freqs").max())
    assert top == pytest.approx(math.pi * 2**config.goal_offset_octaves) and config.goal_offset_octaves == 2.0
    data = config.to_dict()
    del data["goal_offset_octaves"]
    (tmp_path / "config.json").write_text(json.dumps(data))
    older = Config.from_file(tmp_path / "config.json")
    assert older.goal_offset_octaves == 8.0
    assert float(GatoModel(older).goal_offset.get_buffer("freqs").max()) == pytest.approx(math.pi * 256)
    with pytest.raises(ValueError, match="goal_offset_octaves: expected 0 to 10"):
        Config.from_name("debug", goal_offset_octaves=-1.0)


def test_pooled_dynamics_readout_mlp_starts_as_the_adapter_and_learns() -> None:
    """``dynamics_readout="mlp"``: its last layer starts at zero, so the dynamics loss equals the
    adapter readout's with the same other weights; the dynamics loss trains it (the policy's does
    not), and the rollout's ``readout_logits`` goes through it as the loss does."""
    torch.manual_seed(0)
    _, batch = _episode_tokens("dmc-point_mass-easy", 6)
    plain = GatoModel(Config.from_name("debug", backbone="pooled", dynamics_target="delta"))
    model = GatoModel(
        Config.from_name("debug", backbone="pooled", dynamics_target="delta", dynamics_readout="mlp")
    )
    assert plain.readout_mlp is None and model.readout_mlp is not None
    missing = model.load_state_dict(plain.state_dict(), strict=False).missing_keys
    assert missing and all(k.startswith("readout_mlp.") for k in missing)
    out = model(batch)
    with torch.no_grad():
        torch.testing.assert_close(out["dynamics_loss"], plain(batch)["dynamics_loss"])
    out["policy_loss"].backward(retain_graph=True)
    assert model.readout_mlp[-1].weight.grad is None or not model.readout_mlp[-1].weight.grad.any()
    out["dynamics_loss"].backward()
    assert model.readout_mlp[-1].weight.grad.abs().sum() > 0
    with torch.no_grad():  # moved off zero: the readout now differs from the adapter's alone
        model.readout_mlp[-1].bias.fill_(0.1)
        positions = torch.arange(4)
        hidden = torch.randn(64)
        assert not torch.allclose(
            model.readout_logits(hidden, positions), plain.readout_logits(hidden, positions)
        )
    with pytest.raises(ValueError, match="dynamics_readout: expected 'adapter' or 'mlp'"):
        Config.from_name("debug", dynamics_readout="wide")


def test_dynamics_sigma_applies_to_the_dynamics_head_only() -> None:
    torch.manual_seed(0)
    _, batch = _episode_tokens("dmc-cartpole-balance", 6)
    base = GatoModel(Config.from_name("debug", dynamics_target="delta")).eval()
    own = GatoModel(Config.from_name("debug", dynamics_target="delta", dynamics_sigma_bins=0.0)).eval()
    onehot = GatoModel(Config.from_name("debug", dynamics_target="delta", target_sigma_bins=0.0)).eval()
    own.load_state_dict(base.state_dict())
    onehot.load_state_dict(base.state_dict())
    with torch.no_grad():
        a, b, c = base(batch), own(batch), onehot(batch)
    assert torch.equal(a["policy_loss"], b["policy_loss"]) and not torch.equal(
        a["dynamics_loss"], b["dynamics_loss"]
    )
    torch.testing.assert_close(b["dynamics_loss"], c["dynamics_loss"])


def test_strided_patch_encoder_trains_and_costs_a_fraction_of_gatos() -> None:
    """``image_encoder="strided"``: the same block after a 4x4 stride-4 stem; one embedding per
    patch, trainable end to end, at well under a tenth of the ResNet block's multiply-adds."""
    torch.manual_seed(0)
    model = GatoModel(Config.from_name("debug", image_encoder="strided"))
    assert model.patches.stem.stride == (4, 4)
    _, batch = _episode_tokens("dmc-reacher-easy", 2)
    out = model(batch)
    out["loss"].backward()
    assert torch.isfinite(out["loss"]) and model.patches.stem.weight.grad.abs().sum() > 0

    def conv_macs(encoder: torch.nn.Module) -> int:  # multiply-adds of the convolutions on one patch
        macs, side = 0, 16
        for conv in (encoder.stem, encoder.conv1, encoder.conv2):
            side = (side + 2 * conv.padding[0] - conv.kernel_size[0]) // conv.stride[0] + 1
            macs += side * side * conv.out_channels * conv.in_channels * conv.kernel_size[0] ** 2
        return macs

    gato = GatoModel(Config.from_name("debug")).patches
    assert gato.stem.stride == (1, 1)
    assert conv_macs(model.patches) * 10 < conv_macs(gato)
    with pytest.raises(ValueError, match="image_encoder: expected 'resnet', 'strided' or 'timm'"):
        Config.from_name("debug", image_encoder="fast")


def test_pooled_timesteps_number_each_group_and_fold_it_into_one_input() -> None:
    """A pooled timestep numbers its tokens inside their group (so a value's position names its
    dimension whatever text precedes it) and reaches the backbone as one token per group, then
    the separator and the actions."""
    T, P, C, D, S, A = (int(TokenType[n]) for n in ("TEXT", "IMAGE", "CONTINUOUS", "DISCRETE", "SEPARATOR", "ACTION"))  # fmt: skip
    # two timesteps: 2 text, 1 image, 3 values (2 continuous, 1 discrete), separator, 2 actions;
    # then 3 text (a longer mission), the same groups
    types = torch.tensor([[T, T, P, C, C, D, S, A, A, T, T, T, P, C, C, D, S, A, A]])
    local = torch.tensor([[0, 1, 2, 3, 4, 5, 6, 7, 8, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9]])
    expected = [[0, 1, 0, 0, 1, 2, 0, 1, 2, 0, 1, 2, 0, 0, 1, 2, 0, 1, 2]]
    assert group_positions(types, local).tolist() == expected
    model = GatoModel(Config.from_name("debug", backbone="pooled"))
    timesteps = torch.tensor([[0] * 9 + [1] * 10])
    x = torch.randn(1, 19, model.config.n_embd)
    inputs = model.backbone_inputs(x, types, timesteps)
    assert inputs.shape == (1, 2 * (3 + 3), model.config.n_embd)  # 3 pooled groups + sep + 2 actions
    torch.testing.assert_close(inputs[0, 3:6], x[0, 6:9])  # separator and actions pass as they are
    # the values' token depends on every value and nothing else of the timestep
    y = x.clone()
    y[0, 4] += torch.randn(model.config.n_embd)
    changed = model.backbone_inputs(y, types, timesteps)
    assert not torch.allclose(changed[0, 2], inputs[0, 2])
    torch.testing.assert_close(changed[0, :2], inputs[0, :2])
    torch.testing.assert_close(changed[0, 3:], inputs[0, 3:])


def test_a_body_too_large_for_the_position_table_is_refused_naming_the_field() -> None:
    pooled = Config.from_name("debug", backbone="pooled", max_local_positions=8)
    assert position_problem(pooled, "arm", {"image": 0, "values": 8, "action": 3}) is None
    problem = position_problem(pooled, "arm", {"image": 0, "values": 9, "action": 3})
    assert problem is not None and "values group has 9 tokens" in problem and "max_local_positions" in problem
    decoder = Config.from_name("debug", max_local_positions=8)
    assert "one timestep has 12 tokens" in str(
        position_problem(decoder, "arm", {"image": 0, "values": 9, "action": 3})
    )
    model = GatoModel(pooled)
    types = torch.full((1, 10), int(TokenType.CONTINUOUS))
    with pytest.raises(ValueError, match="max_local_positions"):
        model.input_positions(types, torch.arange(10)[None])


def test_pooled_dynamics_reads_every_next_value_from_the_last_action(monkeypatch) -> None:
    """Pooled timesteps make no prediction at a value token, so the dynamics head predicts each
    value of timestep t from timestep t-1's last action token and the value's group position:
    every value of every timestep after the first is a target, and the targets are the values' ids."""
    torch.manual_seed(0)
    model = GatoModel(Config.from_name("debug", backbone="pooled"))
    builder, batch = _episode_tokens("dmc-cartpole-swingup", 6)
    batch = {k: v for k, v in batch.items() if not k.startswith("patch")}
    keep = batch["types"] != int(TokenType.IMAGE)  # proprio only: values right after the action
    batch = {k: v[keep][None] if v.dim() == 2 else v for k, v in batch.items()}
    seen = {}
    original = model.token_losses

    def spy(logits, targets, *args):
        seen.setdefault("targets", []).append(targets)
        return original(logits, targets, *args)

    monkeypatch.setattr(model, "token_losses", spy)
    model(batch)
    values = (batch["types"] == int(TokenType.CONTINUOUS)) & (batch["timesteps"] > 0)
    dynamics_targets = seen["targets"][1]  # the policy's loss comes first
    assert dynamics_targets.tolist() == batch["ids"][values].tolist()
    assert len(dynamics_targets) == 5 * builder.group_sizes()["values"]  # 5 timesteps after the first


def _loss_and_grads(
    model: GatoModel, batch: dict, keyed: bool, goal: bool = False
) -> tuple[torch.Tensor, dict]:
    """Loss and every parameter's gradient of one forward and backward, the pooled fold running
    its MLP once per distinct key (``keyed``, :meth:`GatoModel.pool_keys`) or on every token."""
    if not keyed:
        model.pool_keys = lambda *args, **kwargs: None  # type: ignore[method-assign]
    try:
        model.zero_grad()
        loss = model(batch, goal=goal)["loss"]
        loss.backward()
    finally:
        model.__dict__.pop("pool_keys", None)  # the class's method again
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize(("width", "condition"), [(0, "none"), (96, "none"), (0, "text")])
@pytest.mark.parametrize("task", ["babyai-GoToRedBall", "dmc-reacher-easy"])
def test_the_pooled_fold_runs_its_mlp_once_per_distinct_token_and_sums_as_before(
    task: str, width: int, condition: str
) -> None:
    """The pooled fold's MLP runs once per distinct (id, position, segment) and once per image
    patch, and the loss and every gradient equal the fold that runs it on every token, with and
    without the goal prefix (whose tokens carry the goal segment's vector; reacher's goal holds
    an image patch, as its timesteps do); also when the fold sums in a wider space
    (``pool_width``), whose outer function then gets gradients, and when the values read the
    mission (``pool_condition``: its first layer also runs once per distinct token)."""
    torch.manual_seed(0)
    model = GatoModel(
        Config.from_name("debug", backbone="pooled", pool_width=width, pool_condition=condition)
    )
    assert model.pool.mlp[-1].out_features == (width or 64)
    _, one = _episode_tokens(task, 4)
    observation = int((one["types"] < int(TokenType.SEPARATOR)).sum())
    goal_length = int((one["types"][0] == int(TokenType.SEPARATOR)).nonzero()[0])  # timestep 0's observation
    goal = _slice(one, 0, goal_length)
    images = int((one["types"] == int(TokenType.IMAGE)).sum())
    goal_images = int((goal["types"] == int(TokenType.IMAGE)).sum())
    batch = {k: torch.cat([v, v]) for k, v in one.items()}  # two equal rows: every key twice
    batch |= {f"goal_{k}": torch.cat([v, v]) for k, v in goal.items() if k in ("ids", "types", "local_positions", "patches", "patch_positions", "patch_mask")}  # fmt: skip
    batch["goal_attention_mask"] = torch.ones_like(batch["goal_ids"], dtype=torch.bool)
    rows: list[int] = []
    model.pool.mlp.register_forward_hook(
        lambda module, inputs, output: rows.append(inputs[0].numel() // inputs[0].shape[-1])
    )
    for goal in (False, True):
        results = []
        for keyed in (True, False):
            rows.clear()
            results.append((*_loss_and_grads(model, batch, keyed, goal=goal), sum(rows)))
        (loss_a, grads_a, rows_a), (loss_b, grads_b, rows_b) = results
        # each distinct token once (an image patch once per row)
        distinct = observation + images + (goal_length + goal_images if goal else 0)
        assert rows_a <= distinct < rows_b
        torch.testing.assert_close(loss_a, loss_b, rtol=1e-5, atol=1e-5)  # summed in another order
        assert grads_a.keys() == grads_b.keys()
        assert any(name.startswith("pool.outer.") for name in grads_a) == bool(width)
        conditioned = any(name.startswith("pool.condition") for name in grads_a)
        assert conditioned == (condition == "text" and task.startswith("babyai"))  # only text reads it
        for name in grads_b:
            # the patch encoder's backward is not bit-reproducible here: two identical passes
            # differ by ~5e-4 in the embedding's gradient (scale ~0.2)
            torch.testing.assert_close(grads_a[name], grads_b[name], rtol=1e-4, atol=2e-3 if images else 1e-6)


def test_a_value_embeds_its_groups_size_so_two_bodies_fold_apart() -> None:
    """``value_count_embedding``: every token of a timestep's values group embeds how many the
    group holds, so value 0 of a 4-value body (a point mass's x) and value 0 of a 5-value body (a
    cartpole's cart position) with the same id embed apart (without it, alike); the fold's
    once-per-key path keys on the count too, so a row holding both bodies gives the per-token
    path's loss and gradients; the table starts at zero (the model starts as the one without it)."""
    C, S, A, T = (int(TokenType[n]) for n in ("CONTINUOUS", "SEPARATOR", "ACTION", "TEXT"))
    types = torch.tensor([[C, C, C, C, S, A, A, T, T, C, C, C, C, C, S, A]])
    local = group_positions(types, torch.tensor([[0, 1, 2, 3, 4, 5, 6, 0, 1, 2, 3, 4, 5, 6, 7, 8]]))
    assert value_counts(types, local).tolist() == [[4, 4, 4, 4, 0, 0, 0, 0, 0, 5, 5, 5, 5, 5, 0, 0]]
    with pytest.raises(ValueError, match=r"value_count_embedding.*pooled"):
        Config.from_name("debug", value_count_embedding=True)

    torch.manual_seed(0)
    _, cartpole = _episode_tokens("dmc-cartpole-swingup", 3)
    _, point_mass = _episode_tokens("dmc-point_mass-easy", 3)
    rows = []
    for batch in (cartpole, point_mass):  # proprio only
        keep = batch["types"] != int(TokenType.IMAGE)
        rows.append({k: v[keep][None] for k, v in batch.items() if not k.startswith("patch")})
    first = rows[0]["types"][0] == C
    x_at = int((rows[1]["types"][0] == C).nonzero()[0])
    rows[1]["ids"][0, x_at] = rows[0]["ids"][0, int(first.nonzero()[0])]  # the same id at value 0
    rows[1]["timesteps"] = rows[1]["timesteps"] + int(rows[0]["timesteps"].max()) + 1
    one_row = {k: torch.cat([rows[0][k], rows[1][k]], dim=1) for k in rows[0]}
    cart_x, point_x = int(first.nonzero()[0]), len(first) + x_at  # the two value-0 tokens in one_row

    for counted in (False, True):
        model = GatoModel(Config.from_name("debug", backbone="pooled", value_count_embedding=counted))
        assert model.value_count is None or not model.value_count.weight.any()
        if model.value_count is not None:
            torch.nn.init.normal_(model.value_count.weight)
        local = model.input_positions(one_row["types"], one_row["local_positions"])
        x = model.embed(one_row["ids"], one_row["types"], local)[0]
        assert torch.equal(x[cart_x], x[point_x]) != counted
        (loss_a, grads_a), (loss_b, grads_b) = (
            _loss_and_grads(model, one_row, keyed) for keyed in (True, False)
        )
        torch.testing.assert_close(loss_a, loss_b, rtol=1e-5, atol=1e-5)
        assert grads_a.keys() == grads_b.keys()
        for name, grad in grads_b.items():
            torch.testing.assert_close(grads_a[name], grad, rtol=1e-4, atol=1e-6)


def test_pooled_dynamics_targets_are_capped_by_a_uniform_subset(monkeypatch) -> None:
    """``dynamics_max_targets`` keeps that many of a batch's dynamics targets, drawn from all of
    them; 0 keeps every one; a negative cap is refused naming the field."""
    torch.manual_seed(0)
    _, batch = _episode_tokens("dmc-cartpole-swingup", 6)
    batch = {k: v for k, v in batch.items() if not k.startswith("patch")}
    keep = batch["types"] != int(TokenType.IMAGE)
    batch = {k: v[keep][None] if v.dim() == 2 else v for k, v in batch.items()}
    targets = {}
    for cap in (0, 7):
        model = GatoModel(Config.from_name("debug", backbone="pooled", dynamics_max_targets=cap))
        seen: list[torch.Tensor] = []

        def spy(logits, t, *args, seen=seen, original=model.token_losses):
            seen.append(t)
            return original(logits, t, *args)

        monkeypatch.setattr(model, "token_losses", spy)
        model(batch)
        targets[cap] = seen[1]  # the policy's loss comes first
    assert len(targets[0]) == 25 and len(targets[7]) == 7
    assert set(targets[7].tolist()) <= set(targets[0].tolist())
    with pytest.raises(ValueError, match="dynamics_max_targets"):
        Config.from_name("debug", dynamics_max_targets=-1)


@pytest.mark.parametrize("backbone", ["pooled", "decoder"])
def test_dynamics_on_discrete_off_gives_discrete_bodies_no_dynamics_targets(
    monkeypatch, backbone: str
) -> None:
    """``dynamics_on_discrete=False``: a BabyAI batch gives the dynamics head no targets (its loss
    is 0 and still part of the graph), a control batch keeps exactly the targets it had."""
    counts: dict[tuple[str, bool], int] = {}
    for task in ("babyai-GoToRedBall", "dmc-cartpole-swingup"):
        _, batch = _episode_tokens(task, 3)
        batch = {k: v for k, v in batch.items() if not k.startswith("patch")}
        keep = batch["types"] != int(TokenType.IMAGE)
        batch = {k: v[keep][None] if v.dim() == 2 else v for k, v in batch.items()}
        for on in (True, False):
            torch.manual_seed(0)
            model = GatoModel(Config.from_name("debug", backbone=backbone, dynamics_on_discrete=on))
            seen: list[torch.Tensor] = []

            def spy(logits, t, *args, seen=seen, original=model.token_losses):
                seen.append(t)
                return original(logits, t, *args)

            monkeypatch.setattr(model, "token_losses", spy)
            out = model(batch)
            counts[task, on] = len(seen[1]) if len(seen) > 1 else 0
            if not counts[task, on]:
                assert float(out["dynamics_loss"]) == 0.0 and out["loss"].requires_grad
    assert counts["babyai-GoToRedBall", True] > 0 and counts["babyai-GoToRedBall", False] == 0
    assert counts["dmc-cartpole-swingup", False] == counts["dmc-cartpole-swingup", True] > 0


@pytest.mark.parametrize("placement", ["timestep", "relative"])
def test_a_goal_in_every_timestep_reaches_each_timesteps_fold_and_needs_pooled_timesteps(
    placement: str,
) -> None:
    """``goal_placement`` ``timestep``/``relative``: the goal head's logits at the first timestep
    already depend on the goal (no prefix token to attend to: the goal is in the timestep's own
    fold), the loss trains the goal segment's vector (``relative``: and the offset embedding), and
    any backbone but ``pooled`` is refused naming the field."""
    torch.manual_seed(0)
    model = GatoModel(Config.from_name("debug", backbone="pooled", goal_placement=placement))
    _, batch = _episode_tokens("dmc-point_mass-easy", 3)
    batch = {k: v for k, v in batch.items() if not k.startswith("patch")}
    keep = batch["types"] != int(TokenType.IMAGE)
    batch = {k: v[keep][None] for k, v in batch.items()}
    values = (batch["types"] == int(TokenType.CONTINUOUS)) & (batch["timesteps"] == 0)
    outs = []
    for shift in (0, 7):
        goal = {"goal_ids": batch["ids"][values][None] + shift, "goal_types": batch["types"][values][None],
                "goal_local_positions": batch["local_positions"][values][None],
                "goal_attention_mask": torch.ones(1, int(values.sum()), dtype=torch.bool)}  # fmt: skip
        outs.append(model(batch | goal, goal=True, logits=True))
    separator = int((batch["types"][0] == int(TokenType.SEPARATOR)).nonzero()[0])  # timestep 0's
    assert outs[0]["goal_logits"].shape[1] == batch["ids"].shape[1]
    assert not torch.allclose(outs[0]["goal_logits"][0, separator], outs[1]["goal_logits"][0, separator])
    outs[0]["loss"].backward()
    assert model.goal_segment.grad is not None and model.goal_segment.grad.abs().sum() > 0
    if placement == "relative":
        assert model.goal_offset is not None
        assert (
            model.goal_offset.proj.weight.grad is not None
            and model.goal_offset.proj.weight.grad.abs().sum() > 0
        )
    with pytest.raises(ValueError, match=rf"goal_placement '{placement}'.*'pooled'"):
        Config.from_name("debug", goal_placement=placement)


def test_pool_width_is_validated_and_needs_pooled_timesteps() -> None:
    """A negative ``pool_width`` or one on another backbone is refused naming the field; 0 is
    the fold as built (no outer function), which checkpoints without the field load as."""
    with pytest.raises(ValueError, match="pool_width: expected 0"):
        Config.from_name("debug", backbone="pooled", pool_width=-1)
    with pytest.raises(ValueError, match="pool_width widens the pooled fold: it needs backbone 'pooled'"):
        Config.from_name("debug", pool_width=128)
    assert GatoModel(Config.from_name("debug", backbone="pooled")).pool.outer is None


def test_a_text_conditioned_fold_reads_the_mission_into_the_values_and_only_there() -> None:
    """``pool_condition="text"``: a timestep's values token changes with its text (the mission
    conditions how the view is read), where the plain fold's values token ignores the text; a
    timestep without text folds exactly as the plain fold; the text and image tokens and the
    separator and actions are untouched. Another backbone is refused naming the field."""
    T, P, C, D, S, A = (int(TokenType[n]) for n in ("TEXT", "IMAGE", "CONTINUOUS", "DISCRETE", "SEPARATOR", "ACTION"))  # fmt: skip
    types = torch.tensor([[T, T, P, C, C, D, S, A, C, C, D, S, A]])  # text in timestep 0 only
    timesteps = torch.tensor([[0] * 8 + [1] * 5])
    torch.manual_seed(0)
    model = GatoModel(Config.from_name("debug", backbone="pooled", pool_condition="text"))
    x = torch.randn(1, 13, model.config.n_embd)
    inputs = model.backbone_inputs(x, types, timesteps)  # timestep 0: 3 groups + 2; timestep 1: 1 + 2
    assert inputs.shape == (1, 8, model.config.n_embd)
    y = x.clone()
    y[0, 1] += torch.randn(model.config.n_embd)  # another word
    changed = model.backbone_inputs(y, types, timesteps)
    assert not torch.allclose(changed[0, 0], inputs[0, 0])  # the text's own token
    assert not torch.allclose(changed[0, 2], inputs[0, 2])  # timestep 0's values read the text
    torch.testing.assert_close(changed[0, 1], inputs[0, 1])  # the image does not
    torch.testing.assert_close(changed[0, 3:], inputs[0, 3:])  # nor timestep 1, nor the actions
    condition = model.pool.condition
    model.pool.condition = None  # the plain fold, the same weights
    plain = model.backbone_inputs(x, types, timesteps)
    model.pool.condition = condition
    assert not torch.allclose(plain[0, 2], inputs[0, 2])
    torch.testing.assert_close(plain[0, 5], inputs[0, 5])  # no text: the plain fold exactly
    torch.testing.assert_close(plain[0, :2], inputs[0, :2])
    model.pool.condition = None  # the plain fold's values ignore the text
    torch.testing.assert_close(model.backbone_inputs(y, types, timesteps)[0, 2], plain[0, 2])
    model.pool.condition = condition
    with pytest.raises(
        ValueError, match="pool_condition conditions the pooled fold: it needs backbone 'pooled'"
    ):
        Config.from_name("debug", pool_condition="text")
    with pytest.raises(ValueError, match="pool_condition: expected 'none' or 'text'"):
        Config.from_name("debug", backbone="pooled", pool_condition="image")
    assert GatoModel(Config.from_name("debug", backbone="pooled")).pool.condition is None
