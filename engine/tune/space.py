"""Search spaces declared in YAML, turned into Ray Tune spaces in this one place.

Each entry maps a dotted experiment key to one distribution::

    distill.temperature: {loguniform: [0.5, 8]}
    distill.beta:        {uniform: [0.0, 2.0]}
    distill.steps:       {randint: [100, 400]}      # integers, upper bound exclusive
    distill.weighting:   {choice: [uniform, confidence]}
    pretrain.method:     {choice: [none, mim]}

``OptunaSearch`` converts the Tune space to Optuna distributions itself.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from engine.config.loader import ConfigError

KINDS = ("uniform", "loguniform", "randint", "choice")


def validate_space(space: Mapping[str, Mapping[str, Any]]) -> None:
    """Check every entry's form; raise :class:`ConfigError` naming the key."""
    for key, spec in space.items():
        if not isinstance(spec, Mapping) or len(spec) != 1:
            raise ConfigError(f"space.{key}: expected one of {list(KINDS)} with its "
                              f"arguments, e.g. {{loguniform: [0.5, 8]}}; got {spec!r}")
        kind, args = next(iter(spec.items()))
        if kind not in KINDS:
            raise ConfigError(f"space.{key}: unknown distribution {kind!r}; use {list(KINDS)}")
        if not isinstance(args, list | tuple) or not args:
            raise ConfigError(f"space.{key}: {kind} needs a list of values")
        if kind == "choice":
            continue
        if len(args) != 2 or not all(isinstance(a, int | float) for a in args):
            raise ConfigError(f"space.{key}: {kind} needs [low, high], got {list(args)}")
        low, high = args
        if not low < high or (kind == "loguniform" and low <= 0):
            raise ConfigError(f"space.{key}: bad bounds {list(args)} for {kind}")


def check_point(space: Mapping[str, Mapping[str, Any]], point: Mapping[str, Any],
                where: str) -> None:
    """A point to evaluate must name keys of ``space`` and values inside their ranges;
    raise :class:`ConfigError` naming ``where`` and the key."""
    validate_space(space)
    for key, value in point.items():
        if key not in space:
            raise ConfigError(f"{where}: {key!r} is not in the space {sorted(space)}")
        kind, args = next(iter(space[key].items()))
        if kind == "choice":
            ok = value in list(args)
        elif isinstance(value, bool) or not isinstance(value, int | float):
            ok = False
        elif kind == "randint":
            ok = isinstance(value, int) and args[0] <= value < args[1]
        else:
            ok = args[0] <= value <= args[1]
        if not ok:
            raise ConfigError(f"{where}.{key}: {value!r} is outside {kind} {list(args)}")


def tune_space(space: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """The Ray Tune ``param_space`` of ``space`` (keys stay dotted)."""
    from ray import tune

    validate_space(space)
    out: dict[str, Any] = {}
    for key, spec in space.items():
        kind, args = next(iter(spec.items()))
        if kind == "choice":
            out[key] = tune.choice(list(args))
        elif kind == "uniform":
            out[key] = tune.uniform(float(args[0]), float(args[1]))
        elif kind == "loguniform":
            out[key] = tune.loguniform(float(args[0]), float(args[1]))
        else:
            out[key] = tune.randint(int(args[0]), int(args[1]))
    return out


def check_keys(space: Mapping[str, Any], root: type,
               base: Mapping[str, Any] | None = None) -> None:
    """Every key of ``space`` must name a leaf of the config dataclass ``root``.

    A section whose keys depend on its content (``keys_for``, e.g. ``strategy``, whose keys
    are those of the named strategy's options) is checked against ``base``, the trial base
    experiment as plain data.
    """
    import dataclasses
    from typing import get_type_hints

    for key in space:
        node: Any = root
        data: Any = base or {}
        parts = key.split(".")
        for i, part in enumerate(parts):
            if hasattr(node, "keys_for"):
                valid = node.keys_for(data if isinstance(data, Mapping) else {})
                if ".".join(parts[i:]) not in valid:
                    raise ConfigError(f"space.{key}: unknown config key {part!r}; valid: "
                                      f"{valid}")
                break
            if not dataclasses.is_dataclass(node):
                raise ConfigError(f"space.{key}: {part!r} is below a leaf value")
            hints = get_type_hints(node)
            if part not in hints:
                raise ConfigError(f"space.{key}: unknown config key {part!r}; valid: "
                                  f"{sorted(hints)}")
            node = hints[part]
            data = data.get(part, {}) if isinstance(data, Mapping) else {}
        else:
            if dataclasses.is_dataclass(node):
                raise ConfigError(f"space.{key}: names a whole section, not a value")


def optuna_distributions(space: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """The Optuna distributions of ``space`` (to export finished trials to a study)."""
    import optuna

    validate_space(space)
    out: dict[str, Any] = {}
    for key, spec in space.items():
        kind, args = next(iter(spec.items()))
        if kind == "choice":
            out[key] = optuna.distributions.CategoricalDistribution(list(args))
        elif kind == "randint":  # Tune's randint excludes the upper bound, Optuna's includes
            out[key] = optuna.distributions.IntDistribution(int(args[0]), int(args[1]) - 1)
        else:
            out[key] = optuna.distributions.FloatDistribution(
                float(args[0]), float(args[1]), log=kind == "loguniform")
    return out
