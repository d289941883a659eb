"""``qcompile build``: import a model and compile it into ``OUT/NAME.so`` + manifest."""
from __future__ import annotations

import argparse
from pathlib import Path

from qcompile.build import build
from qcompile.cli.common import Progress
from qcompile.errors import ConfigError
from qcompile.frontend import import_model
from qcompile.model import parse_input_shapes
from qcompile.quantize.config import CALIBRATION_METHODS
from qcompile.target import resolve_target


def add_model_options(p) -> None:
    """MODEL, --target, shapes, weights and quantization: shared by build and tune."""
    p.add_argument("model", help="torchvision model name (resnet18, mobilenet_v2, ...), .pt2 or .onnx file")
    p.add_argument("--target", default="native",
                   help="preset (see `qcompile targets`), 'native', JSON, or TVMC-style 'llvm -mcpu=...' (default: native)")
    p.add_argument("--input-shape", action="append", metavar="NAME:SHAPE",
                   help="fix an input's shape, e.g. input:1x3x224x224 (repeat per input)")
    p.add_argument("--weights", metavar="FILE", help="state_dict for a torchvision model (torch.load, weights_only)")
    p.add_argument("--quantize", choices=["none", "int8"], default="none",
                   help="int8: calibrate and build integer kernels (default: none)")
    q = p.add_argument_group("int8 quantization")
    q.add_argument("--calib-data", metavar="PATH",
                   help=".npz keyed by input name (samples first), .npy, or a folder of images")
    q.add_argument("--calib-samples", type=int, default=64, metavar="N", help="samples to calibrate on (default: 64)")
    q.add_argument("--calib-method", choices=CALIBRATION_METHODS, default="minmax", help="range estimate (default: minmax)")
    q.add_argument("--percentile", type=float, default=99.99, help="for --calib-method percentile (default: 99.99)")
    q.add_argument("--per-tensor", dest="per_channel", action="store_false",
                   help="one weight scale per layer (default: per output channel)")
    q.add_argument("--per-channel", dest="per_channel", action="store_true", help=argparse.SUPPRESS)
    q.add_argument("--symmetric", action="store_true",
                   help="int8 activations with zero point 0 (default: asymmetric uint8, as ONNX Runtime's U8S8)")
    q.add_argument("--asymmetric", dest="symmetric", action="store_false", help=argparse.SUPPRESS)
    q.add_argument("--reduce-range", dest="reduce_range", action="store_true", default=None,
                   help="7-bit weights, as ONNX Runtime's reduce_range (default: where the target needs it for "
                        "its fast int8 instruction: x86 without VNNI)")
    q.add_argument("--no-reduce-range", dest="reduce_range", action="store_false",
                   help="8-bit weights even where the fast instruction then cannot be used")
    q.add_argument("--keep-float", "--skip-layers", nargs="+", default=[], metavar="LAYER",
                   help="layers to leave in float: conv2d_N, matmul_N (see `qcompile info --layers`), "
                        "first, last, or a whole op kind (conv2d, matmul)")
    q.add_argument("--calib-mean", type=float, nargs=3, default=None, metavar=("R", "G", "B"),
                   help="image calibration: per-channel mean after scaling to [0,1] (default: ImageNet)")
    q.add_argument("--calib-std", type=float, nargs=3, default=None, metavar=("R", "G", "B"),
                   help="image calibration: per-channel std (default: ImageNet)")


def register(sub) -> None:
    p = sub.add_parser("build", help="compile a model into a shared library + manifest")
    add_model_options(p)
    p.add_argument("-o", "--output", default="out", metavar="DIR", help="output folder (default: out)")
    p.add_argument("--name", help="artifact name (default: the model's name)")
    p.add_argument("--dump-ir", metavar="DIR", help="write the IR after each pipeline phase into DIR")
    p.add_argument("--log-dir", metavar="DIR", help="tuning records root (default: the repository's tuning_logs/)")
    p.add_argument("--quiet", action="store_true", help="no progress messages")
    p.set_defaults(handler=run)


def run(args) -> int:
    progress = Progress(args.quiet)
    target = resolve_target(args.target)
    model, quantization, name = load_model(args, target, progress)
    artifact = build(
        model,
        target,
        Path(args.output),
        name=args.name or name,
        quantization=quantization,
        tuning_logs=Path(args.log_dir) if args.log_dir else None,
        dump_ir=Path(args.dump_ir) if args.dump_ir else None,
        progress=progress,
    )
    print(artifact.library)
    print(artifact.manifest_file)
    return 0


def load_model(args, target, progress):
    """Import ``args.model`` and quantize it as asked: (model, manifest quantization, default name)."""
    shapes = parse_input_shapes(args.input_shape)
    config = _quant_config(args)
    progress(f"importing {args.model} ...")
    model = import_model(args.model, shapes, weights=args.weights)
    if config is not None:
        from qcompile.quantize import quantize_model
        from qcompile.quantize.data import calibration_batches

        progress(f"calibrating on {args.calib_data} ({config.calibration_method}, up to {config.num_samples} samples) ...")
        batches = calibration_batches(args.calib_data, model.inputs, _preprocess(args))
        model, quantization = quantize_model(model, batches, config, target.to_tvm(), progress)
        return model, quantization, f"{model.source.name}-int8"
    from qcompile.quantize import has_qdq, realize_prequantized

    if has_qdq(model.mod):  # pre-quantized ONNX / PT2E: integer kernels, no calibration
        progress("model is pre-quantized (QDQ): realizing integer kernels ...")
        model, quantization = realize_prequantized(model, source=f"{model.source.kind}-qdq")
        if quantization["float_nodes"]:  # a QDQ pattern realize does not know: name it
            progress(f"warning: {len(quantization['float_nodes'])} conv2d/matmul stayed float (unsupported QDQ "
                     f"pattern): {', '.join(quantization['float_nodes'][:5])}")
        return model, quantization, model.source.name
    return model, None, model.source.name


def _quant_config(args):
    """The QuantConfig for --quantize int8, or None; quantization flags need --quantize int8."""
    if args.quantize == "none":
        if args.calib_data or args.keep_float:
            raise ConfigError("--calib-data/--keep-float apply with --quantize int8")
        return None
    if not args.calib_data:
        raise ConfigError("--quantize int8 needs --calib-data PATH (.npz, .npy or a folder of images)")
    from qcompile.quantize.config import QuantConfig

    return QuantConfig(
        calibration_method=args.calib_method,
        percentile=args.percentile,
        activation_symmetric=args.symmetric,
        per_channel=args.per_channel,
        num_samples=args.calib_samples,
        keep_float=tuple(args.keep_float),
        reduce_range=args.reduce_range,
    )


def _preprocess(args):
    from qcompile.quantize.data import ImagePreprocess

    default = ImagePreprocess()
    return ImagePreprocess(mean=tuple(args.calib_mean or default.mean), std=tuple(args.calib_std or default.std))
