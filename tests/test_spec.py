"""Tests for harness/spec.py: sweep YAML -> validated dataclasses, one-line SpecErrors."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings, strategies as st

from harness.compare import Tolerance
from harness.spec import FORMATS, Environment, SpecError, Sweep, environment_document, load_sweep, parse_sweep

MINIMAL = """\
scenarios: [mlp]
environments:
  cpu: {}
"""

FULL = """\
name: nightly-cpu
description: every knob set
storage: s3://bucket/prefix?endpoint_override=127.0.0.1:9000&scheme=http
scenario_paths: [scen, ../other]
scenarios: [mlp, cnn]
formats: [keras, h5, savedmodel, tf-savedmodel, weights]
training:
  threads: 1
  onednn: false
  op_determinism: true
environments:
  cpu-full:
    description: all the fields
    env: {FOO: bar, NUM: 3, FLAG: true}
    onednn: false
    threads: 2
    jit_compile: true
    batch_size: 8
    num_cpus: 2.5
    num_gpus: 0.5
    accelerator_type: A10G
    resources: {big_mem: 1, special: 0.25}
    label_selector: {zone: us-east-1a, tier: gpu}
    tf32: false
    op_determinism: true
    memory_growth: false
    runtime_env:
      pip: [tensorflow-cpu==2.20.0]
      env_vars: {TF_XLA_FLAGS: --tf_xla_auto_jit=2, TF_ENABLE_ONEDNN_OPTS: "1"}
    tolerance: {atol: 1.0e-5, rtol: 1e-4, max_ulp: 4}
    expect: any
  plain: {}
tolerance: {atol: 1.0e-6, rtol: 0.001}
output_tolerances:
  logits: {max_ulp: 8}
  probs: {atol: 0.01}
