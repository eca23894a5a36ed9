"""The conformance suite against sdi_torch and sdi_jax: both pass, with no expected failure.

PyTorch runs every check on every canonical model.  JAX compiles each model
once per sketch and batch shape (about 180 CPU-seconds for the whole suite on
a 2-core machine, nearly all of it XLA compilation), so the default run
covers every check on the looped MLP plus the factor streams of the other
models, and the full suite (all models, and the ``lax.scan`` forms) runs with
``-m slow``.
"""

from __future__ import annotations

import dataclasses

import pytest

from sdi_conformance import load_backend, yield_checks
from sdi_core import SDIError

def _load(spec: str):
    try:
        return load_backend(spec), None
    except SDIError as exc:  # the framework is not installed: skip its checks, saying why
        return None, str(exc)


def _params(framework: str, spec: str, *, checks=None, models=None, slow=False, restrict=None, label=""):
    """pytest params ``(framework, check)`` for the checks the backend generates (ids ``spec[label]::check id``)."""
    backend, why = _load(spec)
    if backend is None:
        return [pytest.param(framework, None, id=f"{framework}-unavailable", marks=pytest.mark.skip(reason=why))]
    if restrict is not None:
        backend = _restricted(backend, restrict)
    marks = [pytest.mark.slow] if slow else []
    out = []
    for cid, check in yield_checks(backend, checks):
        model = cid.split("[", 1)[1].rstrip("]")
        if models is not None and model not in models:
            continue
        out.append(pytest.param(framework, check, id=f"{spec}{label}::{cid}", marks=marks))
    return out


def _restricted(backend, models):
    """A fresh backend of the same class that declares only ``models`` (checks move to the cheap models)."""
    fresh = type(backend)()
    fresh.capabilities = dataclasses.replace(backend.capabilities, models=frozenset(models))
    return fresh


PARAMS = (
    _params("torch", "sdi_torch.conformance:backend")
    + _params("torch", "sdi_torch.conformance:backend_untied", checks=["check_per_step_gradients"])
    + _params("jax", "sdi_jax.conformance:backend", restrict={"looped_mlp"}, label="[looped_mlp only]")
    + _params("jax", "sdi_jax.conformance:backend", checks=["check_factor_stream"],
              models={"looped_transformer", "early_exit", "weight_used_twice"})
    + _params("jax", "sdi_jax.conformance:backend", slow=True, label="[full]")
    + _params("jax", "sdi_jax.conformance:backend_scan", slow=True,
              checks=["check_factor_stream", "check_per_step_gradients", "check_sketched_features",
                      "check_tracin_conservation", "check_jit_matches_eager"])
)


@pytest.fixture
def torch_one_thread():
    """Tiny models: one intra-op thread is faster than two fighting over a busy machine."""
    torch = pytest.importorskip("torch")
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.mark.parametrize("framework, check", PARAMS)
def test_backend_conformance(framework, check, request):
    request.getfixturevalue("jax_x64" if framework == "jax" else "torch_one_thread")
    check()


def test_every_check_runs_on_both_backends_by_default():
    """The default run leaves no check out for either framework (only models)."""
    from sdi_conformance import CHECK_NAMES

    for framework, spec in (("torch", "sdi_torch.conformance:backend"), ("jax", "sdi_jax.conformance:backend")):
        backend, why = _load(spec)
        if backend is None:
            continue
        names = {p.values[1].func.__name__ for p in PARAMS
                 if p.values[0] == framework and p.values[1] is not None and not p.marks}
        caps = backend.capabilities
        expected = set(CHECK_NAMES)
        if len(caps.devices) < 2:
            expected.discard("check_devices_agree")
        if not caps.jit:
            expected.discard("check_jit_matches_eager")
        assert names == expected, f"{framework}: checks missing from the default run: {expected - names}"
