"""Losses of bag heads beyond classes (task=survival|regression), and the risk a survival head's output stands for.

    cox   the negative Cox partial log-likelihood of the bags of a batch (risk sets within the batch), Efron's
          handling of tied event times (Efron 1977; lifelines' CoxPHFitter default, STAMP's loss), divided by the
          batch's events. The head gives one log-risk per bag.
    nll   the negative log-likelihood of a discrete-time hazard model (Zadeh & Schmid 2020, Patho-Bench's NLL
          loss): time cut into task.bins bins at quantiles of the training event times, the head gives one hazard
          logit per bin; a bag with its event in bin j contributes -log S(j-1) - log h(j), one censored in bin j
          -log S(j). Its risk is minus the expected number of bins survived, -sum_j S(j).
    l1, mse  regression on the head's one output.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch
from torch.nn import functional as F

EPS = 1e-7


def cox_efron_nll(log_risk: torch.Tensor, time: torch.Tensor, event: torch.Tensor,
                  reduction: str = "mean") -> torch.Tensor:
    """Negative Cox partial log-likelihood with Efron ties of log-risks (B,) at times (B,) with events (B,) 0/1;
    mean: divided by the number of events. A batch without an event gives 0 (with the graph kept)."""
    eta = log_risk.reshape(-1)
    event = event.reshape(-1).bool()
    if not bool(event.any()):
        return eta.sum() * 0.0
    shifted = eta - eta.detach().max()  # exp of the largest is 1: no overflow; the shift cancels in each term
    weight = torch.exp(shifted)
    time = time.reshape(-1)
    at_risk = time[None, :] >= time[:, None]  # [i, k]: bag k still at risk at bag i's time
    tied = (time[None, :] == time[:, None]) & event[None, :]  # [i, k]: bag k an event at bag i's time
    index = torch.arange(len(eta), device=eta.device)
    before = (tied & (index[None, :] < index[:, None])).sum(1)  # Efron's l: tied events counted before this one
    deaths = tied.sum(1).clamp(min=1)
    risk_sum = (at_risk * weight[None, :]).sum(1)
    tied_sum = (tied * weight[None, :]).sum(1)
    log_terms = shifted - torch.log(risk_sum - before / deaths * tied_sum)
    total = -log_terms[event].sum()
    return total / event.sum() if reduction == "mean" else total


def time_cuts(times: Sequence[float], events: Sequence[float], bins: int) -> list[float]:
    """The bins - 1 inner cut points of discrete time: quantiles of the event times (all times where none has an
    event)."""
    times, events = np.asarray(times, dtype=float), np.asarray(events, dtype=float)
    source = times[events == 1] if (events == 1).any() else times
    return [float(c) for c in np.quantile(source, np.linspace(0, 1, bins + 1)[1:-1])]


def time_bin(time: torch.Tensor, cuts: torch.Tensor) -> torch.Tensor:
    """Each time's bin 0..len(cuts) (a time on a cut goes to the later bin)."""
    return torch.bucketize(time.contiguous(), cuts.to(time), right=True)


def discrete_time_nll(logits: torch.Tensor, time: torch.Tensor, event: torch.Tensor,
                      cuts: torch.Tensor) -> torch.Tensor:
    """Mean negative log-likelihood of hazard logits (B, K) for times (B,) with events (B,) 0/1, K = len(cuts) + 1."""
    hazard = torch.sigmoid(logits).clamp(EPS, 1 - EPS)
    survival = torch.cumprod(1 - hazard, 1)
    padded = torch.cat([torch.ones_like(survival[:, :1]), survival], 1)  # S(-1) = 1
    j = time_bin(time, cuts)[:, None]
    event = event.reshape(-1, 1).to(logits.dtype)
    uncensored = -(torch.log(padded.gather(1, j)) + torch.log(hazard.gather(1, j)))
    censored = -torch.log(padded.gather(1, j + 1))
    return (event * uncensored + (1 - event) * censored).mean()


def survival_risk(outputs: torch.Tensor, loss: str) -> torch.Tensor:
    """One risk per bag (higher: the event sooner): the log-risk (cox), minus the expected bins survived (nll)."""
    if loss == "nll":
        return -torch.cumprod(1 - torch.sigmoid(outputs), 1).sum(1)
    return outputs[:, 0]


def task_value(outputs: torch.Tensor, task: Any) -> torch.Tensor:
    """One number per bag of a task's head outputs (B, outputs): its risk (survival; higher: the event sooner) or
    its predicted value (regression); training's held-out rows and deployment both read it here."""
    return survival_risk(outputs, task.loss) if task.name == "survival" else outputs[:, 0]


def task_loss(outputs: torch.Tensor, targets: torch.Tensor, loss: str,
              cuts: torch.Tensor | None = None) -> torch.Tensor:
    """The loss of a task's head outputs (B, outputs) against targets (B, 2: time, event) or (B, 1: value)."""
    if loss == "cox":
        return cox_efron_nll(outputs[:, 0], targets[:, 0], targets[:, 1])
    if loss == "nll":
        return discrete_time_nll(outputs, targets[:, 0], targets[:, 1], cuts)
    if loss == "l1":
        return F.l1_loss(outputs[:, 0], targets[:, 0])
    if loss == "mse":
        return F.mse_loss(outputs[:, 0], targets[:, 0])
    raise ValueError(f"loss {loss!r}: expected cox, nll, l1 or mse")
