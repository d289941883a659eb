"""``qcompile`` entry point: parse, dispatch, map errors to exit codes."""
from __future__ import annotations

import argparse
import re
import sys
import traceback

from qcompile import __version__
from qcompile.cli import (
    bench,
    build,
    compare,
    debug,
    explain,
    info,
    report,
    rpc_service,
    run,
    targets,
    tune,
)
from qcompile.cli import eval as eval_cmd
from qcompile.errors import QcompileError, first_line

COMMANDS = [build, tune, run, bench, explain, eval_cmd, debug, report, compare, info, targets, rpc_service]

# TVMC-style target options ("-mcpu=cortex-a72") that follow an unquoted --target.
_TARGET_OPTION = re.compile(r"^-[a-z][a-z0-9_-]*(=.*)?$")
_OWN_SHORT_OPTIONS = {"-o", "-h", "-v"}
_DEBUG_HELP = "on an error, also print its Python traceback (and the error it came from)"


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
    parser.add_argument("--debug", action="store_true", help=_DEBUG_HELP)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for command in COMMANDS:
        command.register(sub)
    # Also accepted after the command (`qcompile build m.onnx --debug`); SUPPRESS keeps a
    # subcommand's default from overwriting a --debug given before the command.
    for subparser in sub.choices.values():
        subparser.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=_DEBUG_HELP)
    return parser


def _one_line(text: str) -> str:
    """Messages are printed on one line: a wrapped TVM message must not spill a dump."""
    return " ".join(part.strip() for part in text.splitlines() if part.strip())


def main(argv: list[str] | None = None) -> int:
    args = make_parser().parse_args(join_target_tokens(list(sys.argv[1:] if argv is None else argv)))
    debug = bool(getattr(args, "debug", False))
    try:
        return int(args.handler(args) or 0)
    except QcompileError as exc:
        if debug:
            traceback.print_exception(exc, file=sys.stderr)
        print(f"error: {_one_line(str(exc))}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt as exc:
        if debug:
            traceback.print_exception(exc, file=sys.stderr)
        # A stage that can say what survived (tuning: the records kept) puts it in the message.
        detail = _one_line(str(exc))
        print(f"error: interrupted{'; ' + detail if detail else ''}", file=sys.stderr)
        return 130
    except BrokenPipeError:  # output piped into `head`: stop quietly, like other CLI tools
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except Exception as exc:  # a bug in qcompile (or TVM), not a user error: no raw traceback
        if debug:
            raise
        # As a traceback's last line reads: the kind, then the message (a bare KeyError says little).
        text = first_line(exc)
        kind = type(exc).__name__
        text = text if text.startswith(kind) else f"{kind}: {text}"
        print(f"error: internal error: {text} (rerun with --debug for the traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
