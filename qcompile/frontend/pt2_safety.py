"""Which parts of a ``.pt2`` archive ``torch.export.load`` would unpickle with arbitrary code.

``torch.export.load`` reads the program as JSON and most weights as raw bytes, but it
unpickles some members with ``weights_only=False`` (pickled weights and tensor constants,
the sample inputs as a fallback) and custom or opaque objects with plain ``pickle``: an
untrusted file can run code there.  Every pickled member is first tried here with torch's
restricted unpickler (``weights_only=True``, tensors and containers only); what it refuses,
and members only plain pickle reads, are reported, and qcompile loads the file only when the
user says they trust it.
"""
from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path, PurePosixPath


def unsafe_members(path: Path) -> list[str]:
    """Archive members that loading ``path`` would unpickle beyond tensors; [] if none."""
    import torch

    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError):
        return []  # not a zip: torch.export.load unpickles nothing of it and reports the error
    with archive:
        names = archive.namelist()
        if not any(PurePosixPath(n).name == "archive_version" for n in names):
            return ["(an older .pt2 format that is unpickled whole)"]
        pickled = [n for n in names if "/data/sample_inputs/" in n or n.endswith(".pt")]
        unsafe = []
        for config_name in (n for n in names if n.endswith(("_weights_config.json", "_constants_config.json"))):
            folder = PurePosixPath(config_name).parent
            try:
                config = json.loads(archive.read(config_name)).get("config", {})
            except (ValueError, AttributeError):
                unsafe.append(config_name)
                continue
            for meta in config.values():
                member = str(folder / str(meta.get("path_name", "")))
                if meta.get("path_name", "").startswith(("custom_obj", "opaque_obj")):
                    unsafe.append(member)
                elif meta.get("use_pickle"):
                    pickled.append(member)
        for member in pickled:
            try:
                torch.load(io.BytesIO(archive.read(member)), weights_only=True)
            except Exception:  # noqa: BLE001 -- any refusal means the full unpickler would run code
                unsafe.append(member)
    return unsafe
