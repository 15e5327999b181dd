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
* Strings (object arrays of ``bytes``/``str``, numpy ``S``/``U``) are compared
  exactly, element by element: equal is ``bitwise``, any difference is a
  ``mismatch`` (no tolerance applies) naming the first differing element.
* Weights (``compare_digests``): every model parameter is matched by name and
  must have the original's shape, dtype and bytes; see ``WeightCheck``.
"""

from __future__ import annotations

import math
import re
from fractions import Fraction
from dataclasses import asdict, dataclass, field
from typing import Iterable, Mapping

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
_INT_OF_WIDTH = {1: np.int8, 2: np.int16, 4: np.int32, 8: np.int64}
#: Elements per chunk: temporaries stay a few MB whatever the array size, and
#: small enough to stay in cache instead of faulting in fresh pages.
CHUNK = 1 << 16


def _is_float(dtype: np.dtype) -> bool:
    return np.issubdtype(dtype, np.floating) or dtype.name == "bfloat16"


def ordered_bits(a: np.ndarray) -> np.ndarray:
    """Map floats to unsigned integers whose order matches the floats' order.

    Negative floats have their bits inverted, non-negative ones get the sign
    bit set, so adjacent representable floats map to adjacent integers.
    Branch-free: an arithmetic shift of the sign bit builds the XOR mask.
    """
    a = np.ascontiguousarray(a)
    width = a.dtype.itemsize
    utype = _UINT_OF_WIDTH[width]
    sign = utype(1) << utype(8 * width - 1)
    mask = (a.view(_INT_OF_WIDTH[width]) >> (8 * width - 1)).view(utype)  # all ones where negative
    return a.view(utype) ^ (mask | sign)


def _ordered_int(a: np.ndarray) -> np.ndarray:
    """Integers/bools as unsigned integers of the same width and order."""
    a = np.ascontiguousarray(a)
    utype = _UINT_OF_WIDTH[a.dtype.itemsize]
    u = a.view(utype)
    if a.dtype.kind == "i":
        u = u ^ (utype(1) << utype(8 * a.dtype.itemsize - 1))
    return u


def _isnan(a: np.ndarray) -> np.ndarray:
    if a.dtype.name == "bfloat16":
        return np.isnan(a.astype(np.float32))
    return np.isnan(a) if _is_float(a.dtype) else np.zeros(a.shape, bool)


def ulp_distance(ref: np.ndarray, obs: np.ndarray) -> np.ndarray:
    """Element-wise ULP distance, on ``ref``'s dtype, as float64.

    Both arrays must already have the same shape and dtype. NaN vs NaN is 0;
    NaN vs anything else is ``inf``. Integers: the exact ``|obs - ref|``.
    """
    if ref.dtype.kind in "iub":  # exact even where float64 cannot hold the values (int64)
        a, b = _ordered_int(ref), _ordered_int(obs)
        return (np.maximum(a, b) - np.minimum(a, b)).astype(np.float64)
    a, b = ordered_bits(ref), ordered_bits(obs)
    dist = (np.maximum(a, b) - np.minimum(a, b)).astype(np.float64)
    ref_nan, obs_nan = _isnan(ref), _isnan(obs)
    if ref_nan.any() or obs_nan.any():
        dist[ref_nan & obs_nan] = 0.0
        dist[ref_nan ^ obs_nan] = np.inf
    return dist


def bits_equal(ref: np.ndarray, obs: np.ndarray) -> bool:
    """Same shape, dtype and bytes, without copying contiguous arrays."""
    if ref.shape != obs.shape or ref.dtype != obs.dtype:
        return False
    utype = _UINT_OF_WIDTH.get(ref.dtype.itemsize)
    if utype is None:
        return ref.tobytes() == obs.tobytes()
    return bool(np.array_equal(np.ascontiguousarray(ref).view(utype), np.ascontiguousarray(obs).view(utype)))


@dataclass
class _Stats:
    """Running maxima and counts over chunks."""

    max_abs: float = 0.0
    max_rel: float = 0.0
    max_ulp: float = 0.0
    required_atol: float = 0.0
    required_rtol: float = 0.0
    differs: int = 0
    bad: int = 0
    nonfinite: int = 0
    first_bad: int | None = None


def _exact_within(ref: float, obs: float, atol: float, rtol: float) -> bool:
    """``|obs - ref| <= atol + rtol * |ref|`` in exact rational arithmetic (finite ref and obs)."""
    if math.isinf(atol) or (math.isinf(rtol) and ref != 0):
        return True
    rhs = Fraction(atol) + (Fraction(rtol) * abs(Fraction(ref)) if ref != 0 else 0)
    return abs(Fraction(obs) - Fraction(ref)) <= rhs


def _exact_diff(ref64: np.ndarray, obs64: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(|obs - ref| rounded to nearest, the smallest double >= the exact |obs - ref|)``.

    Knuth's TwoSum recovers the rounding error of the subtraction exactly, so
    the required atol really passes. The error is zero for almost every element
    (always, unless the two exponents are far apart), so only the few rounded
    ones are stepped up.
    """
    with np.errstate(over="ignore", invalid="ignore"):
        s = obs64 - ref64
        bv = s - obs64
        err = (obs64 - (s - bv)) + (-ref64 - bv)
        absdiff = np.abs(s)
    rounded = np.flatnonzero(err)
    if rounded.size == 0:
        return absdiff, absdiff
    short = rounded[np.isfinite(s[rounded]) & (np.signbit(err[rounded]) == np.signbit(s[rounded]))]  # towards zero
    needed = absdiff.copy()
    with np.errstate(over="ignore"):  # the largest double steps up to inf: no finite atol passes, rightly
        needed[short] = np.nextafter(absdiff[short], np.inf)
    return absdiff, needed


