"""The `brainmri` command. Stages run through DVC (`dvc repro`); this command
holds the tools around them."""

from __future__ import annotations

import argparse

from brainmri import __version__
from brainmri.params import load_params


def check(args: argparse.Namespace) -> int:
    params = load_params(args.params)
    print(f"{args.params}: valid (ingest.source={params.ingest.source}, train.model={params.train.model})")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="brainmri", description=__doc__)
    parser.add_argument("--version", action="version", version=f"brainmri {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    check_parser = commands.add_parser("check", help="validate params.yaml without running anything")
    check_parser.add_argument("params", nargs="?", default="params.yaml")
    check_parser.set_defaults(handler=check)
    args = parser.parse_args(argv)
    return args.handler(args)


if __name__ == "__main__":
    raise SystemExit(main())
