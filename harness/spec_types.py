"""Field types of the sweep spec: pydantic checks the values, these types say what was expected.

Every constrained type is ``Annotated[...]`` with pydantic's own constraints
(strictness, bounds, patterns, literal choices) wrapped by ``expecting``,
which replaces pydantic's wording with ours: ``expected a positive integer,
got 'two'``. Checks pydantic cannot express (a storage scheme pyarrow opens,
Ray's label syntax, reserved resource names, environment-variable names)
raise ``fail(message, *at)``; ``at`` extends the dotted field path of the
error (a dict key, a sub-field). ``harness.spec`` turns the first error into
a ``SpecError``.

No TensorFlow here; Ray is imported only to check label selectors, and only
when a sweep has one.
"""

from __future__ import annotations

import difflib
import math
import re
import reprlib
from typing import Annotated, Any, Callable, Literal, Mapping, Union
from urllib.parse import urlsplit

import pyarrow.fs as pafs
from pydantic import AfterValidator, BeforeValidator, Field, Strict, ValidationError, WrapValidator
from pydantic_core import PydanticCustomError

#: Upper bounds: far beyond any real sweep, well inside what Ray and the OS accept.
MAX_AMOUNT = 1e12          # num_cpus, num_gpus, custom resources (Ray stores amounts x 10^4 in an int64)
RAY_RESOLUTION = 1e-4      # Ray rejects a non-zero amount below this
MAX_SECONDS = 30 * 24 * 3600.0
MAX_RETRIES = 1000
MAX_THREADS = 4096
MAX_GPUS = 64              # per worker: more than any node has; a larger number is a typo that would pend forever
MAX_BATCH_SIZE = 2 ** 31 - 1
MAX_ULP = 2 ** 64          # the distance between any two float64 values fits below this
MAX_REPEATS = 100          # each repeat of a cell is a worker process of its own

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]*$"
# YAML 1.1 (PyYAML) reads `1e-6` (no dot) as a string; accept it as the number the user meant.
_EXP_FLOAT_RE = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)[eE][+-]?\d+$")

_repr = reprlib.Repr()
_repr.maxstring, _repr.maxother, _repr.maxlevel, _repr.maxlist, _repr.maxdict = 80, 80, 3, 6, 6


def show(value: Any) -> str:
    """A short ``repr`` for messages: bounded in length and depth, whatever the value."""
    if isinstance(value, int) and not isinstance(value, bool) and abs(value).bit_length() > 64:
        return f"an integer of about {int(abs(value).bit_length() * math.log10(2)) + 1} digits"
    return _repr.repr(value)


def fail(message: str, *at: str) -> PydanticCustomError:
    """An error with our message; ``at`` are path parts below the field being validated."""
    return PydanticCustomError("spec", "{message}", {"message": message, "at": tuple(str(a) for a in at)})


def did_you_mean(value: Any, choices: tuple[str, ...] | list[str], cutoff: float = 0.6) -> str:
    close = difflib.get_close_matches(str(value), list(choices), n=1, cutoff=cutoff)
    return f"did you mean {close[0]!r}?" if close else ""


def _wrapped(render: Callable[[Any, str], str]) -> WrapValidator:
    """Run pydantic's validation; on failure, raise ``render(value, pydantic_error_type)`` instead."""

    def validate(value: Any, handler: Callable[[Any], Any]) -> Any:
        try:
            return handler(value)
        except ValidationError as exc:
            first = exc.errors(include_url=False)[0]
            if first["type"] == "spec":  # already ours (from a nested check)
                raise fail(first["ctx"]["message"], *first["ctx"]["at"]) from None
            raise fail(render(value, first["type"])) from None

    return WrapValidator(validate)


def expecting(phrase: str, limit: str | None = None) -> WrapValidator:
    """``expected <phrase>, got <value>`` (``; <limit>`` when the value was too large)."""

    def render(value: Any, kind: str) -> str:
        tail = f"; {limit}" if limit and kind in ("less_than", "less_than_equal") else ""
        return f"expected {phrase}, got {show(value)}{tail}"

    return _wrapped(render)


