"""qcompile: quantize, tune and compile models with Apache TVM into shared libraries.

Stages, each a module with a plain function:
``frontend.import_model`` -> ``quantize.quantize_model`` -> ``tune.tune`` ->
``build.build`` -> ``runtime.CompiledModel``.
"""
import os as _os

__version__ = "0.1.0"

# TVM's runtime thread pool starts with 1 thread on this 2-vCPU machine class unless
# TVM_NUM_THREADS is set (resnet18: 112 ms with the default, 63 ms with 2 threads).
# Default it to every CPU this process may use, before any TVM code runs; a value the
# user set wins.
if hasattr(_os, "sched_getaffinity"):
    _os.environ.setdefault("TVM_NUM_THREADS", str(len(_os.sched_getaffinity(0))))
