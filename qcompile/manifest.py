"""The JSON manifest written beside every built ``.so``.

It tells a loader everything it needs without TVM's compiler: inputs, outputs, dtypes,
target, quantization, versions and the library's sha256 (checked on load).
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qcompile.errors import ArtifactError
from qcompile.model import TensorInfo

FORMAT = "qcompile-manifest/1"


def manifest_path(library: Path) -> Path:
    """``out/resnet18.so`` -> ``out/resnet18.manifest.json``."""
    return library.with_name(library.stem + ".manifest.json")


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass(frozen=True)
class Manifest:
    """What was built, from what, for which target."""

    model: dict[str, Any]
    inputs: list[TensorInfo]
    outputs: list[TensorInfo]
    target: dict[str, Any]
    library: dict[str, Any]  # file, sha256, bytes
    quantization: dict[str, Any] = field(default_factory=lambda: {"scheme": "none"})
    cpu_features: list[str] = field(default_factory=list)
    versions: dict[str, str] = field(default_factory=dict)
    build: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "model": self.model,
            "inputs": [t.to_json() for t in self.inputs],
            "outputs": [t.to_json() for t in self.outputs],
            "target": self.target,
            "cpu_features": self.cpu_features,
            "quantization": self.quantization,
            "versions": self.versions,
            "library": self.library,
            "build": self.build,
        }

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> "Manifest":
        if obj.get("format") != FORMAT:
            raise ArtifactError(f"manifest format {obj.get('format')!r} is not {FORMAT!r}: rebuild the artifact")
        return cls(
            model=obj["model"],
            inputs=[TensorInfo.from_json(t) for t in obj["inputs"]],
            outputs=[TensorInfo.from_json(t) for t in obj["outputs"]],
            target=obj["target"],
            library=obj["library"],
            quantization=obj.get("quantization", {"scheme": "none"}),
            cpu_features=list(obj.get("cpu_features", [])),
            versions=obj.get("versions", {}),
            build=obj.get("build", {}),
        )

    def write(self, path: Path) -> None:
        path.write_text(json.dumps(self.to_json(), indent=2) + "\n")


def load_manifest(library: Path) -> Manifest:
    """Read the manifest beside ``library``; a clear error when missing or corrupt."""
    path = manifest_path(library)
    if not path.is_file():
        raise ArtifactError(f"{library}: no manifest {path.name} beside it; rebuild with `qcompile build`")
    try:
        obj = json.loads(path.read_text())
        return Manifest.from_json(obj)
    except ArtifactError:
        raise
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        raise ArtifactError(f"manifest {path} is corrupt ({exc}); rebuild with `qcompile build`") from exc


def verify_library(library: Path, manifest: Manifest) -> None:
    """Check the library's sha256 against the manifest."""
    if not library.is_file():
        raise ArtifactError(f"{library} does not exist")
    actual = sha256_file(library)
    if actual != manifest.library.get("sha256"):
        raise ArtifactError(
            f"{library}: sha256 {actual[:12]}... does not match its manifest "
            f"({str(manifest.library.get('sha256'))[:12]}...); the file was modified or replaced: rebuild it"
        )
