"""int4 weight-only quantization (``--quantize int4`` / ``Int4WeightConfig``): dense-layer
weights as packed 4-bit integers with a float16 scale per group, float32 activations.

The kernel is checked against numpy's ``x @ dequantize(W)`` (the weight the kernel
multiplies by, from the packed bytes); a BERT-shaped encoder from ``transformers`` (random
weights, hidden 128, 2 layers, built in-process) for size and closeness to the float build.
"""
from __future__ import annotations

import json
import time

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

import qcompile
from qcompile.errors import ConfigError
from qcompile.quantize.int4 import (
    dequantize_int4,
    pack_int4,
    quantize_int4,
    unpack_int4,
)

TARGET = "native"
SEQ = 32


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def _ort(path, feeds) -> np.ndarray:
    import onnxruntime as ort

    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feeds)[0]


def _run(library, feeds) -> np.ndarray:
    return next(iter(qcompile.load(library).run(feeds).values()))


def _save(nodes, inputs, output, initializers, path) -> None:
    graph = helper.make_graph(nodes, "g", inputs, [output],
                              [numpy_helper.from_array(v, k) for k, v in initializers.items()])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))


# -- the config -----------------------------------------------------------------------------------

def test_config_validates_and_round_trips():
    config = qcompile.Int4WeightConfig(group_size=128, keep_float="last")
    assert config.keep_float == ("last",) and config.scheme == "int4-weight"
    assert qcompile.Int4WeightConfig.from_json(config.to_json()) == config
    for bad in (12, 4, 0, -32, 32.0, True, "32"):
        with pytest.raises(ConfigError, match="Int4WeightConfig.group_size: expected a power of two") as info:
            qcompile.Int4WeightConfig(group_size=bad)
        assert info.value.parameter == "group_size" and "\n" not in str(info.value)


def test_cli_bad_group_size_is_one_line(cli, tmp_path):
    path = tmp_path / "mm.onnx"
    _save([helper.make_node("MatMul", ["x", "w"], ["y"])],
          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 64])],
          helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 8]), {"w": np.ones((64, 8), np.float32)}, path)
    result = cli("build", path, "--quantize", "int4", "--group-size", "12", "-o", tmp_path)
    assert result.code == 2 and "--group-size: expected a power of two of at least 8" in result.err
    assert len(result.err.strip().splitlines()) == 1, result.err
    result = cli("build", path, "--group-size", "32", "-o", tmp_path)
    assert result.code == 2 and "--group-size applies with --quantize int4" in result.err
    assert not list(tmp_path.glob("*.so"))


# -- the packed weight and the kernel, exactly ----------------------------------------------------

def test_pack_unpack_is_exact_and_quantization_is_symmetric_per_group():
    rng = np.random.default_rng(0)
    q = rng.integers(-8, 8, (64, 24)).astype(np.int8)
    packed = pack_int4(q)
    assert packed.dtype == np.uint8 and packed.shape == (32, 24)
    np.testing.assert_array_equal(unpack_int4(packed), q)
    assert np.all((packed & 15) == (q[0::2] + 8)) and np.all((packed >> 4) == (q[1::2] + 8))

    w = (rng.standard_normal((64, 24)) * np.linspace(0.01, 2, 24)).astype(np.float32)
    w[:32, 3] = 0  # an all-zero group: scale 1, values 0
    wq, scale = quantize_int4(w, 32)
    assert scale.dtype == np.float16 and scale.shape == (2, 24) and scale[0, 3] == 1
    assert wq.min() >= -8 and wq.max() <= 7
    deq = dequantize_int4(pack_int4(wq), scale)
    step = np.repeat(scale.astype(np.float32), 32, axis=0)
    # half a step from the grid, but where float16 rounding of max|w| / 7 clips the largest value to 7
    assert np.all(np.abs(w - deq) <= np.maximum(step / 2, np.abs(w) - 7 * step) + 1e-7)


