"""The optimizer's param groups for a pruning run: model, mask logits, and Lagrange multipliers (ascent)."""

from __future__ import annotations

from typing import Any

from torch import nn

from llmshearing.pruning.l0 import unwrap_l0


def pruning_param_groups(composer_model: nn.Module, lr: float, lag_lr: float,
                         weight_decay: float = 0.0, lag_betas: tuple[float, float] | None = None) -> list[dict[str, Any]]:
    """Three param groups for ONE optimizer: model (lr, weight_decay), mask logits (lag_lr, wd 0),
    Lagrange multipliers (lr = -lag_lr, wd 0).

    The negative learning rate turns the optimizer step into gradient *ascent* on the lambdas
    (the min-max of the Lagrangian); torch only validates the default lr, so pass a positive
    `lr=` to the optimizer. Weight decay must stay 0 on masks and multipliers.
    """
    if lag_lr <= 0:
        raise ValueError(f"lag_lr must be > 0 (the lambdas get -lag_lr), got {lag_lr}")
    l0_wrapped = getattr(composer_model, "l0", None)
    if l0_wrapped is None:
        raise ValueError("the model has no L0 module (`.l0` is None); pruning param groups need one")
    l0 = unwrap_l0(l0_wrapped)
    log_alphas, lambdas = l0.log_alpha_params(), l0.lambda_params()
    l0_ids = {id(p) for p in l0.parameters()}
    model_params = [p for p in composer_model.parameters() if id(p) not in l0_ids and p.requires_grad]
    extra = {} if lag_betas is None else {"betas": tuple(lag_betas)}
    return [
        {"params": model_params, "lr": lr, "weight_decay": weight_decay},
        {"params": log_alphas, "lr": lag_lr, "weight_decay": 0.0, **extra},
        {"params": lambdas, "lr": -lag_lr, "weight_decay": 0.0, **extra},
    ]
