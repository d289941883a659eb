"""The default CPU schedules of kernels that are neither convs nor qcompile's own kernels:
reductions (LayerNorm, Softmax, a tensor's range), matmuls between activations, and a
layout change whose last axis is too short for a vector.

Each case fuses a small Relax function into its kernels, schedules them with the rule under
test and checks that the rule took the kernel (its blocks and loops are the schedule's) and
that the scheduled kernel computes what TVM's unscheduled one does.
"""
from __future__ import annotations

import numpy as np
import tvm
import tvm_ffi
from conftest import run_relax
from tvm import relax, s_tir
from tvm.s_tir import dlight as dl
from tvm.script import ir as I
from tvm.script import relax as R

from qcompile.build.schedules import ConvMatmulCPU, InjectiveCPU, ReductionCPU

TARGET = tvm.target.Target("llvm")


def fused(mod: tvm.IRModule) -> tvm.IRModule:
    return tvm.transform.Sequential([relax.transform.LegalizeOps(), relax.transform.AnnotateTIROpPattern(),
                                     relax.transform.FuseOps(), relax.transform.FuseTIR()])(mod)


def schedule(mod: tvm.IRModule, rule: dl.ScheduleRule) -> tvm.IRModule:
    with TARGET:
        return dl.ApplyDefaultSchedule(rule)(mod)


def kernels(mod: tvm.IRModule) -> list[tvm.tirx.PrimFunc]:
    return [f for f in mod.functions.values() if isinstance(f, tvm.tirx.PrimFunc)]


LOOP_KINDS = {0: "serial", 1: "parallel", 2: "vectorized", 3: "unrolled"}


def structure(kernel: tvm.tirx.PrimFunc) -> tuple[list[str], set[str]]:
    """(block names, the kinds of loop) of a kernel."""
    blocks: list[str] = []
    loops: set[str] = set()

    def visit(node) -> None:
        if isinstance(node, s_tir.SBlock) and node.name_hint != "root":
            blocks.append(node.name_hint)
        elif isinstance(node, tvm.tirx.For):
            loops.add(LOOP_KINDS.get(int(node.kind), "other"))

    tvm_ffi.structural_walk(kernel.body, visit)
    return blocks, loops


def scheduled_matmul(model: tvm.IRModule):
    """(fused module, the same scheduled by ConvMatmulCPU, its matmul kernel, checked scheduled)."""
    mod = fused(model)
    scheduled = schedule(mod, ConvMatmulCPU())
    (kernel,) = [f for f in kernels(scheduled) if "matmul" in str(f)]
    assert kernel.attrs["tirx.is_scheduled"]
    return mod, scheduled, kernel


def run(mod: tvm.IRModule, *args: np.ndarray) -> np.ndarray:
    return run_relax(mod, *args, target=TARGET)


def test_layer_norm_rows_over_cores_sums_in_vectors():
    @I.ir_module
    class Model:
        @R.function
        def main(x: R.Tensor((1, 128, 384), "float32"), g: R.Tensor((384,), "float32"),
                 b: R.Tensor((384,), "float32")) -> R.Tensor((1, 128, 384), "float32"):
            with R.dataflow():
                gv = R.nn.layer_norm(x, g, b, axes=[-1], epsilon=1e-12)
                R.output(gv)
            return gv

    mod = fused(Model)
    scheduled = schedule(mod, ReductionCPU())
    (kernel,) = kernels(scheduled)
    assert kernel.attrs["tirx.is_scheduled"]
    blocks, loops = structure(kernel)
    # each of the two sums as 16 partial sums in a vector, then added up per row
    assert sum(name.endswith("_rf_update") for name in blocks) == 2
    assert {"parallel", "vectorized"} <= loops
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((1, 128, 384)) * 3 + 1).astype("float32")
    g, b = (rng.standard_normal(384).astype("float32") for _ in range(2))
    np.testing.assert_allclose(run(scheduled, x, g, b), run(mod, x, g, b), rtol=1e-5, atol=1e-5)


