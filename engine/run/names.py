"""The names a study gives its methods and steps (Ray-free, shared by the study and the
placement plan): ``universal+lp``, ``mim+knn@10%``, ``lodo:universal+ft``; steps
``eval-linear_probe-10pct``, ``r1-main``."""

from __future__ import annotations

from engine.config import ExperimentConfig

MODE_TAGS = {"finetune": "ft", "linear_probe": "lp", "knn": "knn"}


def lodo_label(cfg: ExperimentConfig) -> str:
    """The method name of a leave-one-domain-out global model, which is always distilled:
    the main strategy's name when it declares ``distils`` (LODO repeats its distillation
    without the held-out domain), else ``distilled``."""
    return cfg.strategy.name if cfg.strategy.strategy_class.distils else "distilled"


def base_label(cfg: ExperimentConfig) -> str:
    """Name of the base encoder as a method: ``mim`` (the paper's baseline) or ``random-init``."""
    return "mim" if cfg.pretrain.method == "mim" else "random-init"


def encoder_label(cfg: ExperimentConfig, arm: str) -> str:
    """The method name of an encoder arm (``main`` is the main strategy's name)."""
    return {"main": cfg.strategy.name, "base": base_label(cfg)}.get(arm, arm)


def method_name(label: str, mode: str, fraction: float) -> str:
    """``universal+ft``, ``mim+lp``, ``merged+knn@10%``: an encoder judged one way."""
    tag = f"{label}+{MODE_TAGS[mode]}"
    return tag if fraction >= 1.0 else f"{tag}@{fraction * 100:g}%"


def step_name(mode: str, fraction: float) -> str:
    """Progress step of one evaluation mode at one label fraction."""
    return f"eval-{mode}" if fraction >= 1.0 else f"eval-{mode}-{fraction * 100:g}pct"


def replicate_step(name: str, index: int, replicates: int) -> str:
    """Step ``name`` of replicate ``index`` (unprefixed when the study has one replicate)."""
    return name if replicates == 1 else f"r{index}-{name}"
