"""``qcompile info``: print an artifact's manifest."""
from __future__ import annotations

import json
from pathlib import Path

from ..manifest import load_manifest, verify_library


def register(sub) -> None:
    p = sub.add_parser("info", help="show the manifest of a built .so")
    p.add_argument("library", help="built .so")
    p.add_argument("--json", action="store_true", help="print the manifest as JSON")
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
    print(f"quantization: {m['quantization'].get('scheme', 'none')}")
    for label, tensors in (("input", manifest.inputs), ("output", manifest.outputs)):
        for t in tensors:
            print(f"{label + ':':<13} {t.name} {list(t.shape)} {t.dtype}")
    print("versions:     " + ", ".join(f"{k} {v}" for k, v in m["versions"].items()))
    return 0