def _required_rtol(absdiff: np.ndarray, reldiff: np.ndarray, ref64: np.ndarray, obs64: np.ndarray) -> float:
    """The smallest double ``q`` with ``|obs - ref| <= q * |ref|`` exactly, for every element.

    ``max(|d| / |ref|)`` is rounded to nearest, so it can fall one step short
    (always so when the product is subnormal); the few elements near the
    maximum are settled exactly.
    """
    top = float(reldiff.max()) if reldiff.size else 0.0
    if top == 0.0 or not math.isfinite(top):
        return top
    near = np.flatnonzero(reldiff >= np.nextafter(np.nextafter(top, 0.0), 0.0))
    for i in near:
        r, o = float(ref64[i]), float(obs64[i])
        while math.isfinite(top) and not _exact_within(r, o, 0.0, top):
            top = math.nextafter(top, math.inf)
    return top


def _chunk_stats(st: _Stats, ref: np.ndarray, obs: np.ndarray, offset: int, same_dtype: bool,
                 atol: float, rtol: float, max_ulp: float) -> None:
    """Fold one flat chunk (``obs`` already cast to ``ref``'s dtype) into ``st``.

    The tolerance test is decided in exact arithmetic: float64 is used where its
    rounding cannot change the answer, and the rare elements where it could
    (subnormal products, float64 references) are re-checked with fractions.
    """
    ulp = ulp_distance(ref, obs)
    if ref.dtype.kind in "iub":
        absdiff = needed = ulp  # exact integer distance (float64 rounding can hide int64 differences)
        absref = np.abs(ref.astype(np.float64))
        agree = np.ones(ref.shape, bool)
        ref64 = obs64 = None
    else:
        ref64, obs64 = ref.astype(np.float64), obs.astype(np.float64)
        finite = np.isfinite(ref64) & np.isfinite(obs64)
        if finite.all():
            agree = finite
            absdiff, needed = _exact_diff(ref64, obs64)
            absref = np.abs(ref64)
        else:
            same_nonfinite = (np.isnan(ref64) & np.isnan(obs64)) | (np.isinf(ref64) & (ref64 == obs64))
            agree = finite | same_nonfinite
            r0, o0 = np.where(finite, ref64, 0.0), np.where(finite, obs64, 0.0)
            d, up = _exact_diff(r0, o0)
            absdiff = np.where(finite, d, np.where(agree, 0.0, np.inf))
            needed = np.where(finite, up, np.where(agree, 0.0, np.inf))
            absref = np.abs(r0)
    with np.errstate(invalid="ignore", over="ignore", divide="ignore", under="ignore"):
        reldiff = np.where(absdiff == 0, 0.0, absdiff / absref)
        # rtol=inf at ref=0 would give NaN, not 0
        threshold = atol + np.where(absref > 0, rtol * absref, 0.0)
        within_tol = agree & (absdiff <= threshold)
        if ref64 is not None:
            # Within a few ulps of the threshold float64 may round either way: decide exactly.
            near = agree & np.isfinite(threshold) & np.isfinite(absdiff) & (
                np.abs(absdiff - threshold) <= 2.0 ** -50 * np.maximum(absdiff, threshold) + 2.0 ** -1070)
            near &= np.isfinite(ref64) & np.isfinite(obs64)
            for i in np.flatnonzero(near):
                within_tol[i] = _exact_within(float(ref64[i]), float(obs64[i]), atol, rtol)
        within = within_tol | (agree & (ulp <= max_ulp))
    if same_dtype:
        utype = _UINT_OF_WIDTH.get(ref.dtype.itemsize)
        differs = int(np.count_nonzero(ref.view(utype) != obs.view(utype))) if utype else int(np.count_nonzero(ref != obs))
    else:
        differs = ref.size
    if ref64 is None:
        req_rtol = float(reldiff.max())
    else:
        fin = agree & np.isfinite(ref64)
        req_rtol = _required_rtol(np.where(fin, absdiff, 0.0), np.where(fin, reldiff, 0.0), ref64, obs64)
        if not agree.all():
            req_rtol = math.inf
    bad = ref.size - int(np.count_nonzero(within))
    if bad and st.first_bad is None:
        st.first_bad = offset + int(np.argmin(within))
    st.max_abs = max(st.max_abs, float(absdiff.max()))
    st.max_rel = max(st.max_rel, float(reldiff.max()))
    st.max_ulp = max(st.max_ulp, float(ulp.max()))
    st.required_atol = max(st.required_atol, float(needed.max()))
    st.required_rtol = max(st.required_rtol, req_rtol)
    st.differs += differs
    st.bad += bad
    st.nonfinite += ref.size - int(np.count_nonzero(agree))


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
        Work proceeds in chunks of ``CHUNK`` elements, so extra memory stays
        bounded whatever the array size.

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
    if _is_string(ref.dtype) or _is_string(obs.dtype):
        return _compare_strings(ref, obs, common)
    same_dtype = ref.dtype == obs.dtype
    if same_dtype and bits_equal(ref, obs):
        zeros = dict(max_abs_diff=0.0, max_rel_diff=0.0, max_ulp_diff=0.0, mismatch_fraction=0.0,
                     required_atol=0.0, required_rtol=0.0, required_ulp=0.0)
        return OutputComparison(verdict="bitwise", **zeros, **common)
    dtype_reason = None if same_dtype else f"dtype {obs.dtype.name} != reference {ref.dtype.name}"
    if ref.size == 0:
        return OutputComparison(verdict="mismatch" if dtype_reason else "bitwise", reason=dtype_reason,
                                mismatch_fraction=0.0, **common)
    if ref.dtype.kind not in "iub" and not _is_float(ref.dtype):
        differs = float(np.mean(ref != obs))
        return OutputComparison(verdict="mismatch", mismatch_fraction=differs, **common,
                                reason=f"dtype {ref.dtype.name} is compared bit for bit only")

    flat_ref = np.ascontiguousarray(ref).reshape(-1)
    flat_obs = np.ascontiguousarray(obs).reshape(-1)
    st = _Stats()
    for start in range(0, flat_ref.size, CHUNK):
        r = flat_ref[start:start + CHUNK]
        o = flat_obs[start:start + CHUNK]
        _chunk_stats(st, r, o if same_dtype else o.astype(ref.dtype), start, same_dtype, atol, rtol, max_ulp)
    first_bad = None if st.first_bad is None else tuple(int(i) for i in np.unravel_index(st.first_bad, ref.shape))
    verdict = "within_tolerance" if not st.bad and dtype_reason is None else "mismatch"
    reason = dtype_reason
    if verdict == "mismatch" and reason is None:
        reason = f"{st.bad} of {ref.size} elements outside tolerance, first at index {list(first_bad)}"
        if st.nonfinite:
            reason += f" ({st.nonfinite} NaN/Inf disagreements)"
    return OutputComparison(
        verdict=verdict,
        max_abs_diff=st.max_abs,
        max_rel_diff=st.max_rel,
        max_ulp_diff=st.max_ulp,
        mismatch_fraction=st.differs / ref.size,
        nonfinite_mismatch=st.nonfinite,
        required_atol=st.required_atol,
        required_rtol=st.required_rtol,
        # A NaN/Inf disagreement is outside every tolerance (Inf is 1 ULP from the largest
        # finite value, yet no max_ulp accepts it): the tolerance that would pass is inf.
        required_ulp=math.inf if st.nonfinite else st.max_ulp,
        first_mismatch_index=first_bad,
        reason=reason,
        **common,
    )


