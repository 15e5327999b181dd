"""harness.isa: oneDNN instruction-set levels, which a CPU has and which it can emulate (pure functions)."""

import pytest

from harness import isa

ZEN3 = ["sse4_1", "sse4_2", "avx", "avx2", "fma", "f16c"]
SKYLAKE_SP = ZEN3 + ["avx512f", "avx512bw", "avx512vl", "avx512dq"]
CASCADE_LAKE = SKYLAKE_SP + ["avx512_vnni"]
SAPPHIRE_RAPIDS = CASCADE_LAKE + ["avx512_bf16", "avx512_fp16", "avx_vnni", "amx_tile", "amx_int8", "amx_bf16"]
ZEN4 = CASCADE_LAKE + ["avx512_bf16"]


def test_levels_are_onednn_names_oldest_first():
    assert isa.ISA_LEVELS[:3] == ("sse41", "avx", "avx2")
    assert isa.onednn_value("avx512_core_amx") == "AVX512_CORE_AMX"
    with pytest.raises(KeyError):
        isa.onednn_value("avx3")


@pytest.mark.parametrize("flags, native, onednn_default", [
    (ZEN3, "avx2", False),
    (SKYLAKE_SP, "avx512_core", False),
    (CASCADE_LAKE, "avx512_core_vnni", True),
    (ZEN4, "avx512_core_bf16", True),
    (SAPPHIRE_RAPIDS, "avx512_core_amx", True),
    (["sse4_2"], None, False),
])
def test_native_level_and_tensorflow_default(flags, native, onednn_default):
    assert isa.native(flags) == native
    assert isa.onednn_default(flags) is onednn_default


def test_inclusion_follows_onednn_masks_not_list_order():
    assert isa.includes("avx512_core", "avx2")
    assert not isa.includes("avx512_core", "avx2_vnni")  # AVX-512 without AVX-VNNI
    assert isa.includes("avx512_core_fp16", "avx2_vnni")
    assert "avx2_vnni" not in isa.supported(ZEN4) and "avx512_core_bf16" in isa.supported(ZEN4)


def test_missing_flags_name_what_the_cpu_lacks():
    assert isa.missing_flags("avx2", ZEN3) == []
    assert isa.missing_flags("avx512_core", ZEN3) == ["avx512bw", "avx512dq", "avx512f", "avx512vl"]
    assert isa.missing_flags("avx512_core_amx", ZEN4) == ["amx_bf16", "amx_int8", "amx_tile", "avx512_fp16", "avx_vnni"]


@pytest.mark.parametrize("level", isa.ISA_LEVELS)
def test_every_level_has_an_xla_cap_at_or_below_it(level):
    xla_order = ["SSE4_2", "AVX", "AVX2", "AVX512", "AVX512_VNNI", "AVX512_BF16", "AMX", "AMX_FP16"]
    assert isa.xla_value(level) in xla_order
    # supported() is monotone: a CPU that runs a level runs every level it includes
    for lower in isa.ISA_LEVELS:
        if isa.includes(level, lower):
            assert isa.required_flags(lower) <= isa.required_flags(level)
