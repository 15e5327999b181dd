"""oneDNN CPU instruction-set levels: which a CPU has and which it can emulate.

oneDNN picks its kernels at run time from the CPU's instruction sets, and
``ONEDNN_MAX_CPU_ISA`` caps that choice. One machine can therefore stand in
for older CPU families: an AVX-512 server capped at ``avx2`` runs the kernels
an AVX2-only CPU would run. A level can only be emulated where the CPU has
every instruction set it needs. No TensorFlow here.

The masks are oneDNN's own ``dnnl_cpu_isa_t`` values: level A includes level B
exactly when ``mask(A) & mask(B) == mask(B)`` (``avx512_core`` does not include
``avx2_vnni``, for example).
"""

from __future__ import annotations

from typing import Iterable

#: level -> (oneDNN dnnl_cpu_isa_t mask, /proc/cpuinfo flags the level needs on top of its sub-levels)
_LEVELS: dict[str, tuple[int, tuple[str, ...]]] = {
    "sse41": (0x1, ("sse4_1",)),
    "avx": (0x3, ("avx",)),
    "avx2": (0x7, ("avx2", "fma")),
    "avx2_vnni": (0xF, ("avx_vnni",)),
    "avx2_vnni_2": (0x1F, ("avx_vnni_int8", "avx_ne_convert")),
    "avx512_core": (0x27, ("avx512f", "avx512bw", "avx512vl", "avx512dq")),
    "avx512_core_vnni": (0x67, ("avx512_vnni",)),
    "avx512_core_bf16": (0xE7, ("avx512_bf16",)),
    "avx512_core_fp16": (0x1EF, ("avx512_fp16",)),
    "avx512_core_amx": (0xFEF, ("amx_tile", "amx_int8", "amx_bf16")),
    "avx512_core_amx_fp16": (0x1FEF, ("amx_fp16",)),
}

#: Every level a sweep may name in ``cpu_isa``, oldest first.
ISA_LEVELS: tuple[str, ...] = tuple(_LEVELS)

#: The cap XLA's CPU code generation gets for each level (``XLA_FLAGS=--xla_cpu_max_isa=...``).
#: XLA knows fewer levels than oneDNN: each maps to the highest XLA level it contains
#: (``sse41`` to XLA's lowest, ``SSE4_2``, which is one step above it). Measured with
#: TensorFlow 2.21: the cap changes the bits of element-wise code XLA generates (AVX
#: without FMA: 20% of a tanh/exp/log1p chain, 2 ULP) but not of its matrix products,
#: which call kernels compiled into TensorFlow.
_XLA: dict[str, str] = {
    "sse41": "SSE4_2", "avx": "AVX", "avx2": "AVX2", "avx2_vnni": "AVX2", "avx2_vnni_2": "AVX2",
    "avx512_core": "AVX512", "avx512_core_vnni": "AVX512_VNNI", "avx512_core_bf16": "AVX512_BF16",
    "avx512_core_fp16": "AVX512_BF16", "avx512_core_amx": "AMX", "avx512_core_amx_fp16": "AMX_FP16",
}

#: CPU flags with which TensorFlow turns oneDNN on by default on Linux x86
#: (``DefaultOneDnnPolicy`` in tensorflow/core/util/port.cc).
ONEDNN_DEFAULT_FLAGS = ("avx512_vnni", "avx512_bf16", "avx_vnni", "amx_tile", "amx_int8", "amx_bf16")


def mask(level: str) -> int:
    """oneDNN's bit mask of ``level``.

    Raises:
        KeyError: ``level`` is not one of ``ISA_LEVELS``.
    """
    return _LEVELS[level][0]


def includes(upper: str, lower: str) -> bool:
    """Whether a CPU (or cap) at level ``upper`` has everything level ``lower`` needs."""
    return mask(upper) & mask(lower) == mask(lower)


def required_flags(level: str) -> set[str]:
    """All /proc/cpuinfo flags a CPU needs to run ``level`` kernels."""
    return {f for name, (m, flags) in _LEVELS.items() if mask(level) & m == m for f in flags}


def supported(cpu_flags: Iterable[str]) -> list[str]:
    """Every level a CPU with these flags can run (and so emulate), oldest first."""
    have = set(cpu_flags)
    return [level for level in ISA_LEVELS if required_flags(level) <= have]


def native(cpu_flags: Iterable[str]) -> str | None:
    """The highest level a CPU with these flags supports (None: not even SSE4.1)."""
    levels = supported(cpu_flags)
    return levels[-1] if levels else None


def missing_flags(level: str, cpu_flags: Iterable[str]) -> list[str]:
    """The flags ``level`` needs that the CPU lacks (empty when it can emulate it)."""
    return sorted(required_flags(level) - set(cpu_flags))


def xla_value(level: str) -> str:
    """The ``--xla_cpu_max_isa`` value that caps XLA's CPU code generation at (or just below) ``level``."""
    return _XLA[level]


def onednn_default(cpu_flags: Iterable[str]) -> bool:
    """Whether TensorFlow (Linux x86) turns oneDNN on by default on a CPU with these flags."""
    return bool(set(cpu_flags) & set(ONEDNN_DEFAULT_FLAGS))


def onednn_value(level: str) -> str:
    """The ``ONEDNN_MAX_CPU_ISA`` value of ``level`` (oneDNN spells them in capitals)."""
    mask(level)  # KeyError for an unknown level
    return level.upper()
