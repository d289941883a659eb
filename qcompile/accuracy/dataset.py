"""Evaluation data: labelled samples shaped like a model's inputs.

Two layouts, as users of torchvision and ONNX Runtime keep them:

* an ``.npz`` with one array per model input (samples first, under the input's name; a
  single-input model takes its one array under any name) and optionally ``labels`` (one
  integer class per sample);
* a folder of images: ImageFolder layout (``ROOT/CLASS/*.png``; classes numbered in sorted
  order, as torchvision's ``ImageFolder``) gives labels, a flat folder none.  Images are
  resized, centre-cropped and normalised like calibration images
  (:class:`qcompile.quantize.data.ImagePreprocess`).

``labels`` given separately (an ``.npy`` or a text file with one integer per line) override
those of the data.
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from qcompile.errors import CalibrationError, RuntimeInputError
from qcompile.model import TensorInfo
from qcompile.quantize.data import IMAGE_SUFFIXES, ImagePreprocess, load_image

Feeds = dict[str, np.ndarray]
DEFAULT_PREPROCESS = ImagePreprocess()


@dataclass(frozen=True)
class EvalData:
    """Model-shaped batches and, when known, each sample's class (``labels[i]`` for the
    ``i``-th sample, batches in order: a batch of ``B`` holds samples ``kB .. kB+B-1``)."""

    source: str
    count: int
    batches: Sequence[Feeds] | None
    labels: np.ndarray | None
    classes: tuple[str, ...] = ()
    files: tuple[Path, ...] = ()  # image files, loaded lazily by ``iter_batches``
    inputs: tuple[TensorInfo, ...] = ()
    preprocess: ImagePreprocess = DEFAULT_PREPROCESS

    def iter_batches(self) -> Iterator[Feeds]:
        if self.batches is not None:
            yield from self.batches
            return
        info = self.inputs[0]
        batch, _, height, width = info.shape
        for start in range(0, self.count * batch, batch):
            images = []
            for file in self.files[start:start + batch]:
                try:
                    images.append(load_image(file, height, width, self.preprocess))
                except CalibrationError as exc:
                    raise RuntimeInputError(f"eval image {file} cannot be read ({exc.__cause__ or exc})") from exc
            yield {info.name: np.stack(images).astype(info.dtype)}


def load_eval_data(path: str | Path, inputs: Sequence[TensorInfo], labels: str | Path | None = None,
                   preprocess: ImagePreprocess = DEFAULT_PREPROCESS, limit: int | None = None) -> EvalData:
    """The evaluation samples at ``path`` for a model with ``inputs`` (at most ``limit``)."""
    path = Path(path)
    if not path.exists():
        raise RuntimeInputError(f"eval data {path} does not exist; give an .npz (arrays under the input names, "
                                "optionally 'labels') or an image folder (ROOT/CLASS/*.png)")
    data = _images(path, inputs, preprocess) if path.is_dir() else _arrays(path, inputs)
    if labels is not None:
        data = _with_labels(data, _read_labels(Path(labels)), str(labels))
    if limit is not None and limit < data.count:
        batch = inputs[0].shape[0] if inputs[0].shape else 1
        data = EvalData(data.source, limit, None if data.batches is None else list(data.batches)[:limit],
                        None if data.labels is None else data.labels[:limit * batch], data.classes,
                        data.files[:limit * batch], data.inputs, data.preprocess)
    return data


def _arrays(path: Path, inputs: Sequence[TensorInfo]) -> EvalData:
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
    except Exception as exc:  # np.load raises OSError, ValueError, BadZipFile ...
        raise RuntimeInputError(f"eval data {path}: cannot read ({exc}); give an .npz keyed by input name "
                                "(and 'labels'), or an image folder") from exc
    labels = arrays.pop("labels", None)
    names = [i.name for i in inputs]
    if len(arrays) == 1 and len(names) == 1:
        arrays = {names[0]: next(iter(arrays.values()))}
    missing = [n for n in names if n not in arrays]
    if missing:
        raise RuntimeInputError(f"eval data {path} lacks model inputs {missing}; it holds {sorted(arrays)}")
    count = None
    for info in inputs:
        arr = arrays[info.name]
        if arr.ndim != len(info.shape) or tuple(arr.shape[1:]) != tuple(info.shape[1:]):
            raise RuntimeInputError(f"eval data {path}: {info.name!r} has shape {list(arr.shape)}; expected "
                                    f"[N, {', '.join(map(str, info.shape[1:]))}] (samples first) for model input "
                                    f"{list(info.shape)}")
        n = arr.shape[0] // (info.shape[0] if info.shape else 1)
        count = n if count is None else min(count, n)
    if not count:
        raise RuntimeInputError(f"eval data {path} holds no complete sample")
    batches = [{i.name: arrays[i.name][k * i.shape[0]:(k + 1) * i.shape[0]].astype(i.dtype, copy=False)
                for i in inputs} for k in range(count)]
    data = EvalData(str(path), count, batches, None, inputs=tuple(inputs))
    return data if labels is None else _with_labels(data, np.asarray(labels), f"{path}['labels']")


def _images(folder: Path, inputs: Sequence[TensorInfo], preprocess: ImagePreprocess) -> EvalData:
    if len(inputs) != 1 or len(inputs[0].shape) != 4 or inputs[0].shape[1] != 3:
        raise RuntimeInputError(f"eval images need a model with one NCHW RGB input; this one takes "
                                f"{[list(i.shape) for i in inputs]}: give an .npz instead")
    classes = tuple(sorted(d.name for d in folder.iterdir() if d.is_dir() and _has_images(d)))
    if classes:
        files, labels = [], []
        for index, name in enumerate(classes):
            members = sorted(p for p in (folder / name).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
            files += members
            labels += [index] * len(members)
        label_array: np.ndarray | None = np.asarray(labels, np.int64)
    else:
        files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        label_array = None
    if not files:
        raise RuntimeInputError(f"eval folder {folder} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
    batch = inputs[0].shape[0]
    count = len(files) // batch
    if not count:
        raise RuntimeInputError(f"eval folder {folder} holds {len(files)} images, fewer than one batch of {batch}")
    return EvalData(str(folder), count, None, None if label_array is None else label_array[:count * batch],
                    classes, tuple(files[:count * batch]), tuple(inputs), preprocess)


def _has_images(folder: Path) -> bool:
    return any(p.suffix.lower() in IMAGE_SUFFIXES for p in folder.rglob("*"))


def _read_labels(path: Path) -> np.ndarray:
    if not path.is_file():
        raise RuntimeInputError(f"labels {path} does not exist")
    try:
        if path.suffix == ".npy":
            return np.load(path, allow_pickle=False)
        return np.loadtxt(path, dtype=np.int64, ndmin=1)
    except Exception as exc:
        raise RuntimeInputError(f"labels {path}: cannot read ({exc}); give an .npy or one integer per line") from exc


def _with_labels(data: EvalData, labels: np.ndarray, where: str) -> EvalData:
    batch = data.inputs[0].shape[0] if data.inputs and data.inputs[0].shape else 1
    labels = np.asarray(labels).reshape(-1)
    if not np.issubdtype(labels.dtype, np.integer):
        raise RuntimeInputError(f"labels {where}: expected integer classes, got {labels.dtype}")
    if len(labels) < data.count * batch:
        raise RuntimeInputError(f"labels {where}: {len(labels)} labels for {data.count * batch} samples")
    return EvalData(data.source, data.count, data.batches, labels[:data.count * batch].astype(np.int64),
                    data.classes, data.files, data.inputs, data.preprocess)
