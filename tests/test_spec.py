"""Tests for harness/spec.py: sweep YAML -> validated dataclasses, one-line SpecErrors."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings, strategies as st

from harness.compare import Tolerance
from harness.spec import FORMATS, Environment, SpecError, Sweep, load_sweep, parse_sweep

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
    sub = tmp_path / "sweeps"
    sub.mkdir()
    p = write(sub, "scenario_paths: [../scenarios, /abs/dir]\n" + MINIMAL)
    monkeypatch.chdir("/")
    sw = load_sweep(p)
    assert sw.scenario_paths == (str((tmp_path / "scenarios").resolve()), str(Path("/abs/dir").resolve()))


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
    assert msg.startswith(f"{p}: expect: 'bitwize' is not one of bitwise, tolerance, any")
    assert "did you mean 'bitwise'?" in msg
    msg, p = error(tmp_path, MINIMAL + "expect_save: strict\n")
    assert msg.startswith(f"{p}: expect_save: 'strict' is not one of")
    msg, p = error(tmp_path, env_block("expect: maybe\n"))
    assert msg.startswith(f"{p}: environments.cpu.expect: 'maybe' is not one of")


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
