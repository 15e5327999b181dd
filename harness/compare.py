"""Pure-numpy comparison of observed outputs against a reference.

No TensorFlow, no Ray. Semantics (also in the README):

* **bitwise**: the observed array has the reference's shape, dtype and bytes.
* An element is **within tolerance** when ``|obs - ref| <= atol + rtol * |ref|``
  (``numpy.isclose`` semantics, asymmetric: the reference scales ``rtol``) **or**
  its ULP distance is ``<= max_ulp``. Either criterion accepts; set a field to 0
  to turn it off. NaN matches NaN and an infinity matches the same infinity;
  anything else against NaN/Inf is outside every tolerance.
* **ULP distance** is measured on the reference's dtype: the observed values are
  cast to it, both are mapped to their ordered integer encodings, and the
  distance is the number of representable values between them (so ``+0`` and
  ``-0`` are 1 apart for the count but still compare equal numerically). For
  integer and bool arrays it is ``|obs - ref|``.
* A shape mismatch is never within tolerance; a dtype mismatch is reported as a
  mismatch even if the values agree after the cast.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Mapping

import numpy as np

#: Per-dtype default tolerances ``(atol, rtol, max_ulp)``. Reduced-precision
#: floats get looser defaults; integers and bools must match exactly.
DEFAULT_TOLERANCES: dict[str, tuple[float, float, float]] = {
    "float64": (1e-12, 1e-9, 0.0),
    "float32": (1e-6, 1e-5, 0.0),
    "float16": (1e-3, 1e-3, 0.0),
    "bfloat16": (1e-2, 1e-2, 0.0),
}
_EXACT = (0.0, 0.0, 0.0)


@dataclass(frozen=True)
class Tolerance:
    """Tolerance for one comparison; ``None`` fields fall back to the dtype default."""

    atol: float | None = None
    rtol: float | None = None
    max_ulp: float | None = None

    def for_dtype(self, dtype: np.dtype) -> tuple[float, float, float]:
        """The effective ``(atol, rtol, max_ulp)`` for arrays of ``dtype``."""
        base = DEFAULT_TOLERANCES.get(np.dtype(dtype).name, _EXACT)
        return (
            base[0] if self.atol is None else float(self.atol),
            base[1] if self.rtol is None else float(self.rtol),
            base[2] if self.max_ulp is None else float(self.max_ulp),
        )

    def merged(self, override: "Tolerance | None") -> "Tolerance":
        """This tolerance with the non-``None`` fields of ``override`` on top."""
        if override is None:
            return self
        return Tolerance(
            atol=self.atol if override.atol is None else override.atol,
            rtol=self.rtol if override.rtol is None else override.rtol,
            max_ulp=self.max_ulp if override.max_ulp is None else override.max_ulp,
        )


@dataclass(frozen=True)
class OutputComparison:
    """Metrics for one output (or one variable) against its reference."""

    name: str
    verdict: str  # bitwise | within_tolerance | mismatch
    shape_ref: tuple[int, ...]
    shape_obs: tuple[int, ...]
    dtype_ref: str
    dtype_obs: str
    max_abs_diff: float = math.nan
    max_rel_diff: float = math.nan
    max_ulp_diff: float = math.nan
    mismatch_fraction: float = math.nan
    nonfinite_mismatch: int = 0
    atol: float = 0.0
    rtol: float = 0.0
    max_ulp: float = 0.0
    required_atol: float = math.nan
    required_rtol: float = math.nan
    required_ulp: float = math.nan
    first_mismatch_index: tuple[int, ...] | None = None
    reason: str | None = None

    def to_dict(self) -> dict:
        d = asdict(self)
        return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in d.items()}


@dataclass(frozen=True)
class Comparison:
    """All outputs of one observation against the reference."""

    verdict: str
    outputs: tuple[OutputComparison, ...] = field(default_factory=tuple)
    reason: str | None = None

    def _agg(self, attr: str) -> float:
        vals = [getattr(o, attr) for o in self.outputs if not math.isnan(getattr(o, attr))]
        return max(vals) if vals else math.nan

    @property
    def max_abs_diff(self) -> float:
        return self._agg("max_abs_diff")

    @property
    def max_rel_diff(self) -> float:
        return self._agg("max_rel_diff")

    @property
    def max_ulp_diff(self) -> float:
        return self._agg("max_ulp_diff")

    @property
    def required(self) -> tuple[float, float, float]:
        """``(atol, rtol, max_ulp)``: each alone would have accepted every element."""
        return self._agg("required_atol"), self._agg("required_rtol"), self._agg("required_ulp")

    @property
    def applied(self) -> tuple[float, float, float]:
        return self._agg("atol"), self._agg("rtol"), self._agg("max_ulp")

    @property
    def mismatch_fraction(self) -> float:
        """Fraction of all compared elements whose bits differ."""
        total = sum(math.prod(o.shape_ref) for o in self.outputs if not math.isnan(o.mismatch_fraction))
        if not total:
            return self._agg("mismatch_fraction")
        bad = sum(o.mismatch_fraction * math.prod(o.shape_ref) for o in self.outputs
                  if not math.isnan(o.mismatch_fraction))
        return bad / total


_UINT_OF_WIDTH = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}


def _is_float(dtype: np.dtype) -> bool:
    return np.issubdtype(dtype, np.floating) or dtype.name == "bfloat16"


def ordered_bits(a: np.ndarray) -> np.ndarray:
    """Map floats to unsigned integers whose order matches the floats' order.

    Negative floats have their bits inverted, non-negative ones get the sign
    bit set, so adjacent representable floats map to adjacent integers.
    """
    a = np.ascontiguousarray(a)
    utype = _UINT_OF_WIDTH[a.dtype.itemsize]
    u = a.view(utype)
    sign = utype(1) << utype(8 * a.dtype.itemsize - 1)
    return np.where(u & sign, ~u, u | sign)


def ulp_distance(ref: np.ndarray, obs: np.ndarray) -> np.ndarray:
    """Element-wise ULP distance, on ``ref``'s dtype, as float64.

    Both arrays must already have the same shape and dtype. NaN vs NaN is 0;
    NaN vs anything else is ``inf``.
    """
    if ref.dtype.kind in "iub":  # exact even where float64 cannot hold the values (int64)
        a, b = _ordered_int(ref), _ordered_int(obs)
        return np.where(a > b, a - b, b - a).astype(np.float64)
    if not _is_float(ref.dtype):
        return np.abs(ref.astype(np.float64) - obs.astype(np.float64))
    a, b = ordered_bits(ref), ordered_bits(obs)
    dist = np.where(a > b, a - b, b - a).astype(np.float64)
    ref_nan, obs_nan = _isnan(ref), _isnan(obs)
    dist = np.where(ref_nan & obs_nan, 0.0, dist)
    return np.where(ref_nan ^ obs_nan, np.inf, dist)


def _ordered_int(a: np.ndarray) -> np.ndarray:
    """Integers/bools as unsigned integers of the same width and order."""
    a = np.ascontiguousarray(a)
    utype = _UINT_OF_WIDTH[a.dtype.itemsize]
    u = a.view(utype)
    if a.dtype.kind == "i":
        u = u ^ (utype(1) << utype(8 * a.dtype.itemsize - 1))
    return u


def _isnan(a: np.ndarray) -> np.ndarray:
    return np.isnan(a.astype(np.float64)) if _is_float(a.dtype) else np.zeros(a.shape, bool)


def _nonfinite_agree(ref64: np.ndarray, obs64: np.ndarray) -> np.ndarray:
    """Elements where NaN/Inf status and value agree (both finite counts as agree)."""
    both_nan = np.isnan(ref64) & np.isnan(obs64)
    same_inf = np.isinf(ref64) & (ref64 == obs64)
    both_finite = np.isfinite(ref64) & np.isfinite(obs64)
    return both_nan | same_inf | both_finite


def compare_arrays(name: str, ref: np.ndarray, obs: np.ndarray, tolerance: Tolerance = Tolerance()) -> OutputComparison:
    """Compare one observed array with its reference.

    Args:
        name: output or variable name, carried into the result.
        ref: the reference array.
        obs: the observed array.
        tolerance: atol / rtol / max_ulp; missing fields use the per-dtype
            defaults of ``ref.dtype`` (see ``DEFAULT_TOLERANCES``).

    Returns:
        An ``OutputComparison`` whose ``verdict`` is ``bitwise``,
        ``within_tolerance`` or ``mismatch``, with every metric filled in.

    Example:
        >>> r = compare_arrays("y", np.float32([1, 2]), np.float32([1, np.nextafter(2, 3, dtype=np.float32)]))
        >>> r.verdict, r.max_ulp_diff
        ('within_tolerance', 1.0)
    """
    ref, obs = np.asarray(ref), np.asarray(obs)
    atol, rtol, max_ulp = tolerance.for_dtype(ref.dtype)
    common = dict(name=name, shape_ref=tuple(ref.shape), shape_obs=tuple(obs.shape),
                  dtype_ref=ref.dtype.name, dtype_obs=obs.dtype.name, atol=atol, rtol=rtol, max_ulp=max_ulp)
    if ref.shape != obs.shape:
        return OutputComparison(verdict="mismatch", reason=f"shape {obs.shape} != reference {ref.shape}", **common)
    dtype_reason = None
    if ref.dtype != obs.dtype:
        dtype_reason = f"dtype {obs.dtype.name} != reference {ref.dtype.name}"
        obs_cast = obs.astype(ref.dtype)
    else:
        obs_cast = obs
        if ref.tobytes() == obs.tobytes():
            zeros = dict(max_abs_diff=0.0, max_rel_diff=0.0, max_ulp_diff=0.0, mismatch_fraction=0.0,
                         required_atol=0.0, required_rtol=0.0, required_ulp=0.0)
            return OutputComparison(verdict="bitwise", **zeros, **common)
    if ref.size == 0:
        return OutputComparison(verdict="mismatch" if dtype_reason else "bitwise", reason=dtype_reason,
                                mismatch_fraction=0.0, **common)

    ref64 = ref.astype(np.float64)
    obs64 = obs_cast.astype(np.float64)
    ulp = ulp_distance(ref, obs_cast)
    agree_nonfinite = _nonfinite_agree(ref64, obs64)
    finite = np.isfinite(ref64) & np.isfinite(obs64)
    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
        absdiff = np.where(finite, np.abs(obs64 - ref64), np.where(agree_nonfinite, 0.0, np.inf))
        if ref.dtype.kind in "iub":
            absdiff = ulp  # exact integer distance (float64 rounding can hide int64 differences)
        absref = np.abs(np.where(finite, ref64, 0.0))
        reldiff = np.where(absdiff == 0, 0.0, absdiff / absref)
    # Bitwise mismatch per element: compare the raw bytes of each element.
    if ref.dtype == obs.dtype:
        utype = _UINT_OF_WIDTH.get(ref.dtype.itemsize)
        if utype is not None:
            differs = np.ascontiguousarray(ref).view(utype) != np.ascontiguousarray(obs).view(utype)
        else:
            differs = ref != obs
    else:
        differs = np.ones(ref.shape, bool)

    with np.errstate(invalid="ignore", over="ignore"):  # rtol=inf at ref=0 would give NaN, not 0
        within_close = agree_nonfinite & (absdiff <= atol + np.where(absref > 0, rtol * absref, 0.0))
    within_ulp = agree_nonfinite & (ulp <= max_ulp)
    within = within_close | within_ulp
    all_within = bool(within.all())
    first_bad = None
    if not all_within:
        first_bad = tuple(int(i) for i in np.unravel_index(int(np.argmin(within.ravel())), ref.shape))
    nonfinite_mismatch = int((~agree_nonfinite).sum())
    # max(|d|/|ref|) can fall 1 ULP short of passing |d| <= rtol*|ref| after rounding; step up until it passes.
    required_rtol = float(reldiff.max())
    with np.errstate(over="ignore"):
        while math.isfinite(required_rtol) and np.any(absdiff > required_rtol * absref):
            required_rtol = float(np.nextafter(required_rtol, math.inf))
    verdict = "within_tolerance" if all_within and dtype_reason is None else "mismatch"
    reason = dtype_reason
    if verdict == "mismatch" and reason is None:
        bad = int((~within).sum())
        reason = f"{bad} of {ref.size} elements outside tolerance, first at index {list(first_bad)}"
        if nonfinite_mismatch:
            reason += f" ({nonfinite_mismatch} NaN/Inf disagreements)"
    return OutputComparison(
        verdict=verdict,
        max_abs_diff=float(absdiff.max()),
        max_rel_diff=float(reldiff.max()),
        max_ulp_diff=float(ulp.max()),
        mismatch_fraction=float(differs.mean()),
        nonfinite_mismatch=nonfinite_mismatch,
        required_atol=float(absdiff.max()),
        required_rtol=required_rtol,
        required_ulp=float(ulp.max()),
        first_mismatch_index=first_bad,
        reason=reason,
        **common,
    )


_RANK = {"bitwise": 0, "within_tolerance": 1, "mismatch": 2}


def worst(verdicts) -> str:
    """The worst of numeric verdicts (``bitwise`` for an empty sequence)."""
    return max(verdicts, key=_RANK.__getitem__, default="bitwise")


def compare_outputs(reference: Mapping[str, np.ndarray], observed: Mapping[str, np.ndarray],
                    tolerance: Tolerance = Tolerance(),
                    per_output: Mapping[str, Tolerance] | None = None) -> Comparison:
    """Compare every named output; the verdict is the worst over outputs.

    Missing or extra outputs make the verdict ``mismatch`` with a reason
    naming them. ``per_output`` overrides the tolerance for named outputs.
    """
    missing = sorted(set(reference) - set(observed))
    extra = sorted(set(observed) - set(reference))
    results = []
    for name in reference:
        if name in observed:
            tol = tolerance.merged((per_output or {}).get(name))
            results.append(compare_arrays(name, reference[name], observed[name], tol))
    verdict = worst(r.verdict for r in results)
    reason = None
    if missing or extra:
        verdict = "mismatch"
        reason = f"outputs missing: {missing}; unexpected outputs: {extra}"
    elif verdict == "mismatch":
        reason = "; ".join(f"{r.name}: {r.reason}" for r in results if r.verdict == "mismatch")
    return Comparison(verdict=verdict, outputs=tuple(results), reason=reason)


def compare_digests(reference: Mapping[str, dict], observed: Mapping[str, dict]) -> tuple[bool, list[str]]:
    """Compare per-variable digests ``{name: {"sha256", "shape", "dtype"}}``.

    Names are matched exactly first, then by unique suffix (a loaded model may
    drop or add the outer model's name, e.g. ``dense/kernel`` vs
    ``sequential/dense/kernel``), then by position among the remaining ones.

    Returns:
        ``(all_equal, problems)`` where problems name each differing, missing or
        extra variable.
    """
    ref_names = list(reference)
    obs_left = dict(observed)
    pairs: list[tuple[str, str | None]] = []
    unmatched = []
    for name in ref_names:
        if name in obs_left:
            pairs.append((name, name))
            obs_left.pop(name)
        else:
            unmatched.append(name)
    still = []
    for name in unmatched:
        cands = [o for o in obs_left if o.endswith("/" + name) or name.endswith("/" + o)]
        if len(cands) == 1:
            pairs.append((name, cands[0]))
            obs_left.pop(cands[0])
        else:
            still.append(name)
    for name, obs_name in zip(still, list(obs_left)):
        pairs.append((name, obs_name))
        obs_left.pop(obs_name)
    problems = []
    matched_ref = {p[0] for p in pairs}
    for name in ref_names:
        if name not in matched_ref:
            problems.append(f"{name}: not restored")
    for obs_name in obs_left:
        problems.append(f"{obs_name}: unexpected extra variable")
    for name, obs_name in pairs:
        r, o = reference[name], observed[obs_name]
        if list(r["shape"]) != list(o["shape"]) or r["dtype"] != o["dtype"]:
            problems.append(f"{name}: {o['dtype']}{list(o['shape'])} != original {r['dtype']}{list(r['shape'])}")
        elif r["sha256"] != o["sha256"]:
            problems.append(f"{name}: restored bytes differ from the original (sha256 {o['sha256'][:12]} != {r['sha256'][:12]})")
    return not problems, problems