def _is_string(dtype: np.dtype) -> bool:
    return dtype.kind in "OSU"


def _compare_strings(ref: np.ndarray, obs: np.ndarray, common: dict) -> OutputComparison:
    """Exact element-wise comparison of string arrays (same shape already checked)."""
    if ref.dtype.kind != obs.dtype.kind:
        return OutputComparison(verdict="mismatch", mismatch_fraction=1.0 if ref.size else 0.0,
                                required_atol=math.inf, required_rtol=math.inf, required_ulp=math.inf, **common,
                                reason=f"dtype {obs.dtype.name} != reference {ref.dtype.name}")
    flat_ref, flat_obs = ref.reshape(-1), obs.reshape(-1)
    # type() too: b"a" and "a" are different values, and numpy's == on object arrays is Python's ==
    same = np.fromiter(((type(r) is type(o) and r == o) for r, o in zip(flat_ref, flat_obs)), bool, flat_ref.size)
    if same.all():
        return OutputComparison(verdict="bitwise", max_abs_diff=0.0, max_rel_diff=0.0, max_ulp_diff=0.0,
                                mismatch_fraction=0.0, required_atol=0.0, required_rtol=0.0, required_ulp=0.0,
                                **common)
    first = int(np.argmin(same))
    index = tuple(int(i) for i in np.unravel_index(first, ref.shape))
    bad = flat_ref.size - int(np.count_nonzero(same))
    return OutputComparison(
        verdict="mismatch", mismatch_fraction=bad / flat_ref.size, first_mismatch_index=index,
        required_atol=math.inf, required_rtol=math.inf, required_ulp=math.inf, **common,
        reason=(f"{bad} of {flat_ref.size} strings differ (strings are compared exactly, no tolerance applies), "
                f"first at index {list(index)}: {_short(flat_obs[first])} != reference {_short(flat_ref[first])}"))


def _short(value, limit: int = 40) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


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


# ---------------------------------------------------------------- weights

#: Kinds of variables that are not model parameters (see ``state_kind``).
STATE_KINDS = ("rng", "optimizer", "metric")
_OPTIMIZERS = ("optimizer", "loss_scale_optimizer", "adam", "adamw", "adamax", "nadam", "sgd", "rmsprop",
               "adagrad", "adadelta", "adafactor", "ftrl", "lion", "lamb", "muon")
_OPTIMIZER_RE = re.compile(rf"^({'|'.join(_OPTIMIZERS)})(_\d+)?$")
_UID_RE = re.compile(r"^(.*?)(?:_(\d+))?$")


def state_kind(name: str, digest: Mapping | None = None) -> str | None:
    """Which kind of non-parameter state a variable is, or ``None`` for a model parameter.

    The digest's own ``kind`` wins when the saver knew it; otherwise the name
    decides: Keras ``SeedGenerator`` states (``.../seed_generator_state``) are
    ``rng``; variables under an optimizer's scope (``adam/...``,
    ``loss_scale_optimizer/...``) or named ``iteration(s)`` are ``optimizer``.
    Metric accumulators are recognised only through ``kind`` (their names,
    e.g. ``mean/total``, are indistinguishable from parameters).
    """
    kind = (digest or {}).get("kind")
    if kind:
        return None if kind == "parameter" else kind
    parts = name.split("/")
    if parts[-1].split("#")[0] == "seed_generator_state":
        return "rng"
    if _OPTIMIZER_RE.match(parts[0]) or (parts[-1] in ("iteration", "iterations") and len(parts) <= 2):
        return "optimizer"
    return None