@pytest.mark.parametrize("op", ["matmul", "gemm"])
def test_int4_kernel_multiplies_by_the_dequantized_weight(tmp_path, op):
    """The compiled layer equals ``x @ dequantize_int4(packed, scales) + b`` computed in
    numpy from the constants the rewrite put in the model (float32 summation order aside)."""
    rng = np.random.default_rng(1)
    k, n = 128, 48
    w = rng.standard_normal((k, n)).astype(np.float32)
    b = rng.standard_normal(n).astype(np.float32)
    if op == "matmul":
        x = rng.standard_normal((2, 5, k)).astype(np.float32)
        nodes = [helper.make_node("MatMul", ["x", "w"], ["m"]), helper.make_node("Add", ["m", "b"], ["y"])]
        weights = {"w": w, "b": b}
    else:  # Gemm with a transposed weight, as torch exports nn.Linear
        x = rng.standard_normal((6, k)).astype(np.float32)
        nodes = [helper.make_node("Gemm", ["x", "w", "b"], ["y"], transB=1)]
        weights = {"w": np.ascontiguousarray(w.T), "b": b}
    path = tmp_path / f"{op}.onnx"
    _save(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x.shape))],
          helper.make_tensor_value_info("y", TensorProto.FLOAT, [*x.shape[:-1], n]), weights, path)
    prepared = qcompile.prepare(path, TARGET, quantization=qcompile.Int4WeightConfig(group_size=32))
    (layer,) = prepared.quantization.layers
    assert layer["shape"] == [k, n] and layer["group_size"] == 32
    packed, scale = _int4_constants(prepared.mod)[0]
    assert packed.shape == (k // 2, n) and scale.shape == (k // 32, n)
    np.testing.assert_array_equal(unpack_int4(packed), quantize_int4(w, 32)[0])
    ours = _run(qcompile.build(prepared, TARGET, tmp_path, tuning_logs=False).library, {"x": x})
    ref = x.astype(np.float64) @ dequantize_int4(packed, scale).astype(np.float64) + b
    np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())
    assert np.abs(ours - (x @ w + b)).max() > 1e-3  # and it is not the float layer


@pytest.mark.parametrize(("m", "k", "n", "lanes"),
                         [(10, 64, 48, 8), (7, 128, 36, 16), (1, 64, 48, 16), (16, 256, 32, 8), (6, 64, 40, None)])
def test_kernel_matches_numpy(m, k, n, lanes):
    """The CPU schedule (row tiles of up to 8, ``lanes``-wide output vectors) on shapes whose
    rows or channels the tile does not divide; ``lanes=None``: the unscheduled one-step-per-k
    form that GPU targets get."""
    import tvm

    from qcompile.quantize.int4 import int4_matmul_func, schedule_cpu

    rng = np.random.default_rng(m + n)
    x = rng.standard_normal((m, k)).astype(np.float32)
    q, scale = quantize_int4(rng.standard_normal((k, n)).astype(np.float32), 32)
    packed = pack_int4(q)
    func = int4_matmul_func(m, k, n, 32, per_byte=lanes is not None)
    lib = tvm.compile(tvm.IRModule({"main": schedule_cpu(func, lanes) if lanes else func}), target="llvm")
    out = tvm.runtime.tensor(np.zeros((m, n), np.float32))
    lib(*(tvm.runtime.tensor(a) for a in (x, packed, scale)), out)
    ref = x.astype(np.float64) @ dequantize_int4(packed, scale).astype(np.float64)
    np.testing.assert_allclose(out.numpy(), ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())


def test_cuda_build_compiles(tmp_path):
    """GPU targets get the one-step-per-k kernel, which TVM's GPU schedules (dlight) take;
    it runs where a GPU is, against numpy."""
    import shutil

    import tvm

    if shutil.which("nvcc") is None:
        pytest.skip("nvcc not installed: no CUDA build")
    rng = np.random.default_rng(4)
    w = rng.standard_normal((64, 32)).astype(np.float32)
    path = tmp_path / "mm.onnx"
    _save([helper.make_node("MatMul", ["x", "w"], ["y"])],
          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 64])],
          helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 32]), {"w": w}, path)
    artifact = qcompile.compile(path, "cuda-sm80", quantization=qcompile.Int4WeightConfig(), out_dir=tmp_path)
    assert artifact.manifest.quantization["scheme"] == "int4-weight"
    if not tvm.cuda(0).exist:
        return
    x = rng.standard_normal((4, 64)).astype(np.float32)
    q, scale = quantize_int4(w, 32)
    ref = x.astype(np.float64) @ dequantize_int4(pack_int4(q), scale).astype(np.float64)
    np.testing.assert_allclose(_run(artifact.library, {"x": x}), ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())


