"""``sdi featurize --model pkg.module:factory`` and ``--config my.toml``: a user's own looped model.

The factory is a function of no arguments that returns a :class:`UserModel`
(or a mapping with the same keys): the model, its per-example loss, the loop
selection and the batches, optionally side groups, checkpoints and the loop
step count.  The backend (``torch`` by default) wraps them in its Attributor;
the store, resumption and ``torchrun`` work as for the built-in model.

A config file (TOML) holds the same options as the command line, one key per
long option (``model``, ``out``, ``sketch_dim``, ``summed``, ...;
``-`` and ``_`` alike); options given on the command line win.
"""

from __future__ import annotations

import importlib
import os
import sys
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from ..factors import SDIError

__all__ = ["UserModel", "is_factory_spec", "load_factory", "load_config_file", "CONFIG_KEYS"]


@dataclass
class UserModel:
    """What a ``--model pkg.module:factory`` function returns.

    Attributes:
        model: the framework's model (torch: an ``nn.Module``; jax: the params
            pytree of a pure loss).
        loss_fn: per-example loss, ``loss_fn(model, batch) -> [B]`` (torch) or
            ``loss_fn(params, batch) -> [B]`` (jax).
        loop: the loop selection, as the backend's Attributor takes it
            (torch: ``model.block``; jax: ``lambda p: p["block"]``).
        batches: the batches to featurise, in a fixed order (a list); a
            mapping batch may carry ``"ids"`` (int ``[B]``), used as example ids.
        groups: side groups, one slot each (``{"prelude": [...], "coda": [...]}``).
        checkpoints: checkpoints to featurise at (``sdi_core.Checkpoint`` objects
            or, for torch, file paths); ``--checkpoint`` options add to none
            given here.  None: the model's current weights.
        steps: loop steps, padding every batch to this many (``Attributor(steps=)``).
    """

    model: Any
    loss_fn: Any
    loop: Any
    batches: Sequence[Any]
    groups: Mapping[str, Any] | None = None
    checkpoints: Sequence[Any] | None = None
    steps: int | None = None


_REQUIRED = ("model", "loss_fn", "loop", "batches")
_OPTIONAL = ("groups", "checkpoints", "steps")


def is_factory_spec(text: str | None) -> bool:
    """``pkg.module:attr`` (and not a file that exists): a factory, not a LoopedConfig JSON."""
    if not text or os.path.exists(text):
        return False
    mod, sep, attr = text.partition(":")
    return bool(sep) and all(p.isidentifier() for p in mod.split(".")) and all(p.isidentifier() for p in attr.split("."))


def load_factory(spec: str) -> UserModel:
    """Import ``pkg.module:factory``, call it, and check what it returned.

    The working directory is searched first, so a ``my_model.py`` beside the
    command is found as ``my_model:build``.

    Raises:
        SDIError: the module or attribute cannot be found or imported, the
            attribute is not callable, or the return value lacks a key or has
            one of the wrong kind (naming it and the fix).
    """
    mod_name, _, attr = spec.partition(":")
    cwd = os.getcwd()
    added = cwd not in sys.path
    if added:
        sys.path.insert(0, cwd)
    try:
        try:
            module = importlib.import_module(mod_name)
        except ModuleNotFoundError as exc:
            raise SDIError(
                f"--model {spec!r}: cannot import module {mod_name!r} ({exc}). Run sdi from the folder holding "
                f"{mod_name.replace('.', '/')}.py, or install the package, or add its folder to PYTHONPATH.") from None
        except Exception as exc:  # the user's module raised while importing
            raise SDIError(f"--model {spec!r}: importing {mod_name!r} raised {type(exc).__name__}: {exc}. Fix the "
                           "module (it must import without side effects that fail).") from None
    finally:
        if added:
            sys.path.remove(cwd)
    obj = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            public = sorted(n for n in vars(module) if not n.startswith("_"))
            raise SDIError(f"--model {spec!r}: module {mod_name!r} has no attribute {attr!r}; it has {public[:12]}. "
                           "Name the factory function: --model module:function.")
        obj = getattr(obj, part)
    if not callable(obj):
        raise SDIError(f"--model {spec!r}: {attr!r} is a {type(obj).__name__}, not a function; name a function that "
                       "takes no arguments and returns sdi_core.app.user_model.UserModel(...) (or a dict).")
    try:
        got = obj()
    except TypeError as exc:
        raise SDIError(f"--model {spec!r}: calling {attr}() failed ({exc}); the factory takes no arguments.") from None
    return _as_user_model(got, spec)


