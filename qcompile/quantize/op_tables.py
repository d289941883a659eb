"""Which Relax ops quantization treats how: read by PTQ (what to observe and where to put
QDQ pairs) and by realize (which QDQ patterns become integer kernels), so the two agree."""
from __future__ import annotations

# Ops with a weight: the integer kernels (int8 x int8 -> int32), by the layer-name prefix.
ANCHORS = {"relax.nn.conv2d": "conv2d", "relax.matmul": "matmul"}

# Ops whose int8 output keeps the input's scale and zero point (they move or pick values).
SAME_SCALE_OPS = frozenset({"relax.nn.max_pool2d", "relax.reshape", "relax.flatten", "relax.permute_dims",
                            "relax.squeeze", "relax.expand_dims"})

# Linear ops, quantized with their own output scale when all inputs are quantized: their
# int8 form dequantizes the inputs inside the fused kernel, since
# op((x - zx) * sx / sy) is op(x_float) / sy for a linear op.
LINEAR_OPS = frozenset({"relax.add", "relax.concat", "relax.mean", "relax.nn.avg_pool2d",
                        "relax.nn.adaptive_avg_pool2d"})

# Activations folded into the preceding layer's output range.
ACTIVATIONS = frozenset({"relax.nn.relu", "relax.clip"})
