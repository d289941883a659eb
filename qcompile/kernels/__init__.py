"""Hand-structured kernels that TVM's default lowering does not provide.

``int8_dot``: the int8 dot-product instructions of each CPU (x86 VNNI ``vpdpbusd``, AVX2
``vpmaddubsw``, aarch64 ``sdot``) as TIR tensor intrinsics, and which one a target gets.
``packed_conv2d``: an int8 conv2d on a packed weight layout whose inner loop is one of them.
"""
