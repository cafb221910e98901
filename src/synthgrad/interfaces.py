"""Interfaces: the boundaries where a network is cut, each owning its predictor and optimizer.

One abstraction serves every kind of boundary: after stage k in depth, at the end
of a truncation window in time (RNN), or in front of a stage as a synthetic input.
An interface *predicts* something at its boundary and is later *regressed* onto
what really happened there:

- ``BackwardInterface`` predicts the gradient dL/dh from h (and the context);
  its target is the gradient that reaches h from above.
- ``ForwardInterface`` predicts the activation h from the network input (and the
  context); its target is the real h when it arrives.

Gradient units: a backward interface's synthesizer predicts the *per-example*
gradient, ``B * dL/dh`` for a batch of B examples and the batch-mean loss L. That
keeps its targets O(1) whatever the batch size, which Adam needs, since its step
size does not shrink with the gradient's scale. ``stage_gradient`` converts back.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from synthgrad.errors import ConfigError
from synthgrad.localloss import LocalLoss
from synthgrad.synthesizers import ClassifierGradient

# An optimizer factory: called with a module's parameters, returns its optimizer. `adam(lr)` and `sgd(lr)`
# make them; any callable will do (a module-level function or functools.partial if it must pickle).
OptimizerFactory = Callable[[Iterator[nn.Parameter]], torch.optim.Optimizer]

# What a backward interface with center=None does when its synthesizer is given a context (cDNI): centre the
# applied synthetic gradient over the batch. The one place this default is decided (config.py reads it for
# the CLI's defaults): a custom cDNI synthesizer gets what the library's gets. Why, in BackwardInterface.
CDNI_CENTER = True
# Likewise whether a cDNI synthesizer carries a local classifier's input gradient (synthesizers.ClassifierGradient):
# over the zoo and the held-out models cut into 2 and 4 stages it took cDNI's mean gap to backprop after 3 epochs
# from -3.80 to -1.82 points, better in 15 of 16 cells (benchmarks/results/zoo-notes.md, section 5).
CDNI_CLASSIFIER = True
# And whether a cDNI stage mixes a local loss's gradient into its synthetic one (localloss.LocalLoss): over the
# zoo (MNIST and Fashion-MNIST) and the held-out models cut into 2 and 4 stages it took cDNI's mean gap to
# backprop after 3 epochs from -2.14 to -0.68 points, better in 19 of 24 cells, and every cell above its frozen
# floor (22 of 24 before; benchmarks/results/zoo-notes.md, section 8).
CDNI_LOCAL_LOSS = True


def classifier_on(classifier: bool | None, conditioned: bool) -> bool:
    """Whether a synthesizer gets the classifier term: `classifier`, or when None CDNI_CLASSIFIER for cDNI only."""
    return classifier if classifier is not None else (CDNI_CLASSIFIER and conditioned)


def local_loss_on(local_loss: bool | None, conditioned: bool) -> bool:
    """Whether a stage mixes in a local loss: `local_loss`, or when None CDNI_LOCAL_LOSS for cDNI only."""
    return local_loss if local_loss is not None else (CDNI_LOCAL_LOSS and conditioned)


def adam(lr: float) -> OptimizerFactory:
    """An optimizer factory: Adam with learning rate `lr`.

    fused=True: one kernel for all of a module's parameters. On CPU the default Adam updates
    them one at a time, and that Python overhead alone was ~15% of a small model's step.
    A partial, not a lambda, so that it pickles (the pipeline engine sends it to its processes).
    """
    return functools.partial(torch.optim.Adam, lr=lr, fused=True)


def set_lr_factor(optimizers: list[torch.optim.Optimizer], factor: float) -> None:
    """Scale every learning rate of `optimizers` to `factor` x its initial value (a schedule's step)."""
    for opt in optimizers:
        for group in opt.param_groups:
            group.setdefault("initial_lr", group["lr"])
            group["lr"] = group["initial_lr"] * factor


def sgd(lr: float, momentum: float = 0.9) -> OptimizerFactory:
    """An optimizer factory: SGD with Nesterov momentum.

    Unlike Adam, its step shrinks with the gradient: a stage whose synthesizer predicts a small
    gradient (it is unsure) moves little, where Adam would move it at the full learning rate.
    """
    return functools.partial(torch.optim.SGD, lr=lr, momentum=momentum, nesterov=True)


OPTIMIZERS: dict[str, Callable[[float], OptimizerFactory]] = {"adam": adam, "sgd": sgd}


def optimizer_to(optimizer: torch.optim.Optimizer, device: torch.device | str) -> None:
    """Move an optimizer's state tensors (Adam's moments) to `device`; the step counters stay on the CPU."""
    for state in optimizer.state.values():
        for k, v in state.items():
            if isinstance(v, torch.Tensor) and k != "step":
                state[k] = v.to(device)


class Interface:
    """A predictor at a boundary, trained by regression (MSE) with its own optimizer."""

    def __init__(self, model: nn.Module, optimizer: OptimizerFactory | torch.optim.Optimizer):
        self.model = model
        self.optimizer = optimizer if isinstance(optimizer, torch.optim.Optimizer) else optimizer(
            model.parameters())

    def regress(self, prediction: torch.Tensor, target: torch.Tensor) -> float:
        """One optimizer step on mse(prediction, target); `prediction` must still hold its graph."""
        loss = F.mse_loss(prediction, target.detach())
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return loss.item()

    # -- bookkeeping shared with nn.Module-like callers
    def to(self, device: torch.device | str) -> Interface:
        self.model.to(device)
        optimizer_to(self.optimizer, device)
        return self

    def train(self, mode: bool = True) -> Interface:
        self.model.train(mode)
        return self

    def state_dict(self) -> dict:
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])


