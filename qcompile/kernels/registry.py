"""The hand-scheduled kernels, by the name of their compute block.

Each kernel module registers a :class:`HandKernel` with the block-name prefix its TIR compute
block carries (after fusion the block keeps that name) and the register tiles `qcompile tune`
measures for it.  :func:`hand_kernel_of` reads a fused kernel's top-level block names.
"""
from __future__ import annotations

from dataclasses import dataclass

Tiles = tuple[tuple[int, int], ...]


@dataclass(frozen=True)
class HandKernel:
    """A kernel qcompile schedules itself: its block-name prefix and its register tiles."""

    name: str
    block_prefix: str
    tiles: Tiles


_KERNELS: dict[str, HandKernel] = {}


def register(kernel: HandKernel) -> HandKernel:
    """Add ``kernel`` (called once by its module, at import)."""
    _KERNELS[kernel.name] = kernel
    return kernel


def hand_kernels() -> tuple[HandKernel, ...]:
    """Every registered kernel (importing the kernel modules registers them)."""
    from qcompile.kernels import depthwise_conv2d, float_conv2d, packed_conv2d, winograd_conv2d  # noqa: F401

    return tuple(_KERNELS.values())


def block_names(func) -> list[str]:
    """Names of the top-level blocks of a PrimFunc (or of an IRModule's ``main``)."""
    from tvm import s_tir

    if hasattr(func, "functions"):  # an IRModule
        func = func["main"]
    sch = s_tir.Schedule(func)
    try:
        root = sch.get_sblock("root")
    except Exception:  # noqa: BLE001 -- a function without a root block has no blocks to name
        return []
    return [sch.get(block).name_hint for block in sch.get_child_blocks(root)]


def hand_kernel_of(func) -> HandKernel | None:
    """The hand kernel a fused PrimFunc (or IRModule) is built on, or None."""
    names = block_names(func)
    for kernel in hand_kernels():
        if any(name.startswith(kernel.block_prefix) for name in names):
            return kernel
    return None