def test_layer_not_divisible_by_the_group_stays_float(cli, tmp_path):
    rng = np.random.default_rng(2)
    w0, w1 = rng.standard_normal((64, 48)).astype(np.float32), rng.standard_normal((48, 8)).astype(np.float32)
    path = tmp_path / "mlp.onnx"
    _save([helper.make_node("MatMul", ["x", "w0"], ["h"]), helper.make_node("MatMul", ["h", "w1"], ["y"])],
          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, 64])],
          helper.make_tensor_value_info("y", TensorProto.FLOAT, [3, 8]), {"w0": w0, "w1": w1}, path)
    quant = qcompile.prepare(path, TARGET, quantization=qcompile.Int4WeightConfig(group_size=32)).quantization
    assert [layer["name"] for layer in quant.layers] == ["matmul_0"]
    assert quant.left_float == ("matmul_1 [48, 8] stays float: K = 48 is not a multiple of group size 32",)
    assert quant.float_ops == {"relax.matmul": 1}
    result = cli("build", path, "--quantize", "int4", "-o", tmp_path, "--quiet")
    assert result.code == 0, result.err
    info = cli("info", tmp_path / "mlp-int4.so", "--layers")
    assert "matmul_0         float32 x int4 (group 32) -> float32" in info.out
    assert "matmul_1 [48, 8] stays float: K = 48 is not a multiple of group size 32" in info.out


def _int4_constants(mod) -> list[tuple[np.ndarray, np.ndarray]]:
    """(packed uint8, float16 scales) of each int4 kernel call in ``main``."""
    from qcompile.passes.bindings import Graph, const_value, op_name

    found = []
    for _, value in Graph.from_main(mod["main"]).bindings:
        if op_name(value) == "relax.call_tir" and "int4_matmul" in value.args[0].name_hint:
            constants = [c for c in (const_value(a) for a in value.args[1].fields) if c is not None]
            found.append((next(c for c in constants if c.dtype == np.uint8),
                          next(c for c in constants if c.dtype == np.float16)))
    return found


# -- a transformer encoder ------------------------------------------------------------------------

class _Encoder(torch.nn.Module):
    """A random-weight BertModel (hidden 128, 2 layers): its last hidden state."""

    def __init__(self) -> None:
        super().__init__()
        from transformers import BertConfig, BertModel

        torch.manual_seed(0)
        config = BertConfig(hidden_size=128, num_hidden_layers=2, num_attention_heads=4, intermediate_size=512,
                            vocab_size=1000, max_position_embeddings=64)
        self.bert = BertModel(config, add_pooling_layer=False).eval()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state


@pytest.fixture(scope="module")
def encoder(tmp_path_factory):
    """(float .onnx, feeds, float32 build's .so)."""
    root = tmp_path_factory.mktemp("int4")
    rng = np.random.default_rng(0)
    mask = np.ones((1, SEQ), np.int64)
    mask[0, -5:] = 0
    feeds = {"input_ids": rng.integers(0, 1000, (1, SEQ)).astype(np.int64), "attention_mask": mask}
    path = root / "encoder.onnx"
    torch.onnx.export(_Encoder(), tuple(torch.from_numpy(v) for v in feeds.values()), str(path),
                      input_names=list(feeds), output_names=["out"], opset_version=17, dynamo=False)
    fp32 = qcompile.compile(path, TARGET, out_dir=root, name="encoder-fp32", tuning_logs=False)
    return path, feeds, fp32.library


def _dense_float_bytes(model) -> int:
    """Bytes of the float32 model's dense-layer weights: the constant 2-D operands of its matmuls."""
    from qcompile.build.pipeline import phases_through, run_phases
    from qcompile.passes.bindings import Graph, const_value, op_name
    from qcompile.target import resolve_target

    mod = run_phases(model.mod, resolve_target(TARGET).to_tvm(), phases=phases_through("inference"))
    weights = [const_value(v.args[1]) for _, v in Graph.from_main(mod["main"]).bindings if op_name(v) == "relax.matmul"]
    return sum(w.nbytes for w in weights if w is not None and w.ndim == 2)


