"""What a built library holds: int8 libraries a fraction of the float32 one's size.

The passes that keep it small (qcompile.build.compact, the injective schedule, the kernels
built without per-argument checks) each have a Before/Expected or same-result test here; a
small CNN over 1 M parameters is built float32 and int8 and its int8 library must be at
most 0.3x the float32 one, hold no float copy of a quantized weight and no kernel twice.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
import tvm
import tvm_ffi
from tvm import relax, s_tir
from tvm.s_tir import dlight as dl
from tvm.script import ir as I
from tvm.script import relax as R
from tvm.script import tirx as T

import qcompile
from qcompile.build.compact import cancel_transpose_pairs, fold_scalar_arguments
from qcompile.build.pipeline import default_schedule_passes, run_phases, with_tuning
from qcompile.build.schedules import InjectiveCPU
from qcompile.target import resolve_target

SCALE = np.array([0.05], "float32")
ZERO = np.array([3], "int32")


def bind(mod: tvm.IRModule, **params: np.ndarray) -> tvm.IRModule:
    """``mod`` with the named parameters of ``main`` replaced by constants."""
    return relax.transform.BindParams("main", {k: tvm.runtime.tensor(v) for k, v in params.items()})(mod)


def run(mod: tvm.IRModule, *args: np.ndarray) -> np.ndarray:
    vm = relax.VirtualMachine(tvm.compile(mod, "llvm"), tvm.cpu())
    return vm["main"](*[tvm.runtime.tensor(a) for a in args]).numpy()


# -- CancelTransposePairs ----------------------------------------------------------------------------

def test_transposes_around_a_quantize_cancel():
    @I.ir_module
    class Before:
        @R.function
        def main(x: R.Tensor((1, 4, 4, 8), "float32"), s: R.Tensor((1,), "float32"),
                 z: R.Tensor((1,), "int32")) -> R.Tensor((1, 4, 4, 8), "uint8"):
            with R.dataflow():
                lv = R.permute_dims(x, axes=[0, 3, 1, 2])
                lv1 = R.quantize(lv, s, z, axis=-1, out_dtype="uint8")
                gv = R.permute_dims(lv1, axes=[0, 2, 3, 1])
                R.output(gv)
            return gv

    @I.ir_module
    class Expected:
        @R.function
        def main(x: R.Tensor((1, 4, 4, 8), "float32"), s: R.Tensor((1,), "float32"),
                 z: R.Tensor((1,), "int32")) -> R.Tensor((1, 4, 4, 8), "uint8"):
            with R.dataflow():
                gv = R.quantize(x, s, z, axis=2, out_dtype="uint8")
                R.output(gv)
            return gv

    # axis -1 of the NCHW view is the width, axis 2 of the NHWC tensor (one scale: either reads it)
    after = cancel_transpose_pairs(bind(Before, s=SCALE, z=ZERO))
    tvm.ir.assert_structural_equal(after, bind(Expected, s=SCALE, z=ZERO))
    x = np.random.default_rng(0).standard_normal((1, 4, 4, 8)).astype("float32")
    np.testing.assert_array_equal(run(after, x), run(bind(Before, s=SCALE, z=ZERO), x))


def test_per_channel_dequantize_keeps_its_channel_and_one_transpose():
    """The channel axis moves with the tensor; transposes that do not undo each other leave one."""
    @I.ir_module
    class Before:
        @R.function
        def main(x: R.Tensor((1, 4, 4, 8), "int8"), s: R.Tensor((8,), "float32"),
                 z: R.Tensor((8,), "int8")) -> R.Tensor((4, 8, 4, 1), "float32"):
            with R.dataflow():
                lv = R.permute_dims(x, axes=[0, 3, 1, 2])
                lv1 = R.dequantize(lv, s, z, axis=1, out_dtype="float32")
                gv = R.permute_dims(lv1, axes=[2, 1, 3, 0])
                R.output(gv)
            return gv

    @I.ir_module
    class Expected:
        @R.function
        def main(x: R.Tensor((1, 4, 4, 8), "int8"), s: R.Tensor((8,), "float32"),
                 z: R.Tensor((8,), "int8")) -> R.Tensor((4, 8, 4, 1), "float32"):
            with R.dataflow():
                gv_q = R.dequantize(x, s, z, axis=3, out_dtype="float32")
                gv = R.permute_dims(gv_q, axes=[1, 3, 2, 0])
                R.output(gv)
            return gv

    rng = np.random.default_rng(1)
    scale, zero = rng.uniform(0.01, 0.1, 8).astype("float32"), rng.integers(-5, 5, 8).astype("int8")
    after = cancel_transpose_pairs(bind(Before, s=scale, z=zero))
    tvm.ir.assert_structural_equal(after, bind(Expected, s=scale, z=zero))
    x = rng.integers(-128, 128, (1, 4, 4, 8)).astype("int8")
    np.testing.assert_array_equal(run(after, x), run(bind(Before, s=scale, z=zero), x))


def test_quantize_read_twice_keeps_its_transposes():
    @I.ir_module
    class Before:
        @R.function
        def main(x: R.Tensor((1, 4, 4, 8), "float32"), s: R.Tensor((1,), "float32"), z: R.Tensor((1,), "int32")):
            with R.dataflow():
                lv = R.permute_dims(x, axes=[0, 3, 1, 2])
                lv1 = R.quantize(lv, s, z, axis=-1, out_dtype="uint8")
                lv2 = R.permute_dims(lv1, axes=[0, 2, 3, 1])
                gv = (lv1, lv2)
                R.output(gv)
            return gv

    before = bind(Before, s=SCALE, z=ZERO)
    tvm.ir.assert_structural_equal(cancel_transpose_pairs(before), before)


# -- FoldScalarArguments ---------------------------------------------------------------------------

@I.ir_module
class _TwoCalls:
    @T.prim_func(private=True, s_tir=True)
    def requant(x: T.Buffer((8,), "float32"), lo: T.Buffer((1,), "float32"), hi: T.Buffer((1,), "float32"),
                out: T.Buffer((8,), "float32")):
        for i in range(8):
            with T.sblock("clip"):
                vi = T.axis.spatial(8, i)
                T.reads(x[vi], lo[0], hi[0])
                T.writes(out[vi])
                out[vi] = T.min(T.max(x[vi], lo[0]), hi[0])

    @R.function
    def main(x: R.Tensor((8,), "float32"), lo: R.Tensor((1,), "float32"), hi: R.Tensor((1,), "float32"),
             hi2: R.Tensor((1,), "float32")) -> R.Tensor((8,), "float32"):
        cls = _TwoCalls
        with R.dataflow():
            lv = R.call_tir(cls.requant, (x, lo, hi), out_ty=R.Tensor((8,), "float32"))
            gv = R.call_tir(cls.requant, (lv, lo, hi2), out_ty=R.Tensor((8,), "float32"))
            R.output(gv)
        return gv


def test_scalar_constant_every_call_passes_becomes_an_immediate():
    """``lo`` is the same constant at both calls: an immediate; ``hi`` differs: an argument."""
    @I.ir_module
    class Expected:
        @T.prim_func(private=True, s_tir=True)
        def requant(x: T.Buffer((8,), "float32"), hi: T.Buffer((1,), "float32"), out: T.Buffer((8,), "float32")):
            for i in range(8):
                with T.sblock("clip"):
                    vi = T.axis.spatial(8, i)
                    T.reads(x[vi], hi[0])
                    T.writes(out[vi])
                    out[vi] = T.min(T.max(x[vi], T.float32(-1.5)), hi[0])

        @R.function
        def main(x: R.Tensor((8,), "float32"), hi: R.Tensor((1,), "float32"),
                 hi2: R.Tensor((1,), "float32")) -> R.Tensor((8,), "float32"):
            cls = Expected
            with R.dataflow():
                lv = R.call_tir(cls.requant, (x, hi), out_ty=R.Tensor((8,), "float32"))
                gv = R.call_tir(cls.requant, (lv, hi2), out_ty=R.Tensor((8,), "float32"))
                R.output(gv)
            return gv

    consts = {"lo": np.array([-1.5], "float32"), "hi": np.array([2.0], "float32"), "hi2": np.array([1.0], "float32")}
    before = bind(_TwoCalls, **consts)
    after = fold_scalar_arguments(before)
    tvm.ir.assert_structural_equal(after, bind(Expected, hi=consts["hi"], hi2=consts["hi2"]))
    x = np.linspace(-3, 3, 8).astype("float32")
    np.testing.assert_array_equal(run(after, x), np.clip(x, -1.5, 1.0))


def test_kernel_whose_scalar_differs_between_calls_is_not_duplicated():
    consts = {"lo": np.array([-1.5], "float32"), "hi": np.array([2.0], "float32"), "hi2": np.array([1.0], "float32")}
    after = fold_scalar_arguments(bind(_TwoCalls, **consts))
    kernels = [f for f in after.functions.values() if isinstance(f, tvm.tirx.PrimFunc)]
    assert len(kernels) == 1 and len(kernels[0].params) == 3


# -- InjectiveCPU ------------------------------------------------------------------------------------

def test_layout_and_quantize_kernel_is_one_loop_nest():
    """concat -> transpose -> quantize (one fused kernel) inlines into the quantize block,
    vectorized along channels; the same bytes as TVM's unscheduled kernel."""
    @I.ir_module
    class Model:
        @R.function
        def main(a: R.Tensor((1, 6, 6, 16), "float32"), b: R.Tensor((1, 6, 6, 16), "float32"),
                 s: R.Tensor((1,), "float32"), z: R.Tensor((1,), "int32")) -> R.Tensor((1, 32, 6, 6), "uint8"):
            with R.dataflow():
                lv = R.concat((a, b), axis=3)
                lv1 = R.permute_dims(lv, axes=[0, 3, 1, 2])
                gv = R.quantize(lv1, s, z, axis=-1, out_dtype="uint8")
                R.output(gv)
            return gv

    target = tvm.target.Target("llvm")
    mod = bind(Model, s=SCALE, z=ZERO)
    mod = tvm.transform.Sequential([relax.transform.LegalizeOps(), relax.transform.AnnotateTIROpPattern(),
                                    relax.transform.FuseOps(), relax.transform.FuseTIR()])(mod)
    with target:
        scheduled = dl.ApplyDefaultSchedule(InjectiveCPU())(mod)
    (kernel,) = [f for f in scheduled.functions.values() if isinstance(f, tvm.tirx.PrimFunc)]
    assert kernel.attrs["tirx.is_scheduled"]
    blocks = []
    tvm_ffi.structural_walk(kernel.body, lambda n: blocks.append(n.name_hint) if isinstance(n, s_tir.SBlock) else None)
    assert [b for b in blocks if b != "root"] == ["quantized"]
    rng = np.random.default_rng(2)
    a, b = (rng.standard_normal((1, 6, 6, 16)).astype("float32") for _ in range(2))
    np.testing.assert_array_equal(run(scheduled, a, b), run(mod, a, b))


