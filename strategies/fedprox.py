"""FedProx: FedAvg whose clients add a proximal term towards the global encoder."""

from __future__ import annotations

from typing import Any, ClassVar

from strategies.fedavg import FedAvg


class FedProx(FedAvg):
    """FedProx (Li et al. 2020): local loss + ``mu / 2 * ||w - w_global||^2`` on the encoder.

    Parameters
    ----------
    proximal_mu
        Weight of the proximal term (``strategy.proximal_mu``); 0 is FedAvg.
    """

    name: ClassVar[str] = "fedprox"
    options: ClassVar[tuple[str, ...]] = ("proximal_mu",)

    def __init__(self, proximal_mu: float) -> None:
        super().__init__()
        if proximal_mu < 0:
            raise ValueError(f"proximal_mu must be >= 0, got {proximal_mu}")
        self.proximal_mu = proximal_mu

    def fit_config(self, server_round: int, cid: str) -> dict[str, Any]:
        return {"proximal_mu": self.proximal_mu}
