"""The `defocus-clip` console script.

Each subcommand lives in its own module that defines `HELP`, `add_arguments(parser)` and `run(args) -> int`.
Those modules import heavy dependencies inside `run`, so `defocus-clip --help` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from .errors import DefocusError

# subcommand -> module holding its HELP / add_arguments / run
COMMANDS: dict[str, str] = {
    "info": "defocus_clip.commands.info",
    "prep": "defocus_clip.data.cli",
    "train": "defocus_clip.train.cli",
    "eval": "defocus_clip.evaluation.cli",
    "export": "defocus_clip.export.cli",
    "diagnose": "defocus_clip.diagnose.cli",
    "bench": "defocus_clip.bench.cli",
}


def setup_logging(verbose: bool = False) -> None:
    """Our loggers at INFO (DEBUG with -v); other libraries stay at WARNING so their chatter stays out of the way."""
    if not logging.getLogger().handlers:
        logging.basicConfig(
            level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S"
        )
    logging.getLogger("defocus_clip").setLevel(logging.DEBUG if verbose else logging.INFO)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="defocus-clip",
        description="CLIP pretraining with 1D causal De-focus Attention Network image towers.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, module_name in COMMANDS.items():
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as e:  # a subcommand whose module is not built yet
            if e.name and e.name.startswith("defocus_clip"):
                continue
            raise
        p = sub.add_parser(name, help=module.HELP, description=module.HELP)
        module.add_arguments(p)
        p.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    setup_logging(args.verbose)
    if not getattr(args, "_run", None):
        parser.print_help()
        return 2
    try:
        return int(args._run(args) or 0)
    except DefocusError as e:
        print(f"defocus-clip {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"defocus-clip {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
