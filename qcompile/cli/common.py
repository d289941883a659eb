"""Helpers shared by subcommands: model and quantization options, progress messages,
reading input files, RPC options.  Subcommand modules import this one, never each other."""
from __future__ import annotations

import argparse
import contextlib
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from qcompile.errors import ConfigError, RuntimeInputError
from qcompile.model import TensorInfo, read_arrays
from qcompile.quantize.config import CALIBRATION_METHODS


class Progress:
    """Prints ``[  12.3s] message`` lines to stderr (quiet with ``--quiet``)."""

    def __init__(self, quiet: bool = False) -> None:
        self.quiet = quiet
        self.start = time.perf_counter()

    def __call__(self, message: str) -> None:
        if not self.quiet:
            print(f"[{time.perf_counter() - self.start:7.1f}s] {message}", file=sys.stderr, flush=True)


def load_inputs(path: str | None, infos: list[TensorInfo]) -> dict[str, np.ndarray] | None:
    """Read ``--inputs``: an .npz keyed by input name (any key for one input) or an .npy."""
    if path is None:
        return None
    file = Path(path)
    if not file.is_file():
        raise RuntimeInputError(f"inputs file {path} does not exist")
    try:
        return read_arrays(file, [i.name for i in infos])
    except Exception as exc:  # np.load raises OSError, ValueError, BadZipFile ...
        raise RuntimeInputError(f"inputs file {path}: cannot read ({exc}); give an .npz keyed by input name or an .npy") from exc


def add_input_option(parser) -> None:
    parser.add_argument(
        "--inputs",
        metavar="FILE",
        help="input arrays: .npz keyed by input name (or .npy for one input); default: seeded random",
    )


def add_rpc_options(parser) -> None:
    """--rpc / --rpc-tracker / --rpc-key / --rpc-timeout: run on a device over TVM RPC."""
    g = parser.add_argument_group("remote device (TVM RPC)")
    g.add_argument("--rpc", metavar="HOST:PORT", help="run on the device whose RPC server listens here")
    g.add_argument("--rpc-tracker", metavar="HOST:PORT", help="ask this RPC tracker for a device ...")
    g.add_argument("--rpc-key", metavar="KEY", help="... registered under this key")
    g.add_argument("--rpc-timeout", type=float, default=60.0, metavar="S",
                   help="seconds to wait to connect or for a free device (default: 60)")


def rpc_endpoint(args):
    from qcompile.runtime.rpc import RpcEndpoint

    return RpcEndpoint.from_args(args.rpc, args.rpc_tracker, args.rpc_key, args.rpc_timeout)


# Int8Config parameter -> the flag that sets it (for error messages).
_FLAGS = {"calibration": "--calib-method", "percentile": "--percentile", "weights": "--per-tensor",
          "equalize": "--equalize", "bias_correction": "--bias-correction",
          "activation_symmetric": "--symmetric", "num_samples": "--calib-samples", "keep_float": "--keep-float",
          "reduce_range": "--reduce-range", "activations": "--per-row", "group_size": "--group-size"}


def add_model_options(p) -> None:
    """MODEL, --target, shapes, weights and quantization: shared by build and tune."""
    p.add_argument("model", help="torchvision model name (resnet18, mobilenet_v2, ...), .pt2 or .onnx file")
    p.add_argument("--target", default="native",
                   help="preset (see `qcompile targets`), 'native', JSON, or TVMC-style 'llvm -mcpu=...' (default: native)")
    p.add_argument("--input-shape", action="append", metavar="NAME:SHAPE",
                   help="fix an input's shape, e.g. input:1x3x224x224 (repeat per input)")
    p.add_argument("--weights", metavar="FILE", help="state_dict for a torchvision model (torch.load, weights_only)")
    p.add_argument("--trust-pt2", action="store_true",
                   help="load a .pt2 even if it holds pickled objects beyond tensors: torch unpickles them, which "
                        "can run code -- only for files from a source you trust")
    p.add_argument("--quantize", choices=["none", "int8", "int8-dynamic", "int4"], default="none",
                   help="int8: calibrate and build integer kernels; int8-dynamic: int8 weights, activations "
                        "quantized at run time, no calibration data (ONNX Runtime's quantize_dynamic); "
                        "int4: int4 weight-only dense layers, float activations (saves size, not time) "
                        "(default: none)")
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
    q.add_argument("--equalize", action=argparse.BooleanOptionalAction, default=None,
                   help="cross-layer equalization + high-bias absorption of conv pairs before calibrating "
                        "(default: on with --per-tensor, off for per-channel weights)")
    q.add_argument("--bias-correction", action=argparse.BooleanOptionalAction, default=None,
                   help="correct each layer's bias for the mean shift its int8 weights cause "
                        "(default: on with --per-tensor, off for per-channel weights)")
    q.add_argument("--keep-float", "--skip-layers", nargs="+", default=[], metavar="LAYER",
                   help="layers to leave in float: conv2d_N, matmul_N (see `qcompile info --layers`), "
                        "first, last, or a whole op kind (conv2d, matmul)")
    q.add_argument("--calib-mean", type=float, nargs=3, default=None, metavar=("R", "G", "B"),
                   help="image calibration: per-channel mean after scaling to [0,1] (default: ImageNet)")
    q.add_argument("--calib-std", type=float, nargs=3, default=None, metavar=("R", "G", "B"),
                   help="image calibration: per-channel std (default: ImageNet)")
    d = p.add_argument_group("int8-dynamic quantization (also: --per-tensor, --symmetric, --reduce-range, "
                             "--keep-float)")
    d.add_argument("--per-row", action="store_true",
                   help="one run-time activation scale per row of each matmul's input, e.g. per token "
                        "(default: per tensor)")
    i = p.add_argument_group("int4 weight-only quantization (also: --keep-float)")
    i.add_argument("--group-size", type=int, default=None, metavar="N",
                   help="input channels per weight scale, a power of two >= 8 (default: 32)")


