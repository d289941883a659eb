"""ConvAsConv2D: 1-D convolutions and non-overlapping transposed convolutions as conv2d.

TVM 0.27 lowers ``conv1d`` and ``conv2d_transpose`` only in their NCW / NCHW layouts with
generic loop nests (no NHWC conversion, no packed kernel, no int8 form), so an audio model's
1-D convs or a U-Net decoder's upsampling ran many times slower than the 2-D convs around
them.  Both have exact conv2d forms that the packed kernels take, float32 and, through PTQ,
int8 (this pass runs in the ``inference`` phase, before calibration):

* ``conv1d(x[N, C, L], W[O, C/g, K])`` is ``conv2d`` over ``[N, C, 1, L]`` with a ``1 x K``
  kernel (strides, padding, dilation and groups along the width), squeezed back;
* ``conv2d_transpose`` whose stride equals its kernel and that neither pads nor dilates (the
  2x2 stride-2 upsampling of U-Net and FPN decoders) writes each output pixel from one input
  pixel: ``y[n, o, i*KH + a, j*KW + b] = sum_c x[n, c, i, j] W[c, o, a, b]``, a ``1 x 1``
  conv to ``O*KH*KW`` channels followed by a pixel shuffle (reshape, transpose, reshape).

Float32 ops with constant weights only; other forms are left as they are.
"""
from __future__ import annotations

import numpy as np
import tvm
from tvm import relax

from qcompile.passes.bindings import (
    Emitter,
    const_value,
    dtype_of,
    rewrite_calls,
    shape_of,
)


def _ints(values) -> list[int]:
    return [int(v) for v in values] if values is not None else []


def _float(value) -> bool:
    out_dtype = str(value.attrs.out_dtype or "")
    return dtype_of(value.args[0]) == "float32" and out_dtype in ("", "float32", "void")


def _conv1d(em: Emitter, _var, value):
    attrs = value.attrs
    weight = const_value(value.args[1])
    if (weight is None or weight.dtype != np.float32 or not _float(value) or attrs.data_layout != "NCW"
            or attrs.kernel_layout != "OIW" or (attrs.out_layout or "NCW") != "NCW"):
        return None
    (stride,), (dilation,) = _ints(attrs.strides), _ints(attrs.dilation)
    left, right = _ints(attrs.padding)
    x = em.emit(relax.op.expand_dims(em.subst(value.args[0]), [2]))
    y = em.emit(relax.op.nn.conv2d(x, relax.const(np.ascontiguousarray(weight[:, :, None, :])),
                                   strides=[1, stride], padding=[0, left, 0, right], dilation=[1, dilation],
                                   groups=int(attrs.groups)))
    return relax.op.squeeze(y, [2])


def _conv2d_transpose(em: Emitter, _var, value):
    attrs = value.attrs
    weight = const_value(value.args[1])
    if (weight is None or weight.dtype != np.float32 or weight.ndim != 4 or not _float(value)
            or int(attrs.groups) != 1 or attrs.data_layout != "NCHW" or attrs.kernel_layout != "IOHW"
            or (attrs.out_layout or "NCHW") != "NCHW"):
        return None
    ic, oc, kh, kw = weight.shape
    if (_ints(attrs.strides) != [kh, kw] or any(_ints(attrs.padding)) or any(_ints(attrs.output_padding))
            or _ints(attrs.dilation) != [1, 1]):
        return None
    n, _, h, w = shape_of(value.args[0])
    # W[c, o, a, b] -> W1[(o, a, b), c, 1, 1]: output channel o*KH*KW + a*KW + b
    w1 = np.ascontiguousarray(weight.transpose(1, 2, 3, 0).reshape(oc * kh * kw, ic, 1, 1))
    z = em.emit(relax.op.nn.conv2d(em.subst(value.args[0]), relax.const(w1)))
    z = em.emit(relax.op.reshape(z, [n, oc, kh, kw, h, w]))
    z = em.emit(relax.op.permute_dims(z, [0, 1, 4, 2, 5, 3]))  # n, o, i, a, j, b
    return relax.op.reshape(z, [n, oc, h * kh, w * kw])


_REWRITES = {"relax.nn.conv1d": _conv1d, "relax.nn.conv2d_transpose": _conv2d_transpose}


@tvm.transform.module_pass(opt_level=0, name="ConvAsConv2D")
def ConvAsConv2D(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
    """``mod`` with its float32 ``conv1d`` and non-overlapping ``conv2d_transpose`` as conv2d."""
    return rewrite_calls(mod, _REWRITES)