def test_attention_softmax_with_nan_mask_is_scheduled():
    """Softmax as an exported attention computes it (NaN rows set to zero): the boolean
    isnan mask is inlined, the rest scheduled by rows."""
    @I.ir_module
    class Model:
        @R.function
        def main(x: R.Tensor((1, 4, 64, 64), "float32")) -> R.Tensor((1, 4, 64, 64), "float32"):
            with R.dataflow():
                lv = R.nn.softmax(x, axis=-1)
                gv = R.where(R.isnan(lv), R.const(0.0, "float32"), lv)
                R.output(gv)
            return gv

    mod = fused(Model)
    scheduled = schedule(mod, ReductionCPU())
    (kernel,) = kernels(scheduled)
    assert kernel.attrs["tirx.is_scheduled"]
    blocks, loops = structure(kernel)
    assert {"parallel", "vectorized"} <= loops and "compute" not in blocks
    x = np.random.default_rng(1).standard_normal((1, 4, 64, 64)).astype("float32") * 4
    np.testing.assert_allclose(run(scheduled, x), run(mod, x), rtol=1e-6, atol=1e-7)


def test_range_of_a_tensor_is_reduced_in_parallel_parts():
    """min and max of a whole activation (dynamic quantization's range): contiguous parts
    over the cores, vectors within each part, one exact result."""
    @I.ir_module
    class Model:
        @R.function
        def main(x: R.Tensor((1, 128, 1536), "float32")) -> R.Tensor((), "float32"):
            with R.dataflow():
                gv = R.min(x)
                R.output(gv)
            return gv

    mod = fused(Model)
    scheduled = schedule(mod, ReductionCPU())
    (kernel,) = kernels(scheduled)
    blocks, loops = structure(kernel)
    assert kernel.attrs["tirx.is_scheduled"] and {"parallel", "vectorized"} <= loops
    assert any(name.endswith("_rf_update") for name in blocks)
    x = np.random.default_rng(2).standard_normal((1, 128, 1536)).astype("float32")
    x[0, 77, 1000] = -50.0
    assert run(scheduled, x) == run(mod, x) == np.float32(-50.0)


def test_reduction_over_a_middle_axis_is_correct():
    @I.ir_module
    class Model:
        @R.function
        def main(x: R.Tensor((8, 32, 16), "float32")) -> R.Tensor((8, 16), "float32"):
            with R.dataflow():
                gv = R.sum(x, axis=[1])
                R.output(gv)
            return gv

    mod = fused(Model)
    scheduled = schedule(mod, ReductionCPU())
    x = np.random.default_rng(4).standard_normal((8, 32, 16)).astype("float32")
    np.testing.assert_allclose(run(scheduled, x), x.sum(axis=1), rtol=1e-5, atol=1e-5)


def test_masked_attention_matmul_gets_a_register_tile():
    """Q @ K^T with the attention mask added in the epilogue (the mask's own elementwise
    producers inlined so that the epilogue runs per tile), batched over heads."""
    @I.ir_module
    class Model:
        @R.function
        def main(q: R.Tensor((1, 4, 64, 32), "float32"), k: R.Tensor((1, 4, 32, 64), "float32"),
                 mask: R.Tensor((1, 1, 1, 64), "bool")) -> R.Tensor((1, 4, 64, 64), "float32"):
            with R.dataflow():
                lv = R.matmul(q, k)
                lv1 = R.where(mask, R.const(0.0, "float32"), R.const(-10000.0, "float32"))
                gv = R.add(lv, lv1)
                R.output(gv)
            return gv

    mod, scheduled, kernel = scheduled_matmul(Model)
    _, loops = structure(kernel)
    assert {"parallel", "unrolled", "vectorized"} <= loops
    rng = np.random.default_rng(3)
    q, k = rng.standard_normal((1, 4, 64, 32)).astype("float32"), rng.standard_normal((1, 4, 32, 64)).astype("float32")
    mask = rng.integers(0, 2, (1, 1, 1, 64)).astype(bool)
    np.testing.assert_allclose(run(scheduled, q, k, mask), run(mod, q, k, mask), rtol=1e-5, atol=1e-5)


