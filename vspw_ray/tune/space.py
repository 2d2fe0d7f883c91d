"""The search space of an experiment's ``tune.space`` as an Optuna define-by-run function.

Every searched key is a dotted config key (``data.crop_size``, ``loss.ohem.thresh``, ...) and is
also the Optuna parameter name. A parameter with ``when: {key: value}`` is sampled only in
trials where that key (searched earlier in the same trial, or fixed in the config) has that
value; otherwise it is absent from the trial, so TPE never models a threshold of a switched-off
OHEM. Parameters are sampled in dependency order.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from vspw_ray.config import (
    ConfigError,
    ExperimentConfig,
    SearchParam,
    apply_overrides,
    check_trainable,
    config_from_dict,
    to_dict,
)

__all__ = ["ordered_params", "validate_space", "sample", "trial_config", "lookup",
           "has_compound_choices", "optuna_choice"]

_MISSING = object()


def lookup(data: Mapping[str, Any], key: str, *, sep: str = ".", default: Any = _MISSING) -> Any:
    """The value at a nested key (``"model.family"``; ``sep="/"`` for a reported metric's name) of a
    plain dict, or ``default``."""
    node: Any = data
    for part in key.split(sep):
        if not isinstance(node, Mapping) or part not in node:
            return default
        node = node[part]
    return node


def ordered_params(space: Mapping[str, SearchParam]) -> list[SearchParam]:
    """Parameters in an order where every ``when`` key that is itself searched comes first."""
    done: list[SearchParam] = []
    placed: set[str] = set()
    pending = dict(space)
    while pending:
        ready = [k for k, p in pending.items()
                 if all(dep not in space or dep in placed for dep in p.when)]
        if not ready:
            raise ConfigError(f"config key 'tune.space': the 'when' conditions of "
                              f"{sorted(pending)} depend on each other in a cycle")
        for key in ready:
            done.append(pending.pop(key))
            placed.add(key)
    return done


def _candidates(param: SearchParam) -> list[Any]:
    if param.type == "categorical":
        return list(param.choices)
    if param.type == "int":
        return [int(param.low), int(param.high)]
    return [param.low, param.high]


def validate_space(cfg: ExperimentConfig) -> list[SearchParam]:
    """Check that every searched key and ``when`` key is a config key and that every choice
    (and both ends of every range) makes a valid config; return the sampling order."""
    base = to_dict(cfg)
    base.pop("variants", None)
    space = cfg.tune.space
    if not space:
        raise ConfigError("config key 'tune.space' is empty: list the keys to search, e.g. "
                          "data.crop_size: {type: categorical, choices: [[480, 480], [640, 640]]}")
    for key, param in space.items():
        where = f"tune.space.{key}"
        if lookup(base, key) is _MISSING or key.split(".")[0] in ("tune", "variants", "storage",
                                                                 "tracking"):
            raise ConfigError(f"config key '{where}': '{key}' is not a searchable config key "
                              f"(use a dotted key of the data, model, loss or train sections)")
        for dep, value in param.when.items():
            if dep not in space and lookup(base, dep) is _MISSING:
                raise ConfigError(f"config key '{where}.when': '{dep}' is not a config key")
            if dep in space and space[dep].type == "categorical" and value not in space[dep].choices:
                raise ConfigError(f"config key '{where}.when': {dep}={value!r} is never sampled "
                                  f"(choices {list(space[dep].choices)})")
        for value in _candidates(param):
            try:
                check_trainable(config_from_dict(apply_overrides(base, {key: value})))
            except ConfigError as err:
                raise ConfigError(f"config key '{where}': the value {value!r} makes an invalid "
                                  f"config: {err}") from None
    return ordered_params(space)


def has_compound_choices(param: SearchParam) -> bool:
    """Whether a categorical parameter has list or dict choices (crop sizes), which Optuna
    cannot store: they are offered to it as their strings."""
    return any(isinstance(c, (list, tuple, dict)) for c in param.choices)


def optuna_choice(choice: Any) -> str:
    """A list or dict choice as Optuna sees it (tuples written as lists)."""
    return str(list(choice) if isinstance(choice, tuple) else choice)


def sample(trial, params: list[SearchParam], fixed: Mapping[str, Any]) -> dict[str, Any]:
    """Draw one trial's values (an ``optuna.Trial``-like object) in order; parameters whose
    ``when`` does not hold are left out."""
    chosen: dict[str, Any] = {}
    for p in params:
        if any(chosen.get(dep, lookup(fixed, dep)) != value for dep, value in p.when.items()):
            continue
        if p.type == "categorical":
            # Optuna stores categorical choices as scalars: index lists (crop sizes) by position
            if has_compound_choices(p):
                idx = trial.suggest_categorical(p.key, [optuna_choice(c) for c in p.choices])
                value = next(c for c in p.choices if optuna_choice(c) == idx)
                chosen[p.key] = list(value) if isinstance(value, tuple) else value
            else:
                chosen[p.key] = trial.suggest_categorical(p.key, list(p.choices))
        elif p.type == "int":
            chosen[p.key] = trial.suggest_int(p.key, int(p.low), int(p.high), step=p.step or 1)
        else:
            chosen[p.key] = trial.suggest_float(p.key, p.low, p.high,
                                                log=p.type == "loguniform")
    return chosen


def trial_config(cfg: ExperimentConfig, params: Mapping[str, Any], *,
                 iters: int | None = None) -> ExperimentConfig:
    """The experiment with a trial's values; ``iters`` shortens the schedule (warmup and
    validation interval scaled to fit), ``None`` keeps the full-length one."""
    data = to_dict(cfg)
    data["variants"] = []
    data = apply_overrides(data, dict(params))
    if iters is not None:
        train = data["train"]
        train["warmup_iters"] = min(train["warmup_iters"], max(1, iters // 10))
        train["val_interval"] = min(train["val_interval"], cfg.tune.grace_period)
        train["log_interval"] = min(train["log_interval"], train["val_interval"])
        train["iters"] = iters
    return config_from_dict(data)
