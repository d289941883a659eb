"""``qcompile eval``: accuracy of a built artifact on data, and its agreement with a reference."""
from __future__ import annotations

import json
import sys

from qcompile.cli.common import add_rpc_options, rpc_endpoint


def register(sub) -> None:
    p = sub.add_parser("eval", help="top-1/top-5 of a built .so on labelled data; agreement with a reference")
    p.add_argument("library", help="built .so (its manifest must lie beside it)")
    p.add_argument("--data", required=True, metavar="PATH",
                   help="an .npz (arrays under the input names, samples first, optionally 'labels') or an image "
                        "folder (ROOT/CLASS/*.png gives labels by sorted class name)")
    p.add_argument("--labels", metavar="FILE", help="labels overriding the data's: .npy or one integer per line")
    p.add_argument("--reference", metavar="FLOAT.so|MODEL.onnx|source",
                   help="compare outputs with another build, an ONNX file (ONNX Runtime), or 'source': the model "
                        "the library was built from, run by its framework")
    p.add_argument("--output", metavar="NAME", help="the output holding class scores (default: the first)")
    p.add_argument("--limit", type=int, metavar="N", help="evaluate the first N samples (batches) only")
    p.add_argument("--mean", type=float, nargs=3, default=None, metavar=("R", "G", "B"),
                   help="images: per-channel mean after scaling to [0,1] (default: ImageNet)")
    p.add_argument("--std", type=float, nargs=3, default=None, metavar=("R", "G", "B"),
                   help="images: per-channel std (default: ImageNet)")
    add_rpc_options(p)
    p.add_argument("--json", action="store_true", help="print machine-readable JSON")
    p.set_defaults(handler=run)


def run(args) -> int:
    import qcompile
    from qcompile.errors import ConfigError

    if args.limit is not None and args.limit < 1:
        raise ConfigError(f"--limit: expected a positive number of samples, but got {args.limit}")
    default = qcompile.ImagePreprocess()
    preprocess = qcompile.ImagePreprocess(mean=tuple(args.mean or default.mean), std=tuple(args.std or default.std))
    result = qcompile.evaluate(args.library, args.data, labels=args.labels, reference=args.reference,
                               output=args.output, limit=args.limit, preprocess=preprocess,
                               rpc=rpc_endpoint(args), progress=None if args.json else _progress_bar())
    report = result.to_json()
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(f"{args.library} on {report['data']}: {report['n']} samples")
    if result.top1 is not None:
        line = f"  top-1 {result.top1:.2f} %   top-5 {result.top5:.2f} %"
        if result.reference_top1 is not None:
            line += (f"   (reference: top-1 {result.reference_top1:.2f} %, top-5 {result.reference_top5:.2f} %; "
                     f"drop {result.reference_top1 - result.top1:+.2f} points)")
        print(line)
    if result.reference is not None:
        print(f"  agreement with {result.reference}:")
        for name, a in result.agreement.items():
            extra = f", top-1 agreement {a['top1_agreement']:.2f} %" if "top1_agreement" in a else ""
            print(f"    {name}: SQNR {a['sqnr_db']:.2f} dB, cosine min {a['cosine_min']:.5f} / mean "
                  f"{a['cosine_mean']:.5f}, max abs diff {a['max_abs_diff']:.3g}{extra}")
    return 0


def _progress_bar():
    """A one-line progress bar on stderr when it is a terminal (nothing in pipes and logs)."""
    if not sys.stderr.isatty():
        return None

    def show(done: int, total: int) -> None:
        width = 30
        filled = width * done // max(total, 1)
        sys.stderr.write(f"\reval [{'#' * filled}{'.' * (width - filled)}] {done}/{total}")
        if done == total:
            sys.stderr.write("\n")
        sys.stderr.flush()

    return show
