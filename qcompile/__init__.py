"""qcompile: quantize, tune and compile models with Apache TVM into shared libraries.

Stages, each a module with a plain function:
``frontend.import_model`` -> ``build.build`` -> ``runtime.CompiledModel``.
"""
__version__ = "0.1.0"