def _exp_number(value: Any) -> Any:
    return float(value) if isinstance(value, str) and _EXP_FLOAT_RE.match(value) else value


def _scalar_text(value: Any) -> Any:
    """YAML scalars people write unquoted in string maps: ``3`` -> "3", ``true`` -> "true"."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        try:
            return str(value)
        except ValueError:  # an integer beyond Python's int-to-str limit
            return value
    return value


def as_mapping(value: Any) -> Any:
    """``None`` (an empty YAML block) is an empty mapping; anything but a mapping is an error."""
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise fail(f"expected a mapping (key: value lines), got {type(value).__name__} {show(value)}")
    return dict(value)


def _as_list(what: str) -> Callable[[Any], Any]:
    def as_list(value: Any) -> Any:
        if isinstance(value, str):
            return [value]
        if not isinstance(value, (list, tuple)):
            raise fail(f"expected {what}, got {show(value)}")
        return list(value)

    return as_list


def _unique(values: list) -> tuple:
    dup = sorted({str(x) for x in values if values.count(x) > 1})
    if dup:
        raise fail(f"duplicate entries {dup}")
    return tuple(values)


def _non_empty(values: tuple) -> tuple:
    if not values:
        raise fail("expected a non-empty list of names, got []")
    return values


def name_list(item: Any, *, allow_empty: bool = False, what: str = "a non-empty list of names") -> Any:
    """A list of names (a single string is a list of one), without repeats; a tuple once validated."""
    checks = [AfterValidator(_unique)] + ([] if allow_empty else [AfterValidator(_non_empty)])
    return Annotated[list[item], BeforeValidator(_as_list(what), json_schema_input_type=Union[item, list[item]]),
                     *checks]


def mapping(key: Any, value: Any) -> Any:
    """A ``dict[key, value]`` that also accepts an empty YAML block (``null``)."""
    return Annotated[dict[key, value], BeforeValidator(as_mapping, json_schema_input_type=Union[dict[key, value], None])]


def choice(values: tuple[str, ...]) -> Any:
    """One of ``values``: ``'bitwize' is not one of bitwise, tolerance, any (did you mean 'bitwise'?)``."""

    def render(value: Any, kind: str) -> str:
        hint = did_you_mean(value, values)
        return f"{show(value)} is not one of {', '.join(values)}" + (f" ({hint})" if hint else "")

    return Annotated[Literal[values], _wrapped(render)]  # type: ignore[valid-type]


# -- numbers ---------------------------------------------------------------------------
def _ray_resolution(value: float) -> float:
    if 0 < value < RAY_RESOLUTION:
        raise fail(f"{value!r} is below Ray's resolution of {RAY_RESOLUTION:g}; use 0 or at least {RAY_RESOLUTION:g}")
    return value


def _whole_or_fraction(value: float) -> float:
    if value > MAX_GPUS:
        raise fail(f"got {value:g} GPUs per worker; at most {MAX_GPUS} (no node has more, so the worker would never "
                   "be scheduled)")
    if value > 1 and not value.is_integer():
        raise fail(f"got {value:g} GPUs; Ray takes a whole number of GPUs, or a fraction below 1 "
                   "(several environments sharing one GPU)")
    return value


Amount = Annotated[float, Strict(), Field(ge=0, le=MAX_AMOUNT, allow_inf_nan=False), BeforeValidator(_exp_number),
                   expecting("a number >= 0", f"at most {MAX_AMOUNT:g}"), AfterValidator(_ray_resolution)]
GpuAmount = Annotated[Amount, AfterValidator(_whole_or_fraction)]
NonNegative = Annotated[float, Strict(), Field(ge=0, allow_inf_nan=False), BeforeValidator(_exp_number),
                        expecting("a number >= 0")]
Ulps = Annotated[int, Strict(), Field(ge=0, le=MAX_ULP), expecting("a whole number of ULPs >= 0", "at most 2**64")]
Seconds = Annotated[float, Strict(), Field(gt=0, le=MAX_SECONDS, allow_inf_nan=False), BeforeValidator(_exp_number),
                    expecting("a number of seconds > 0", f"at most {MAX_SECONDS:.0f} (30 days)")]
Retries = Annotated[int, Strict(), Field(ge=0, le=MAX_RETRIES), expecting(
    "a whole number >= 0", f"at most {MAX_RETRIES} (a task lost that often will not come back)")]
Threads = Annotated[int, Strict(), Field(gt=0, le=MAX_THREADS), expecting("a positive integer", f"at most {MAX_THREADS}")]
BatchSize = Annotated[int, Strict(), Field(gt=0, le=MAX_BATCH_SIZE),
                      expecting("a positive integer", f"at most {MAX_BATCH_SIZE}")]
Repeats = Annotated[int, Strict(), Field(ge=1, le=MAX_REPEATS), expecting(
    "a whole number of repeats >= 1", f"at most {MAX_REPEATS} (each repeat of a cell runs in a worker process of its "
    "own)")]

# -- strings and names -----------------------------------------------------------------
Flag = Annotated[bool, Strict(), expecting("true or false")]
Text = Annotated[str, Strict(), expecting("a string")]
ScenarioName = Annotated[str, Strict(), Field(min_length=1), expecting("a name")]
SweepName = Annotated[str, Strict(), Field(pattern=NAME_PATTERN), expecting("a name of letters, digits, '-', '_', '.'")]
EnvironmentName = Annotated[str, Strict(), Field(pattern=NAME_PATTERN), _wrapped(
    lambda value, kind: f"environment names use letters, digits, '-', '_' and '.' only; got {show(value)}")]
AcceleratorType = Annotated[str, Strict(), Field(min_length=1), expecting("a string such as A10G or H100")]


def _env_var_name(name: str) -> str:
    if not name or "=" in name or "\0" in name:
        raise fail(f"{show(name)} cannot be an environment variable name (empty, or with '=' or a NUL byte); "
                   "use letters, digits and '_' such as TF_XLA_FLAGS")
    return name


def _no_nul(value: str) -> str:
    if "\0" in value:
        raise fail(f"an environment variable value cannot hold a NUL byte, got {show(value)}")
    return value


EnvVarName = Annotated[str, Strict(), expecting("a variable name (a string)"), AfterValidator(_env_var_name)]
EnvVarValue = Annotated[str, Strict(), BeforeValidator(_scalar_text, json_schema_input_type=Union[str, int, float, bool]),
                        expecting("a string value"), AfterValidator(_no_nul)]
EnvVars = mapping(EnvVarName, EnvVarValue)

_RESERVED_RESOURCES = {
    "CPU": "use num_cpus instead of resources: {CPU: ...}",
    "GPU": "use num_gpus instead of resources: {GPU: ...}",
    "memory": "Ray reserves 'memory' for its memory= option, which environments do not set; "
              "name a custom resource differently",
    "object_store_memory": "Ray reserves 'object_store_memory'; name a custom resource differently",
    "bundle": "Ray reserves 'bundle' for placement groups; name a custom resource differently",
}


def _resource_name(name: str) -> str:
    if name in _RESERVED_RESOURCES:
        raise fail(f"{name!r} is not a custom resource: {_RESERVED_RESOURCES[name]}")
    if name.startswith("accelerator_type:"):
        raise fail(f"{name!r} is reserved by Ray: use accelerator_type: instead")
    return name


ResourceName = Annotated[str, Strict(), Field(min_length=1), expecting("a resource name"), AfterValidator(_resource_name)]
LabelValue = Annotated[str, Strict(), BeforeValidator(_scalar_text, json_schema_input_type=Union[str, int, float, bool]),
                       expecting("a string value")]


def _label_selector(selector: dict[str, str]) -> dict[str, str]:
    """Ray's own syntax check of each ``key: value`` (``in(a,b)``, ``!a``); Ray is imported only if needed."""
    if selector:
        from ray._private.label_utils import validate_label_selector

        for key, value in selector.items():
            reason = validate_label_selector({key: value})
            if reason:
                raise fail(f"Ray rejects this label selector: {reason}", key)
    return selector


