"""Target parsing: TVMC strings, presets, JSON, native, and bad input."""
from __future__ import annotations

import json
import os
import platform
from pathlib import Path

import pytest

from qcompile.cli.main import join_target_tokens
from qcompile.errors import ConfigError
from qcompile.target import list_presets, parse_tvmc_string, resolve_target


def test_tvmc_arm_cpu_without_triple_means_aarch64_linux():
    spec = resolve_target("llvm -mcpu=cortex-a72")
    assert spec.target == {"kind": "llvm", "mcpu": "cortex-a72", "mtriple": "aarch64-linux-gnu"}
    assert spec.cross_compiler == "aarch64-linux-gnu-g++"
    assert "arm_cpu" in list(spec.to_tvm().keys)


def test_tvmc_full_string_with_list_attrs():
    spec = parse_tvmc_string("llvm -mtriple=aarch64-linux-gnu -mcpu=cortex-a72 -mattr=+neon,+dotprod")
    assert spec.target["mattr"] == ["+neon", "+dotprod"]
    assert bool(spec.to_tvm().attrs["feature.has_dotprod"])


def test_tvmc_space_separated_value_and_ints():
    spec = parse_tvmc_string("llvm -mcpu haswell -num-cores=4")
    assert spec.target == {"kind": "llvm", "mcpu": "haswell", "num-cores": 4}
    assert not spec.needs_cross_compile()


def test_cuda_string_gets_llvm_host():
    spec = resolve_target("cuda -arch=sm_86")
    assert spec.is_gpu and spec.host == {"kind": "llvm"}
    assert spec.to_tvm().host is not None


@pytest.mark.parametrize("name", ["x86-avx512", "x86-avx2", "x86-zen4", "x86-zen5", "x86-sapphirerapids", "rpi4",
                                  "rpi5", "cuda-sm80"])
def test_presets_resolve_and_validate(name):
    spec = resolve_target(name)
    assert spec.name == name and spec.description
    spec.to_tvm()
    assert spec.tuning.get("trials", 0) > 0


def test_rpi4_preset_is_cross_compiled_cortex_a72():
    spec = resolve_target("rpi4")
    assert spec.target["mcpu"] == "cortex-a72" and spec.triple == "aarch64-linux-gnu"
    assert spec.needs_cross_compile() and spec.cross_compiler == "aarch64-linux-gnu-g++"


def test_list_presets_has_the_shipped_ones():
    names = {p.name for p in list_presets()}
    assert {"x86-avx512", "x86-avx2", "x86-zen4", "x86-zen5", "x86-sapphirerapids", "rpi4", "cuda-sm80"} <= names


@pytest.mark.parametrize("name, mcpu", [("x86-avx512", "cascadelake"), ("x86-avx2", "haswell"), ("x86-zen4", "znver4"),
                                        ("x86-zen5", "znver5"), ("x86-sapphirerapids", "sapphirerapids")])
def test_x86_presets_name_their_microarchitecture(name, mcpu):
    spec = resolve_target(name)
    assert spec.target["mcpu"] == mcpu and spec.triple == "x86_64-linux-gnu"


# LLVM feature -> the /proc/cpuinfo flag of the same instructions (x86).
_LLVM_TO_CPUINFO = {"sse4.2": "sse4_2", "avx": "avx", "avx2": "avx2", "fma": "fma", "bmi2": "bmi2",
                    "avx512f": "avx512f", "avx512bw": "avx512bw", "avx512dq": "avx512dq", "avx512vl": "avx512vl",
                    "avx512cd": "avx512cd", "avx512vnni": "avx512_vnni"}
_AVX512_INT8 = {"avx512f", "avx512bw", "avx512dq", "avx512vl", "avx512_vnni"}
_X86 = platform.machine() in ("x86_64", "AMD64")


def _proc_cpuinfo_flags() -> set[str]:
    """The first CPU's flag list ('flags' on x86, 'Features' on aarch64), read here directly."""
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return set(value.split())
    return set()


def _llvm_features(spec) -> set[str]:
    """The ISA features LLVM enables for the target's -mcpu/-mattr."""
    from tvm.target import codegen

    return {str(f) for f in codegen.llvm_get_cpu_features(spec.to_tvm())}


