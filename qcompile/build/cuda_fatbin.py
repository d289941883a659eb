"""Compile CUDA kernels at build time, so a CUDA ``.so`` loads without a CUDA compiler.

TVM 0.27, without its CUDA runtime plugin loaded (libtvm_runtime_cuda.so needs the driver's
libcuda.so.1, absent on a build machine without a GPU), exports CUDA *source* (fmt "cuda"),
and the loading machine compiles it through TVM's Python callback
``tvm_callback_cuda_compile`` (NVRTC or nvcc) -- so every deployment would need TVM's Python
package and a CUDA compiler.  ``precompile_cuda_kernels`` returns an ``fpack_imports`` hook for
``export_library``: it serialises the import tree with TVM's own packer, replaces each
source-form CUDA entry by an nvcc fatbin (fmt "fatbin"; SASS for the arch + PTX; the function
table is kept byte for byte) and writes the ``__tvm_ffi__library_bin`` C array.  The CUDA
loader hands any fmt other than "cuda" straight to ``cuModuleLoadData``.

The byte layout is TVM 0.27's (``[fmt][function map][code]``, u64-length-prefixed strings);
anything else raises rather than writing a corrupt library.
"""
from __future__ import annotations

import os
import struct

import tvm

_U64 = struct.Struct("<Q")


def _take(buf: bytes, pos: int) -> tuple[bytes, int]:
    """Read one length-prefixed (u64 little-endian) byte string."""
    (n,) = _U64.unpack_from(buf, pos)
    pos += 8
    if pos + n > len(buf):
        raise ValueError("truncated TVM library blob")
    return buf[pos:pos + n], pos + n


def _put(data: bytes) -> bytes:
    return _U64.pack(len(data)) + data


def _skip_fmap(buf: bytes, pos: int) -> tuple[list[str], int]:
    """Walk Map<String, FunctionInfo> (0.27 layout); return kernel names, end."""
    (count,), pos, names = _U64.unpack_from(buf, pos), pos + 8, []
    for _ in range(count):
        key, pos = _take(buf, pos)
        _, pos = _take(buf, pos)                      # FunctionInfo.name
        (n,) = _U64.unpack_from(buf, pos); pos += 8 + 4 * n   # arg_types (DLDataType)
        (n,) = _U64.unpack_from(buf, pos); pos += 8
        for _ in range(n):                              # launch_param_tags
            _, pos = _take(buf, pos)
        (n,) = _U64.unpack_from(buf, pos); pos += 8 + 4 * n   # arg_extra_tags
        names.append(key.decode())
    return names, pos


def _rewrite_cuda_entry(entry: bytes, compile_src) -> tuple[bytes, list[str]]:
    fmt, pos = _take(entry, 0)
    if fmt not in (b"cuda", b"ptx", b"cubin", b"fatbin"):
        raise ValueError(f"unknown CUDA module layout (first field {fmt[:32]!r})")
    fmap_start = pos
    names, pos = _skip_fmap(entry, pos)
    code, end = _take(entry, pos)
    if end != len(entry):
        raise ValueError("CUDA module bytes do not match the TVM 0.27 [fmt][fmap][code] layout")
    if fmt != b"cuda":                                   # already compiled: keep as is
        return entry, names
    binary = compile_src(code.decode())
    return _put(b"fatbin") + entry[fmap_start:pos] + _put(binary), names


def precompile_cuda_kernels(executable_or_runtime_module, arch="sm_80", compiler="nvcc"):
    """Compile the CUDA kernels now; return an ``fpack_imports`` hook for export_library.

    Usage:  ex.export_library("m.so", fpack_imports=precompile_cuda_kernels(ex, "sm_80"))
    ``arch``: "sm_80" (SASS sm_80 + PTX compute_80) or a list such as
    ["sm_80", "sm_90a"] (one -gencode per arch, PTX for the last one).
    """
    from tvm.support import nvcc

    root = getattr(executable_or_runtime_module, "mod", executable_or_runtime_module)
    arches = [arch] if isinstance(arch, str) else list(arch)
    gencode = []
    for a in arches:
        gencode += ["-gencode", f"arch=compute_{a[3:]},code={a}"]
    last = arches[-1][3:]
    gencode += ["-gencode", f"arch=compute_{last},code=compute_{last}"]
    cache: dict[str, bytes] = {}

    def compile_src(src: str) -> bytes:
        if src not in cache:
            with tvm.target.Target({"kind": "cuda", "arch": arches[0]}):
                cache[src] = bytes(nvcc.compile_cuda(src, target_format="fatbin",
                                                     arch=gencode, compiler=compiler))
        return cache[src]

    pack = tvm.get_global_func("runtime.ModulePackImportsToTensor")
    # Compile eagerly so nvcc errors surface here, not inside export_library.
    # (Runnable "cuda" modules come from the real runtime plugin, which has compiled already.)
    for m in root._collect_from_import_tree(lambda m: m.kind == "cuda"):
        if not m.get_property_mask() & 2:
            src = m.inspect_source("cuda")
            if src:
                compile_src(src)

    def fpack_imports(mod, is_system_lib, prefix, workspace_dir):
        blob = pack(mod).numpy().tobytes()
        (nbytes,) = _U64.unpack_from(blob, 0)
        if nbytes + 8 != len(blob):
            raise ValueError("unexpected TVM library blob header (not TVM 0.27's layout)")
        pos, out = 8, []
        for _ in range(2):                                 # import tree: indptr, child ids
            (n,) = _U64.unpack_from(blob, pos); pos += 8 + 8 * n
        out.append(blob[8:pos])
        while pos < len(blob):
            kind, pos = _take(blob, pos)
            out.append(_put(kind))
            if kind == b"_lib":
                continue
            entry, pos = _take(blob, pos)
            if kind == b"cuda":
                entry, _ = _rewrite_cuda_entry(entry, compile_src)
            out.append(_put(entry))
        payload = b"".join(out)
        data = _U64.pack(len(payload)) + payload
        sym = prefix + tvm.get_global_func("runtime.ModuleImportsBlobName")()
        path = os.path.join(workspace_dir, f"{prefix}devc_precompiled.c")
        with open(path, "w") as f:
            f.write('#ifdef _WIN32\n#define TVM_EXPORT __declspec(dllexport)\n#else\n'
                    '#define TVM_EXPORT\n#endif\n#ifdef __cplusplus\nextern "C" {\n#endif\n'
                    f"TVM_EXPORT extern const unsigned char {sym}[];\n"
                    f"const unsigned char {sym}[{len(data)}] = {{\n")
            f.writelines(",".join(str(b) for b in data[i:i + 32]) + ",\n" for i in range(0, len(data), 32))
            f.write("};\n")
            if is_system_lib:
                f.write("extern int TVMFFIEnvModRegisterSystemLibSymbol(const char*, void*);\n"
                        f"static int {sym}_reg_ = TVMFFIEnvModRegisterSystemLibSymbol("
                        f'"{sym}", (void*){sym});\n')
            f.write("#ifdef __cplusplus\n}\n#endif\n")
        return path

    return fpack_imports
