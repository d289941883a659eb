"""``qcompile build``: import a model and compile it into ``OUT/NAME.so`` + manifest."""
from __future__ import annotations

from pathlib import Path

from ..build import build
from ..frontend import import_model
from ..model import parse_input_shapes
from ..targets import resolve_target
from .common import Progress


def register(sub) -> None:
    p = sub.add_parser("build", help="compile a model into a shared library + manifest")
    p.add_argument("model", help="torchvision model name (resnet18, mobilenet_v2, ...), .pt2 or .onnx file")
    p.add_argument("--target", default="native",
                   help="preset (see `qcompile targets`), 'native', JSON, or TVMC-style 'llvm -mcpu=...' (default: native)")
    p.add_argument("--input-shape", action="append", metavar="NAME:SHAPE",
                   help="fix an input's shape, e.g. input:1x3x224x224 (repeat per input)")
    p.add_argument("--weights", metavar="FILE", help="state_dict for a torchvision model (torch.load, weights_only)")
    p.add_argument("--quantize", choices=["none"], default="none", help="quantization scheme (default: none)")
    p.add_argument("-o", "--output", default="out", metavar="DIR", help="output folder (default: out)")
    p.add_argument("--name", help="artifact name (default: the model's name)")
    p.add_argument("--dump-ir", metavar="DIR", help="write the IR after each pipeline phase into DIR")
    p.add_argument("--quiet", action="store_true", help="no progress messages")
    p.set_defaults(handler=run)


def run(args) -> int:
    progress = Progress(args.quiet)
    target = resolve_target(args.target)
    shapes = parse_input_shapes(args.input_shape)
    progress(f"importing {args.model} ...")
    model = import_model(args.model, shapes, weights=args.weights)
    artifact = build(
        model,
        target,
        Path(args.output),
        name=args.name,
        dump_ir=Path(args.dump_ir) if args.dump_ir else None,
        progress=progress,
    )
    print(artifact.library)
    print(artifact.manifest_file)
    return 0
