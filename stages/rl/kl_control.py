"""The KL coefficient of the reward across iterations (plain Python): fixed, or adapted to a target KL (Ziegler et
al. 2019). The loop (rl_loop.py) picks one from the config and checkpoints its state.
"""

from __future__ import annotations


class FixedKLController:
    """A constant KL coefficient (the default: 0.05 with the k1 estimator)."""

    def __init__(self, kl_coef: float = 0.05):
        self.value = float(kl_coef)

    def update(self, current_kl: float, n_steps: int) -> None:
        """No-op: the coefficient is fixed."""

    def state_dict(self) -> dict[str, float]:
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.value = float(state["value"])


class AdaptiveKLController:
    """Ziegler et al. 2019: move kl_coef proportionally so the measured KL tracks `target`.

    error = clip(KL / target - 1, -0.2, 0.2); kl_coef *= 1 + error * n_steps / horizon.
    """

    def __init__(self, init_kl_coef: float, target: float, horizon: int):
        if target <= 0 or horizon <= 0:
            raise ValueError(f"adaptive KL: expected target > 0 and horizon > 0, found {target} and {horizon}")
        self.value = float(init_kl_coef)
        self.target = float(target)
        self.horizon = int(horizon)

    def update(self, current_kl: float, n_steps: int) -> None:
        """Adjust the coefficient after a batch of `n_steps` samples whose mean sequence KL was `current_kl`."""
        error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_steps / self.horizon

    def state_dict(self) -> dict[str, float]:
        return {"value": self.value, "target": self.target, "horizon": self.horizon}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.value = float(state["value"])
        self.target = float(state["target"])
        self.horizon = int(state["horizon"])
