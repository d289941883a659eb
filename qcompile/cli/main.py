"""``qcompile`` entry point: parse, dispatch, map errors to exit codes."""
from __future__ import annotations

import argparse
import re
import sys

from qcompile import __version__
from qcompile.cli import bench, build, compare, info, rpc_service, run, targets, tune
from qcompile.errors import QcompileError

COMMANDS = [build, tune, run, bench, compare, info, targets, rpc_service]

# TVMC-style target options ("-mcpu=cortex-a72") that follow an unquoted --target.
_TARGET_OPTION = re.compile(r"^-[a-z][a-z0-9_-]*(=.*)?$")
_OWN_SHORT_OPTIONS = {"-o", "-h", "-v"}


def join_target_tokens(argv: list[str]) -> list[str]:
    """Let ``--target llvm -mcpu=cortex-a72`` work unquoted, as it did in TVMC."""
    out: list[str] = []
    i = 0
    while i < len(argv):
        tok = argv[i]
        out.append(tok)
        if tok == "--target" and i + 1 < len(argv):
            parts = [argv[i + 1]]
            i += 2
            while i < len(argv) and _TARGET_OPTION.match(argv[i]) and argv[i].split("=")[0] not in _OWN_SHORT_OPTIONS:
                parts.append(argv[i])
                i += 1
            out.append(" ".join(parts))
            continue
        i += 1
    return out


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="qcompile",
        description="Quantize, tune and compile deep-learning models with Apache TVM into shared libraries.",
    )
    parser.add_argument("--version", action="version", version=f"qcompile {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for command in COMMANDS:
        command.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = make_parser().parse_args(join_target_tokens(list(sys.argv[1:] if argv is None else argv)))
    try:
        return int(args.handler(args) or 0)
    except QcompileError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # output piped into `head`: stop quietly, like other CLI tools
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
