"""Which parameters are attributed through, and in which slot group.

Pure bookkeeping over ``model.named_parameters()``: no forward pass, no
hooks.  Both the capture (:mod:`sdi_torch.capture`) and the untied baseline
(:mod:`sdi_torch.baseline`) resolve their selection here, so they agree on
names, groups and the feature layout.

Canonical shapes are the shapes PyTorch stores: ``nn.Linear`` weights are
``(d_out, d_in)`` and ``nn.Embedding`` weights ``(num, dim)`` already.  A
weight stored ``(d_in, d_out)`` and used as ``x @ W`` (GPT-2 ``Conv1D``) keeps
its stored shape; its uses hand the core the factors swapped, so features are
always those of the gradient in the stored orientation.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Mapping

import torch
from torch import nn

from sdi_core import ParamInfo, SDIError

LOOP = "loop"


@dataclass(frozen=True)
class Selection:
    """Resolved parameter selection.

    Attributes:
        infos: one :class:`~sdi_core.ParamInfo` per selected parameter, in
            ``model.named_parameters()`` order (the feature layout order).
        params: dotted name -> the parameter tensor.
        loop_modules: the modules whose calls define loop steps (may be empty).
        loop_by_uses: True when ``loop`` named parameters only: the ``k``-th
            use of each loop parameter is step ``k``.
    """

    infos: tuple[ParamInfo, ...]
    params: Mapping[str, nn.Parameter]
    loop_modules: tuple[nn.Module, ...]
    loop_by_uses: bool

    def group_of(self, name: str) -> str:
        for p in self.infos:
            if p.name == name:
                return p.group
        raise KeyError(name)

    @property
    def groups(self) -> tuple[str, ...]:
        out: list[str] = []
        for p in self.infos:
            if p.group not in out:
                out.append(p.group)
        return tuple(out)

    def names_in(self, group: str) -> list[str]:
        return [p.name for p in self.infos if p.group == group]


def _as_list(x) -> list:
    if isinstance(x, (nn.Module, torch.Tensor, str)):
        return [x]
    if isinstance(x, Iterable):
        return list(x)
    return [x]


def _describe(item) -> str:
    if isinstance(item, nn.Module):
        return f"module {type(item).__name__}"
    if isinstance(item, torch.Tensor):
        return f"tensor of shape {tuple(item.shape)}"
    return repr(item)


def _resolve_items(model: nn.Module, items, what: str, name_of: dict[int, str], module_ids: set[int]):
    """(modules, [(name, param)]) for a list of modules, parameters or dotted names."""
    modules: list[nn.Module] = []
    params: list[tuple[str, nn.Parameter]] = []
    for item in _as_list(items):
        if isinstance(item, str):
            try:
                item = model.get_submodule(item) if item == "" or not _is_param_name(model, item) else model.get_parameter(item)
            except AttributeError:
                raise SDIError(
                    f"{what}: the model has no submodule or parameter named {item!r}. "
                    "Pass a module, a parameter, or a dotted name from model.named_parameters()."
                ) from None
        if isinstance(item, nn.Module):
            if id(item) not in module_ids:
                raise SDIError(
                    f"{what}: {_describe(item)} is not a submodule of the model. Pass a module of this model "
                    "(e.g. model.block), not a copy of it."
                )
            own = list(item.named_parameters())
            if not own:
                raise SDIError(f"{what}: {_describe(item)} has no parameters to attribute through.")
            modules.append(item)
            for _, p in own:
                params.append((name_of[id(p)], p))
        elif isinstance(item, torch.Tensor):
            if id(item) not in name_of:
                raise SDIError(
                    f"{what}: a {_describe(item)} is not a parameter of the model. Pass parameters from "
                    "model.parameters() (or modules, or dotted names)."
                )
            params.append((name_of[id(item)], item))
        else:
            raise SDIError(f"{what}: expected modules, parameters or dotted names, got {type(item).__name__}.")
    return modules, params


def _is_param_name(model: nn.Module, name: str) -> bool:
    try:
        model.get_parameter(name)
        return True
    except AttributeError:
        return False


def resolve_selection(model: nn.Module, loop: Any, groups: Mapping[str, Any] | None = None) -> Selection:
    """Resolve ``loop`` and ``groups`` against ``model`` (see :class:`sdi_torch.Attributor`).

    Args:
        model: the ``nn.Module``.
        loop: a module, a parameter, a dotted name, or a list of them.  With at
            least one module, a loop step is one call of that module.  With
            parameters only, the ``k``-th use of each parameter is step ``k``.
        groups: extra one-slot groups, e.g. ``{"prelude": [model.tok_emb],
            "coda": [model.ln_f, model.head]}``.

    Raises:
        SDIError: unknown names, modules that are not submodules, a parameter
            selected twice, a group named ``"loop"``.
    """
    if not isinstance(model, nn.Module):
        raise SDIError(f"model must be a torch.nn.Module, got {type(model).__name__}.")
    name_of: dict[int, str] = {}
    order: dict[str, int] = {}
    for i, (n, p) in enumerate(model.named_parameters()):
        name_of[id(p)] = n
        order[n] = i
    module_ids = {id(m) for m in model.modules()}
    if loop is None:
        raise SDIError("loop is required: pass the looped module (e.g. loop=model.block) or its parameters.")
    loop_modules, loop_params = _resolve_items(model, loop, "loop", name_of, module_ids)
    if not loop_params:
        raise SDIError("loop selects no parameters; pass the looped module or its parameters.")
    chosen: dict[str, tuple[str, nn.Parameter]] = {}
    for n, p in loop_params:
        chosen[n] = (LOOP, p)
    for g, items in (groups or {}).items():
        if not isinstance(g, str) or not g:
            raise SDIError(f"groups: group names must be non-empty strings, got {g!r}.")
        if g == LOOP:
            raise SDIError("groups: 'loop' is reserved for the loop= selection; name extra groups e.g. 'prelude' or 'coda'.")
        _, params = _resolve_items(model, items, f"groups[{g!r}]", name_of, module_ids)
        if not params:
            raise SDIError(f"groups[{g!r}] selects no parameters.")
        for n, p in params:
            if n in chosen and chosen[n][0] != g:
                raise SDIError(
                    f"Parameter {n!r} is selected in group {chosen[n][0]!r} and in group {g!r}; "
                    "put each parameter in one group only."
                )
            chosen[n] = (g, p)
    names = sorted(chosen, key=order.__getitem__)
    infos = tuple(ParamInfo(n, tuple(chosen[n][1].shape), chosen[n][0]) for n in names)
    return Selection(
        infos=infos,
        params={n: chosen[n][1] for n in names},
        loop_modules=tuple(dict.fromkeys(loop_modules)),  # unique, in order
        loop_by_uses=not loop_modules,
    )