def test_global_mean_of_channels_last_then_requantize_is_exact():
    """A global average pool over NHWC followed by a quantize to uint8: the reduction runs
    over H and W with a vector of contiguous channels per step (blocks of channels over the
    cores, the quantize under each block), and gives the same integers as TVM's kernel."""
    @I.ir_module
    class Model:
        @R.function
        def main(x: R.Tensor((4, 7, 7, 512), "float32")) -> R.Tensor((4, 1, 1, 512), "uint8"):
            with R.dataflow():
                lv = R.mean(x, axis=[1, 2], keepdims=True)
                gv = R.quantize(lv, R.const(0.1, "float32"), R.const(3, "int32"), axis=-1, out_dtype="uint8")
                R.output(gv)
            return gv

    mod = fused(Model)
    scheduled = schedule(mod, ReductionCPU())
    (kernel,) = kernels(scheduled)
    assert kernel.attrs["tirx.is_scheduled"]
    _, loops = structure(kernel)
    assert {"parallel", "vectorized"} <= loops
    x = (np.random.default_rng(5).random((4, 7, 7, 512)) * 20).astype("float32")
    expected = run(mod, x)
    assert len(np.unique(expected)) > 20  # the outputs differ by channel: a real check
    np.testing.assert_array_equal(run(scheduled, x), expected)


def test_image_to_channels_last_vectorizes_along_width():
    """The input quantize NCHW -> NHWC of a 3-channel image: the 3 channels are too few for a
    vector, so the vectors run along the width (contiguous in the input)."""
    @I.ir_module
    class Model:
        @R.function
        def main(x: R.Tensor((1, 3, 32, 48), "float32")) -> R.Tensor((1, 32, 48, 3), "uint8"):
            with R.dataflow():
                lv = R.quantize(x, R.const(0.02, "float32"), R.const(128, "int32"), axis=-1, out_dtype="uint8")
                gv = R.permute_dims(lv, axes=[0, 2, 3, 1])
                R.output(gv)
            return gv

    mod = fused(Model)
    scheduled = schedule(mod, InjectiveCPU())
    (kernel,) = kernels(scheduled)
    _, loops = structure(kernel)
    assert kernel.attrs["tirx.is_scheduled"] and "vectorized" in loops
    x = np.random.default_rng(6).standard_normal((1, 3, 32, 48)).astype("float32")
    np.testing.assert_array_equal(run(scheduled, x), run(mod, x))


def test_one_row_matmul_splits_its_columns_over_the_cores():
    """A classifier on one image (x[1, K] @ W[K, N] + bias): the output columns in chunks of
    vectors over the cores (a row tile would leave one row, one core and one FMA chain per
    vector), the bias added per chunk."""
    @I.ir_module
    class Model:
        @R.function
        def main(x: R.Tensor((1, 256), "float32"), w: R.Tensor((256, 1000), "float32"),
                 b: R.Tensor((1000,), "float32")) -> R.Tensor((1, 1000), "float32"):
            with R.dataflow():
                gv = R.add(R.matmul(x, w), b)
                R.output(gv)
            return gv

    mod, scheduled, kernel = scheduled_matmul(Model)
    parallel: list[int] = []

    def visit(node) -> None:
        if isinstance(node, tvm.tirx.For) and int(node.kind) == 1:
            parallel.append(int(node.extent))

    tvm_ffi.structural_walk(kernel.body, visit)
    assert parallel == [25]  # 1000 columns: 25 chunks of 5 vectors of 8
    rng = np.random.default_rng(4)
    x, w = rng.standard_normal((1, 256)).astype("float32"), rng.standard_normal((256, 1000)).astype("float32")
    b = rng.standard_normal(1000).astype("float32")
    np.testing.assert_allclose(run(scheduled, x, w, b), run(mod, x, w, b), rtol=1e-4, atol=1e-4)
