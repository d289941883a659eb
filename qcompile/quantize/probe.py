"""Run the float model on sample batches and hand back some of its inner tensors.

High-bias absorption (:mod:`.equalize`) and bias correction (:mod:`.bias_correction`)
read per-channel statistics of tensors inside the model; this compiles ``main`` returning
those tensors too, as calibration does (:func:`qcompile.quantize.ptq.calibrate`).
"""
from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence

import numpy as np
import tvm
from tvm import relax

from qcompile.passes.bindings import rebuild, with_main


def probe(mod: tvm.IRModule, tensors: Sequence, batches: Iterable[dict[str, np.ndarray]],
          target: tvm.target.Target) -> Iterator[list[np.ndarray]]:
    """For each batch, the values of ``tensors`` (vars of ``mod["main"]``, none of them a
    model output), in order, from the float model compiled for ``target`` (this machine)."""
    from qcompile.build.pipeline import compile_module

    tensors = list(tensors)
    if not tensors:
        return
    main = rebuild(mod["main"], lambda em, v, val: None, extra_outputs=tensors)
    vm = relax.VirtualMachine(compile_module(with_main(mod, main), target), tvm.cpu())
    n_out = len(main.ret_ty.fields) - len(tensors)
    params = [p.name for p in mod["main"].params]
    for batch in batches:
        result = vm["main"](*[tvm.runtime.tensor(np.ascontiguousarray(batch[name])) for name in params])
        yield [t.numpy() for t in list(result)[n_out:]]