def _structural_names(names: Iterable[str]) -> dict[str, str]:
    """Variable paths with auto-generated layer uids replaced by their rank.

    Keras names unnamed layers ``dense``, ``dense_1``, ... from a per-process
    counter, so the same model built after another one is ``dense_2``,
    ``dense_3``. Within each parent, components sharing a base name are ranked
    by their numeric suffix: ``dense_2 -> dense#0``, ``dense_3 -> dense#1``
    on one side and ``dense -> dense#0``, ``dense_1 -> dense#1`` on the other.
    """
    split = {n: n.split("/") for n in names}
    canon: dict[str, list[str]] = {n: [] for n in split}
    depth = max((len(p) for p in split.values()), default=0)
    for d in range(depth):
        groups: dict[tuple, set] = {}
        parsed = {}
        for n, parts in split.items():
            if d < len(parts):
                m = _UID_RE.match(parts[d])
                base, num = m.group(1), int(m.group(2) or 0)
                parsed[n] = (tuple(canon[n]), base, num, parts[d])
                groups.setdefault((tuple(canon[n]), base), set()).add((num, parts[d]))
        for n, (parent, base, num, comp) in parsed.items():
            canon[n].append(f"{base}#{sorted(groups[(parent, base)]).index((num, comp))}")
    return {n: "/".join(c) for n, c in canon.items()}


@dataclass(frozen=True)
class WeightCheck:
    """Outcome of ``compare_digests``.

    Attributes:
        equal: every model parameter of the reference was restored with the
            same shape, dtype and bytes, and no unknown parameter appeared.
        problems: one line per failing parameter (missing, extra, other
            shape/dtype, other bytes).
        notes: how names were matched when not exactly, and state that was
            ignored (present on one side only, or differing) -- never a failure.
        checked: number of reference parameters compared.
        ignored_state: names of non-parameter variables (RNG, optimizer,
            metric state) left out of the verdict.
    """

    equal: bool
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    checked: int = 0
    ignored_state: list[str] = field(default_factory=list)


def compare_digests(reference: Mapping[str, dict], observed: Mapping[str, dict]) -> WeightCheck:
    """Compare per-variable digests ``{name: {"sha256", "shape", "dtype"[, "kind"]}}``.

    Pairing, by name only, in this order (never by position):

    1. the same name;
    2. a unique ``/``-suffix match (a loaded model may drop or add the outer
       model's name: ``dense/kernel`` vs ``sequential/dense/kernel``);
    3. the same structural path (``_structural_names``: auto-generated layer
       uids replaced by their rank), unique on both sides; reported in ``notes``.

    Model parameters that stay unpaired fail the check (missing or extra);
    non-parameter state (``state_kind``: RNG seed states, optimizer slots and
    counters, metric accumulators) present on one side only, or with other
    bytes, is listed in ``notes`` / ``ignored_state`` and does not fail it.

    Example:
        >>> d = {"sha256": "00" * 32, "shape": [2], "dtype": "float32"}
        >>> check = compare_digests({"sequential/dense/bias": d},
        ...                         {"sequential_1/dense_2/bias": d, "seed_generator/seed_generator_state": d})
        >>> check.equal, check.checked, check.ignored_state
        (True, 1, ['seed_generator/seed_generator_state'])
    """
    ref_left = dict(reference)
    obs_left = dict(observed)
    pairs: list[tuple[str, str]] = []
    notes: list[str] = []
    for name in list(ref_left):
        if name in obs_left:
            pairs.append((name, name))
            ref_left.pop(name), obs_left.pop(name)
    for name in list(ref_left):
        cands = [o for o in obs_left if o.endswith("/" + name) or name.endswith("/" + o)]
        back = [r for r in ref_left if cands and (cands[0].endswith("/" + r) or r.endswith("/" + cands[0]))]
        if len(cands) == 1 and back == [name]:
            pairs.append((name, cands[0]))
            ref_left.pop(name), obs_left.pop(cands[0])
    if ref_left and obs_left:
        ref_struct, obs_struct = _structural_names(reference), _structural_names(observed)
        by_struct: dict[str, list[str]] = {}
        for o in obs_left:
            by_struct.setdefault(obs_struct[o], []).append(o)
        ref_count: dict[str, int] = {}
        for r in ref_left:
            ref_count[ref_struct[r]] = ref_count.get(ref_struct[r], 0) + 1
        renamed = []
        for name in list(ref_left):
            cands = by_struct.get(ref_struct[name], [])
            if len(cands) == 1 and ref_count[ref_struct[name]] == 1:
                pairs.append((name, cands[0]))
                renamed.append(f"{cands[0]} -> {name}")
                ref_left.pop(name), obs_left.pop(cands[0])
        if renamed:
            notes.append(f"{len(renamed)} variable(s) matched by structural path (auto-generated layer names "
                         f"differ): " + "; ".join(renamed[:10]) + (" ..." if len(renamed) > 10 else ""))

    problems: list[str] = []
    ignored: list[str] = []
    checked = 0
    def judge(name: str, kind: str | None, problem: str, what: str) -> None:
        """A parameter's problem fails the check; the same about non-parameter state is only noted."""
        if kind is None:
            problems.append(problem)
        else:
            ignored.append(name)
            notes.append(f"{kind} state {what} (not a model parameter: ignored)")

    for name, obs_name in pairs:
        r, o = reference[name], observed[obs_name]
        kind = state_kind(name, r) or state_kind(obs_name, o)
        if kind is None:
            checked += 1
        if list(r["shape"]) != list(o["shape"]) or r["dtype"] != o["dtype"]:
            text = f"{name}: {o['dtype']}{list(o['shape'])} != original {r['dtype']}{list(r['shape'])}"
        elif r["sha256"] != o["sha256"]:
            text = f"{name}: restored bytes differ from the original (sha256 {o['sha256'][:12]} != {r['sha256'][:12]})"
        else:
            continue
        judge(name, kind, text, text)
    for name, d in ref_left.items():
        kind = state_kind(name, d)
        if kind is None:
            checked += 1
        judge(name, kind, f"{name}: not restored", f"{name}: only in the original")
    for name, d in obs_left.items():
        judge(name, state_kind(name, d), f"{name}: unexpected extra variable", f"{name}: only in the reloaded artifact")
    return WeightCheck(equal=not problems, problems=problems, notes=notes, checked=checked, ignored_state=ignored)


