"""Experiment configuration: frozen dataclasses loaded from YAML plus overrides."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from engine.config.loader import (
    ConfigError,
    apply_overrides,
    dump_yaml,
    from_dict,
    load_yaml,
    to_dict,
)
from engine.config.schema import (
    ClientsConfig,
    DataConfig,
    DistillConfig,
    DPConfig,
    EvaluationConfig,
    ExperimentConfig,
    ModelConfig,
    PretrainConfig,
    PrimaryComparison,
    PrivacyConfig,
    RunConfig,
    StrategyConfig,
    TrainConfig,
    TrainScaling,
)


def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()
                ) -> ExperimentConfig:
    """Load an :class:`ExperimentConfig` from YAML (or defaults) plus ``key=value`` overrides."""
    data = load_yaml(path) if path is not None else {}
    return from_dict(ExperimentConfig, apply_overrides(data, overrides))


__all__ = [
    "ClientsConfig",
    "ConfigError",
    "DPConfig",
    "DataConfig",
    "DistillConfig",
    "EvaluationConfig",
    "ExperimentConfig",
    "ModelConfig",
    "PretrainConfig",
    "PrimaryComparison",
    "PrivacyConfig",
    "RunConfig",
    "StrategyConfig",
    "TrainConfig",
    "TrainScaling",
    "dump_yaml",
    "from_dict",
    "load_config",
    "to_dict",
]
