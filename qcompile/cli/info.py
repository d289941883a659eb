"""``qcompile info``: print an artifact's manifest."""
from __future__ import annotations

import json
from pathlib import Path

from qcompile.manifest import load_manifest, verify_library


def register(sub) -> None:
    p = sub.add_parser("info", help="show the manifest of a built .so")
    p.add_argument("library", help="built .so")
    p.add_argument("--json", action="store_true", help="print the manifest as JSON")
    p.add_argument("--layers", action="store_true", help="list each quantized layer's dtype and scales")
    p.set_defaults(handler=run)


def run(args) -> int:
    library = Path(args.library)
    manifest = load_manifest(library)
    verify_library(library, manifest)
    if args.json:
        print(json.dumps(manifest.to_json(), indent=2))
        return 0
    m = manifest.to_json()
    print(f"library:      {library} ({m['library']['bytes'] / 1e6:.2f} MB, sha256 {m['library']['sha256'][:16]}...)")
    print(f"model:        {m['model']['name']} ({m['model']['kind']}{', ' + m['model']['path'] if m['model']['path'] else ''})")
    print(f"target:       {m['target']['name']} -> {json.dumps(m['target']['target'])}")
    quant = m["quantization"]
    summary = quant.get("scheme", "none")
    if summary == "int4-weight":
        summary += (f" ({quant.get('activation_dtype')} activations x int4 weights, group "
                    f"{quant.get('config', {}).get('group_size')}, {len(quant.get('layers', []))} int4 layers, "
                    f"{len(quant.get('float_layers', []))} kept float)")
    elif summary != "none":
        summary += (f" ({quant.get('activation_dtype')} activations x {quant.get('weight_dtype')} weights, "
                    f"{len(quant.get('layers', []))} integer layers, {len(quant.get('float_layers', []))} kept float)")
    print(f"quantization: {summary}")
    for label, tensors in (("input", manifest.inputs), ("output", manifest.outputs)):
        for t in tensors:
            print(f"{label + ':':<13} {t.name} {list(t.shape)} {t.dtype}")
    print("versions:     " + ", ".join(f"{k} {v}" for k, v in m["versions"].items()))
    if args.layers:
        print_layers(m["quantization"])
    return 0


def print_layers(quantization: dict) -> None:
    """One line per layer: integer layers with scales, then what stayed float."""
    layers = quantization.get("layers", [])
    if not layers:
        print("layers:       all float (not quantized)")
        return
    if quantization.get("scheme") == "int4-weight":
        print(f"{'layer':<16} {'dtype':<40} {'weight K x N':<18} bytes (float32 -> int4 + scales)")
    else:
        print(f"{'layer':<16} {'dtype':<40} {'in scale/zp':<18} {'out scale/zp':<18}")
    for layer in layers:
        if "group_size" in layer:  # int4 weight-only: weight shape and bytes instead of activation scales
            shape = "x".join(str(d) for d in layer["shape"])
            print(f"{layer['name']:<16} {layer['dtype']:<40} {shape:<18} "
                  f"{layer['bytes']} -> {layer['quantized_bytes']} bytes")
            continue
        inp = f"{layer['input_scale']:.4g}/{layer['input_zero_point']}" if "input_scale" in layer else "-"
        out = f"{layer['output_scale']:.4g}/{layer['output_zero_point']}" if "output_scale" in layer else "float32"
        relu = " +relu" if layer.get("fused_relu") else ""
        print(f"{layer['name']:<16} {layer['dtype'] + relu:<40} {inp:<18} {out:<18}")
    for name in quantization.get("float_layers", []):
        print(f"{name:<16} float32 (kept float by --keep-float)")
    for note in quantization.get("left_float", []):  # int4: a dense layer that stayed float, and why
        print(note)
    for op, count in sorted(quantization.get("float_ops", {}).items()):
        print(f"{op:<16} float32 x{count} (left float: no int8 lowering, or float inputs)")