# -- prediction impact: do the differences change a decision? ------------------------------
#: What an output is, for prediction impact: ``classes`` (scores over the last axis: top-1
#: class and top-k ranks), ``binary`` (one score in [0, 1]: decided at 0.5), ``labels``
#: (integer class ids) or ``regression`` (no decision to flip).
OUTPUT_KINDS = ("classes", "binary", "labels", "regression")
TOP_K = 5


@dataclass(frozen=True)
class Impact:
    """How many predictions of one output changed, not just how many bits.

    ``positions`` are the predictions compared: rows, or rows x time steps for
    sequence outputs. ``flips`` counts those whose decision (top-1 class, the
    0.5 threshold, the label) changed; ``max_rank_change`` is the largest
    move, in rank, of one of the reference's top-``k`` classes.
    """

    kind: str
    positions: int
    flips: int | None = None
    k: int | None = None
    max_rank_change: int | None = None

    @property
    def flip_fraction(self) -> float | None:
        return None if self.flips is None or not self.positions else self.flips / self.positions

    def to_dict(self) -> dict:
        return {**asdict(self), "flip_fraction": self.flip_fraction}


def output_kind(ref: np.ndarray, declared: str | None = None) -> str:
    """The kind of an output: ``declared`` if given, else guessed from its dtype, shape and values.

    Integers are labels; floats with more than one column are class scores; one
    column with every value in [0, 1] is a binary score; anything else is a regression.
    """
    if declared is not None:
        if declared not in OUTPUT_KINDS:
            raise ValueError(f"unknown output kind {declared!r}; use one of {', '.join(OUTPUT_KINDS)}")
        return declared
    ref = np.asarray(ref)
    if ref.dtype.kind in "iub":
        return "labels"
    if not _is_float(ref.dtype) or ref.ndim == 0 or ref.size == 0:
        return "regression"
    if ref.ndim >= 2 and ref.shape[-1] > 1:
        return "classes"
    values = ref.astype(np.float32)
    if np.all(np.isfinite(values)) and values.min() >= 0 and values.max() <= 1:
        return "binary"
    return "regression"


def prediction_impact(ref: np.ndarray, obs: np.ndarray, kind: str | None = None) -> Impact | None:
    """How the observed output's decisions differ from the reference's (None: nothing to decide, or shapes differ)."""
    ref, obs = np.asarray(ref), np.asarray(obs)
    if ref.shape != obs.shape or ref.size == 0:
        return None
    kind = output_kind(ref, kind)
    if kind == "regression":
        return None
    if kind == "labels":
        return Impact(kind, positions=ref.size, flips=int(np.count_nonzero(ref != obs)))
    r, o = ref.astype(np.float32), obs.astype(np.float32)
    if kind == "binary":
        return Impact(kind, positions=r.size, flips=int(np.count_nonzero((r >= 0.5) != (o >= 0.5))))
    if r.ndim < 2:
        return None
    r, o = r.reshape(-1, r.shape[-1]), o.reshape(-1, o.shape[-1])
    classes = r.shape[-1]
    k = min(TOP_K, classes)
    ref_order = np.argsort(-r, axis=-1, kind="stable")
    obs_order = np.argsort(-o, axis=-1, kind="stable")
    flips = int(np.count_nonzero(ref_order[:, 0] != obs_order[:, 0]))
    obs_rank = np.empty_like(obs_order)
    np.put_along_axis(obs_rank, obs_order, np.arange(classes)[None, :].repeat(len(o), 0), axis=-1)
    moved = np.abs(np.take_along_axis(obs_rank, ref_order[:, :k], axis=-1) - np.arange(k)[None, :])
    return Impact(kind, positions=len(r), flips=flips, k=k, max_rank_change=int(moved.max()))


def prediction_impacts(reference: Mapping[str, np.ndarray], observed: Mapping[str, np.ndarray],
                       kinds: Mapping[str, str] | None = None) -> dict[str, Impact]:
    """``prediction_impact`` of every output both sides have, using a declared kind where ``kinds`` names one.

    Outputs with no decision (regression), another shape or missing are left out.
    """
    kinds = kinds or {}
    out = {}
    for name, ref in reference.items():
        if name in observed:
            impact = prediction_impact(ref, observed[name], kinds.get(name))
            if impact is not None:
                out[name] = impact
    return out


def impact_summary(impacts: Mapping[str, Impact]) -> tuple[int | None, float | None, int | None]:
    """``(flips, worst flip fraction, largest top-k rank change)`` over outputs; ``None`` where nothing applies.

    Example:
        >>> impact_summary({"a": Impact("binary", 4, flips=1), "b": Impact("classes", 2, flips=0, k=2, max_rank_change=1)})
        (1, 0.25, 1)
    """
    decided = [i for i in impacts.values() if i.flips is not None]
    if not decided:
        return None, None, None
    ranks = [i.max_rank_change for i in decided if i.max_rank_change is not None]
    return (sum(i.flips for i in decided), max(i.flip_fraction or 0.0 for i in decided),
            max(ranks) if ranks else None)