def _check_x86_features_follow_flags(spec, flags: set[str]) -> None:
    features = _llvm_features(spec)
    enabled = {f for f in _LLVM_TO_CPUINFO if f in features}
    assert all(_LLVM_TO_CPUINFO[f] in flags for f in enabled), (spec.target, sorted(enabled), sorted(flags))
    assert ("avx512f" in features) == (_AVX512_INT8 <= flags), spec.target
    assert ("avx512vnni" in features) == (_AVX512_INT8 <= flags), spec.target
    assert ("avx2" in features) == ({"avx2", "fma", "bmi2"} <= flags), spec.target


def test_native_matches_this_cpu():
    spec = resolve_target("native")
    assert spec.target["kind"] == "llvm" and not spec.needs_cross_compile()
    assert spec.target["num-cores"] == os.cpu_count()
    flags = _proc_cpuinfo_flags()
    if _X86:
        assert spec.target["mtriple"] == "x86_64-linux-gnu"
        _check_x86_features_follow_flags(spec, flags)
    elif platform.machine() in ("aarch64", "arm64"):
        assert spec.target["mtriple"] == "aarch64-linux-gnu" and "+neon" in spec.target["mattr"]
        assert ("+dotprod" in spec.target["mattr"]) == ("asimddp" in flags)


@pytest.mark.skipif(not _X86, reason="the x86 flag sets apply to x86 machines only")
@pytest.mark.parametrize("flags", [
    {"sse4_2", "avx", "avx2", "fma", "bmi2", "avx512f", "avx512bw", "avx512dq", "avx512vl", "avx512cd", "avx512_vnni"},
    {"sse4_2", "avx", "avx2", "fma", "bmi2", "avx512f", "avx512bw", "avx512dq", "avx512vl", "avx512cd"},  # no VNNI
    {"sse4_2", "avx", "avx2", "fma", "bmi2"},  # a VM hiding AVX-512
    {"sse4_2"},
], ids=["avx512-vnni", "avx512-without-vnni", "avx2", "sse4.2"])
def test_native_uses_only_the_reported_flags(monkeypatch, flags):
    from qcompile.target import hostcpu

    monkeypatch.setattr(hostcpu, "cpu_flags", lambda *_: set(flags))
    _check_x86_features_follow_flags(resolve_target("native"), flags)


def _flags_of(mcpu: str) -> set[str]:
    """The /proc/cpuinfo flags of a CPU that has every extension LLVM enables for ``mcpu``."""
    from qcompile.target import hostcpu

    features = _llvm_features(resolve_target(f"llvm -mtriple=x86_64-linux-gnu -mcpu={mcpu}"))
    return {hostcpu.X86_FEATURE_FLAGS[f] for f in features if f in hostcpu.X86_FEATURE_FLAGS}


@pytest.mark.parametrize("ident, flags_of, hidden, expected", [
    (("AuthenticAMD", 25, 17), "znver4", set(), "znver4"),  # Zen 4 (Genoa)
    (("AuthenticAMD", 26, 2), "znver5", set(), "znver5"),  # Zen 5 (Turin)
    (("AuthenticAMD", 26, 2), "znver5", {"avx_vnni"}, "cascadelake"),  # a guest without AVX-VNNI
    (("AuthenticAMD", 26, 2), "znver5", {"avx512f"}, "haswell"),  # a guest without AVX-512
    (("AuthenticAMD", 25, 1), "haswell", set(), "haswell"),  # Zen 3: AVX2
    (("GenuineIntel", 6, 85), "cascadelake", set(), "cascadelake"),  # Cascade Lake-SP
    (("GenuineIntel", 6, 106), "icelake-server", set(), "icelake-server"),
    (("GenuineIntel", 6, 143), "sapphirerapids", set(), "sapphirerapids"),
    (("GenuineIntel", 6, 143), "sapphirerapids", {"amx_tile", "amx_int8", "amx_bf16"}, "icelake-server"),
    (("GenuineIntel", 6, 207), "emeraldrapids", set(), "emeraldrapids"),
    (("GenuineIntel", 6, 167), "sapphirerapids", set(), "sapphirerapids"),  # a guest's model number
    (("GenuineIntel", 6, 167), "sapphirerapids", {"amx_tile", "amx_int8", "amx_bf16"}, "cascadelake"),
    (("GenuineIntel", 6, 167), "graniterapids", set(), "graniterapids"),
    (("GenuineIntel", 6, 140), "cascadelake", set(), "cascadelake"),  # Tiger Lake: the generic choice
    (None, "znver5", set(), "cascadelake"),  # no CPUID fields: the ISA level
], ids=["zen4", "zen5", "zen5-no-avxvnni", "zen5-no-avx512", "zen3", "cascadelake", "icelake-server",
        "sapphirerapids", "sapphirerapids-no-amx", "emeraldrapids", "amx-unknown-model",
        "no-amx-unknown-model", "amx-fp16-unknown-model", "tigerlake", "unknown"])