def model_options(args) -> dict[str, Any]:
    """The keyword arguments of qcompile.compile/tune that ``add_model_options`` parsed."""
    from qcompile.model import parse_input_shapes

    if args.quantize == "none" and (args.calib_data or args.keep_float):
        raise ConfigError("--calib-data/--keep-float apply with --quantize int8")
    if args.quantize == "int8-dynamic" and (args.calib_data or args.calib_mean or args.calib_std):
        raise ConfigError("--calib-data: --quantize int8-dynamic quantizes activations at run time and takes "
                          "no calibration data (calibrate with --quantize int8)")
    if args.per_row and args.quantize != "int8-dynamic":
        raise ConfigError("--per-row applies with --quantize int8-dynamic")
    if args.group_size is not None and args.quantize != "int4":
        raise ConfigError("--group-size applies with --quantize int4")
    if args.quantize == "int4" and (args.calib_data or args.calib_mean or args.calib_std):
        raise ConfigError("--calib-data: --quantize int4 quantizes weights only and takes no calibration data")
    if args.quantize != "int8" and (args.equalize is not None or args.bias_correction is not None):
        raise ConfigError("--equalize/--bias-correction apply with --quantize int8")
    if args.quantize == "int8" and not args.calib_data:
        raise ConfigError("--quantize int8 needs --calib-data PATH (.npz, .npy or a folder of images)")
    options: dict[str, Any] = {"input_shapes": parse_input_shapes(args.input_shape), "weights": args.weights,
                               "trust_pt2": args.trust_pt2}
    if args.quantize == "int8":
        import qcompile

        options["quantization"] = qcompile.Int8Config(
            calibration=args.calib_method, percentile=args.percentile, activation_symmetric=args.symmetric,
            weights=qcompile.PerChannel() if args.per_channel else qcompile.PerTensor(),
            num_samples=args.calib_samples, keep_float=tuple(args.keep_float), reduce_range=args.reduce_range,
            equalize=args.equalize, bias_correction=args.bias_correction)
        options["calibration_data"] = args.calib_data
        if args.calib_mean or args.calib_std:
            default = qcompile.ImagePreprocess()
            options["preprocess"] = qcompile.ImagePreprocess(mean=tuple(args.calib_mean or default.mean),
                                                             std=tuple(args.calib_std or default.std))
    elif args.quantize == "int8-dynamic":
        import qcompile

        options["quantization"] = qcompile.DynamicInt8Config(
            weights=qcompile.PerChannel() if args.per_channel else qcompile.PerTensor(),
            activations=qcompile.PerRow() if args.per_row else qcompile.PerTensor(),
            activation_symmetric=args.symmetric, keep_float=tuple(args.keep_float), reduce_range=args.reduce_range)
    elif args.quantize == "int4":
        import qcompile

        group = {} if args.group_size is None else {"group_size": args.group_size}
        options["quantization"] = qcompile.Int4WeightConfig(keep_float=tuple(args.keep_float), **group)
    return options


@contextlib.contextmanager
def config_errors_as_flags() -> Iterator[None]:
    """Re-raise a config error that names an Int8Config parameter with the CLI flag for it."""
    try:
        yield
    except ConfigError as exc:
        parameter = getattr(exc, "parameter", None)
        if parameter in _FLAGS:
            raise ConfigError(f"{_FLAGS[parameter]}: {str(exc).split(': ', 1)[-1]}") from exc
        raise