def _as_user_model(got: Any, spec: str) -> UserModel:
    if isinstance(got, UserModel):
        values = {k: getattr(got, k) for k in _REQUIRED + _OPTIONAL}
    elif isinstance(got, Mapping):
        unknown = sorted(set(got) - set(_REQUIRED) - set(_OPTIONAL))
        if unknown:
            raise SDIError(f"--model {spec!r}: the factory returned unknown key(s) {unknown}; the keys are "
                           f"{list(_REQUIRED)} and optionally {list(_OPTIONAL)}.")
        values = dict(got)
    else:
        raise SDIError(f"--model {spec!r}: the factory returned a {type(got).__name__}; return "
                       f"sdi_core.app.user_model.UserModel(model=..., loss_fn=..., loop=..., batches=[...]) or a dict "
                       f"with the keys {list(_REQUIRED)}.")
    missing = [k for k in _REQUIRED if values.get(k) is None]
    if missing:
        raise SDIError(f"--model {spec!r}: the factory's result has no {missing}; it needs {list(_REQUIRED)} "
                       f"(optionally {list(_OPTIONAL)}).")
    if not callable(values["loss_fn"]):
        raise SDIError(f"--model {spec!r}: loss_fn is a {type(values['loss_fn']).__name__}; return the per-example "
                       "loss function, loss_fn(model, batch) -> [B].")
    batches = values["batches"]
    if isinstance(batches, Mapping) or not isinstance(batches, Sequence) or isinstance(batches, (str, bytes)):
        raise SDIError(f"--model {spec!r}: batches is a {type(batches).__name__}; return a list of batches (the "
                       "same list on every run: the store resumes by position).")
    if not batches:
        raise SDIError(f"--model {spec!r}: batches is empty; nothing to featurise.")
    steps = values.get("steps")
    if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or steps < 1):
        raise SDIError(f"--model {spec!r}: steps={steps!r} must be a positive int (or left out).")
    return UserModel(**{k: values.get(k) for k in _REQUIRED + _OPTIONAL})


# Keys of a --config file: the long options of `sdi featurize` (underscored).
CONFIG_KEYS = ("model", "backend", "checkpoint", "eta", "tau", "sketch_dim", "seed", "groups", "summed", "dtype",
               "out", "split", "batch_size", "shard_size", "no_consolidate", "overwrite", "no_verify", "device",
               "torch_dtype", "progress", "data")


def load_config_file(path: str) -> dict[str, Any]:
    """The options of a TOML config file, ``{option: value}`` (keys underscored), checked against
    :data:`CONFIG_KEYS`; ``checkpoint`` and ``eta`` may be a value or a list."""
    try:
        import tomllib
    except ImportError:  # Python 3.10
        try:
            import tomli as tomllib  # type: ignore[no-redef]
        except ImportError:
            raise SDIError("--config needs Python 3.11+ (tomllib) or the tomli package; pip install tomli.") from None
    if not os.path.isfile(path):
        raise SDIError(f"--config {path!r}: no such file.")
    try:
        with open(path, "rb") as fh:
            raw = tomllib.load(fh)
    except tomllib.TOMLDecodeError as exc:
        raise SDIError(f"--config {path!r} is not valid TOML ({exc}).") from None
    out: dict[str, Any] = {}
    for key, value in raw.items():
        name = key.replace("-", "_")
        if name not in CONFIG_KEYS:
            raise SDIError(f"--config {path!r}: unknown key {key!r}; the keys are the long options of sdi featurize: "
                           f"{', '.join(CONFIG_KEYS)}. Remove it or fix its spelling.")
        if isinstance(value, dict):
            raise SDIError(f"--config {path!r}: {key!r} is a table; every key is one option with a plain value.")
        if name in ("checkpoint", "eta") and not isinstance(value, list):
            value = [value]
        out[name] = value
    return out
