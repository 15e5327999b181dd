"""Every malformed sweep in tests/data/bad-sweeps/ is refused by ``validate`` *and* ``run``.

One defect per file, named after it; everything else in each file is a valid
sweep of the built-in scenarios, so the defect is the only reason to refuse
it. Each file goes through ``harness.cli.main`` in this process (``run`` must
stop at validation: no Ray, nothing written) and must give exit 2 and exactly
one stderr line naming the file and, from the table below, the field.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from harness import cli

BAD = Path(__file__).parent / "data" / "bad-sweeps"
FILES = sorted(BAD.glob("*.yaml"))

#: file stem -> fragments of the error line (after the file name): the dotted field first.
EXPECTED: dict[str, tuple[str, ...]] = {
    # YAML itself
    "dup-environment-name": ("environments.cpu-default:", "appears twice", "line 5", "line 8"),
    "dup-formats": ("formats:", "appears twice", "line 3", "line 4"),
    "dup-env-var": ("environments.cpu-bad.env.TF_XLA_FLAGS:", "appears twice"),
    "alias-bomb": ("line 5", "expands to more than"),
    "alias-recursive": ("line 9", "recursive"),
    "deep-nesting": ("line 9", "nested deeper than 50 levels"),
    "tabs-indent": ("invalid YAML at line 5", "tabs"),
    "not-utf8": ("not a UTF-8 text file", "line 4"),
    "empty": ("the file is empty",),
    "only-comments": ("the file is empty",),
    "list-at-top": ("a YAML mapping", "got list"),
    "scalar-at-top": ("a YAML mapping", "got str"),
    "yaml-syntax": ("invalid YAML at line 4",),
    "multiple-documents": ("invalid YAML at line 8", "single document"),
    "python-tag": ("invalid YAML at line 9", "python/object"),
    "huge-int": ("invalid YAML at line 9", "5001 characters"),
    "nul-byte": ("invalid YAML at line 1, column 10", "#x0000"),
    # sweep fields
    "unknown-field": ("retry: unknown field", "did you mean 'retries'?"),
    "scenarios-missing": ("scenarios: required field is missing",),
    "scenarios-empty": ("scenarios: expected a non-empty list",),
    "scenarios-duplicate": ("scenarios: duplicate entries ['seed-binary-classifier']",),
    "scenario-not-a-name": ("scenarios.1: expected a name, got 42",),
    "unknown-scenario": ("scenarios:", "unknown scenario 'seed-binary-clasifier'", "did you mean"),
    "environments-missing": ("environments: required field is missing",),
    "environments-empty": ("environments: expected a non-empty mapping",),
    "environments-list": ("environments: expected a non-empty mapping",),
    "environment-name-invalid": ("environments.cpu default: environment names use",),
    "environment-named-training": ("environments.training:", "name of the training environment", "rename this environment"),
    "sweep-name-invalid": ("name: expected a name", "'my sweep'"),
    "bad-format": ("formats.1: 'savedmodle' is not one of", "did you mean 'savedmodel'?"),
    "formats-duplicate": ("formats: duplicate entries ['keras']",),
    "bad-expect": ("expect: 'bitwize'", "did you mean 'bitwise'?"),
    "bad-expect-save": ("expect_save: 'strict' is not one of",),
    "scenario-paths-missing": ("scenario_paths.0: '../my-scenarios-typo' is not a directory",
                               "my-scenarios-typo (relative paths start at the sweep file's directory)"),
    "storage-ftp": ("storage:", "'ftp'", "s3://"),
    "storage-typo-scheme": ("storage:", "'s4'", "did you mean 's3'?"),
    "storage-s3-no-bucket": ("storage:", "names no bucket"),
    "storage-s3-option-typo": ("storage:", "no option 'endpoint_overide'", "did you mean 'endpoint_override'?"),
    "storage-file-relative": ("storage:", "absolute path"),
    "storage-empty": ("storage: expected a path or URI",),
    "storage-not-a-string": ("storage: expected a path or URI",),
    "retries-huge": ("retries: expected a whole number >= 0", "at most 1000"),
    "retries-negative": ("retries: expected a whole number >= 0, got -1",),
    "retries-fraction": ("retries: expected a whole number >= 0, got 1.5",),
    "batch-size-zero": ("batch_size: expected a positive integer, got 0",),
    "timeout-zero": ("timeouts.cell_timeout_s: expected a number of seconds > 0, got 0",),
    "timeout-inf": ("timeouts.schedule_timeout_s:", "got inf"),
    "timeout-huge": ("timeouts.train_timeout_s:", "30 days"),
    "timeout-unknown-field": ("timeouts.cell_timeout: unknown field", "did you mean 'cell_timeout_s'?"),
    "tolerance-negative": ("tolerance.atol: expected a number >= 0",),
    "max-ulp-fraction": ("tolerance.max_ulp: expected a whole number of ULPs >= 0, got 1.5",),
    "output-tolerance-max-ulp-fraction": ("output_tolerances.logits.max_ulp:", "got 0.5"),
    "output-tolerances-list": ("output_tolerances: expected a mapping",),
    "precheck-not-bool": ("precheck: expected true or false, got 'no'",),
    "explain-not-bool": ("explain: expected true or false, got 1",),
    "repeats-zero": ("repeats: expected a whole number of repeats >= 1, got 0",),
    "repeats-in-training": ("training.repeats: a scenario is trained once", "set repeats on the sweep or on an environment"),
    "scenario-paths-not-a-list": ("scenario_paths: expected a list of directories",),
    "training-unknown-field": ("training.jit: unknown field",),
    # environment fields
    "num-gpus-absurd": ("environments.cpu-xla.num_gpus:", "at most 64"),
    "runtime-env-config-typo": ("environments.cpu-xla.runtime_env.config.setup_timeout_secnds:",
                                "did you mean 'setup_timeout_seconds'?"),
    "unknown-environment-field": ("environments.cpu-bad.thread: unknown field", "did you mean 'threads'?"),
    "environment-not-a-mapping": ("environments.cpu-bad: expected a mapping",),
    "threads-zero": ("environments.cpu-bad.threads: expected a positive integer, got 0",),
    "threads-string": ("environments.cpu-bad.threads: expected a positive integer, got 'two'",),
    "threads-huge": ("environments.cpu-bad.threads:", "at most 4096"),
    "jit-compile-null": ("environments.cpu-bad.jit_compile: expected true or false, got None",),
    "onednn-string": ("environments.cpu-bad.onednn: expected true or false, got 'off'",),
    "optional-not-bool": ("environments.cpu-bad.optional: expected true or false",),
    "tolerance-nan": ("environments.cpu-bad.tolerance.rtol:", "got nan"),
    "tolerance-not-a-mapping": ("environments.cpu-bad.tolerance: expected a mapping",),
    "expect-unknown": ("environments.cpu-bad.expect: 'tolerant'", "did you mean 'tolerance'?"),
    "accelerator-type-number": ("environments.cpu-bad.accelerator_type:", "got 100"),
    "num-cpus-inf": ("environments.cpu-bad.num_cpus:", "got inf"),
    "num-cpus-negative": ("environments.cpu-bad.num_cpus: expected a number >= 0, got -1",),
    "num-cpus-string": ("environments.cpu-bad.num_cpus:", "got 'many'"),
    "num-gpus-fraction-above-one": ("environments.cpu-bad.num_gpus:", "fraction below 1"),
    "num-gpus-huge": ("environments.cpu-bad.num_gpus:", "at most 1e+12"),
    "resources-cpu": ("environments.cpu-bad.resources.CPU:", "use num_cpus"),
    "resources-gpu": ("environments.cpu-bad.resources.GPU:", "use num_gpus"),
    "resources-memory": ("environments.cpu-bad.resources.memory:", "reserves"),
    "resources-object-store-memory": ("environments.cpu-bad.resources.object_store_memory:", "reserves"),
    "resources-negative": ("environments.cpu-bad.resources.train: expected a number >= 0",),
    "resources-below-ray-resolution": ("environments.cpu-bad.resources.train:", "resolution"),
    "label-key-invalid": ("environments.cpu-bad.label_selector.bad key!:", "Invalid label key name"),
    "label-value-invalid": ("environments.cpu-bad.label_selector.gpu:", "Invalid label selector value"),
    "label-value-list": ("environments.cpu-bad.label_selector.gpu: expected a string value",),
    "env-var-name-equals": ("environments.cpu-bad.env.TF_XLA_FLAGS=--x:", "environment variable name"),
    "env-var-name-empty": ("environments.cpu-bad.env.'':", "environment variable name"),
    "env-var-value-nul": ("environments.cpu-bad.env.TF_XLA_FLAGS:", "NUL"),
    "env-var-name-nul": ("environments.cpu-bad.runtime_env.env_vars.'A\\x00B':", "environment variable name"),
    "env-var-value-null": ("environments.cpu-bad.env.TF_XLA_FLAGS: expected a string value, got None",),
    "env-not-a-mapping": ("environments.cpu-bad.env: expected a mapping",),
    "runtime-env-conda-int": ("environments.cpu-bad.runtime_env.conda:", "got 5"),
    "runtime-env-pip-int": ("environments.cpu-bad.runtime_env.pip:", "got 5"),
    "runtime-env-env-vars-list": ("environments.cpu-bad.runtime_env.env_vars: expected a mapping",),
    "runtime-env-py-modules-string": ("environments.cpu-bad.runtime_env.py_modules:", "got 'my_module'"),
    "runtime-env-unknown-key": ("environments.cpu-bad.runtime_env.pipp: unknown field", "did you mean 'pip'?"),
    "runtime-env-pip-and-conda": ("environments.cpu-bad.runtime_env: Ray rejects", "cannot be specified at the same"),
    "runtime-env-image-uri-with-pip": ("environments.cpu-bad.runtime_env: Ray rejects", "image_uri"),
    "runtime-env-config-timeout-string": ("environments.cpu-bad.runtime_env: Ray rejects", "setup_timeout_seconds"),
    "working-dir-missing": ("environments.cpu-bad.runtime_env.working_dir:", "'./no-such-dir'", str(BAD)),
    "requirements-file-missing": ("environments.cpu-bad.runtime_env.pip:", "'no-such-requirements.txt'"),
    "py-modules-missing": ("environments.cpu-bad.runtime_env.py_modules.0:", "'./no-such-module'"),
    "cpu-isa-unknown": ("environments.cpu-bad.cpu_isa: 'avx512' is not one of", "did you mean"),
    "cpu-isa-with-onednn-off": ("environments.cpu-bad.cpu_isa:", "onednn: false"),
    "cpu-isa-with-onednn-env-off": ("environments.cpu-bad.env.TF_ENABLE_ONEDNN_OPTS:", "cpu_isa"),
    "cpu-isa-with-onednn-max-isa": ("environments.cpu-bad.runtime_env.env_vars.ONEDNN_MAX_CPU_ISA:", "cpu_isa"),
    "cpu-isa-with-xla-max-isa": ("environments.cpu-bad.env.XLA_FLAGS:", "--xla_cpu_max_isa"),
    "repeats-huge": ("environments.cpu-bad.repeats: expected a whole number of repeats >= 1, got 1000", "at most 100"),
    "repeats-string": ("environments.cpu-bad.repeats: expected a whole number of repeats >= 1, got '3'",),
    "dtype-policy-unknown": ("environments.cpu-bad.dtype_policy: 'mixed_bf16' is not one of",
                             "did you mean 'mixed_bfloat16'?"),
    "dtype-policy-in-training": ("training.dtype_policy: mixed_bfloat16 is a way to serve the trained model",
                                 "set dtype_policy on an environment"),
    "metric-delta-negative": ("environments.cpu-bad.expect.metric_delta: expected a number >= 0, got -0.01",),
    # the sweep against its scenarios
    "metric-delta-without-labels": ("environments.cpu-bad.expect:", "scenario 'seed-binary-classifier' declares none",
                                    "give it labels= and metric="),
}


def test_the_corpus_and_the_table_agree():
    assert len(FILES) >= 60
    assert {f.stem for f in FILES} == set(EXPECTED)


def _main(capsys, *args: str) -> tuple[int, list[str]]:
    code = cli.main(list(args))
    captured = capsys.readouterr()
    assert captured.out == "", captured.out
    return code, captured.err.splitlines()


@pytest.mark.parametrize("path", FILES, ids=[f.stem for f in FILES])
def test_validate_and_run_refuse_it_in_one_line(path, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # a default storage: would land here (it must not be created)
    out = tmp_path / "out"
    lines = {}
    for command in (["validate", str(path)], ["run", str(path), "--out", str(out)]):
        code, err = _main(capsys, *command)
        assert code == cli.EXIT_INVALID, (command, err)
        assert len(err) == 1, (command, err)
        assert "Traceback" not in err[0]
        assert err[0].startswith(f"harness: error: {path}: "), err[0]
        rest = err[0][len(f"harness: error: {path}: "):]
        for fragment in EXPECTED[path.stem]:
            assert fragment in rest, f"{fragment!r} not in {rest!r}"
        field = EXPECTED[path.stem][0].split(":")[0]
        if ":" in EXPECTED[path.stem][0]:  # the dotted field comes first
            assert rest.startswith(f"{field}:"), rest
        lines[command[0]] = err[0]
    assert lines["validate"] == lines["run"]  # run stops at the same check
    assert not out.exists(), "run wrote into --out"
    assert list(tmp_path.iterdir()) == [], "something was written"


@pytest.mark.parametrize("option", ["--storage", "--history"])
def test_command_line_uris_are_checked_like_storage(option, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    good = Path(__file__).resolve().parent.parent / "scenarios" / "sweeps" / "quickstart.yaml"
    command = ["nightly", str(good), "--history", str(tmp_path / "h")] if option == "--storage" else ["nightly", str(good)]
    code, err = _main(capsys, *command, option, "ftp://files.example.com/x", "--out", str(tmp_path / "out"))
    assert code == cli.EXIT_INVALID and len(err) == 1, err
    assert err[0].startswith(f"harness: error: {option}: 'ftp://files.example.com/x': pyarrow.fs opens no 'ftp'"), err
    assert list(tmp_path.iterdir()) == []
