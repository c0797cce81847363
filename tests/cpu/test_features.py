"""The CPU probe on recorded `/proc/cpuinfo` lines of each machine kind, and the path choices
it makes: a path the CPU cannot execute is never selected."""

from __future__ import annotations

import pytest

from pagoda.cpu.features import CPUFeatures, parse_cpuinfo

_BASE = (
    "fpu vme de pse tsc msr pae mce cx8 apic sep mtrr pge mca cmov pat pse36 clflush mmx fxsr sse "
    "sse2 ht syscall nx mmxext fxsr_opt pdpe1gb rdtscp lm constant_tsc rep_good nopl xtopology "
    "nonstop_tsc cpuid extd_apicid tsc_known_freq pni pclmulqdq ssse3 cx16 pcid sse4_1 sse4_2 "
    "x2apic movbe popcnt aes xsave avx f16c rdrand hypervisor lahf_lm"
)
# AMD EPYC Zen 3 (Milan): AVX2 and FMA, nothing wider.
ZEN3 = f"{_BASE} fma bmi1 avx2 smep bmi2 erms invpcid rdseed adx smap clflushopt clwb sha_ni vaes"
# AMD EPYC Zen 4 (Genoa), as this project's machines report it: AVX-512 with BF16 and VNNI.
ZEN4 = (
    f"{ZEN3} avx512f avx512dq avx512ifma avx512cd avx512bw avx512vl xsaveopt xsavec xgetbv1 "
    "xsaves avx512_bf16 clzero avx512vbmi umip avx512_vbmi2 gfni vpclmulqdq avx512_vnni "
    "avx512_bitalg avx512_vpopcntdq rdpid fsrm"
)
# Intel Xeon Sapphire Rapids: AVX-512, AVX-VNNI and the AMX tiles.
SAPPHIRE_RAPIDS = (
    f"{ZEN3} avx512f avx512dq avx512cd avx512bw avx512vl avx512_vnni avx_vnni avx512_bf16 "
    "avx512_fp16 amx_bf16 amx_tile amx_int8 serialize tsxldtrk"
)
# Intel Skylake-SP: AVX-512 without BF16 or VNNI.
SKYLAKE = f"{ZEN3} avx512f avx512dq avx512cd avx512bw avx512vl"
# An x86 CPU from before AVX2.
SANDY_BRIDGE = _BASE


def _cpuinfo(flags: str, model: str = "Test CPU", key: str = "flags") -> str:
    return (
        f"processor\t: 0\nvendor_id\t: Test\nmodel name\t: {model}\n{key}\t\t: {flags}\n"
        f"\nprocessor\t: 1\nmodel name\t: {model}\n{key}\t\t: {flags}\n"
    )


@pytest.mark.parametrize(
    ("flags", "kind", "bf16", "vnni", "amx_int8"),
    [
        (SANDY_BRIDGE, "baseline", False, False, False),
        (ZEN3, "avx2", False, False, False),
        (SKYLAKE, "avx512", False, False, False),
        (ZEN4, "avx512-bf16", True, True, False),
        (SAPPHIRE_RAPIDS, "amx", True, True, True),
    ],
    ids=["sandy-bridge", "zen3", "skylake", "zen4", "sapphire-rapids"],
)
def test_each_machine_kind_is_named_from_its_flags(
    flags: str, kind: str, bf16: bool, vnni: bool, amx_int8: bool
) -> None:
    features = parse_cpuinfo(_cpuinfo(flags, model="AMD EPYC"))
    assert features.model_name == "AMD EPYC"
    assert features.kind == kind
    assert features.bf16_matmul is bf16
    assert features.vnni is vnni
    assert features.amx_int8 is amx_int8


def test_a_wide_flag_without_its_base_is_not_taken() -> None:
    # AVX512-BF16 listed without AVX-512 F/BW (a masked or virtualised CPU) selects nothing wide.
    features = CPUFeatures("odd", frozenset({"avx2", "fma", "avx512_bf16", "avx512_vnni"}))
    assert features.kind == "avx2"
    assert not features.avx512_bf16 and not features.vnni
    # AVX-VNNI (256-bit) needs AVX2; AMX-BF16 needs the tile state.
    assert CPUFeatures("vnni", frozenset({"avx2", "fma", "avx_vnni"})).vnni
    assert not CPUFeatures("amx", frozenset({"amx_bf16"})).amx_bf16


def test_the_record_lists_only_the_flags_that_matter_in_a_fixed_order() -> None:
    features = parse_cpuinfo(_cpuinfo(ZEN4, model="AMD EPYC"))
    assert features.reported_flags == [
        "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16",
    ]  # fmt: skip
    assert features.describe() == (
        "AMD EPYC (avx512-bf16: avx2 fma f16c avx512f avx512bw avx512vl avx512_vnni avx512_bf16)"
    )


def test_an_arm_cpuinfo_has_no_x86_paths() -> None:
    text = "processor\t: 0\nBogoMIPS\t: 50.00\nFeatures\t: fp asimd evtstrm aes crc32 asimddp\n"
    features = parse_cpuinfo(text)
    assert features.kind == "baseline"
    assert "asimd" in features.flags and features.reported_flags == []
