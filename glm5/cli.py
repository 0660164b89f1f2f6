"""The ``glm5`` command. Each subcommand lives next to the code it drives and registers itself through an
``add_parser(subparsers)`` function; this file only lists them, so importing the CLI stays cheap and a
subsystem's dependencies load only when its command runs."""

from __future__ import annotations

import argparse
import importlib
import os
import sys

# command -> module defining add_parser(subparsers)
COMMANDS = {
    "info": "glm5.info",
    "sample": "glm5.sample",
    "quantize": "glm5.checkpoint.quantize",
    "train": "glm5.train.cli",
    "sft": "glm5.train.cli",
    "generate": "glm5.engine.cli",
    "chat": "glm5.engine.cli",
    "serve": "glm5.serve.cli",
    "rl": "glm5.rl.cli",
    "eval": "glm5.eval.cli",
    "speedrun": "glm5.speedrun",
}


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The argument parser; with ``only``, just that command's module is imported (fast start-up, and a
    broken optional subsystem cannot break unrelated commands)."""
    parser = argparse.ArgumentParser(prog="glm5", description="GLM-5 from scratch: model, training, RL, inference, serving")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    modules = [COMMANDS[only]] if only in COMMANDS else list(dict.fromkeys(COMMANDS.values()))
    for module in modules:
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as e:
            if e.name and e.name.startswith("glm5"):
                continue  # subsystem not built yet
            raise
        if hasattr(mod, "add_parser"):
            mod.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser(argv[0] if argv else None)
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        result = args.func(args)
    except KeyboardInterrupt:
        print(f"glm5 {args.command}: interrupted", file=sys.stderr)
        return 130
    except (OSError, ValueError) as e:
        # Bad input met at the edge (a missing file, a malformed config or checkpoint, an invalid option) gets
        # one readable line, not a traceback; GLM5_DEBUG=1 re-raises for a full one.
        if os.environ.get("GLM5_DEBUG"):
            raise
        print(f"glm5 {args.command}: error: {e} ({type(e).__name__}; GLM5_DEBUG=1 shows the traceback)",
              file=sys.stderr)
        return 2
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
