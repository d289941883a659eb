"""The JSON manifest written beside every built ``.so``.

It tells a loader everything it needs without TVM's compiler: inputs, outputs, dtypes,
target, quantization, versions and the library's sha256 (checked on load).
"""
from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qcompile.errors import ArtifactError
from qcompile.model import TensorInfo

FORMAT_NAME = "qcompile-manifest"
FORMAT_VERSION = 1
FORMAT = f"{FORMAT_NAME}/{FORMAT_VERSION}"


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
    def from_json(cls, obj: dict[str, Any]) -> Manifest:
        check_format(obj.get("format"))
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


def check_format(value: Any) -> None:
    """Refuse a manifest this qcompile cannot read: not a qcompile manifest, or a newer format."""
    match = re.fullmatch(rf"{re.escape(FORMAT_NAME)}/(\d+)", str(value))
    if match is None:
        raise ArtifactError(f"manifest format {value!r} is not {FORMAT!r}: rebuild the artifact")
    version = int(match.group(1))
    if version > FORMAT_VERSION:
        raise ArtifactError(f"manifest written by a newer qcompile (format {version}, this one reads "
                            f"{FORMAT_VERSION}): upgrade qcompile or rebuild the artifact with this one")
    if version != FORMAT_VERSION:
        raise ArtifactError(f"manifest format {version} is older than this qcompile reads ({FORMAT_VERSION}): "
                            "rebuild the artifact")


def check_tvm_version(manifest: Manifest, library: Path) -> None:
    """Refuse an artifact built with another TVM: its library calls the runtime that built
    it, and TVM's runtime interfaces change between versions (a mismatch can crash)."""
    built = manifest.versions.get("tvm")
    if not built:
        return
    try:
        import tvm
    except ImportError:  # no TVM here: loading fails later, with its own message
        return
    if str(built) != tvm.__version__:
        raise ArtifactError(f"{library} was built with TVM {built}, this machine's TVM runtime is {tvm.__version__}: "
                            f"rebuild it with this TVM (`qcompile build`), or install TVM {built} to run it")


def load_manifest(library: Path, check_versions: bool = True) -> Manifest:
    """Read the manifest beside ``library``; a clear error when missing, corrupt, of a newer
    format or (``check_versions``) built with another TVM version than the installed one."""
    path = manifest_path(library)
    if not path.is_file():
        raise ArtifactError(f"{library}: no manifest {path.name} beside it; rebuild with `qcompile build`")
    try:
        obj = json.loads(path.read_text())
        manifest = Manifest.from_json(obj)
    except ArtifactError as exc:
        if str(exc).startswith("manifest "):  # name the file the message is about
            raise ArtifactError(f"{path}: {exc}") from exc
        raise
    except (json.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError) as exc:
        raise ArtifactError(f"manifest {path} is corrupt ({exc}); rebuild with `qcompile build`") from exc
    if check_versions:
        check_tvm_version(manifest, library)
    return manifest


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
