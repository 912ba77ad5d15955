"""FedProx: FedAvg whose clients add a proximal term towards the global encoder."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from strategies.base import StrategyContext
from strategies.fedavg import FedAvg


@dataclass(frozen=True)
class FedProxOptions:
    """FedProx's ``strategy.*`` keys: ``proximal_mu``, the weight of the proximal term
    (0 is FedAvg)."""

    proximal_mu: float = 0.01

    def __post_init__(self) -> None:
        if self.proximal_mu < 0:
            raise ValueError(f"strategy.proximal_mu must be >= 0, got {self.proximal_mu}")


class FedProx(FedAvg):
    """FedProx (Li et al. 2020): local loss + ``mu / 2 * ||w - w_global||^2`` on the encoder.

    Options are :class:`FedProxOptions`.
    """

    name: ClassVar[str] = "fedprox"
    Options: ClassVar[type] = FedProxOptions

    def __init__(self, options: FedProxOptions | None = None,
                 context: StrategyContext | None = None) -> None:
        super().__init__(options, context)
        self.proximal_mu = self.options.proximal_mu

    def fit_config(self, server_round: int, cid: str) -> dict[str, Any]:
        return {"proximal_mu": self.proximal_mu}