# -- accuracy against a float64 oracle: worse, or just different? ----------------------------
#: Accuracy tiers of a numeric cell (see ``judge_accuracy``).
AS_ACCURATE, LESS_ACCURATE, NOT_APPLICABLE = "as_accurate", "less_accurate", "n/a"
ACCURACY_TIERS = (AS_ACCURATE, LESS_ACCURATE, NOT_APPLICABLE)
#: PyTorch's multipliers (``torch._dynamo.utils.same``): the observation may be this many times
#: further from the float64 run than the reference is; 3 where rounding noise dominates the error
#: (half-precision outputs, outputs of fewer than ``SMALL_OUTPUT`` elements).
MULTIPLIER, NOISY_MULTIPLIER, SMALL_OUTPUT = 2.0, 3.0, 1000
HALF_PRECISION = ("float16", "bfloat16")


def accuracy_multiplier(size: int, *dtypes: np.dtype | str) -> float:
    """``m`` of the rule: 3 for outputs under 1,000 elements or in float16/bfloat16 on either side, else 2.

    Example:
        >>> accuracy_multiplier(64, np.float32), accuracy_multiplier(4096, np.float32)
        (3.0, 2.0)
    """
    half = any(np.dtype(d).name in HALF_PRECISION for d in dtypes)
    return NOISY_MULTIPLIER if half or size < SMALL_OUTPUT else MULTIPLIER


def rmse(truth: np.ndarray, values: np.ndarray) -> float:
    """Root mean squared error of ``values`` against ``truth``, in float64 (NaN for no elements)."""
    if truth.size == 0:
        return math.nan
    with np.errstate(over="ignore", invalid="ignore"):
        d = values.astype(np.float64) - truth.astype(np.float64)
        return float(np.sqrt(np.mean(d * d)))


def _finite_or_none(d: dict) -> dict:
    """``d`` with NaN and infinite floats as None (what strict JSON can hold)."""
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in d.items()}


@dataclass(frozen=True)
class OutputAccuracy:
    """One output against the float64 oracle: is the observation as close to it as the reference?

    ``rmse`` and ``reference_rmse`` are over the elements finite on all three sides;
    ``elements`` counts them. The observation passes when
    ``rmse <= multiplier * reference_rmse + tol / 10``.
    """

    name: str
    tier: str
    rmse: float = math.nan
    reference_rmse: float = math.nan
    multiplier: float = math.nan
    tol: float = math.nan
    elements: int = 0
    reference_nonfinite: int = 0  # elements where the reference, not the observation, disagrees with the oracle
    reason: str | None = None

    @property
    def allowance(self) -> float:
        """``multiplier * reference_rmse + tol / 10``: the largest ``rmse`` that is as accurate."""
        return self.multiplier * self.reference_rmse + self.tol / 10

    @property
    def excess(self) -> float:
        """``rmse - allowance`` (> 0: less accurate); NaN where the rule did not apply."""
        return self.rmse - self.allowance

    def to_dict(self) -> dict:
        return _finite_or_none({**asdict(self), "allowance": self.allowance})