expect: bitwise
expect_save: tolerance
batch_size: 16
timeouts: {cell_timeout_s: 120, schedule_timeout_s: 30.5, train_timeout_s: 900}
retries: 0
precheck: false
"""


def write(tmp_path: Path, text: str, name: str = "sweep.yaml") -> Path:
    if text is FULL:  # its scenario_paths must exist (relative to the sweep file)
        for d in (tmp_path / "scen", tmp_path.parent / "other"):
            d.mkdir(exist_ok=True)
    p = tmp_path / name
    p.write_text(textwrap.dedent(text))
    return p


def error(tmp_path: Path, text: str, name: str = "sweep.yaml") -> tuple[str, Path]:
    p = write(tmp_path, text, name)
    with pytest.raises(SpecError) as info:
        load_sweep(p)
    msg = str(info.value)
    assert "\n" not in msg, msg
    assert msg.startswith(f"{p}: "), msg
    return msg, p


def env_block(body: str, env: str = "cpu") -> str:
    return "scenarios: [mlp]\nenvironments:\n  " + env + ":\n" + textwrap.indent(textwrap.dedent(body), "    ")


# ---------------------------------------------------------------- valid sweeps

def test_minimal_defaults(tmp_path):
    sw = load_sweep(write(tmp_path, MINIMAL, "my-sweep.yaml"))
    assert isinstance(sw, Sweep)
    assert sw.name == "my-sweep"  # from the file name
    assert sw.source == str(tmp_path / "my-sweep.yaml")
    assert sw.scenarios == ("mlp",)
    assert sw.formats == ("keras",)
    assert [e.name for e in sw.environments] == ["cpu"]
    cpu = sw.environments[0]
    assert cpu == Environment(name="cpu")
    assert sw.training == Environment(name="training")
    assert sw.storage == ".harness/store"
    assert sw.scenario_paths == ()
    assert sw.tolerance == Tolerance()
    assert sw.output_tolerances == {}
    assert (sw.expect, sw.expect_save, sw.batch_size, sw.retries, sw.precheck) == ("tolerance", "bitwise", 32, 2, True)
    assert (sw.cell_timeout_s, sw.schedule_timeout_s, sw.train_timeout_s) == (600.0, 300.0, 1800.0)


def test_full_round_trip(tmp_path):
    sw = load_sweep(write(tmp_path, FULL))
    assert sw.name == "nightly-cpu"
    assert sw.description == "every knob set"
    assert sw.storage == "s3://bucket/prefix?endpoint_override=127.0.0.1:9000&scheme=http"
    assert sw.scenario_paths == (str((tmp_path / "scen").resolve()), str((tmp_path.parent / "other").resolve()))
    assert sw.scenarios == ("mlp", "cnn")
    assert sw.formats == FORMATS
    assert sw.training.name == "training"
    assert (sw.training.threads, sw.training.onednn, sw.training.op_determinism) == (1, False, True)
    assert sw.tolerance == Tolerance(atol=1e-6, rtol=1e-3, max_ulp=None)
    assert sw.output_tolerances == {"logits": Tolerance(max_ulp=8.0), "probs": Tolerance(atol=0.01)}
    assert (sw.expect, sw.expect_save, sw.batch_size, sw.retries, sw.precheck) == ("bitwise", "tolerance", 16, 0, False)
    assert (sw.cell_timeout_s, sw.schedule_timeout_s, sw.train_timeout_s) == (120.0, 30.5, 900.0)

    env = sw.environment("cpu-full")
    assert env.description == "all the fields"
    assert env.env == {"FOO": "bar", "NUM": "3", "FLAG": "true"}
    assert env.onednn is False
    assert env.threads == 2
    assert env.jit_compile is True
    assert env.batch_size == 8
    assert env.num_cpus == 2.5 and env.num_gpus == 0.5
    assert env.accelerator_type == "A10G"
    assert env.resources == {"big_mem": 1.0, "special": 0.25}
    assert env.label_selector == {"zone": "us-east-1a", "tier": "gpu"}
    assert env.tf32 is False
    assert env.op_determinism is True
    assert env.memory_growth is False
    assert env.runtime_env == {"pip": ["tensorflow-cpu==2.20.0"],
                               "env_vars": {"TF_XLA_FLAGS": "--tf_xla_auto_jit=2", "TF_ENABLE_ONEDNN_OPTS": "1"}}
    assert env.tolerance == Tolerance(atol=1e-5, rtol=1e-4, max_ulp=4.0)
    assert env.expect == "any"

    plain = sw.environment("plain")
    assert plain == Environment(name="plain")
    with pytest.raises(KeyError):
        sw.environment("nope")

    # the sweep-level helpers combine sweep and environment settings
    assert sw.expectation(env) == "any" and sw.expectation(plain) == "bitwise"
    assert sw.tolerance_for(env) == Tolerance(atol=1e-5, rtol=1e-4, max_ulp=4.0)
    assert sw.tolerance_for(plain) == sw.tolerance
    assert sw.batch_size_for(env) == 8 and sw.batch_size_for(plain) == 16
    assert env.knobs() == {"onednn": False, "threads": 2, "jit_compile": True, "batch_size": 8, "tf32": False,
                           "op_determinism": True, "memory_growth": False, "num_gpus": 0.5, "cpu_isa": None}


def test_scenario_paths_relative_to_sweep_file_not_cwd(tmp_path, monkeypatch):
    sub, absolute = tmp_path / "sweeps", tmp_path / "abs" / "dir"
    for d in (sub, tmp_path / "scenarios", absolute):
        d.mkdir(parents=True)
    p = write(sub, f"scenario_paths: [../scenarios, {absolute}]\n" + MINIMAL)
    monkeypatch.chdir("/")
    sw = load_sweep(p)
    assert sw.scenario_paths == (str((tmp_path / "scenarios").resolve()), str(absolute.resolve()))
    (tmp_path / "scenarios").rmdir()  # a missing one is refused, naming the file and the field
    with pytest.raises(SpecError, match=r"sweep.yaml: scenario_paths.0: '../scenarios' is not a directory: looked for "):
        load_sweep(p)


def test_parse_sweep_from_data_and_single_string_lists():
    sw = parse_sweep({"scenarios": "mlp", "formats": "h5", "environments": {"a": None}}, source="inline.yaml")
    assert sw.scenarios == ("mlp",) and sw.formats == ("h5",) and sw.name == "inline"


def test_env_vars_and_runtime_env(tmp_path):
    sw = load_sweep(write(tmp_path, FULL))
    env = sw.environment("cpu-full")
    ev = env.env_vars()
    assert ev["HARNESS_ENVIRONMENT"] == "cpu-full"
    # raw runtime_env env_vars override the onednn knob, and `env` overrides both
    assert ev["TF_ENABLE_ONEDNN_OPTS"] == "1"
    assert ev["TF_XLA_FLAGS"] == "--tf_xla_auto_jit=2"
    assert ev["TF_NUM_INTRAOP_THREADS"] == ev["TF_NUM_INTEROP_THREADS"] == ev["OMP_NUM_THREADS"] == "2"
    assert ev["FOO"] == "bar" and ev["NUM"] == "3"
    renv = env.ray_runtime_env()
    assert renv["pip"] == ["tensorflow-cpu==2.20.0"]
    assert renv["env_vars"] == ev
    assert set(renv) == {"pip", "env_vars"}
    # the parsed spec is not mutated by building a runtime env
    assert "HARNESS_ENVIRONMENT" not in env.runtime_env["env_vars"]


def test_env_vars_knobs():
    off = Environment(name="off", onednn=False, threads=3)
    ev = off.env_vars()
    assert ev["TF_ENABLE_ONEDNN_OPTS"] == "0"
    assert ev["TF_NUM_INTRAOP_THREADS"] == ev["TF_NUM_INTEROP_THREADS"] == ev["OMP_NUM_THREADS"] == "3"
    assert ev["HARNESS_ENVIRONMENT"] == "off"
    assert Environment(name="on", onednn=True).env_vars()["TF_ENABLE_ONEDNN_OPTS"] == "1"
    plain = Environment(name="plain").env_vars()
    assert plain["HARNESS_ENVIRONMENT"] == "plain"
    assert not {"TF_ENABLE_ONEDNN_OPTS", "TF_NUM_INTRAOP_THREADS", "OMP_NUM_THREADS"} & set(plain)
    assert Environment(name="plain").ray_runtime_env() == {"env_vars": plain}
    merged = Environment(name="m", threads=1, env={"OMP_NUM_THREADS": "7"},
                         runtime_env={"env_vars": {"X": "1"}, "container": {"image": "img"}})
    renv = merged.ray_runtime_env()
    assert renv["container"] == {"image": "img"}
    assert renv["env_vars"]["X"] == "1" and renv["env_vars"]["OMP_NUM_THREADS"] == "7"
    assert renv["env_vars"]["TF_NUM_INTRAOP_THREADS"] == "1"


def test_exponent_without_dot_is_a_number(tmp_path):
    # PyYAML (YAML 1.1) reads `1e-6` as a string; a tolerance written that way must still work
    sw = load_sweep(write(tmp_path, MINIMAL + "tolerance: {atol: 1e-6, rtol: 2E-3}\ntimeouts: {cell_timeout_s: 1e3}\n"))
    assert sw.tolerance == Tolerance(atol=1e-6, rtol=2e-3)
    assert sw.cell_timeout_s == 1000.0


# ---------------------------------------------------------------- errors: one per path

def test_missing_file(tmp_path):
    p = tmp_path / "nope.yaml"
    with pytest.raises(SpecError) as info:
        load_sweep(p)
    msg = str(info.value)
    assert msg.startswith(f"{p}: ") and "cannot read" in msg and "\n" not in msg


def test_yaml_syntax_error_has_line_number(tmp_path):
    msg, _ = error(tmp_path, "scenarios: [mlp]\nenvironments:\n  cpu: {threads: 2\n")
    assert "invalid YAML" in msg and "line 4" in msg
    msg, _ = error(tmp_path, "scenarios: [mlp]\nenvironments: a: b\n")
    assert "line 2" in msg and "mapping values are not allowed" in msg


def test_not_utf8_is_spec_error(tmp_path):
    p = tmp_path / "bin.yaml"
    p.write_bytes(b"scenarios: [\xff\xfe]\n")
    with pytest.raises(SpecError) as info:
        load_sweep(p)
    assert str(info.value).startswith(f"{p}: ") and "\n" not in str(info.value)


@pytest.mark.parametrize("text", ["- a\n- b\n", "just a string\n", "42\n", ""])
def test_top_level_not_a_mapping(tmp_path, text):
    msg, _ = error(tmp_path, text)
    assert "mapping" in msg and "scenarios" in msg


@pytest.mark.parametrize("field", ["scenarios", "environments"])
def test_missing_required(tmp_path, field):
    text = "scenarios: [mlp]\n" if field == "environments" else "environments: {cpu: {}}\n"
    msg, p = error(tmp_path, text)
    assert msg == f"{p}: {field}: required field is missing"


def test_unknown_top_level_field_did_you_mean(tmp_path):
    msg, p = error(tmp_path, MINIMAL + "retry: 3\n")
    assert msg.startswith(f"{p}: retry: unknown field") and "did you mean 'retries'?" in msg
    msg, _ = error(tmp_path, "scenarios: [a]\nenvironment: {cpu: {}}\n")
    assert "environment: unknown field" in msg and "'environments'" in msg
    msg, _ = error(tmp_path, MINIMAL + "zzzzzz: 1\n")
    assert "zzzzzz: unknown field" in msg and "allowed:" in msg


def test_unknown_environment_field_did_you_mean(tmp_path):
    msg, p = error(tmp_path, env_block("thread: 2\n"))
    assert msg.startswith(f"{p}: environments.cpu.thread: unknown field")
    assert "did you mean 'threads'?" in msg
    msg, _ = error(tmp_path, env_block("runtime_env: {pipp: [x]}\n"))
    assert "environments.cpu.runtime_env.pipp: unknown field" in msg and "'pip'" in msg
    msg, _ = error(tmp_path, MINIMAL + "training: {jit: true}\n")
    assert "training.jit: unknown field" in msg


@pytest.mark.parametrize("value", ["two", "0", "-1", "true", "1.5", "[2]"])
def test_bad_threads(tmp_path, value):
    msg, p = error(tmp_path, env_block(f"threads: {value}\n", env="cpu-xla"))
    assert msg.startswith(f"{p}: environments.cpu-xla.threads: expected a positive integer, got ")


@pytest.mark.parametrize("body,field", [
    ("tolerance: {atol: -1}", "environments.cpu.tolerance.atol"),
    ("tolerance: {rtol: loose}", "environments.cpu.tolerance.rtol"),
    ("tolerance: {rtol: '1e-3x'}", "environments.cpu.tolerance.rtol"),
    ("tolerance: {max_ulp: .nan}", "environments.cpu.tolerance.max_ulp"),
    ("tolerance: {max_ulp: true}", "environments.cpu.tolerance.max_ulp"),
    ("tolerance: {atoll: 1}", "environments.cpu.tolerance.atoll"),
    ("tolerance: 0.5", "environments.cpu.tolerance"),
])
def test_bad_environment_tolerance(tmp_path, body, field):
    msg, p = error(tmp_path, env_block(body + "\n"))
    assert msg.startswith(f"{p}: {field}: "), msg
    if "atoll" in body:
        assert "did you mean 'atol'?" in msg


def test_bad_sweep_and_output_tolerance(tmp_path):
    msg, p = error(tmp_path, MINIMAL + "tolerance: {atol: -0.1}\n")
    assert msg.startswith(f"{p}: tolerance.atol: expected a number >= 0, got -0.1")
    msg, p = error(tmp_path, MINIMAL + "output_tolerances: {logits: {rtol: abc}}\n")
    assert msg.startswith(f"{p}: output_tolerances.logits.rtol: ") and "'abc'" in msg
    msg, p = error(tmp_path, MINIMAL + "output_tolerances: [a]\n")
    assert msg.startswith(f"{p}: output_tolerances: expected a mapping")


def test_bad_expect(tmp_path):
    msg, p = error(tmp_path, MINIMAL + "expect: bitwize\n")
    assert msg.startswith(f"{p}: expect: 'bitwize' is not one of bitwise, tolerance, accurate, any, or a mapping "
                          "{metric_delta: D}")
    assert "did you mean 'bitwise'?" in msg
    msg, p = error(tmp_path, MINIMAL + "expect_save: strict\n")
    assert msg.startswith(f"{p}: expect_save: 'strict' is not one of")
    msg, p = error(tmp_path, MINIMAL + "expect_save: accurate\n")  # no oracle judges the save round trip
    assert msg.startswith(f"{p}: expect_save: 'accurate' is not one of bitwise, tolerance, any")
    msg, p = error(tmp_path, env_block("expect: maybe\n"))
    assert msg.startswith(f"{p}: environments.cpu.expect: 'maybe' is not one of")
    msg, p = error(tmp_path, env_block("expect: {metric_delta: -0.1}\n"))
    assert msg.startswith(f"{p}: environments.cpu.expect.metric_delta: expected a number >= 0, got -0.1")
    msg, p = error(tmp_path, env_block("expect: {metric_delt: 0.1}\n"))
    assert msg.startswith(f"{p}: environments.cpu.expect.metric_delt: unknown field; did you mean 'metric_delta'?")
    msg, p = error(tmp_path, env_block("expect: {}\n"))
    assert msg.startswith(f"{p}: environments.cpu.expect.metric_delta: required field is missing")


def test_accurate_and_metric_delta_expectations(tmp_path):
    sw = parse_sweep({"scenarios": ["s"], "expect": "accurate", "environments": {
        "plain": {}, "metric": {"expect": {"metric_delta": 0.001}}, "named": {"expect": "tolerance"}}})
    assert sw.expect == "accurate"
    assert [sw.expectation(e) for e in sw.environments] == ["accurate", "metric_delta<=0.001", "tolerance"]
    # A derived copy of the environment (explain) keeps the mapping form, as a sweep file would hold it.
    metric = sw.environment("metric")
    assert environment_document(metric) == {"expect": {"metric_delta": 0.001}}
    again = parse_sweep({"scenarios": ["s"], "environments": {"metric": environment_document(metric)}})
    assert again.environments[0] == metric and again.expectation(again.environments[0]) == "metric_delta<=0.001"
    assert metric.derive("m2", threads=1).expect == metric.expect
    assert parse_sweep({"scenarios": ["s"], "expect": {"metric_delta": "1e-3"},
                        "environments": {"e": {}}}).expect == "metric_delta<=0.001"


def test_dtype_policy_is_an_environment_knob_refused_in_training(tmp_path):
    sw = parse_sweep({"scenarios": ["s"], "environments": {"bf16": {"dtype_policy": "mixed_bfloat16"}}})
    assert sw.environments[0].dtype_policy == "mixed_bfloat16"
    msg, p = error(tmp_path, env_block("dtype_policy: bf16\n"))
    assert msg.startswith(f"{p}: environments.cpu.dtype_policy: 'bf16' is not one of mixed_bfloat16, ")
    assert "did you mean 'bfloat16'?" in msg
    msg, p = error(tmp_path, MINIMAL + "training: {dtype_policy: mixed_float16}\n")
    assert msg.startswith(f"{p}: training.dtype_policy: mixed_float16 is a way to serve the trained model")
    assert "set dtype_policy on an environment" in msg


def test_repeats_at_sweep_level_and_per_environment(tmp_path):
    sw = load_sweep(write(tmp_path, "repeats: 3\nscenarios: [mlp]\nenvironments:\n  cpu: {}\n  once: {repeats: 1}\n"
                                    "  five: {repeats: 5}\n"))
    assert sw.repeats == 3 and [sw.repeats_for(e) for e in sw.environments] == [3, 1, 5]
    assert sw.repeated() == {"cpu": 3, "five": 5}
    plain = load_sweep(write(tmp_path, MINIMAL))
    assert plain.repeats == 1 and plain.repeated() == {} and plain.environment("cpu").repeats is None


@pytest.mark.parametrize("body, fragment", [
    ("repeats: 0\n", "repeats: expected a whole number of repeats >= 1, got 0"),
    ("repeats: 101\n", "repeats: expected a whole number of repeats >= 1, got 101; at most 100"),
    ("repeats: 2.5\n", "repeats: expected a whole number of repeats >= 1, got 2.5"),
    ("repeats: '3'\n", "repeats: expected a whole number of repeats >= 1, got '3'"),
    ("repeats: true\n", "repeats: expected a whole number of repeats >= 1, got True"),
])
def test_bad_repeats_are_one_line_errors(tmp_path, body, fragment):
    msg, p = error(tmp_path, body + MINIMAL)
    assert msg == f"{p}: {fragment}" or msg.startswith(f"{p}: {fragment}"), msg
    msg, p = error(tmp_path, env_block(body))
    assert msg.startswith(f"{p}: environments.cpu.{fragment}"), msg


def test_repeats_are_refused_in_training(tmp_path):
    msg, p = error(tmp_path, MINIMAL + "training: {repeats: 3}\n")
    assert msg.startswith(f"{p}: training.repeats: a scenario is trained once"), msg
    assert "set repeats on the sweep or on an environment" in msg


def test_unknown_format(tmp_path):
    msg, p = error(tmp_path, MINIMAL + "formats: [keras, savedmodle]\n")
    assert msg.startswith(f"{p}: formats.1: 'savedmodle' is not one of")
    assert "did you mean 'savedmodel'?" in msg
    msg, p = error(tmp_path, MINIMAL + "formats: []\n")
    assert msg.startswith(f"{p}: formats: expected a non-empty list")


def test_duplicate_scenarios(tmp_path):
    msg, p = error(tmp_path, "scenarios: [mlp, cnn, mlp]\nenvironments: {cpu: {}}\n")
    assert msg == f"{p}: scenarios: duplicate entries ['mlp']"
    msg, p = error(tmp_path, "scenarios: []\nenvironments: {cpu: {}}\n")
    assert msg.startswith(f"{p}: scenarios: expected a non-empty list")
    msg, p = error(tmp_path, "scenarios: [mlp, 3]\nenvironments: {cpu: {}}\n")
    assert msg.startswith(f"{p}: scenarios.1: expected a name, got 3")


@pytest.mark.parametrize("body,field", [
    ("timeouts: {cell_timeout_s: 0}", "timeouts.cell_timeout_s"),
    ("timeouts: {train_timeout_s: -5}", "timeouts.train_timeout_s"),
    ("timeouts: {schedule_timeout_s: soon}", "timeouts.schedule_timeout_s"),
    ("timeouts: {cell_timeout: 10}", "timeouts.cell_timeout"),
    ("timeouts: 10", "timeouts"),
])
def test_bad_timeouts(tmp_path, body, field):
    msg, p = error(tmp_path, MINIMAL + body + "\n")
    assert msg.startswith(f"{p}: {field}: "), msg
    if "cell_timeout:" in body:
        assert "did you mean 'cell_timeout_s'?" in msg


@pytest.mark.parametrize("value", ["-1", "two", "true", "1.5"])
def test_bad_retries(tmp_path, value):
    msg, p = error(tmp_path, MINIMAL + f"retries: {value}\n")
    assert msg.startswith(f"{p}: retries: expected a whole number >= 0, got ")


@pytest.mark.parametrize("value", ["''", "42", "[a, b]", "null"])
def test_bad_storage(tmp_path, value):
    msg, p = error(tmp_path, MINIMAL + f"storage: {value}\n")
    assert msg.startswith(f"{p}: storage: expected a path or URI")


@pytest.mark.parametrize("name", ["'bad name'", "'-dash'", "'a/b'", "'x!'"])
def test_bad_environment_name(tmp_path, name):
    msg, p = error(tmp_path, f"scenarios: [mlp]\nenvironments:\n  {name}: {{}}\n")
    env = yaml.safe_load(name)
    assert msg.startswith(f"{p}: environments.{env}: environment names use letters")


def test_bad_sweep_name_and_environments_shape(tmp_path):
    msg, p = error(tmp_path, "name: 'my sweep'\n" + MINIMAL)
    assert msg.startswith(f"{p}: name: ")
    msg, p = error(tmp_path, "scenarios: [a]\nenvironments: [cpu]\n")
    assert msg.startswith(f"{p}: environments: expected a non-empty mapping")
    msg, p = error(tmp_path, "scenarios: [a]\nenvironments: {}\n")
    assert msg.startswith(f"{p}: environments: expected a non-empty mapping")
    msg, p = error(tmp_path, "scenarios: [a]\nenvironments: {cpu: [1]}\n")
    assert msg.startswith(f"{p}: environments.cpu: expected a mapping")


@pytest.mark.parametrize("body,field", [
    ("onednn: 'no'", "environments.cpu.onednn"),
    ("jit_compile: 1", "environments.cpu.jit_compile"),
    ("batch_size: 0", "environments.cpu.batch_size"),
    ("num_gpus: -1", "environments.cpu.num_gpus"),
    ("num_cpus: many", "environments.cpu.num_cpus"),
    ("accelerator_type: 100", "environments.cpu.accelerator_type"),
    ("resources: {gpu_mem: -2}", "environments.cpu.resources.gpu_mem"),
    ("label_selector: {zone: [a]}", "environments.cpu.label_selector.zone"),
    ("env: {A: null}", "environments.cpu.env.A"),
    ("runtime_env: {pip: 3}", "environments.cpu.runtime_env.pip"),
    ("runtime_env: {env_vars: {X: {a: 1}}}", "environments.cpu.runtime_env.env_vars.X"),
    ("description: [x]", "environments.cpu.description"),
    ("tf32: maybe", "environments.cpu.tf32"),
])
def test_bad_environment_fields(tmp_path, body, field):
    msg, p = error(tmp_path, env_block(body + "\n"))
    assert msg.startswith(f"{p}: {field}: "), msg


def test_huge_integer_is_spec_error(tmp_path):
    msg, p = error(tmp_path, env_block("num_cpus: 1" + "0" * 400 + "\n"))
    assert msg.startswith(f"{p}: environments.cpu.num_cpus: ")
    # beyond Python's int-string limit PyYAML itself raises ValueError
    msg, p = error(tmp_path, env_block("num_cpus: 1" + "0" * 5000 + "\n"))
    assert "invalid YAML" in msg


# ---------------------------------------------------------------- junk never crashes

_keys = st.sampled_from(["scenarios", "environments", "formats", "training", "tolerance", "timeouts",
                         "retries", "storage", "name", "expect", "threads", "onednn", "env", "atol",
                         "rtol", "max_ulp", "runtime_env", "env_vars", "pip", "cpu", "output_tolerances",
                         "resources", "label_selector", "cell_timeout_s", "batch_size", "x", ""])
_scalars = st.one_of(st.none(), st.booleans(), st.integers(-10, 10), st.integers(-10 ** 400, 10 ** 400),
                     st.floats(allow_nan=True), st.text(max_size=8), st.sampled_from(FORMATS + ("any", "1e-6")))
_docs = st.recursive(_scalars, lambda kids: st.one_of(st.lists(kids, max_size=4),
                                                      st.dictionaries(_keys, kids, max_size=5)), max_leaves=20)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(doc=st.one_of(_docs, st.fixed_dictionaries({"scenarios": _docs, "environments": _docs},
                                                  optional={"training": _docs, "tolerance": _docs,
                                                            "formats": _docs, "timeouts": _docs})),
       mutation=st.one_of(st.none(), st.tuples(st.integers(0, 400), st.sampled_from(list(":-[]{}&*!|>'\"#%@`\t\n ?,")))))
def test_junk_documents_parse_or_spec_error(tmp_path, doc, mutation):
    try:
        text = yaml.safe_dump(doc, allow_unicode=False)
    except (yaml.YAMLError, OverflowError):
        return
    if mutation is not None:
        i, ch = mutation
        i = min(i, len(text))
        text = text[:i] + ch + text[i:]
    p = tmp_path / "junk.yaml"
    p.write_text(text)
    try:
        sw = load_sweep(p)
    except SpecError as err:
        assert "\n" not in str(err)
        assert str(err).startswith(f"{p}: ")
    else:
        assert isinstance(sw, Sweep) and sw.scenarios and sw.environments


# ---------------------------------------------------------------- safe YAML loading

def test_duplicate_keys_are_errors_but_merge_keys_may_be_overridden(tmp_path):
    msg, p = error(tmp_path, "scenarios: [mlp]\nenvironments:\n  cpu: {threads: 1}\n  gpu: {}\n  cpu: {threads: 2}\n")
    assert msg == (f"{p}: environments.cpu: key 'cpu' appears twice (line 3 and line 5); YAML would silently keep "
                   "only the last: remove or rename one")
    msg, p = error(tmp_path, "formats: [keras]\n" + MINIMAL + "formats: [h5]\n")
    assert msg.startswith(f"{p}: formats: key 'formats' appears twice (line 1 and line 5)")
    sw = load_sweep(write(tmp_path, """\
        scenarios: [mlp]
        environments:
          base: &base {threads: 2, jit_compile: true}
          a:
            <<: *base
            threads: 4
        """))
    a = sw.environment("a")
    assert (a.threads, a.jit_compile) == (4, True)


def test_alias_bomb_and_deep_nesting_are_refused_fast(tmp_path):
    import time

    levels = ["&a [lol, lol, lol, lol, lol, lol, lol, lol, lol]"] + [
        f"&{y} [" + ", ".join([f"*{x}"] * 9) + "]" for x, y in zip("abcdefgh", "bcdefghi")]
    bomb = "scenarios: [mlp]\nenvironments:\n  cpu:\n    description: [" + ", ".join(levels) + "]\n"
    assert len(bomb) < 600
    start = time.perf_counter()
    msg, _ = error(tmp_path, bomb)
    assert "expands to more than" in msg and "line 4" in msg
    msg, _ = error(tmp_path, "scenarios: [mlp]\nenvironments:\n  cpu:\n    description: " + "[" * 3000 + "\n")
    assert "nested deeper than 50 levels" in msg
    assert time.perf_counter() - start < 5
    # a few aliases, as people really use them, are fine
    sw = load_sweep(write(tmp_path, "scenarios: [mlp]\nenvironments:\n  a: &gpu {num_gpus: 1, tf32: false}\n  b: *gpu\n"))
    assert sw.environment("b").num_gpus == 1.0


def test_file_size_encoding_and_readability(tmp_path):
    big = tmp_path / "big.yaml"
    big.write_text(MINIMAL + "description: " + "x" * (10 * 1024 * 1024) + "\n")
    with pytest.raises(SpecError, match=r"larger than 10 MB"):
        load_sweep(big)
    bom = tmp_path / "bom.yaml"
    bom.write_bytes(b"\xef\xbb\xbf" + MINIMAL.encode())
    assert load_sweep(bom).scenarios == ("mlp",)
    with pytest.raises(SpecError, match=r"cannot read sweep file: Is a directory"):
        load_sweep(tmp_path)
    bad = tmp_path / "latin1.yaml"
    bad.write_bytes(MINIMAL.encode() + b"description: caf\xe9\n")
    with pytest.raises(SpecError, match=r"not a UTF-8 text file \(byte \d+, line 4"):
        load_sweep(bad)


# ---------------------------------------------------------------- new fields and rules

def test_cpu_isa_sets_onednn_and_xla_caps():
    env = Environment(name="avx2", cpu_isa="avx2", runtime_env={"env_vars": {"XLA_FLAGS": "--xla_dump_to=/tmp/x"}})
    ev = env.env_vars()
    assert ev["ONEDNN_MAX_CPU_ISA"] == "AVX2" and ev["TF_ENABLE_ONEDNN_OPTS"] == "1"
    assert ev["XLA_FLAGS"] == "--xla_dump_to=/tmp/x --xla_cpu_max_isa=AVX2"
    assert Environment(name="sse", cpu_isa="sse41").env_vars()["XLA_FLAGS"] == "--xla_cpu_max_isa=SSE4_2"
    assert env.knobs()["cpu_isa"] == "avx2"
    assert env.ray_runtime_env()["env_vars"] == ev
    with pytest.raises(SpecError, match=r"cpu_isa: avx2 caps oneDNN.*onednn: false"):
        env.derive("avx2-off", onednn=False)


def test_optional_and_explain_are_stored(tmp_path):
    sw = load_sweep(write(tmp_path, "explain: true\n" + env_block("optional: true\ncpu_isa: avx512_core_amx\n")))
    assert sw.explain is True and sw.environment("cpu").optional is True
    plain = load_sweep(write(tmp_path, MINIMAL))
    assert plain.explain is False and plain.environment("cpu").optional is False


def test_runtime_env_paths_are_relative_to_the_sweep_file(tmp_path, monkeypatch):
    (tmp_path / "code").mkdir()
    (tmp_path / "requirements.txt").write_text("tensorflow-cpu==2.20.0\n")
    p = write(tmp_path, env_block("runtime_env: {working_dir: code, pip: requirements.txt}\n"))
    monkeypatch.chdir("/")
    renv = load_sweep(p).environment("cpu").runtime_env
    assert renv == {"working_dir": str(tmp_path / "code"), "pip": str(tmp_path / "requirements.txt")}
    for uri in ("s3://bucket/code.zip", "https://example.com/code.zip"):
        assert load_sweep(write(tmp_path, env_block(f"runtime_env: {{working_dir: '{uri}'}}\n"))) \
            .environment("cpu").runtime_env == {"working_dir": uri}


@pytest.mark.parametrize("selector", [{"cpu-family": "amd"}, {"gpu": "in(a10g,l4)"}, {"gpu": "!a10g"},
                                      {"ray.io/node-id": "in(abc,def)"}, {"gpu": "!in(a10g, l4)"}])
def test_label_selectors_ray_accepts(selector):
    assert dict(parse_sweep({"scenarios": ["a"], "environments": {"e": {"label_selector": selector}}})
                .environment("e").label_selector) == selector


@pytest.mark.parametrize("uri", ["/data/store", "relative/store", "file:///data/store", "s3://bucket/prefix",
                                 "s3://bucket/prefix?endpoint_override=127.0.0.1:9000&scheme=http", "gs://b/p",
                                 "gcs://b/p", "hdfs://namenode:8020/p", "hdfs:///p", "viewfs://cluster/p"])
def test_storage_uris_pyarrow_opens(uri):
    assert parse_sweep({"scenarios": ["a"], "environments": {"e": {}}, "storage": uri}).storage == uri


def test_amount_rules(tmp_path):
    env = parse_sweep({"scenarios": ["a"], "environments": {"e": {"num_gpus": 0.25, "num_cpus": "1e1",
                                                                  "resources": {"train": 0, "big": 1e6}}}})
    e = env.environment("e")
    assert (e.num_gpus, e.num_cpus, e.resources) == (0.25, 10.0, {"train": 0.0, "big": 1e6})
    assert Environment(name="x", onednn=False, num_gpus=1).num_gpus == 1.0


def test_max_ulp_is_a_whole_number(tmp_path):
    assert load_sweep(write(tmp_path, MINIMAL + "tolerance: {max_ulp: 3}\n")).tolerance == Tolerance(max_ulp=3.0)
    msg, p = error(tmp_path, MINIMAL + "tolerance: {max_ulp: 1.5}\n")
    assert msg == f"{p}: tolerance.max_ulp: expected a whole number of ULPs >= 0, got 1.5"


# ---------------------------------------------------------------- models: pickle, repr, derive, documents

def test_environment_pickles_and_repr_is_deterministic(tmp_path):
    import pickle

    from ray import cloudpickle

    a = load_sweep(write(tmp_path, FULL)).environment("cpu-full")
    b = load_sweep(write(tmp_path, FULL)).environment("cpu-full")
    assert repr(a) == repr(b) and repr(a).startswith("Environment(name='cpu-full', description='all the fields'")
    for dumps, loads in ((pickle.dumps, pickle.loads), (cloudpickle.dumps, cloudpickle.loads)):
        c = loads(dumps(a))
        assert c == a and repr(c) == repr(a) and c.env_vars() == a.env_vars()
    sw = load_sweep(write(tmp_path, FULL))
    assert pickle.loads(pickle.dumps(sw)) == sw


def test_derive_validates_and_keeps_the_rest():
    base = Environment(name="cpu", threads=2, env={"A": "1"}, tolerance=Tolerance(max_ulp=4.0))
    one = base.derive("cpu-1t", threads=1)
    assert (one.name, one.threads, one.env, one.tolerance) == ("cpu-1t", 1, {"A": "1"}, Tolerance(max_ulp=4.0))
    assert base.threads == 2
    with pytest.raises(SpecError, match=r"threads: expected a positive integer, got 0"):
        base.derive("bad", threads=0)
    with pytest.raises(SpecError, match=r"thread: unknown field; did you mean 'threads'\?"):
        base.derive("bad", thread=1)
    with pytest.raises(SpecError, match=r"name: environment names use"):
        base.derive("bad name")


_env_names = st.sampled_from(["TF_XLA_FLAGS", "TF_USE_LEGACY_KERAS", "OMP_NUM_THREADS", "MY_VAR", "XLA_FLAGS"])
_env_values = st.text(st.characters(codec="utf-8", exclude_categories=("Cs", "Cc")), max_size=12)
_environment_docs = st.fixed_dictionaries({}, optional={
    "description": st.text(max_size=20),
    "env": st.dictionaries(_env_names, _env_values, max_size=3),
    "onednn": st.sampled_from([True, None]),
    "threads": st.integers(1, 64),
    "jit_compile": st.booleans(),
    "batch_size": st.integers(1, 4096),
    "num_cpus": st.sampled_from([0, 0.5, 1, 2, 4, 1.25]),
    "num_gpus": st.sampled_from([0, 0.25, 0.5, 1, 2]),
    "accelerator_type": st.sampled_from(["A10G", "L4", "H100"]),
    "resources": st.dictionaries(st.sampled_from(["train", "big_mem", "special"]), st.sampled_from([0.25, 1, 2]),
                                 max_size=2),
    "label_selector": st.dictionaries(st.sampled_from(["cpu-family", "gpu", "node-role"]),
                                      st.sampled_from(["amd", "intel", "in(a10g,l4)", "!a10g", "replay"]), max_size=2),
    "tf32": st.booleans(),
    "op_determinism": st.booleans(),
    "memory_growth": st.booleans(),
    "runtime_env": st.sampled_from([{}, {"pip": ["tensorflow-cpu==2.20.0"]}, {"env_vars": {"X": "1"}},
                                    {"container": {"image": "img"}}, {"conda": "tf-env"}]),
    "tolerance": st.fixed_dictionaries({}, optional={"atol": st.floats(0, 1), "rtol": st.floats(0, 1),
                                                     "max_ulp": st.integers(0, 1 << 40)}),
    "expect": st.sampled_from(["bitwise", "tolerance", "any"]),
    "cpu_isa": st.sampled_from(["sse41", "avx2", "avx512_core_amx"]),
    "optional": st.booleans(),
})


@settings(max_examples=60, deadline=None)
@given(doc=_environment_docs)
def test_environment_document_round_trip(doc):
    env = parse_sweep({"scenarios": ["a"], "environments": {"e": doc}}).environment("e")
    again_doc = environment_document(env)
    yaml.safe_load(yaml.safe_dump(again_doc))  # YAML-able
    again = parse_sweep({"scenarios": ["a"], "environments": {"e": again_doc}}).environment("e")
    assert again == env and repr(again) == repr(env)
    assert env.derive("e") == env
    assert Environment(name="e", **again_doc) == env


@pytest.mark.parametrize("written", ["S3://bucket/p?region=x", "s3://bucket/p?region=x", "S3://bucket/p?region=x"])
def test_storage_scheme_is_case_insensitive_and_stored_in_lower_case(tmp_path, written):
    """RFC 3986 schemes are case-insensitive; pyarrow's ``from_uri`` is not (``S3://`` is 'Unrecognized')."""
    doc = {"scenarios": ["seed-linear-regression"], "environments": {"cpu": {}}, "storage": written}
    sw = load_sweep(write(tmp_path, yaml.safe_dump(doc)))
    assert sw.storage == "s3://bucket/p?region=x"


def test_s3_query_options_are_exactly_those_pyarrow_takes():
    """Each listed option opens (no network: endpoint on 127.0.0.1); anything else pyarrow itself refuses."""
    import pyarrow.fs as pafs

    from harness.spec_types import S3_URI_OPTIONS, storage_problem

    values = {"allow_bucket_creation": "true", "allow_bucket_deletion": "false", "tls_verify_certificates": "false"}
    base = "s3://b/p?endpoint_override=127.0.0.1:1&scheme=http&region=x"
    for key in S3_URI_OPTIONS:
        uri = f"{base}&{key}={values.get(key, 'x' if key != 'scheme' else 'http')}"
        assert storage_problem(uri) is None
        pafs.FileSystem.from_uri(uri)
    assert "no option 'bogus'" in storage_problem(f"{base}&bogus=1")
    with pytest.raises(Exception, match="bogus"):
        pafs.FileSystem.from_uri(f"{base}&bogus=1")