LabelSelector = Annotated[mapping(Annotated[str, Strict(), expecting("a label key (a string)")], LabelValue),
                          AfterValidator(_label_selector)]


# -- storage ---------------------------------------------------------------------------
def storage_schemes() -> dict[str, str]:
    """URI scheme -> the pyarrow filesystem that opens it, for the filesystems this pyarrow was built with."""
    schemes = {"file": "LocalFileSystem"}
    for names, cls in ((("s3",), "S3FileSystem"), (("gs", "gcs"), "GcsFileSystem"),
                       (("hdfs", "viewfs"), "HadoopFileSystem"), (("abfs", "abfss"), "AzureFileSystem")):
        if hasattr(pafs, cls):
            schemes.update((n, cls) for n in names)
    return schemes


def storage_problem(uri: str) -> str | None:
    """Why ``pyarrow.fs`` could not open ``uri`` (scheme and shape only, no network), or None."""
    if "\0" in uri or any(ord(c) < 32 for c in uri):
        return f"{show(uri)} holds control characters; expected a path or URI"
    if "://" not in uri:
        return None  # a local path
    scheme = uri.split("://", 1)[0]
    schemes = storage_schemes()
    if scheme.lower() not in schemes:
        hint = did_you_mean(scheme.lower(), list(schemes), cutoff=0.5)  # schemes are short: s4 -> s3
        return (f"{show(uri)}: pyarrow.fs opens no {scheme!r} URIs; use a local path or "
                f"{', '.join(s + '://' for s in schemes)}" + (f" ({hint})" if hint else ""))
    try:
        parts = urlsplit(uri)
        parts.port  # noqa: B018 -- raises ValueError for a port that is not a number
    except ValueError as exc:
        return f"{show(uri)} is not a valid URI: {exc}"
    scheme = scheme.lower()
    if scheme == "file":
        if parts.netloc not in ("", "localhost") or not parts.path.startswith("/"):
            return f"{show(uri)}: a file URI takes an absolute path, file:///abs/path (or write the path itself)"
    elif scheme in ("s3", "gs", "gcs", "abfs", "abfss") and not parts.hostname:
        what = "container" if scheme.startswith("abfs") else "bucket"
        return f"{show(uri)} names no {what}; expected {scheme}://{what}/prefix"
    if scheme == "s3" and parts.query:
        from urllib.parse import parse_qsl

        for key, _ in parse_qsl(parts.query, keep_blank_values=True):
            if key not in S3_URI_OPTIONS:
                hint = did_you_mean(key, S3_URI_OPTIONS)
                return (f"{show(uri)}: pyarrow's S3 URIs take no option {key!r}" + (f" ({hint})" if hint else "")
                        + f"; known options: {', '.join(S3_URI_OPTIONS)}")
    return None


#: The query options pyarrow's ``FileSystem.from_uri`` takes for S3 (checked against pyarrow 26). It refuses
#: any other key only when the run opens the storage; here a typo (``endpoint_overide``) is an exit-2 with a hint.
S3_URI_OPTIONS = ("region", "scheme", "endpoint_override", "allow_bucket_creation", "allow_bucket_deletion",
                  "tls_ca_file_path", "tls_verify_certificates")


def normalize_scheme(uri: str) -> str:
    """``uri`` with its scheme in lower case (RFC 3986: schemes are case-insensitive; pyarrow's are not)."""
    if "://" in uri:
        scheme, rest = uri.split("://", 1)
        return f"{scheme.lower()}://{rest}"
    return uri


def _storage(uri: str) -> str:
    problem = storage_problem(uri)
    if problem:
        raise fail(problem)
    return normalize_scheme(uri)


StorageURI = Annotated[str, Strict(), Field(min_length=1), expecting("a path or URI (s3://bucket/prefix)"),
                       AfterValidator(_storage)]
