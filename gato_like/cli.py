"""The ``gato-like`` command line: one console script, one verb per job (see ``gato-like --help``)."""

from __future__ import annotations

import sys

from jsonargparse import ArgumentParser

from gato_like import __version__
from gato_like import demo as demo_module


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(
        prog="gato-like",
        description="A Gato-style generalist agent: tokenize episodes, train, evaluate and serve one "
        "transformer for many embodiments.",
        env_prefix="GATO_LIKE",
    )
    parser.add_argument("--version", action="version", version=f"gato-like {__version__}")
    commands = parser.add_subcommands(dest="command", required=True)
    demo_parser = ArgumentParser(description=demo_module.run.__doc__)
    demo_parser.add_function_arguments(demo_module.run)
    commands.add_subcommand("demo", demo_parser, help="the main job end to end on the embedded default")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    config = parser.parse_args(argv)
    if config.command == "demo":
        demo_module.run(**config.demo.as_dict())
    return 0


if __name__ == "__main__":
    sys.exit(main())