def _same_nonfinite(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Where ``a`` and ``b`` hold the same NaN/Inf (NaN with NaN, an infinity with the same one)."""
    return (np.isnan(a) & np.isnan(b)) | (np.isinf(a) & (a == b))


def _nonfinite_disagreements(truth: np.ndarray, values: np.ndarray, reference: np.ndarray) -> int:
    """Elements where ``values`` does not have the oracle's NaN/Inf (or has one where the oracle is finite),
    unless the reference has that very value too: then both sides err alike, and the element is left out."""
    differs = (~np.isfinite(truth) | ~np.isfinite(values)) & ~_same_nonfinite(truth, values)
    with np.errstate(invalid="ignore"):
        alike = _same_nonfinite(values, reference) | (values == reference)
    return int(np.count_nonzero(differs & ~alike))


def output_accuracy(name: str, oracle: np.ndarray, reference: np.ndarray, observed: np.ndarray | None,
                    tol: float) -> OutputAccuracy:
    """Judge one output against its float64 oracle (PyTorch's rule, see ``judge_accuracy``).

    Args:
        name: output name.
        oracle: the output of the model rebuilt in float64 (any float dtype is read as float64).
        reference: the training environment's output (the baseline).
        observed: this cell's output (``None``: the output is missing).
        tol: the output's absolute tolerance; ``tol / 10`` is added to the allowance.

    Returns:
        ``as_accurate`` or ``less_accurate`` with both RMSEs, or ``n/a`` for outputs
        without rounding error to measure (integers, bools, strings). An observation
        that is missing, of another shape or not numeric is ``less_accurate``; so is one
        with a NaN/Inf where the oracle is finite, or without the oracle's NaN/Inf, unless
        the reference has that same NaN/Inf (both err alike: the element is left out,
        so a bitwise observation is always ``as_accurate``).
    """
    reference = np.asarray(reference)
    if not _is_float(reference.dtype):
        kind = "string" if _is_string(reference.dtype) else "integer"
        return OutputAccuracy(name, NOT_APPLICABLE, reason=f"{kind} output: no rounding error to measure")
    oracle = np.asarray(oracle)
    if oracle.shape != reference.shape:
        return OutputAccuracy(name, NOT_APPLICABLE,
                              reason=f"float64 oracle shape {oracle.shape} != reference {reference.shape}")
    if observed is None:
        return OutputAccuracy(name, LESS_ACCURATE, reason="output missing")
    observed = np.asarray(observed)
    if observed.shape != oracle.shape or not _is_float(observed.dtype):
        what = (f"shape {observed.shape}" if observed.shape != oracle.shape else f"dtype {observed.dtype.name}")
        return OutputAccuracy(name, LESS_ACCURATE, reason=f"observed {what} cannot approximate the float64 oracle")
    t, r, x = (a.astype(np.float64).reshape(-1) for a in (oracle, reference, observed))
    m = accuracy_multiplier(t.size, reference.dtype, observed.dtype)
    bad = _nonfinite_disagreements(t, x, r)
    if bad:
        return OutputAccuracy(name, LESS_ACCURATE, multiplier=m, tol=tol, reason=(
            f"{bad} of {t.size} elements are NaN/Inf where the float64 oracle and the reference are not, or "
            "differ from the oracle's NaN/Inf"))
    finite = np.isfinite(t) & np.isfinite(r) & np.isfinite(x)
    ref_nonfinite = int(np.count_nonzero(np.isfinite(t) & ~np.isfinite(r)))
    t, r, x = t[finite], r[finite], x[finite]
    ref_err, obs_err = (rmse(t, r), rmse(t, x)) if t.size else (0.0, 0.0)
    tier = AS_ACCURATE if obs_err <= m * ref_err + tol / 10 else LESS_ACCURATE
    return OutputAccuracy(name, tier, rmse=obs_err, reference_rmse=ref_err, multiplier=m, tol=tol,
                          elements=int(t.size), reference_nonfinite=ref_nonfinite)


@dataclass(frozen=True)
class Accuracy:
    """A cell's accuracy tier: the worst of its outputs' (``less_accurate`` > ``as_accurate`` > ``n/a``)."""

    tier: str
    outputs: tuple[OutputAccuracy, ...] = ()
    reason: str | None = None  # why n/a

    @property
    def decisive(self) -> OutputAccuracy | None:
        """The judged output closest to failing (largest ``excess``; a rule-less ``less_accurate`` first)."""
        judged = [o for o in self.outputs if o.tier != NOT_APPLICABLE]
        if not judged:
            return None
        return max(judged, key=lambda o: math.inf if math.isnan(o.excess) else o.excess)

    @property
    def rmse(self) -> float | None:
        d = self.decisive
        return None if d is None or math.isnan(d.rmse) else d.rmse

    @property
    def reference_rmse(self) -> float | None:
        d = self.decisive
        return None if d is None or math.isnan(d.reference_rmse) else d.reference_rmse

    @property
    def note(self) -> str:
        """One line: the rule with the decisive output's numbers, or why there is no tier."""
        d = self.decisive
        if d is None:
            return self.reason or ""
        if d.reason:
            return f"{d.name}: {d.reason}"
        sign = "<=" if d.tier == AS_ACCURATE else ">"
        return (f"{d.name}: rmse vs float64 {d.rmse:.3g} {sign} {d.multiplier:g} x reference's {d.reference_rmse:.3g}"
                f" + atol {d.tol:.3g}/10")

    def to_dict(self) -> dict:
        return {"tier": self.tier, "note": self.note, "outputs": [o.to_dict() for o in self.outputs]}


def judge_accuracy(oracle: Mapping[str, np.ndarray] | None, reference: Mapping[str, np.ndarray],
                   observed: Mapping[str, np.ndarray], tols: Mapping[str, float] | None = None, *,
                   unavailable: Mapping[str, str] | None = None, reason: str | None = None) -> Accuracy:
    """Worse, or just different? Judge every output against the model run in float64.

    PyTorch's compiler accuracy check (``torch._dynamo.utils.same`` with ``fp64_ref``),
    output by output: the observation is **as accurate** when
    ``RMSE(observed, fp64) <= m * RMSE(reference, fp64) + tol / 10``, with ``m`` from
    ``accuracy_multiplier`` and ``tol`` the output's atol (``tols``, default 0). RMSEs are
    taken in float64 over the elements finite on every side; NaN/Inf must sit where the
    oracle has them. Unlike PyTorch, the rule is applied to every cell, also those within
    tolerance (the expectation ``accurate`` adds the tolerance back, see ``records.meets``).

    Args:
        oracle: output name -> float64 oracle; ``None`` when the model could not be rebuilt.
        reference, observed: output name -> array.
        tols: output name -> absolute tolerance.
        unavailable: output name -> why it has no oracle (integer/string outputs, ...).
        reason: why there is no oracle at all (with ``oracle=None``).

    Example:
        >>> truth = {"y": np.array([0.1, 0.2, 0.3] * 400)}
        >>> ref = {"y": truth["y"].astype(np.float32)}
        >>> judge_accuracy(truth, ref, {"y": ref["y"].astype(np.float16)}).tier
        'less_accurate'
    """
    if oracle is None:
        return Accuracy(NOT_APPLICABLE, reason=reason or "no float64 oracle")
    tols, unavailable = tols or {}, unavailable or {}
    outputs = []
    for name, ref in reference.items():
        if name in oracle:
            outputs.append(output_accuracy(name, oracle[name], ref, observed.get(name), float(tols.get(name, 0.0))))
        else:
            outputs.append(OutputAccuracy(name, NOT_APPLICABLE, reason=unavailable.get(name, "no float64 oracle")))
    tiers = {o.tier for o in outputs}
    tier = next((t for t in (LESS_ACCURATE, AS_ACCURATE) if t in tiers), NOT_APPLICABLE)
    why = None
    if tier == NOT_APPLICABLE:
        why = "; ".join(f"{o.name}: {o.reason}" for o in outputs) or "the model has no outputs"
    return Accuracy(tier, tuple(outputs), why)


# -- task metrics: MLPerf-style "does the metric move?" ---------------------------------------
#: Task metrics a scenario may declare with probe labels.
METRICS = ("accuracy", "auc", "mse", "mae")


def _average_ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks of ``x``, ties sharing their average rank."""
    order = np.argsort(x, kind="mergesort")
    _, first, counts = np.unique(x[order], return_index=True, return_counts=True)
    ranks = np.empty(x.size, np.float64)
    ranks[order] = np.repeat(first + (counts + 1) / 2.0, counts)
    return ranks


def binary_auc(scores: np.ndarray, positive: np.ndarray) -> float:
    """Area under the ROC curve (Mann-Whitney U / (positives x negatives), ties count one half).

    Raises:
        ValueError: the labels hold only one class.

    Example:
        >>> binary_auc(np.array([0.1, 0.4, 0.35, 0.8]), np.array([0, 0, 1, 1]))
        0.75
    """
    scores = np.asarray(scores, np.float64).reshape(-1)
    positive = np.asarray(positive).reshape(-1).astype(bool)
    n_pos = int(np.count_nonzero(positive))
    n_neg = positive.size - n_pos
    if not n_pos or not n_neg:
        raise ValueError("auc needs both positive and negative labels among the probe rows")
    if np.isnan(scores).any():
        return math.nan
    ranks = _average_ranks(scores)
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def _class_ids(values: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Labels as class ids for scores over the last axis: ids as they are, one-hot rows by argmax."""
    classes = values.shape[-1]
    if labels.size * classes == values.size:
        return labels.reshape(-1).astype(np.int64)
    if labels.shape == values.shape:
        return np.argmax(labels.reshape(-1, classes), axis=-1)
    raise ValueError(f"labels of shape {labels.shape} fit neither class ids nor one-hot rows of "
                     f"scores {values.shape}")


def task_metric(metric: str, values: np.ndarray, labels: np.ndarray, kind: str) -> float:
    """The task metric of one output on the probe labels, in float64.

    Args:
        metric: ``accuracy`` (share of decisions equal to the label: top-1 class, the 0.5
            threshold, or the integer label, by ``kind``), ``auc`` (ROC AUC of a binary
            score; macro one-vs-rest over classes), ``mse`` or ``mae``.
        values: the output.
        labels: one label per prediction (class ids or one-hot rows for ``classes``,
            0/1 for ``binary``, the targets for ``mse``/``mae``).
        kind: the output's kind (``output_kind``).

    Raises:
        ValueError: the metric does not apply to this kind of output, or the labels do
            not fit it (the message says which).
    """
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}; use one of {', '.join(METRICS)}")
    values, labels = np.asarray(values), np.asarray(labels)
    if metric in ("mse", "mae"):
        if labels.size != values.size:
            raise ValueError(f"{metric} needs one target per output element: labels have {labels.size} "
                             f"elements, the output {values.size}")
        d = values.astype(np.float64).reshape(-1) - labels.astype(np.float64).reshape(-1)
        with np.errstate(over="ignore", invalid="ignore"):
            return float(np.mean(d * d) if metric == "mse" else np.mean(np.abs(d)))
    if kind == "regression":
        raise ValueError(f"{metric} needs a decision, but the output is a regression (declare "
                         "outputs={name: 'binary' | 'classes' | 'labels'} if it is not)")
    if kind == "classes":
        scores = values.astype(np.float64).reshape(-1, values.shape[-1])
        ids = _class_ids(values, labels)
        if metric == "accuracy":
            return float(np.mean(np.argmax(scores, axis=-1) == ids))
        aucs = [binary_auc(scores[:, c], ids == c) for c in range(scores.shape[1])
                if 0 < np.count_nonzero(ids == c) < ids.size]
        if not aucs:
            raise ValueError("auc needs at least two classes among the probe labels")
        return float(np.mean(aucs))
    if labels.size != values.size:
        raise ValueError(f"{metric} of a {kind} output needs one label per element: labels have {labels.size} "
                         f"elements, the output {values.size}")
    if kind == "binary":
        scores, positive = values.astype(np.float64).reshape(-1), labels.reshape(-1).astype(np.float64) >= 0.5
        if metric == "accuracy":
            return float(np.mean((scores >= 0.5) == positive))
        return binary_auc(scores, positive)
    if metric == "auc":
        raise ValueError("auc needs scores, but the output holds integer labels")
    return float(np.mean(values.reshape(-1) == labels.reshape(-1)))  # labels (integer outputs)


@dataclass(frozen=True)
class MetricChange:
    """A task metric of one output on the reference and on the observation."""

    metric: str
    output: str
    reference: float
    observed: float
    reason: str | None = None  # why the observation has no metric (output missing, other shape)

    @property
    def delta(self) -> float:
        """``observed - reference`` (NaN when either is)."""
        return self.observed - self.reference

    def to_dict(self) -> dict:
        return _finite_or_none({**asdict(self), "delta": self.delta})


def metric_changes(metric: str, labels: Mapping[str, np.ndarray], reference: Mapping[str, np.ndarray],
                   observed: Mapping[str, np.ndarray], kinds: Mapping[str, str] | None = None) -> list[MetricChange]:
    """``metric`` on every labelled output, reference vs observation.

    An observed output that is missing or of another shape gets a NaN metric (and a reason).

    Raises:
        ValueError: the metric does not apply to a reference output (see ``task_metric``).
    """
    kinds = kinds or {}
    out = []
    for name, lab in labels.items():
        ref = np.asarray(reference[name])
        kind = output_kind(ref, kinds.get(name))
        before = task_metric(metric, ref, lab, kind)
        obs = observed.get(name)
        if obs is None or np.asarray(obs).shape != ref.shape:
            why = "output missing" if obs is None else f"shape {np.asarray(obs).shape} != reference {ref.shape}"
            out.append(MetricChange(metric, name, before, math.nan, why))
            continue
        out.append(MetricChange(metric, name, before, task_metric(metric, np.asarray(obs), lab, kind)))
    return out


def largest_change(changes: Iterable[MetricChange]) -> MetricChange | None:
    """The change with the largest ``|delta|`` (an undefined delta counts as the largest)."""
    return max(changes, key=lambda c: math.inf if math.isnan(c.delta) else abs(c.delta), default=None)