class BackwardInterface(Interface):
    """Carries a synthetic gradient down across a boundary (removes the update lock).

    scale: multiplies the synthetic gradient that the stage below applies.
    warmup_steps: the applied scale ramps linearly from 0 to `scale` over these steps,
        so the stage below waits for a synthesizer that has learnt something.
    trust: the stage below moves at its learning rate times `trust_factor`, alpha = E[p.t] / E[p.p],
        the least-squares scalar that best maps the synthesizer's predictions p onto the targets t
        that later arrive for them, clamped to [0, 1]. The two expectations are exponential moving
        averages over the targets received (decay `trust_decay`; their bias corrections cancel in the
        ratio). Below a synthesizer that predicts noise, or a gradient many times too large, the stage
        stays about where it is instead of drifting (a residual stream running away); below a good one
        it moves at its full rate. The learning rate, not the gradient, is scaled because Adam
        normalises a gradient's size away. It needs only the targets the interface already receives, so
        it works for any synthesizer and in any engine (StageRule applies it). Off by default: it holds a
        stage whose activations run away (a residual stream, a network without normalisation) and costs
        a run whose synthesizers are still learning (benchmarks/results/zoo-notes.md, section 6).
    update_every: regress onto every this-many-th target only (1: every one). The synthesizer's
        regression costs about as much as its prediction again; taking every other target halves it,
        for a synthesizer that learns fast enough from half of them.
    project: remove from each example's prediction its component along that example's activation h
        (p - (p.h / h.h) h), in what is regressed as in what is applied. A stage that feeds a
        normalisation has a true gradient orthogonal to h; a synthetic gradient with a component along
        h changes the scale of h, which a synthesizer linear in h then follows: a runaway loop.
    center: the stage below applies the synthetic gradient minus its mean over the batch (per feature);
        the synthesizer still regresses onto the whole target. The batch mean is one vector shared by
        every example: the stage's parameters (its biases first) follow it coherently, since it does not
        cancel in the sum over examples as per-example errors do, and Adam follows it at the full
        learning rate on every step; an error there shifts every example's activation the same way
        (the activation drift of a residual stream). What distinguishes examples is kept. None (the
        default): centred when the synthesizer is given a context (cDNI, whose default it is), not otherwise
        (DNI, and through time), so that a custom cDNI synthesizer gets what the library's gets.
    classifier: the synthesizer also carries a local classifier's input gradient (ClassifierGradient). None
        (the default): on for cDNI (CDNI_CLASSIFIER), added at the first prediction with a label, when the
        activation's size is known, its parameters joining this interface's optimizer; off for DNI. False
        for activations whose size varies. The library's default synthesizers have it from the start.
    local_loss: the stage below applies a c + b l instead of the synthetic gradient c alone: l is the input
        gradient of a local loss, an auxiliary classifier on h trained on the label (DGL's), and (a, b) >= 0
        the least-squares fit of the targets by the two (localloss.LocalLoss). Needs the label (cDNI). None
        (the default): on for cDNI (CDNI_LOCAL_LOSS), built at the first prediction with a label; off for DNI.
        False for activations whose shape varies. Like centring, it works for any synthesizer.
    """

    def __init__(self, synthesizer: nn.Module, optimizer: OptimizerFactory | torch.optim.Optimizer,
                 scale: float = 1.0, warmup_steps: int = 0, trust: bool = False, trust_decay: float = 0.99,
                 project: bool = False, update_every: int = 1, center: bool | None = None,
                 classifier: bool | None = None, local_loss: bool | None = None):
        super().__init__(synthesizer, optimizer)
        if not 0.0 <= trust_decay < 1.0:
            raise ValueError(f"trust_decay must lie in [0, 1), got {trust_decay}")
        if update_every < 1:
            raise ValueError(f"update_every must be >= 1, got {update_every}")
        self.update_every, self.targets_seen = update_every, 0
        self.scale, self.warmup_steps = scale, warmup_steps
        self.trust, self.trust_decay, self.project, self.center = trust, trust_decay, project, center
        self.classifier, self.local_loss = classifier, local_loss
        self.local: LocalLoss | None = None  # built at the first prediction with a label, when local_loss is on
        # Moving averages of the per-example p.t, p.p and t.t (float64 [3]): the trust factor and the agreement.
        self.fit = torch.zeros(3, dtype=torch.float64)

    @property
    def synthesizer(self) -> nn.Module:
        return self.model

    @property
    def fit_scale(self) -> torch.Tensor:
        """E[p.t] / E[p.p] over the targets received, clamped to [0, 1] (a 0-dim float64 tensor), whether or not
        `trust` uses it; 1 before any non-zero prediction met its target (a zero-initialised synthesizer applies
        zero then anyway)."""
        pt, pp = self.fit[0], self.fit[1]
        return torch.where(pp > 0, (pt / pp.clamp_min(1e-300)).clamp(0.0, 1.0), torch.ones_like(pp))

    @property
    def trust_factor(self) -> torch.Tensor:
        """alpha in [0, 1]: `fit_scale` when `trust` is on, 1 when it is off."""
        return self.fit_scale if self.trust else torch.ones((), dtype=torch.float64)

    @property
    def agreement(self) -> torch.Tensor:
        """E[p.t] / sqrt(E[p.p] E[t.t]) over the targets received (the moving averages), clamped to [0, 1]:
        the cosine of predictions and targets, pooled over batches; 0 before any target (a 0-dim tensor)."""
        pt, pp, tt = self.fit[0], self.fit[1], self.fit[2]
        den = (pp * tt).sqrt()
        return torch.where(den > 0, (pt / den.clamp_min(1e-300)).clamp(0.0, 1.0), torch.zeros_like(den))

    def predict(self, h: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        """The synthesizer's per-example gradient B * dL/dh, shaped like h, graph kept for `update`."""
        if classifier_on(self.classifier, context is not None) and not isinstance(self.model, ClassifierGradient):
            if context is None:
                raise ConfigError("classifier=True needs the number of classes, which a DNI interface is not given: "
                                  "wrap the synthesizer yourself, sg.ClassifierGradient(synth, shape, num_classes)")
            self._add_classifier(math.prod(h.shape[1:]), context.shape[1], h)
        p = self.model(h.detach(), context)
        if self.project:  # per example: p - (p.h / h.h) h, on the flattened [B, D] views
            pf, hf = p.flatten(1), h.detach().flatten(1)
            coef = (pf * hf).sum(1, keepdim=True) / hf.pow(2).sum(1, keepdim=True).clamp_min(1e-12)
            p = (pf - coef * hf).view_as(p)
        return p

    def _add_classifier(self, dim: int, num_classes: int, like: torch.Tensor | None = None) -> None:
        """Wrap the synthesizer in ClassifierGradient (its first cDNI prediction, or a checkpoint that has the
        term), the new parameters joining the optimizer with its defaults: a custom cDNI synthesizer gets what
        the library's get, as with centring."""
        # V's random start from a seed of its own: the same in every process (a pipeline's stage = DNI.step),
        # and the global random stream, which the run's other draws follow, left where it was.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(1009 * dim + num_classes)
            wrapped = ClassifierGradient(self.model, (dim,), num_classes)
        ref = like if like is not None else next(self.model.parameters(), None)
        if ref is not None:
            wrapped.logits.to(ref.device, ref.dtype)
            wrapped.error_map.to(ref.device, ref.dtype)
        self.optimizer.add_param_group({"params": [*wrapped.logits.parameters(), *wrapped.error_map.parameters()]})
        self.model = wrapped

    def centers(self, conditioned: bool) -> bool:
        """Whether the stage below applies the prediction centred over the batch, for a prediction made with
        a context (conditioned, cDNI) or without: `center`, or when None CDNI_CENTER for cDNI only."""
        return self.center if self.center is not None else (CDNI_CENTER and conditioned)

    def local_gradient(self, h: torch.Tensor, context: torch.Tensor | None) -> torch.Tensor | None:
        """The local loss's gradient at h (per-example units, [B, ...]) when the stage below mixes one in
        (`local_loss`), after one step of its classifier; None when it does not."""
        if context is None:
            if self.local_loss:
                raise ConfigError("local_loss=True needs the label, which a DNI interface is not given: use cDNI "
                                  "(conditioned=True), or local_loss=None")
            return None
        if not local_loss_on(self.local_loss, True):
            return None
        if self.local is None:
            self.local = LocalLoss(tuple(h.shape[1:]), context.shape[1], decay=self.trust_decay, like=h)
        return self.local.gradient(h, context.to(h.dtype))

    def applied(self, prediction: torch.Tensor, conditioned: bool = False) -> torch.Tensor:
        """The prediction [B, ...] as the stage below applies it, per-example units, detached: centred over
        the batch when `centers`."""
        p = prediction.detach()
        if self.centers(conditioned) and p.shape[0] > 1:  # one example is its own batch mean: keep it
            p = p - p.mean(0, keepdim=True)  # [B, ...] minus its mean over the batch, per feature
        return p

    def stage_gradient(self, prediction: torch.Tensor, step: int = 0, conditioned: bool = False,
                       local: torch.Tensor | None = None) -> torch.Tensor:
        """What the stage below backpropagates: the prediction in batch-mean units, scaled, warmed up and
        centred; with a local loss's gradient `local` (per-example units), a c + b l (`LocalLoss`).
        conditioned: the prediction was made with a context (cDNI; decides `center=None`)."""
        ramp = min(1.0, (step + 1) / self.warmup_steps) if self.warmup_steps else 1.0
        factor = self.scale * ramp / prediction.shape[0]
        c = self.applied(prediction, conditioned)
        if local is None or self.local is None:
            return c * factor
        a, b = self.local.coefficients()
        return (a * c + b * local.detach()) * factor

    def accept_target(self) -> bool:
        """Count one more target that came; whether to regress onto it (every `update_every`-th)."""
        self.targets_seen += 1
        return (self.targets_seen - 1) % self.update_every == 0

    def update(self, prediction: torch.Tensor, target_grad: torch.Tensor, local: torch.Tensor | None = None) -> float:
        """Regress onto the gradient that reached h from above, given in batch-mean units. local: the local
        loss's gradient that the stage applied with this prediction, if any (it updates the mix)."""
        target = target_grad * target_grad.shape[0]  # per-example units, like the prediction
        if local is not None and self.local is not None:
            self.local.observe(self.applied(prediction, conditioned=True), local, target)
        with torch.no_grad():
            # Three dot products in the activation's dtype (no float64 copy of [B, ...]: this runs every step).
            p, t, b = prediction.detach().flatten(), target.detach().flatten(), prediction.shape[0]
            moments = (torch.stack([p @ t, p @ p, t @ t]) / b).to(self.fit.device, self.fit.dtype)
            self.fit.mul_(self.trust_decay).add_(moments, alpha=1.0 - self.trust_decay)
        return self.regress(prediction, target)

    def to(self, device: torch.device | str) -> BackwardInterface:
        super().to(device)
        self.fit = self.fit.to(device)
        if self.local is not None:
            self.local.head.to(device)
            optimizer_to(self.local.optimizer, device)
        return self

    def train(self, mode: bool = True) -> BackwardInterface:
        super().train(mode)
        if self.local is not None:
            self.local.head.train(mode)
        return self

    def state_dict(self) -> dict:
        state = {**super().state_dict(), "fit": self.fit.clone(), "targets_seen": self.targets_seen}
        if self.local is not None:
            state["local"] = self.local.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        error_map = state["model"].get("error_map.weight")  # [D, K]: saved after the term was added
        if error_map is not None and not isinstance(self.model, ClassifierGradient):
            self._add_classifier(error_map.shape[0], error_map.shape[1])
        super().load_state_dict(state)
        if "fit" in state:  # checkpoints written before the trust factor have none
            fit = state["fit"].to(self.fit.device, self.fit.dtype)
            self.fit = torch.cat([fit, self.fit[len(fit):]])  # [2] before the agreement was tracked: t.t restarts
        self.targets_seen = state.get("targets_seen", 0)
        local = state.get("local")
        if local is not None:
            ref = next(self.model.parameters(), None)
            self.local = LocalLoss(tuple(local["shape"]), local["num_classes"], decay=self.trust_decay, like=ref)
            self.local.load_state_dict(local)


class ForwardInterface(Interface):
    """Carries a synthetic input up to a stage, predicted from the network input (removes the forward lock)."""

    def predict(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        """The predicted activation that the stage would receive from below."""
        return self.model(x.detach(), context)

    def update(self, prediction: torch.Tensor, activation: torch.Tensor) -> float:
        """Regress onto the real activation once the stage below has produced it."""
        return self.regress(prediction, activation)

