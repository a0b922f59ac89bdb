"""Optimisers and the lr schedule from the config and the method's parameter groups.

The ``main`` optimiser is the config's ``optimizer:`` section; a method may add named optimisers over its
own modules (``Method.optimizers``). Groups keep their names (``param_groups[i]["name"]``) so a method can
find its group's lr through the runtime.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from midasbench.harness.config import OptimizerConfig, RunConfig
from midasbench.methods.base import MAIN_OPTIMIZER, Method, OptimizerSpec, ParamGroup


@dataclass
class Optimizers:
    """The run's optimisers by name (``main`` first) and the parameters each one steps."""

    by_name: dict[str, torch.optim.Optimizer]
    params: dict[str, list[nn.Parameter]]

    @property
    def main(self) -> torch.optim.Optimizer:
        return self.by_name[MAIN_OPTIMIZER]

    def all_params(self) -> list[nn.Parameter]:
        return [p for params in self.params.values() for p in params]

    def zero_grad(self) -> None:
        for optimizer in self.by_name.values():
            optimizer.zero_grad(set_to_none=True)

    def step(self) -> None:
        for optimizer in self.by_name.values():
            optimizer.step()

    def state_dict(self) -> dict[str, dict]:
        return {name: o.state_dict() for name, o in self.by_name.items()}

    def load_state_dict(self, state: dict[str, dict]) -> None:
        if sorted(state) != sorted(self.by_name):
            raise ValueError(
                f"checkpoint has optimizers {sorted(state)}, the run builds {sorted(self.by_name)}"
            )
        for name, optimizer in self.by_name.items():
            optimizer.load_state_dict(state[name])


def _make(
    name: str, groups: list[dict], lr: float, momentum: float, weight_decay: float
) -> torch.optim.Optimizer:
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum, weight_decay=weight_decay)
    if name == "adam":
        return torch.optim.Adam(groups, lr=lr, weight_decay=weight_decay)
    return torch.optim.AdamW(groups, lr=lr, weight_decay=weight_decay)


def make_optimizer(spec: OptimizerSpec | OptimizerConfig, groups: list) -> torch.optim.Optimizer:
    """An optimiser of ``spec``'s kind and settings over ``groups`` (parameters or group dicts)."""
    return _make(spec.name, groups, spec.lr, spec.momentum, spec.weight_decay)


def _group_dict(group: ParamGroup) -> dict:
    out: dict = {"params": [p for p in group.params if p.requires_grad], "name": group.name}
    if group.lr is not None:
        out["lr"] = group.lr
    if group.weight_decay is not None:
        out["weight_decay"] = group.weight_decay
    return out


def encoder_lr_scales(model: nn.Module) -> dict[int, float]:
    """``id(parameter) -> lr multiple`` for encoders whose ``lr_scale`` is not 1 (pretrained parts)."""
    scales: dict[int, float] = {}
    for encoder in getattr(model, "encoders", {}).values():
        scale = float(getattr(encoder, "lr_scale", 1.0))
        if scale != 1.0:
            scales.update({id(p): scale for p in encoder.parameters()})
    return scales


def _split_by_lr_scale(group: dict, scales: dict[int, float], base_lr: float) -> list[dict]:
    """A group as one group per lr multiple: the encoder's parameters at ``scale ×`` the group's lr (the
    schedule then scales every group alike, so the ratio holds), named ``<group>@lr×<scale>``."""
    by_scale: dict[float, list[nn.Parameter]] = {}
    for p in group["params"]:
        by_scale.setdefault(scales.get(id(p), 1.0), []).append(p)
    if len(by_scale) <= 1 and 1.0 in by_scale:
        return [group]
    out = []
    for scale, params in sorted(by_scale.items(), reverse=True):
        part = {**group, "params": params}
        if scale != 1.0:
            part["lr"] = group.get("lr", base_lr) * scale
            part["name"] = f"{group['name']}@lr×{scale:g}"
        out.append(part)
    return out


def build_optimizers(cfg: RunConfig, method: Method, model: nn.Module) -> Optimizers:
    """One optimiser per name the method's groups use; every parameter in at most one group; an
    encoder's ``lr_scale`` gives its parameters their own group at that multiple of the lr."""
    groups = method.param_groups(model)
    scales = encoder_lr_scales(model)
    specs: dict[str, OptimizerSpec | OptimizerConfig] = {MAIN_OPTIMIZER: cfg.optimizer, **method.optimizers()}
    seen: dict[int, str] = {}
    by_optimizer: dict[str, list[dict]] = {}
    for group in groups:
        if group.optimizer not in specs:
            raise ValueError(
                f"method {method.name!r}: group {group.name!r} names optimizer {group.optimizer!r}, "
                f"which method.optimizers() does not declare ({sorted(specs)})"
            )
        for p in group.params:
            if id(p) in seen:
                raise ValueError(
                    f"method {method.name!r}: a parameter is in groups {seen[id(p)]!r} and {group.name!r}"
                )
            seen[id(p)] = group.name
        base_lr = specs[group.optimizer].lr
        by_optimizer.setdefault(group.optimizer, []).extend(
            _split_by_lr_scale(_group_dict(group), scales, base_lr)
        )
    by_optimizer.setdefault(MAIN_OPTIMIZER, [])
    built, params = {}, {}
    for name in [MAIN_OPTIMIZER, *sorted(k for k in by_optimizer if k != MAIN_OPTIMIZER)]:
        spec = specs[name]
        groups_of = [g for g in by_optimizer[name] if g["params"]] or [{"params": [], "name": "empty"}]
        built[name] = _make(spec.name, groups_of, spec.lr, spec.momentum, spec.weight_decay)
        params[name] = [p for g in groups_of for p in g["params"]]
    return Optimizers(built, params)


def build_scheduler(cfg: RunConfig, optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LRScheduler:
    """The config's lr schedule over the main optimiser, stepped once per epoch."""
    s = cfg.scheduler
    if s.name == "step":
        return torch.optim.lr_scheduler.StepLR(optimizer, step_size=s.step_size, gamma=s.gamma)
    if s.name == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=cfg.train.epochs)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
