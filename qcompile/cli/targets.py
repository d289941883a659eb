"""``qcompile targets``: list target presets and what 'native' means here."""
from __future__ import annotations

import json

from qcompile.target import list_presets, resolve_target


def register(sub) -> None:
    p = sub.add_parser("targets", help="list named target presets")
    p.add_argument("--json", action="store_true", help="print machine-readable JSON")
    p.set_defaults(handler=run)


def run(args) -> int:
    specs = [resolve_target("native")] + list_presets()
    if args.json:
        print(json.dumps([dict(s.to_json(), description=s.description) for s in specs], indent=2))
        return 0
    for spec in specs:
        print(f"{spec.name:<12} {spec.description}")
        print(f"{'':<12} {json.dumps(spec.target)}" + (f"  (cross: {spec.cross_compiler})" if spec.cross_compiler else ""))
    return 0
