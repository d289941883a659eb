"""``qcompile eval`` / ``qcompile.evaluate``: accuracy on labelled data and agreement with a reference.

A CNN trained here on scikit-learn's real 8x8 digits is built in float32 and int8; ``eval``
must report the top-1 that running each library sample by sample gives, the float build's
as the reference's, and an int8 drop of at most 0.3 points.  An ImageFolder of PNGs gives
labels by sorted class name.  Bad data is a one-line error naming the file (exit 5).
"""
from __future__ import annotations

import json

import numpy as np
import pytest

import qcompile
from qcompile.accuracy import Agreement, TopK, cosine, sqnr_db


def _direct_top1(library, x, y) -> float:
    model = qcompile.load(library)
    name = model.outputs[0].name
    hits = sum(int(model.run({model.inputs[0].name: x[i:i + 1]})[name].argmax() == y[i]) for i in range(len(x)))
    return 100.0 * hits / len(x)


def test_eval_reports_top1_and_the_reference(cli, digits):
    fp32, int8, data, x, y = digits
    result = cli("eval", int8, "--data", data, "--reference", fp32, "--json")
    assert result.code == 0, result.err
    report = json.loads(result.out)
    assert report["n"] == len(y) == 500
    assert report["top1"] == pytest.approx(_direct_top1(int8, x, y), abs=1e-9)
    assert report["reference_top1"] == pytest.approx(_direct_top1(fp32, x, y), abs=1e-9)
    assert report["reference_top1"] >= 95.0, "the float model did not train"
    assert report["reference_top1"] - report["top1"] <= 0.3
    assert report["top5"] >= report["top1"]
    agreement = report["agreement"][qcompile.load(int8).outputs[0].name]
    assert agreement["sqnr_db"] > 15 and agreement["cosine_min"] > 0.9 and agreement["top1_agreement"] >= 98
    # the float build against itself agrees exactly: the metrics are not constants
    same = json.loads(cli("eval", fp32, "--data", data, "--reference", fp32, "--json", "--limit", "20").out)
    assert same["n"] == 20 and next(iter(same["agreement"].values()))["max_abs_diff"] == 0.0


def test_eval_text_output_and_source_reference(cli, digits):
    _, int8, data, _, _ = digits
    result = cli("eval", int8, "--data", data, "--reference", "source", "--limit", "50")
    assert result.code == 0, result.err
    assert "top-1" in result.out and "drop" in result.out and "SQNR" in result.out and "PyTorch" in result.out


def test_evaluate_image_folder_labels_by_sorted_class(tmp_path, tiny_pt2):
    from PIL import Image

    from qcompile.quantize.data import ImagePreprocess, load_image

    art = qcompile.compile(str(tiny_pt2), "native", out_dir=tmp_path / "out", name="tiny", tuning_logs=False)
    model = qcompile.load(art.library)
    rng = np.random.default_rng(0)
    root = tmp_path / "val"
    files = {}
    for cls in ("b_cat", "a_dog"):  # sorted: a_dog = 0, b_cat = 1
        (root / cls).mkdir(parents=True)
        for k in range(3):
            path = root / cls / f"{k}.png"
            Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(path)
            files[path] = 0 if cls == "a_dog" else 1
    result = qcompile.evaluate(art.library, root)
    hits = 0
    for path, label in sorted(files.items()):
        x = load_image(path, 32, 32, ImagePreprocess())[None].astype("float32")
        hits += int(model.run({model.inputs[0].name: x})[model.outputs[0].name].argmax() == label)
    assert result.n == 6 and result.top1 == pytest.approx(100.0 * hits / 6)


@pytest.mark.parametrize("case, needle", [
    ("missing", "does not exist"),
    ("shape", "expected [N, 1, 8, 8]"),
    ("labels", "labels"),
])
def test_eval_bad_data_is_one_line_naming_the_file(cli, digits, tmp_path, case, needle):
    _, int8, _, x, y = digits
    path = tmp_path / f"{case}.npz"
    if case == "shape":
        np.savez(path, x=x[:, :, :4], labels=y)
    elif case == "labels":
        np.savez(path, x=x, labels=y[:10])
    result = cli("eval", int8, "--data", path)
    assert result.code == 5, result.err
    lines = result.err.strip().splitlines()
    assert len(lines) == 1 and str(path) in lines[0] and needle in lines[0], result.err


def test_metrics_against_numpy():
    rng = np.random.default_rng(3)
    ref = rng.standard_normal((4, 10))
    out = ref + 0.01 * rng.standard_normal((4, 10))
    expected = 10 * np.log10(np.sum(ref ** 2) / np.sum((out - ref) ** 2))
    assert sqnr_db(out, ref) == pytest.approx(expected)
    assert cosine(out[0], ref[0]) == pytest.approx(out[0] @ ref[0] / np.linalg.norm(out[0]) / np.linalg.norm(ref[0]))
    agreement = Agreement()
    agreement.update(out, ref)
    assert agreement.to_json()["top1_agreement"] == pytest.approx(100.0 * np.mean(out.argmax(1) == ref.argmax(1)))
    topk = TopK()
    labels = np.array([ref[0].argmax(), np.argsort(-ref[1])[3], np.argsort(-ref[2])[7], ref[3].argmax()])
    topk.update(ref, labels)
    assert topk.result() == (50.0, 75.0)
