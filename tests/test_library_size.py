"""What a built library holds, and the passes and schedules that keep it small."""
from __future__ import annotations

import numpy as np
import tvm
import tvm_ffi
from tvm import relax, s_tir
from tvm.s_tir import dlight as dl
from tvm.script import ir as I
from tvm.script import relax as R

from qcompile.build.schedules import InjectiveCPU

SCALE = np.array([0.05], "float32")
ZERO = np.array([3], "int32")


def bind(mod: tvm.IRModule, **params: np.ndarray) -> tvm.IRModule:
    """``mod`` with the named parameters of ``main`` replaced by constants."""
    return relax.transform.BindParams("main", {k: tvm.runtime.tensor(v) for k, v in params.items()})(mod)


def run(mod: tvm.IRModule, *args: np.ndarray) -> np.ndarray:
    vm = relax.VirtualMachine(tvm.compile(mod, "llvm"), tvm.cpu())
    return vm["main"](*[tvm.runtime.tensor(a) for a in args]).numpy()


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
