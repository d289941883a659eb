"""Which Relax ops quantization treats how: read by PTQ (what to observe and where to put
QDQ pairs) and by realize (which QDQ patterns become integer kernels), so the two agree."""
from __future__ import annotations

# Ops with a weight: the integer kernels (int8 x int8 -> int32), by the layer-name prefix.
# ``matmul`` also takes two activations (attention's Q.K^T and P.V): both sides observed.
ANCHORS = {"relax.nn.conv2d": "conv2d", "relax.nn.conv1d": "conv1d",
           "relax.nn.conv2d_transpose": "conv2d_transpose", "relax.matmul": "matmul"}

# Per kind: (data layout, kernel layout, the weight's output-channel axis, its rank).
CONV_LAYOUTS = {"conv2d": ("NCHW", "OIHW", 0, 4), "conv1d": ("NCW", "OIW", 0, 3),
                "conv2d_transpose": ("NCHW", "IOHW", 1, 4)}

# Ops whose int8 output keeps the input's scale and zero point (they move or pick values).
SAME_SCALE_OPS = frozenset({"relax.nn.max_pool2d", "relax.reshape", "relax.flatten", "relax.permute_dims",
                            "relax.squeeze", "relax.expand_dims", "relax.broadcast_to", "relax.take",
                            "relax.strided_slice"})

# Ops that scale their first input by a constant: by a positive scalar the int8 values stay
# as they are and only the scale changes (multiply(dq(x, s), c) is dq(x, s * c)).
SCALE_OPS = frozenset({"relax.multiply", "relax.divide"})

# Linear ops, quantized with their own output scale when all inputs are quantized: their
# int8 form dequantizes the inputs inside the fused kernel, since
# op((x - zx) * sx / sy) is op(x_float) / sy for an op linear in x.  Realize also takes
# multiply/divide this way (linear in the dequantized input, the other operand in float).
LINEAR_OPS = frozenset({"relax.add", "relax.concat", "relax.mean", "relax.nn.avg_pool2d",
                        "relax.nn.adaptive_avg_pool2d"})

# Activations folded into the preceding layer's output range.
ACTIVATIONS = frozenset({"relax.nn.relu", "relax.clip"})
