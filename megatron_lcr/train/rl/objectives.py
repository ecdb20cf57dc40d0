"""The objectives ``lcr train`` knows, by the name its config's ``objective`` gives.

Each entry builds an :class:`~megatron_lcr.rl.objective.Objective` from the run config; adding an
objective is one class (in ``rl/`` or ``distill/``) and one line here.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from megatron_lcr.distill.depo import DePO, DePOIW
from megatron_lcr.distill.objectives import DGRPO, ForwardKLWarmup, OnPolicyDistillation
from megatron_lcr.registry import lookup
from megatron_lcr.rl.objective import Objective, PolicyGradient

if TYPE_CHECKING:
    from megatron_lcr.train.rl.config import RLRunConfig


def _policy_gradient(cfg: RLRunConfig) -> PolicyGradient:
    return PolicyGradient(cfg.rl.loss, max_response_len=cfg.rl.max_new_tokens,
                          mask_truncated=cfg.rl.advantage.mask_truncated)


def _depo(kind: type[DePO]) -> Callable[[RLRunConfig], DePO]:
    def build(cfg: RLRunConfig) -> DePO:
        if cfg.rl.context != "short":
            raise ValueError(f"objective {cfg.objective!r} needs rl.context='short' (DePO runs RL on the short "
                             f"context), got rl.context={cfg.rl.context!r}")
        return kind(_policy_gradient(cfg), cfg.depo)

    return build


def _forward_kl(cfg: RLRunConfig) -> ForwardKLWarmup:
    loss = cfg.rl.loss
    if loss.kl_coef or loss.entropy_coef:
        raise ValueError("objective 'fkl' has no KL penalty or entropy bonus (it fits the teacher's tokens): "
                         "set rl.loss.kl_coef and rl.loss.entropy_coef to 0")
    return ForwardKLWarmup(_policy_gradient(cfg), cfg.distill.fkl)


OBJECTIVES: dict[str, Callable[[RLRunConfig], Objective]] = {
    "rl": _policy_gradient,
    "depo": _depo(DePO),
    "depo-iw": _depo(DePOIW),
    "opd": lambda cfg: OnPolicyDistillation(_policy_gradient(cfg), cfg.distill.opd),
    "dgrpo": lambda cfg: DGRPO(_policy_gradient(cfg), cfg.distill.opd),
    "fkl": _forward_kl,
}


def build_objective(cfg: RLRunConfig) -> Objective:
    """The objective ``cfg.objective`` names, configured from ``cfg``."""
    return lookup(OBJECTIVES, cfg.objective, "objective")(cfg)
