"""The three ways to run the suite from outside: pytest plugin, ``python -m sdi_conformance``, import isolation.

Each test runs a fresh interpreter in a temporary directory, so that this
project's configuration does not leak into the run under test.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

NUMPY_BACKEND = "sdi_conformance.numpy_backend:backend"
BROKEN_BACKEND = "sdi_conformance.fakes:StepsReversed"


def _run(args, cwd, env_backend: str | None = None):
    env = {k: v for k, v in os.environ.items() if k != "SDI_CONFORMANCE_BACKEND"}
    if env_backend is not None:
        env["SDI_CONFORMANCE_BACKEND"] = env_backend
    proc = subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    return proc.returncode, proc.stdout + proc.stderr


def _pytest(tmp_path, *args, env_backend=None):
    # Other plugins are switched off: they are slow to load and irrelevant here.
    return _run(["-m", "pytest", "-p", "no:cacheprovider", "-p", "no:hypothesispytest", "-p", "no:xdist",
                 "-p", "sdi_conformance.pytest_plugin", *args],
                tmp_path, env_backend)


@pytest.fixture
def project(tmp_path):
    (tmp_path / "test_own.py").write_text(
        "import sys\n"
        "def test_own():\n"
        "    # the plugin is inert without a backend: it pulls in neither the suite nor sdi_core\n"
        "    assert 'sdi_core' not in sys.modules, 'plugin imported sdi_core'\n"
        "    assert 'sdi_conformance.checks' not in sys.modules\n"
    )
    return tmp_path


def test_plugin_is_inert_without_a_backend(project):
    rc, out = _pytest(project, "-q")
    assert rc == 0, out
    assert "1 passed" in out and "sdi-conformance" not in out, out


def test_plugin_runs_checks_and_prints_backend_in_header(project):
    rc, out = _pytest(project, "--sdi-backend", NUMPY_BACKEND, "-m", "sdi_conformance", "-k",
                      "check_factor_stream or check_bad_checkpoint")
    assert rc == 0, out
    assert "sdi-conformance: backend numpy-reference" in out, out
    assert "capabilities float64=True jit=False" in out, out
    assert "7 passed" in out and "test_own" not in out, out  # 6 models x factor stream + 1


def test_plugin_takes_backend_from_environment_and_reports_failures(project):
    rc, out = _pytest(project, "-k", "check_factor_stream and looped_mlp", env_backend=BROKEN_BACKEND)
    assert rc == 1, out
    assert "FAILED sdi_conformance::check_factor_stream[looped_mlp]" in out, out
    assert "called:   backend.factor_stream" in out and "expected: loop steps in forward order" in out, out


def test_plugin_xfail_option_marks_expected_failures(project):
    rc, out = _pytest(project, "-q", "--sdi-backend", BROKEN_BACKEND, "--sdi-xfail",
                      "check_factor_stream=steps reversed on purpose", "-k", "check_factor_stream")
    assert rc == 0, out
    assert "6 xfailed" in out, out  # factor stream on the 6 canonical models


@pytest.mark.parametrize("name, pattern", [
    ("not_a_module_xyz:backend", "cannot import module 'not_a_module_xyz'"),
    ("sdi_conformance.numpy_backend:nope", "has no attribute 'nope'"),
])
def test_plugin_fails_loudly_on_unknown_backend(project, name, pattern):
    rc, out = _pytest(project, "--sdi-backend", name)
    assert rc == 4, out  # pytest's usage-error exit code
    assert pattern in out, out


def test_module_runner_exit_codes(tmp_path):
    rc, out = _run(["-m", "sdi_conformance", NUMPY_BACKEND, "--check", "check_factor_stream"], tmp_path)
    assert rc == 0, out
    assert "PASSED   check_factor_stream[looped_transformer]" in out and "6 passed" in out, out
    rc, out = _run(["-m", "sdi_conformance", BROKEN_BACKEND, "--check", "check_factor_stream"], tmp_path)
    assert rc == 1, out
    assert "FAILED   check_factor_stream[early_exit]" in out and "called:" in out, out
    rc, out = _run(["-m", "sdi_conformance", "nowhere:backend"], tmp_path)
    assert rc == 2 and "cannot import module" in out, out


def test_import_sdi_conformance_imports_no_framework(tmp_path):
    code = (
        "import sys, sdi_conformance, sdi_conformance.checks, sdi_conformance.runner, sdi_conformance.models, "
        "sdi_conformance.numpy_backend, sdi_conformance.fakes, sdi_conformance.decorators, "
        "sdi_conformance.pytest_plugin; "
        "sdi_conformance.run_checks(sdi_conformance.numpy_backend.backend, checks=['check_factor_stream']); "
        "bad = [m for m in ('torch', 'jax', 'jaxlib', 'sdi_torch', 'sdi_jax') if m in sys.modules]; "
        "assert not bad, bad"
    )
    rc, out = _run(["-c", code], tmp_path)
    assert rc == 0, f"importing sdi_conformance pulled in a framework: {out}"


def test_plugin_takes_a_registered_backend_name(project):
    """`--sdi-backend numpy` resolves through the sdi.backends entry points to the NumPy conformance backend."""
    import re

    args = ("-m", "sdi_conformance", "-k", "check_factor_stream")
    rc, out = _pytest(project, "--sdi-backend", "numpy", *args)
    assert rc == 0, out
    rc_spec, out_spec = _pytest(project, "--sdi-backend", NUMPY_BACKEND, *args)
    passed = re.findall(r"(\d+) passed", out)
    assert "sdi-conformance: backend numpy-reference" in out and passed and int(passed[-1]) > 0, out
    assert passed == re.findall(r"(\d+) passed", out_spec), (out, out_spec)


def test_registered_names_resolve_to_each_frameworks_conformance_backend():
    from sdi_conformance.runner import _registered

    assert _registered("numpy") == "sdi_conformance.numpy_backend:backend"
    assert _registered("torch") == "sdi_torch.conformance:backend"
    assert _registered("jax") == "sdi_jax.conformance:backend"


def test_plugin_refuses_an_unregistered_name_listing_the_installed(project):
    rc, out = _pytest(project, "--sdi-backend", "tensorflow")
    assert rc == 4, out
    assert "neither 'package.module:attribute' nor a registered backend" in out and "numpy" in out, out
