"""The distribution installs one top-level package, gato_like, and a working console script."""

import json
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import gato_like

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def test_subpackages_live_in_the_gato_like_namespace() -> None:
    import gato_like.data_pipelines
    import gato_like.tokenizers
    import gato_like.training

    for module, folder in (
        (gato_like.tokenizers, "tokenizers"),
        (gato_like.data_pipelines, "data_pipelines"),
        (gato_like.training, "training"),
    ):
        assert Path(module.__file__).parent.name == folder


def test_installed_package_shadows_no_top_level_module(tmp_path: Path) -> None:
    # run from an unrelated directory so the checkout itself is not on sys.path
    code = (
        "import importlib.util, json, gato_like.tokenizers\n"
        "out = {}\n"
        "for name in ('tokenizers', 'training', 'data_pipelines'):\n"
        "    spec = importlib.util.find_spec(name)\n"
        "    out[name] = spec.origin if spec else None\n"
        "print(json.dumps(out))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, check=True
    )
    import json

    found = json.loads(result.stdout)
    assert found["tokenizers"] is not None, "Hugging Face tokenizers (a dev dependency) should be importable"
    assert "site-packages" in found["tokenizers"]
    for name, origin in found.items():
        # absent, or someone else's package (e.g. Hugging Face tokenizers), never ours
        ours = [ROOT / folder for folder in ("tokenizers", "training", "data_pipelines", "gato_like")]
        assert origin is None or not any(str(origin).startswith(str(p)) for p in ours), (name, origin)


def test_checkout_root_on_sys_path_still_gets_hugging_faces_tokenizers() -> None:
    # `python -c` from the repository root puts the root on sys.path, where our tokenizers/ folder lives
    code = "import tokenizers, gato_like.tokenizers as ours; print(tokenizers.__file__); print(ours.ContinuousTokenizer.__name__)"
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.split()
    assert "site-packages" in out[0] and out[1] == "ContinuousTokenizer"


@pytest.mark.timeout(300)
def test_wheel_contains_only_gato_like(tmp_path: Path) -> None:
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
            str(ROOT),
        ],
        check=True,
        capture_output=True,
        cwd=tmp_path,
    )
    (wheel,) = tmp_path.glob("gato_like-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    tops = {name.split("/")[0] for name in names}
    assert tops == {"gato_like", f"gato_like-{gato_like.__version__}.dist-info"}, tops
    for expected in (
        "gato_like/tokenizers/continuous.py",
        "gato_like/tokenizers/assets/text.model",
        "gato_like/data_pipelines/__init__.py",
        "gato_like/training/__init__.py",
        "gato_like/py.typed",
    ):
        assert expected in names


def test_console_script_help_and_version() -> None:
    version = subprocess.run([BIN / "gato-like", "--version"], capture_output=True, text=True, check=True)
    assert version.stdout.strip() == f"gato-like {gato_like.__version__}"
    help_text = subprocess.run(
        [BIN / "gato-like", "--help"], capture_output=True, text=True, check=True
    ).stdout
    assert "demo" in help_text
    bad = subprocess.run([BIN / "gato-like", "fly"], capture_output=True, text=True)
    assert bad.returncode != 0 and "fly" in bad.stderr


def test_demo_runs_end_to_end(tmp_path: Path) -> None:
    result = subprocess.run(
        [BIN / "gato-like", "demo", "--out", str(tmp_path), "--episodes", "1", "--max-steps", "10", "--normalizer-episodes", "1",
         "--act-episodes", "1", "--act-max-steps", "30", "--train-steps", "4", "--eval-episodes", "1"],
        capture_output=True, text=True, check=True, env={"PATH": str(BIN), "MUJOCO_GL": "egl"},
    )  # fmt: skip
    out = result.stdout
    for task in ("dmc-cartpole-balance", "babyai-GoToLocal", "captions", "dmc-reacher-easy"):
        assert task in out
    assert "10 timesteps -> 230 tokens" in out  # cartpole: 16 patches + 5 proprio + separator + 1 action
    assert "[3072, 3073)" in out  # separator id with V = 1024
    assert (tmp_path / "data" / "index.json").is_file() and (tmp_path / "data" / "montage.png").is_file()
    # the agent is trained on the acting data (DART, no pixels), rolled out while training and scored
    act = json.loads((tmp_path / "act_data" / "index.json").read_text())
    assert sorted(act["tasks"]) == ["babyai-GoToRedBall", "dmc-cartpole-balance"]
    assert act["tasks"]["dmc-cartpole-balance"]["perturbation"]["noise"] == 0.3
    assert (tmp_path / "run" / "rollouts.json").is_file() and "mean expert-normalized score" in out
    assert "through ws://127.0.0.1:" in out


def test_public_api_at_the_top_level_without_loading_torch_first() -> None:
    code = (
        "import sys, gato_like\n"
        "assert 'torch' not in sys.modules, 'import gato_like loaded torch'\n"
        "from gato_like import PolicyClient\n"
        "assert 'torch' not in sys.modules, 'the client loaded torch'\n"
        "from gato_like import Policy, Config, GatoModel, ActingCore, EmbodimentSpec, load_checkpoint\n"
        "model = GatoModel(Config.from_name('debug'))\n"
        "print(Policy.__module__, type(model).__name__, sorted(set(gato_like.__all__) - set(dir(gato_like))))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["gato_like.policy", "GatoModel", "[]"]
    with pytest.raises(AttributeError, match="no attribute 'Nothing'"):
        gato_like.Nothing  # noqa: B018
