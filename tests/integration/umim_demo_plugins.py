"""A user's own code, outside the umim package: an encoder with options and a strategy with
options, named by import path in configs (``umim_demo_plugins:TinyCNN``), as a researcher's
package would be. Used by ``test_doors.py``."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from strategies import FitRes
from strategies.fedavg import FedAvg


@dataclass(frozen=True)
class TinyCNNOptions:
    """``model.options`` of :class:`TinyCNN`."""

    width: int = 16

    def __post_init__(self) -> None:
        if self.width < 1:
            raise ValueError("model.options.width must be >= 1")


class TinyCNN(nn.Module):
    """Two 3x3 convolutions and global pooling: ``(B, 3, 28, 28) -> (B, width)``."""

    Options: ClassVar[type] = TinyCNNOptions

    def __init__(self, cfg: Any) -> None:
        super().__init__()
        width = TinyCNNOptions(**dict(cfg.options)).width
        self.body = nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.ReLU(),
                                  nn.Conv2d(width, width, 3, stride=2, padding=1), nn.ReLU(),
                                  nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.out_features = width

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


@dataclass(frozen=True)
class DampedOptions:
    """``strategy.*`` options of :class:`DampedFedAvg`."""

    keep: float = 0.5

    def __post_init__(self) -> None:
        if not 0.0 <= self.keep < 1.0:
            raise ValueError("strategy.keep must be in [0, 1)")


class DampedFedAvg(FedAvg):
    """FedAvg whose new encoder keeps a fraction ``keep`` of the previous one."""

    name: ClassVar[str] = "damped-fedavg"
    Options: ClassVar[type] = DampedOptions

    def aggregate_fit(self, server_round: int, results: Mapping[str, FitRes],
                      failures: Mapping[str, str]) -> dict[str, float]:
        previous = dict(self.encoder)
        metrics = super().aggregate_fit(server_round, results, failures)
        keep = self.options.keep
        self.encoder = {k: keep * previous[k] + (1 - keep) * v if v.is_floating_point() else v
                        for k, v in self.encoder.items()}
        return {**metrics, "kept": keep}
