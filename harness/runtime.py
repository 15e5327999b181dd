"""Apply an environment's TensorFlow knobs inside a worker process.

Import-time knobs (oneDNN, thread counts, raw env vars) were already set as
environment variables by Ray's runtime_env before this process imported TF.
Here we apply the ones TF takes through its API, once per process, before
any op runs: memory growth, TF32, op determinism. A worker reused for a
second cell of the same environment skips the work.
"""

from __future__ import annotations

import os
import traceback
from pathlib import Path

from .spec import Environment


class EnvironmentMismatch(RuntimeError):
    """The process cannot honour the environment (e.g. no GPU where one was asked for)."""


_configured: dict[str, str] = {}
# Set for every environment but irrelevant to numerics.
_COSMETIC = ("HARNESS_ENVIRONMENT", "TF_CPP_MIN_LOG_LEVEL")


def _import_time_drift(env: Environment) -> list[str]:
    """Env vars the environment wants that this process did not start with."""
    return [f"{k}={v!r} (process has {os.environ.get(k)!r})"
            for k, v in env.env_vars().items()
            if k not in _COSMETIC and os.environ.get(k) != v]


def configure(env: Environment) -> None:
    """Configure TF for ``env`` in this process, or raise ``EnvironmentMismatch``.

    Raises:
        EnvironmentMismatch: the environment asked for GPUs and TensorFlow sees
            none; the process was started with other import-time env vars
            (e.g. ``--inline`` with several environments); or it was already
            configured for a different environment.
    """
    drift = _import_time_drift(env)
    if drift:
        raise EnvironmentMismatch(
            f"environment {env.name!r} needs these variables set before TensorFlow is imported: "
            f"{'; '.join(drift)}. Run it through Ray (not --inline) so it gets a worker process of its own")
    import tensorflow as tf

    gpus = tf.config.list_physical_devices("GPU")
    if env.num_gpus > 0 and not gpus:
        build = tf.sysconfig.get_build_info()
        raise EnvironmentMismatch(
            f"environment {env.name!r} asked for {env.num_gpus:g} GPU(s) but TensorFlow {tf.__version__} sees none "
            f"(CUDA build: {bool(build.get('is_cuda_build'))}, CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r}). "
            f"Install the 'gpu' extra (tensorflow[and-cuda]) on that node, or remove num_gpus")
    # Only process-wide state matters here; batch size and XLA are per call.
    key = repr((env.memory_growth, env.tf32, env.op_determinism))
    previous = _configured.get("knobs")
    if previous == key:
        return
    if previous is not None:
        raise EnvironmentMismatch(f"this worker was already configured for other TF settings; cannot switch to {env.name!r}")
    for gpu in gpus:
        tf.config.experimental.set_memory_growth(gpu, env.memory_growth)
    if env.tf32 is not None:
        tf.config.experimental.enable_tensor_float_32_execution(env.tf32)
    if env.op_determinism:
        tf.config.experimental.enable_op_determinism()
    _configured["knobs"] = key


def error_text(exc: BaseException) -> str:
    """One line: exception type, first line of its message, and where it was raised."""
    last = traceback.extract_tb(exc.__traceback__)[-1:] if exc.__traceback__ else []
    where = f" (at {Path(last[0].filename).name}:{last[0].lineno})" if last else ""
    return f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}{where}"