# -- the library of a model ----------------------------------------------------------------------------

def _squeezenet(tmp_path):
    from qcompile.frontend.from_torch import torchvision_module

    torch.manual_seed(0)
    net = torchvision_module("squeezenet1_1")
    weights = tmp_path / "squeezenet1_1.pth"
    torch.save(net.state_dict(), weights)
    params = sum(p.numel() for p in net.parameters())
    return qcompile.import_model("squeezenet1_1", {"": (1, 3, 64, 64)}, weights=str(weights)), params


def test_int8_cnn_library_is_under_a_third_of_float32(tmp_path):
    """squeezenet1_1 (1.2 M parameters, 64x64): int8 .so <= 0.3x float32; its constants are
    int8 weights plus per-channel vectors (no float copy of a weight), no two kernels alike,
    and the kernels carry no per-argument checks (the VM still rejects a wrong input)."""
    model, params = _squeezenet(tmp_path)
    assert params > 1_000_000
    rng = np.random.default_rng(0)
    calib = [{"x": rng.standard_normal((1, 3, 64, 64)).astype("float32")} for _ in range(4)]
    quantized = qcompile.quantize(model, calib, qcompile.Int8Config(num_samples=4))
    fp32 = qcompile.build(model, "native", tmp_path, name="fp32", tuning_logs=False)
    int8 = qcompile.build(quantized, "native", tmp_path, name="int8", tuning_logs=False)
    ratio = int8.manifest.library["bytes"] / fp32.manifest.library["bytes"]
    print(f"squeezenet1_1 64x64: int8 {int8.manifest.library['bytes']} B / float32 "
          f"{fp32.manifest.library['bytes']} B = {ratio:.3f}")
    assert ratio <= 0.3

    target = resolve_target("native").to_tvm()
    lowered = run_phases(quantized.mod, target, phases=with_tuning(default_schedule_passes(target)))
    consts = []
    relax.analysis.post_order_visit(lowered["main"], lambda e: consts.append(e.value.numpy())
                                    if isinstance(getattr(e, "value", None), tvm.runtime.Tensor) else None)
    weights = [c for c in consts if c.dtype == np.int8]
    assert sum(w.size for w in weights) >= 0.99 * params  # every weight is there, as int8 (biases: int32)
    floats = [c for c in consts if c.dtype == np.float32]
    # per-channel scales and scalars only: a float copy of a weight would have two dims over 1
    assert all(int(np.prod(c.shape)) == max(c.shape, default=1) for c in floats), \
        [c.shape for c in floats if int(np.prod(c.shape)) != max(c.shape, default=1)]
    assert sum(c.nbytes for c in floats) < 0.05 * sum(w.nbytes for w in weights)
    kernels = [f for f in lowered.functions.values() if isinstance(f, tvm.tirx.PrimFunc)]
    assert len({tvm_ffi.structural_hash(f) for f in kernels}) == len(kernels)

    library = int8.library.read_bytes()
    assert b"Mismatched" not in library and b"on argument #" not in library
    loaded = qcompile.load(int8.library)
    with pytest.raises(Exception, match="shape|mismatch"):
        loaded.run({"x": np.zeros((1, 3, 32, 32), "float32")})
