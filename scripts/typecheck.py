"""mypy over the ``gato_like`` namespace as it is installed, not folder by folder.

pyproject.toml maps root folders into the namespace (``package-dir``: ``tokenizers/`` is
``gato_like.tokenizers``, ...). mypy cannot follow that mapping, so run on the folders it took
``gato_like.data_pipelines`` and its siblings for missing modules (``Any``) and checked no call
between them. This builds the installed layout as a farm of symbolic links under
``build/typecheck/`` (from ``package-dir``, so it follows pyproject.toml) and runs
``mypy -p gato_like`` there with the project's settings; errors are printed with the repository's
paths.

    .venv/bin/python scripts/typecheck.py        # what `make lint` runs
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parent.parent


def build_farm(target: Path) -> dict[str, str]:
    """``target/gato_like`` laid out as installed; returns farm path prefix -> repository prefix."""
    mapping: dict[str, str] = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"][
        "package-dir"
    ]
    shutil.rmtree(target, ignore_errors=True)
    package = target / "gato_like"
    package.mkdir(parents=True)
    for entry in (ROOT / mapping["gato_like"]).iterdir():  # the package's own modules and subpackages
        (package / entry.name).symlink_to(entry)
    prefixes = {"gato_like/": f"{mapping['gato_like']}/"}
    for name, folder in mapping.items():
        if name == "gato_like" or not name.startswith("gato_like."):
            continue
        sub = name.split(".", 1)[1]
        if not (package / sub).exists():
            (package / sub).symlink_to(ROOT / folder)
        prefixes[f"gato_like/{sub}/"] = f"{folder}/"
    return prefixes


def main() -> int:
    farm = ROOT / "build" / "typecheck"
    prefixes = build_farm(farm)
    command = [sys.executable, "-m", "mypy", "--config-file", str(ROOT / "pyproject.toml"), "-p", "gato_like"]
    result = subprocess.run(command, cwd=farm, capture_output=True, text=True)
    for line in (result.stdout + result.stderr).splitlines():
        for farm_prefix, repo_prefix in sorted(prefixes.items(), key=lambda p: -len(p[0])):  # longest first
            if line.startswith(farm_prefix):
                line = repo_prefix + line[len(farm_prefix) :]
                break
        print(line)
    return result.returncode


if __name__ == "__main__":
    sys.exit(main())