@pytest.mark.parametrize("group", [32, 128])
def test_encoder_int4_is_small_and_close_to_float(cli, encoder, tmp_path, group):
    path, feeds, fp32 = encoder
    result = cli("build", path, "--quantize", "int4", "--group-size", group, "-o", tmp_path, "--quiet")
    assert result.code == 0, result.err
    library = tmp_path / "encoder-int4.so"
    quant = json.loads((tmp_path / "encoder-int4.manifest.json").read_text())["quantization"]
    assert quant["scheme"] == "int4-weight" and quant["weight_dtype"] == "int4"
    assert quant["config"]["group_size"] == group and quant["activation_dtype"] == "float32"
    # the 12 dense layers with constant weights (Q/K/V, attention output, FFN x2, per layer);
    # attention's activation x activation matmuls stay float
    assert len(quant["layers"]) == 12 and quant["float_ops"] == {"relax.matmul": 4}

    # bytes: what the float model holds in its dense weights vs the int4 constants the model
    # now has (packed weights + scales), which the manifest's per-layer entries must match
    imported = qcompile.import_model(path)
    float_bytes = _dense_float_bytes(imported)
    prepared = qcompile.prepare(imported, TARGET, quantization=qcompile.Int4WeightConfig(group_size=group))
    constants = _int4_constants(_through_legalize(prepared.mod))
    int4_bytes = sum(p.nbytes + s.nbytes for p, s in constants)
    assert len(constants) == 12 and float_bytes == sum(layer["bytes"] for layer in quant["layers"])
    assert int4_bytes == sum(layer["quantized_bytes"] for layer in quant["layers"])
    ratio = int4_bytes / float_bytes
    assert ratio <= 0.2 and abs(ratio - (0.5 + 2 / group) / 4) < 1e-9  # 4 bits + a float16 scale per group

    ours, ref = _run(library, feeds), _run(fp32, feeds)
    cosine = _cosine(ours, ref)
    assert _cosine(ref, _ort(path, feeds)) >= 0.99999  # the float build is the float model
    lat = {name: _latency(lib, feeds) for name, lib in (("fp32", fp32), ("int4", library))}
    print(f"encoder int4 group {group}: dense weights {int4_bytes} / {float_bytes} bytes = {ratio:.4f}x float32; "
          f"output cosine vs float32 build {cosine:.6f}; library {library.stat().st_size} vs "
          f"{fp32.stat().st_size} bytes; latency int4 {lat['int4']:.2f} ms vs fp32 {lat['fp32']:.2f} ms")
    assert cosine >= 0.99

    info = cli("info", library, "--layers")
    assert info.code == 0, info.err
    assert f"quantization: int4-weight (float32 activations x int4 weights, group {group}, 12 int4 layers" in info.out
    assert f"matmul_0         float32 x int4 (group {group}) -> float32" in info.out


def _through_legalize(mod):
    """``mod`` through the build's phases up to fusion: the int4 constants must survive the
    build's constant folding (a dequantize outside the kernel would fold back to float32)."""
    from qcompile.build.pipeline import phases_through, run_phases
    from qcompile.passes.bindings import Graph, const_value, op_name
    from qcompile.target import resolve_target

    lowered = run_phases(mod, resolve_target(TARGET).to_tvm(), phases=phases_through("legalize"))
    for _, value in Graph.from_main(lowered["main"]).bindings:
        if op_name(value) == "relax.call_tir":  # no float32 [K, N] weight is left in any kernel's arguments
            weights = [const_value(a) for a in value.args[1].fields]
            assert not any(c is not None and c.dtype == np.float32 and c.ndim == 2 and c.size >= 128 * 128
                           for c in weights)
    return lowered


def _latency(library, feeds, runs: int = 20) -> float:
    """Median milliseconds of one run (a rough number, printed only: the machine is shared)."""
    model = qcompile.load(library)
    model.run(feeds)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        model.run(feeds)
        times.append(time.perf_counter() - start)
    return 1e3 * float(np.median(times))
