"""``qcompile build``: import a model and compile it into ``OUT/NAME.so`` + manifest."""
from __future__ import annotations

from qcompile.cli.common import (
    Progress,
    add_model_options,
    config_errors_as_flags,
    model_options,
)


def register(sub) -> None:
    p = sub.add_parser("build", help="compile a model into a shared library + manifest")
    add_model_options(p)
    p.add_argument("-o", "--output", default="out", metavar="DIR", help="output folder (default: out)")
    p.add_argument("--name", help="artifact name (default: the model's name, with -int8, -int8-dynamic or -int4 when quantized here)")
    p.add_argument("--dump-ir", metavar="DIR", help="write the IR after each pipeline phase into DIR")
    p.add_argument("--log-dir", metavar="DIR",
                   help="tuning records folder (default: $QCOMPILE_TUNING_LOGS or ~/.cache/qcompile/tuning_logs, "
                        "then the records shipped with qcompile)")
    p.add_argument("--quiet", action="store_true", help="no progress messages")
    p.set_defaults(handler=run)


def run(args) -> int:
    import qcompile

    with config_errors_as_flags():
        artifact = qcompile.compile(
            args.model, args.target, **model_options(args), out_dir=args.output, name=args.name,
            tuning_logs=args.log_dir, dump_ir=args.dump_ir, progress=Progress(args.quiet))
    print(artifact.library)
    print(artifact.manifest_file)
    return 0
