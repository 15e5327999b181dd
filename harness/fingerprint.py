"""What an environment really is, measured inside the worker.

``collect()`` imports TensorFlow, so it runs in workers only. ``cpu_info()`` and
``ray_info()`` do not, and are also used by ``harness envs``.
"""

from __future__ import annotations

import copy
import os
import platform
import socket
import sys
from typing import Any

from . import isa

# CPU flags that change which kernels TF/oneDNN/XLA pick; the full list is noise.
_INTERESTING_FLAGS = tuple(sorted({"sse4_2", "f16c", "asimd", "sve", *(f for level in isa.ISA_LEVELS
                                                                        for f in isa.required_flags(level))}))
_ENV_KEYS = ("TF_ENABLE_ONEDNN_OPTS", "TF_NUM_INTRAOP_THREADS", "TF_NUM_INTEROP_THREADS", "OMP_NUM_THREADS",
             "TF_XLA_FLAGS", "XLA_FLAGS", "ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA", "TF_USE_LEGACY_KERAS",
             "CUDA_VISIBLE_DEVICES", "TF_DETERMINISTIC_OPS", "NVIDIA_TF32_OVERRIDE", "TF_CPP_MIN_LOG_LEVEL")


def cpu_info() -> dict[str, Any]:
    """CPU model, vendor and the SIMD flags that matter for numerics (Linux /proc/cpuinfo)."""
    model, vendor, flags = platform.processor() or platform.machine(), None, set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "model name" and model in (None, "", platform.machine(), platform.processor()):
                    model = value.strip()
                elif key == "vendor_id" and vendor is None:
                    vendor = value.strip()
                elif key in ("flags", "Features") and not flags:
                    flags = set(value.split())
    except OSError:
        pass
    return {"cpu_model": model, "cpu_vendor": vendor, "cpu_count": os.cpu_count(),
            "cpu_flags": sorted(f for f in flags if f in _INTERESTING_FLAGS), "machine": platform.machine()}


def ray_info() -> dict[str, Any]:
    """Ray node id and labels of the current worker (empty outside Ray)."""
    try:
        import ray

        if not ray.is_initialized():
            return {"ray_node_id": None, "ray_node_labels": {}}
        ctx = ray.get_runtime_context()
        labels = ctx.get_node_labels() if hasattr(ctx, "get_node_labels") else {}
        return {"ray_node_id": ctx.get_node_id(), "ray_node_labels": dict(labels or {})}
    except Exception:  # fingerprinting must never fail a cell
        return {"ray_node_id": None, "ray_node_labels": {}}


def _onednn_enabled(tf) -> bool | None:
    try:
        from tensorflow.python.util import _pywrap_util_port

        return bool(_pywrap_util_port.IsMklEnabled()) and os.environ.get("TF_ENABLE_ONEDNN_OPTS", "1") not in ("0", "false", "False")
    except Exception:
        return None


def _gpus(tf) -> list[dict[str, Any]]:
    out = []
    for dev in tf.config.list_physical_devices("GPU"):
        try:
            details = tf.config.experimental.get_device_details(dev)
        except Exception:
            details = {}
        cc = details.get("compute_capability")
        out.append({"name": details.get("device_name", dev.name),
                    "compute_capability": ".".join(map(str, cc)) if cc else None})
    return out


_cache: dict[tuple[str | None, bool], dict[str, Any]] = {}


def collect(environment: str | None = None, jit_compile: bool = False) -> dict[str, Any]:
    """Fingerprint this process: versions, build, CPU, GPUs, TF settings, Ray node.

    Measured once per process and environment (a worker serves many cells; what
    it is does not change between them); each call returns a fresh copy.
    """
    key = (environment, jit_compile)
    if key not in _cache:
        _cache[key] = _measure(environment, jit_compile)
    return copy.deepcopy(_cache[key])


def _measure(environment: str | None, jit_compile: bool) -> dict[str, Any]:
    import keras
    import numpy
    import tensorflow as tf

    build = dict(tf.sysconfig.get_build_info())
    try:
        determinism = tf.config.experimental.is_op_determinism_enabled()
    except AttributeError:
        determinism = None
    fp = {
        "environment": environment,
        "tf_version": tf.__version__,
        "keras_version": keras.__version__,
        "python": platform.python_version(),
        "numpy": numpy.__version__,
        "platform": platform.platform(),
        "hostname": socket.gethostname(),
        "pid": os.getpid(),
        "tf_cuda_build": bool(build.get("is_cuda_build", False)),
        "cuda_version": build.get("cuda_version"),
        "cudnn_version": build.get("cudnn_version"),
        "gpus": _gpus(tf),
        "gpu_driver": _nvidia_driver(),
        "onednn": _onednn_enabled(tf),
        "intra_op_threads": _threads(tf.config.threading.get_intra_op_parallelism_threads(), "TF_NUM_INTRAOP_THREADS"),
        "inter_op_threads": _threads(tf.config.threading.get_inter_op_parallelism_threads(), "TF_NUM_INTEROP_THREADS"),
        "tf32": tf.config.experimental.tensor_float_32_execution_enabled(),
        "op_determinism": determinism,
        "jit_compile": jit_compile,
        "xla_flags": os.environ.get("TF_XLA_FLAGS"),
        "xla_cpu_flags": os.environ.get("XLA_FLAGS"),
        "env": {k: os.environ[k] for k in _ENV_KEYS if k in os.environ},
        "executable": sys.executable,
        # Where this worker's harness code came from: a Ray py_modules upload on clusters.
        "harness_path": os.path.dirname(os.path.abspath(__file__)),
    }
    fp.update(cpu_info())
    fp.update(onednn_info(fp["onednn"], fp["cpu_flags"]))
    fp.update(ray_info())
    return fp


def onednn_info(effective: bool | None, cpu_flags: list[str]) -> dict[str, Any]:
    """oneDNN as TensorFlow decides it on this CPU: its default, the ISA the CPU has and the cap in force.

    ``onednn_default``: what TensorFlow picks with TF_ENABLE_ONEDNN_OPTS unset
    (on only with AVX512-VNNI/BF16, AVX-VNNI or AMX). ``onednn_max_isa``: the
    instruction set oneDNN may use here: ``ONEDNN_MAX_CPU_ISA`` when set, else
    the CPU's own level; None while oneDNN is off.
    """
    native = isa.native(cpu_flags)
    cap = os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA")
    cap = cap.lower() if cap else native
    if cap in isa.ISA_LEVELS and native in isa.ISA_LEVELS and not isa.includes(native, cap):
        cap = native  # oneDNN cannot go above what the CPU has
    return {"onednn_default": isa.onednn_default(cpu_flags), "cpu_isa_native": native,
            "onednn_max_isa": cap if effective else None}


def _threads(api_value: int, env_var: str) -> int:
    """Effective thread count: the API's value, else the env var TF read at start-up.

    The API answers 0 ("TF's default") when the count came from the environment.
    0 still means TF's default (about one thread per core).
    """
    if api_value:
        return api_value
    try:
        return int(os.environ.get(env_var, "0"))
    except ValueError:
        return 0


def _nvidia_driver() -> str | None:
    try:
        with open("/proc/driver/nvidia/version") as f:
            return f.readline().strip()
    except OSError:
        return None