def test_x86_microarchitecture_from_cpuid(ident, flags_of, hidden, expected):
    """native names the microarchitecture (vendor, family, model) where the kernel reports
    every extension LLVM enables for it, else a CPU whose extensions it does report."""
    from qcompile.target import hostcpu

    flags = _flags_of(flags_of) - hidden
    mcpu = hostcpu.x86_mcpu(flags, ident)
    assert mcpu == expected
    _check_x86_features_follow_flags(resolve_target(f"llvm -mtriple=x86_64-linux-gnu -mcpu={mcpu}"), flags)


def test_cpu_id_reads_the_first_cpu(tmp_path):
    from qcompile.target import hostcpu

    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nvendor_id\t: AuthenticAMD\ncpu family\t: 26\nmodel\t\t: 2\n"
                    "model name\t: AMD EPYC\n\nprocessor\t: 1\nvendor_id\t: GenuineIntel\ncpu family\t: 6\n")
    assert hostcpu.cpu_id(info) == ("AuthenticAMD", 26, 2)
    info.write_text("processor\t: 0\nFeatures\t: asimd\n")  # aarch64: no x86 fields
    assert hostcpu.cpu_id(info) is None


def test_inline_json_and_json_file(tmp_path):
    spec = resolve_target('{"kind": "llvm", "mcpu": "haswell"}')
    assert spec.target == {"kind": "llvm", "mcpu": "haswell"}
    preset = tmp_path / "mine.json"
    preset.write_text(json.dumps({"target": {"kind": "llvm", "mcpu": "skylake"}, "tuning": {"trials": 8}}))
    spec = resolve_target(str(preset))
    assert spec.name == "mine" and spec.target["mcpu"] == "skylake" and spec.tuning == {"trials": 8}


@pytest.mark.parametrize(
    "text, message",
    [
        ("nosuchtarget", "unknown target 'nosuchtarget'"),
        ("llvm -bogus=1", "Unknown config option 'bogus'"),
        ("llvm -mcpu", "option -mcpu has no value"),
        ("cuda", "needs -arch"),
        ("-mcpu=haswell", "must start with a target kind"),
        ("{not json", "malformed"),
        ('{"mcpu": "x"}', "needs a 'kind'"),
        ("missing.json", "does not exist"),
        ("", "empty"),
    ],
)
def test_bad_targets_raise_config_error(text, message):
    with pytest.raises(ConfigError, match=message):
        resolve_target(text)


def test_unquoted_tvmc_target_tokens_are_joined():
    argv = ["build", "resnet18", "--target", "llvm", "-mcpu=cortex-a72", "-mattr=+neon", "-o", "out/"]
    assert join_target_tokens(argv) == ["build", "resnet18", "--target", "llvm -mcpu=cortex-a72 -mattr=+neon",
                                        "-o", "out/"]
    assert join_target_tokens(["build", "m", "--target", "rpi4", "--quiet"]) == ["build", "m", "--target", "rpi4",
                                                                                 "--quiet"]


def test_cli_targets_lists_presets(cli):
    result = cli("targets")
    assert result.code == 0
    for name in ("native", "x86-avx512", "x86-avx2", "rpi4", "cuda-sm80"):
        assert name in result.out
