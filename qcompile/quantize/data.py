"""Calibration data: .npz/.npy arrays or a folder of images, streamed sample by sample."""
from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from qcompile.errors import CalibrationError
from qcompile.model import TensorInfo, read_arrays

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".webp"}


@dataclass(frozen=True)
class ImagePreprocess:
    """Resize (shorter side to size/crop_ratio), centre crop, scale to [0,1], normalise."""

    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)  # ImageNet, as torchvision
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    crop_ratio: float = 0.875


def calibration_batches(path: str | Path, inputs: list[TensorInfo],
                        preprocess: ImagePreprocess = ImagePreprocess()) -> Iterator[dict[str, np.ndarray]]:
    """Yield ``{input name: array}`` batches shaped like the model's inputs."""
    path = Path(path)
    if not path.exists():
        raise CalibrationError(f"calibration data {path} does not exist")
    if path.is_dir():
        return _image_batches(path, inputs, preprocess)
    return _array_batches(path, inputs)


def _array_batches(path: Path, inputs: list[TensorInfo]) -> Iterator[dict[str, np.ndarray]]:
    names = [i.name for i in inputs]
    try:
        arrays = read_arrays(path, names)
    except Exception as exc:  # np.load raises OSError, ValueError, BadZipFile ...
        raise CalibrationError(f"calibration data {path}: cannot read ({exc}); give an .npz keyed by input name, "
                               "an .npy, or a folder of images") from exc
    return array_batches(arrays, inputs, f"calibration data {path}")


def array_batches(arrays: Mapping[str, np.ndarray], inputs: list[TensorInfo],
                  where: str = "calibration data") -> Iterator[dict[str, np.ndarray]]:
    """Batches from in-memory arrays keyed by input name, samples first (a single-input
    model takes its one array under any key)."""
    names = [i.name for i in inputs]
    arrays = dict(arrays)
    if len(arrays) == 1 and len(names) == 1:
        arrays = {names[0]: next(iter(arrays.values()))}
    missing = [n for n in names if n not in arrays]
    if missing:
        raise CalibrationError(f"{where} lacks inputs {missing}; it has {sorted(arrays)}")
    count = None
    for info in inputs:
        arr = np.asarray(arrays[info.name])
        arrays[info.name] = arr
        batch = info.shape[0] if info.shape else 1
        if arr.ndim != len(info.shape) or tuple(arr.shape[1:]) != tuple(info.shape[1:]):
            raise CalibrationError(
                f"{where}: input {info.name!r} has shape {list(arr.shape)}; expected "
                f"[N, {', '.join(map(str, info.shape[1:]))}] (samples first) for model input {list(info.shape)}"
            )
        n = arr.shape[0] // batch
        count = n if count is None else min(count, n)
    if not count:
        raise CalibrationError(f"{where} is empty: it holds no complete sample")

    def gen():
        for i in range(count):
            yield {info.name: arrays[info.name][i * info.shape[0]:(i + 1) * info.shape[0]].astype(info.dtype, copy=False)
                   for info in inputs}

    return gen()


def as_batches(data, inputs: list[TensorInfo], preprocess: ImagePreprocess = ImagePreprocess()
               ) -> Iterable[dict[str, np.ndarray]]:
    """Calibration batches from what a user hands :func:`qcompile.quantize`: a path (.npz,
    .npy, a folder of images), an array (one input, samples first), a mapping of input name
    to such arrays, or an iterable of ``{input name: batch}`` dicts (used as it is)."""
    if isinstance(data, (str, Path)):
        return calibration_batches(data, inputs, preprocess)
    if isinstance(data, np.ndarray):
        return array_batches({"": data}, inputs)
    if isinstance(data, Mapping):
        return array_batches(data, inputs)
    if isinstance(data, Iterable):
        return data
    raise CalibrationError(f"calibration_data: expected a path, an array, a mapping of input name to arrays or an "
                           f"iterable of batches, but got {type(data).__name__}")


def _image_batches(folder: Path, inputs: list[TensorInfo], pre: ImagePreprocess) -> Iterator[dict[str, np.ndarray]]:
    if len(inputs) != 1 or len(inputs[0].shape) != 4 or inputs[0].shape[1] != 3:
        raise CalibrationError(f"calibration images need a model with one NCHW RGB input; this one takes "
                               f"{[list(i.shape) for i in inputs]}: give an .npz instead")
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise CalibrationError(f"calibration folder {folder} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
    info = inputs[0]
    batch, _, height, width = info.shape

    def gen():
        pending = []
        for file in files:
            pending.append(load_image(file, height, width, pre))
            if len(pending) == batch:
                yield {info.name: np.stack(pending).astype(info.dtype)}
                pending = []

    return gen()


def load_image(file: Path, height: int, width: int, pre: ImagePreprocess) -> np.ndarray:
    """One image file as a CHW float32 array: resized, centre-cropped, normalised."""
    from PIL import Image

    try:
        img = Image.open(file).convert("RGB")
    except Exception as exc:
        raise CalibrationError(f"calibration image {file} cannot be read: {exc}") from exc
    scale = max(height, width) / pre.crop_ratio / min(img.size)
    img = img.resize((max(width, round(img.size[0] * scale)), max(height, round(img.size[1] * scale))),
                     Image.BILINEAR)
    left, top = (img.size[0] - width) // 2, (img.size[1] - height) // 2
    img = img.crop((left, top, left + width, top + height))
    arr = np.asarray(img, dtype=np.float32) / 255.0
    arr = (arr - np.array(pre.mean, np.float32)) / np.array(pre.std, np.float32)
    return arr.transpose(2, 0, 1)
