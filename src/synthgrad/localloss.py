"""Local losses: a small classifier above a stage, and the mix of its input gradient with a synthetic gradient.

An auxiliary classifier on an activation h (DGL's, Belilovsky et al. 2020) gives a gradient grounded in the
label at every boundary: l = B * d CE(head(h), y) / dh. A synthetic gradient c is grounded only as well as its
targets, which below the top interface are bootstrapped from the interfaces above. A cDNI stage can use both:
it applies a c + b l, where (a, b) >= 0 is the least-squares fit of the targets t that later arrive by the two,

    minimise E |a c + b l - t|^2   =>   [E c.c  E c.l] [a]   [E c.t]
                                        [E c.l  E l.l] [b] = [E l.t]

with the expectations exponential moving averages over the targets received, as the trust factor's (the
interface's E[p.t] / E[p.p], for one predictor). A local loss that the targets do not bear out gets b = 0 and
the stage follows its synthesizer alone; one that they do keeps a stage on the label while its synthesizer is
still learning, or where its bootstrapped targets are poor (benchmarks/results/zoo-notes.md, section 8).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def auxiliary_head(shape: tuple[int, ...], num_classes: int, pool: int = 2) -> nn.Module:
    """DGL's default classifier on an activation of per-example `shape`: for feature maps [C, H, W], average
    pooling to pool x pool (2 x 2, as the paper's small CNN heads end) then a linear layer; for anything else a
    linear layer."""
    if len(shape) == 3:
        return nn.Sequential(nn.AdaptiveAvgPool2d(pool), nn.Flatten(), nn.Linear(pool * pool * shape[0], num_classes))
    return nn.Sequential(nn.Flatten(), nn.Linear(math.prod(shape), num_classes))


def local_gradient(head: nn.Module, optimizer: torch.optim.Optimizer, h: torch.Tensor,
                   onehot: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """B * d CE(head(h), y) / dh at h [B, ...] (per-example units, as a synthesizer's prediction), and the
    loss (0-dim, detached: reading it waits for the device, so only a caller that reports it does); the head
    takes one optimizer step on that loss."""
    with torch.enable_grad():
        h = h.detach().requires_grad_(True)
        loss = -(onehot * F.log_softmax(head(h), dim=1)).sum(1).mean()  # cross-entropy, one-hot labels [B, K]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    assert h.grad is not None
    return h.grad * h.shape[0], loss.detach()


def mix_moments(applied: torch.Tensor, local: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """[c.c, c.l, l.l, c.t, l.t] per example (float64 [5]) for one step's applied synthetic gradient c, local
    gradient l and target t (all [B, ...], per-example units)."""
    c, loc, t, b = applied.flatten(), local.flatten(), target.flatten(), applied.shape[0]
    return torch.stack([c @ c, c @ loc, loc @ loc, c @ t, loc @ t]).to(torch.float64) / b


def least_squares_mix(moments: torch.Tensor) -> tuple[float, float] | None:
    """(a, b) >= 0 minimising E |a c + b l - t|^2, from the expectations `mix_moments` lists; None before
    anything was observed (all zero)."""
    cc, cl, ll, ct, lt = moments.tolist()
    if cc == 0.0 and ll == 0.0:
        return None
    ridge = 1e-6 * (cc + ll)  # keeps the 2 x 2 system solvable when c and l are parallel, or c is 0
    cc, ll = cc + ridge, ll + ridge
    det = cc * ll - cl * cl
    a, b = (ll * ct - cl * lt) / det, (cc * lt - cl * ct) / det
    if a < 0.0:  # the constrained optimum lies on an edge: the best fit by one of the two alone
        return 0.0, max(lt / ll, 0.0)
    if b < 0.0:
        return max(ct / cc, 0.0), 0.0
    return a, b


# Feature maps reach the local loss's head pooled to LOCAL_POOL x LOCAL_POOL (zoo-notes.md, section 9).
LOCAL_POOL = 4


class LocalLoss:
    """The local loss above one stage (an auxiliary classifier and its Adam) and its least-squares mix with
    the synthetic gradient: `coefficients` (a, b) from the moments `observe` keeps.

    shape: the activation's per-example shape; num_classes: the label's; lr: the head's Adam learning rate;
    decay: of the moving averages. `seed`: the head's initial weights come from a generator of their own, so
    every process that builds it (a pipeline's stage, the single-process step) builds the same one and the
    global random stream is left alone. pool: feature maps reach the head's linear layer pooled to
    pool x pool (LOCAL_POOL: its gradient is what the stage applies, and a finer map gives it more of the
    true gradient's spatial detail than DGL's 2 x 2).
    """

    def __init__(self, shape: tuple[int, ...], num_classes: int, lr: float = 1e-3, decay: float = 0.99,
                 seed: int | None = None, like: torch.Tensor | None = None, pool: int | None = None):
        self.shape, self.num_classes, self.decay, self.lr = tuple(shape), num_classes, decay, lr
        self.seed = seed if seed is not None else 7919 * math.prod(shape) + num_classes
        self._build_head(LOCAL_POOL if pool is None else pool, like)
        # Moving averages of E[c.c], E[c.l], E[l.l], E[c.t], E[l.t], per example (float64 [5]).
        self.moments = torch.zeros(5, dtype=torch.float64)

    def _build_head(self, pool: int, like: torch.Tensor | None) -> None:
        self.pool = pool
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            self.head = auxiliary_head(self.shape, self.num_classes, pool)
        if like is not None:
            self.head.to(like.device, like.dtype)
        self.optimizer = torch.optim.Adam(self.head.parameters(), lr=self.lr)

    def gradient(self, h: torch.Tensor, onehot: torch.Tensor) -> torch.Tensor:
        """l = B * d CE / dh for h [B, *shape], and one step of the head."""
        if tuple(h.shape[1:]) != self.shape:
            raise ValueError(f"this local loss was built for activations of shape {list(self.shape)} per example, "
                             f"got {list(h.shape[1:])}: activations whose shape varies (sequences of any length) "
                             "need local_loss=False (--no-synth-local)")
        return local_gradient(self.head, self.optimizer, h, onehot)[0]

    @torch.no_grad()
    def observe(self, applied: torch.Tensor, local: torch.Tensor, target: torch.Tensor) -> None:
        """Fold one step's applied synthetic gradient c, local gradient l and target t (all [B, ...],
        per-example units) into the moving averages."""
        m = mix_moments(applied, local, target).to(self.moments)
        self.moments.mul_(self.decay).add_(m, alpha=1.0 - self.decay)

    def coefficients(self) -> tuple[float, float]:
        """(a, b) >= 0 minimising E |a c + b l - t|^2 over what `observe` saw. Before anything came, (1, 0):
        the stage follows its synthesizer, as without a local loss, until the targets bear the local loss out."""
        mix = least_squares_mix(self.moments)
        return (1.0, 0.0) if mix is None else mix

    def state_dict(self) -> dict:
        return {"shape": list(self.shape), "num_classes": self.num_classes, "pool": self.pool,
                "head": self.head.state_dict(), "optimizer": self.optimizer.state_dict(),
                "moments": self.moments.clone()}

    def load_state_dict(self, state: dict) -> None:
        pool = state.get("pool", 2)  # checkpoints written before the pool was a choice pooled to 2 x 2
        if pool != self.pool:  # resume with the head the run was training
            self._build_head(pool, next(self.head.parameters()))
        self.head.load_state_dict(state["head"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.moments = state["moments"].to(torch.float64).clone()
