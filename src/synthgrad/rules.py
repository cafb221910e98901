"""Training rules (methods): backprop, DNI and cDNI, over any model cut into stages.

The rule for one stage is written once, in ``stage_step``: forward, then backward
with the true loss (last stage) or the synthetic gradient of the interface above,
then the stage's own optimizer step. The single-process ``DNI`` rule runs it
stage after stage; the pipeline engine runs the same function in one process per
stage.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from synthgrad.errors import ConfigError, DivergenceError
from synthgrad.interfaces import (
    BackwardInterface,
    ForwardInterface,
    Interface,
    OptimizerFactory,
    adam,
    optimizer_to,
    set_lr_factor,
)
from synthgrad.synthesizers import InputSynthesizer, make_synthesizer

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
METHODS = ("backprop", "dni", "cdni")
TARGETS = ("bootstrap", "backprop")
UNLOCKS = ("update", "complete")


@dataclass
class StageResult:
    """What one stage step produced."""

    output: torch.Tensor  # h_k, detached: what crosses the boundary above
    input_grad: torch.Tensor | None  # dL/dh_(k-1) as it reached the stage input (batch-mean units)
    loss: torch.Tensor | None = None  # the true loss, last stage only
    prediction: torch.Tensor | None = None  # synthetic gradient (per-example units), graph kept


def check_finite(t: torch.Tensor, what: str, stage: int, step: int) -> None:
    """Raise DivergenceError naming the stage and step when `t` holds a NaN or an infinity."""
    # One reduction where isfinite().all() takes four passes (a synthetic gradient is checked every step):
    # the sum is NaN or infinite when any element is, or when finite ones overflow, divergence too.
    if not math.isfinite(float(t.detach().sum())):
        raise DivergenceError(
            f"non-finite {what} at stage {stage + 1}, step {step}; the run diverged. Try a lower "
            "--lr or --synth-lr, a --synth-scale below 1, or --synth-warmup steps; the last good "
            "checkpoint is kept and the run can be resumed with --resume")


def stage_step(stage: nn.Module, optimizer: torch.optim.Optimizer, inp: torch.Tensor, *,
               index: int, step: int, interface: BackwardInterface | None = None,
               context: torch.Tensor | None = None, labels: torch.Tensor | None = None,
               loss_fn: LossFn = F.cross_entropy, input_grad: bool = True,
               update: bool = True) -> StageResult:
    """The per-stage rule: forward, backward with the loss or a synthetic gradient, update.

    inp: h_(k-1), the activation from below (or the network input), [B, ...].
    interface: the backward interface above this stage; None for the last stage, which
        backpropagates the true loss on `labels`.
    input_grad: keep the gradient at the stage input (the target for the interface below).
    update: False skips the backward pass and the update (random update frequency).
    """
    if not update:
        with torch.no_grad():
            out = stage(inp)
            loss = loss_fn(out, labels) if interface is None else None
        return StageResult(out, None, loss)
    inp = inp.detach().requires_grad_(input_grad)
    out = stage(inp)
    loss = prediction = None
    if interface is None:
        loss = loss_fn(out, labels)
        check_finite(loss, "loss", index, step)
        loss.backward()
    else:
        prediction = interface.predict(out, context)
        check_finite(prediction, "synthetic gradient", index, step)
        out.backward(interface.stage_gradient(prediction, step))
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return StageResult(out.detach(), inp.grad if input_grad else None,
                       None if loss is None else loss.detach(), prediction)


@contextlib.contextmanager
def frozen_batchnorm_stats(modules: Sequence[nn.Module]) -> Iterator[None]:
    """Run extra diagnostic forward passes in train mode without moving BN running statistics."""
    saved = []
    for m in modules:
        for bn in m.modules():
            if isinstance(bn, nn.modules.batchnorm._BatchNorm) and bn.track_running_stats:
                saved.append((bn, bn.momentum, bn.num_batches_tracked.clone()))
                bn.momentum = 0.0  # running = (1 - 0) * running + 0 * batch: unchanged
    try:
        yield
    finally:
        for bn, momentum, tracked in saved:
            bn.momentum = momentum
            bn.num_batches_tracked.copy_(tracked)


def true_gradient(upper: Sequence[nn.Module], h: torch.Tensor, labels: torch.Tensor,
                  loss_fn: LossFn = F.cross_entropy) -> torch.Tensor:
    """dL/dh through the stages above h at their current parameters (batch-mean units)."""
    h = h.detach().requires_grad_(True)
    with frozen_batchnorm_stats(upper):
        out = h
        for stage in upper:
            out = stage(out)
        (grad,) = torch.autograd.grad(loss_fn(out, labels), h)
    return grad


def gradient_agreement(prediction: torch.Tensor, true_grad: torch.Tensor) -> tuple[float, float]:
    """(cosine similarity, relative error) of a per-example prediction against a batch-mean gradient."""
    p = prediction.detach().flatten().double() / prediction.shape[0]
    t = true_grad.detach().flatten().double()
    cos = F.cosine_similarity(p, t, dim=0).item()
    rel = ((p - t).norm() / t.norm().clamp_min(1e-30)).item()
    return cos, rel


class StepRule:
    """A method's training step over stages; owns stage optimizers (and interfaces, for DNI)."""

    method = "backprop"

    def __init__(self, stages: Sequence[nn.Module], lr: float = 1e-3,
                 optimizer: OptimizerFactory | None = None, loss_fn: LossFn = F.cross_entropy,
                 update_prob: float = 1.0, seed: int = 0):
        if not 0.0 <= update_prob <= 1.0:
            raise ConfigError(f"update_prob must lie in [0, 1], got {update_prob}")
        self.stages = nn.ModuleList(stages)
        make = optimizer or adam(lr)
        self.optimizers = [make(s.parameters()) for s in self.stages]
        self.loss_fn, self.update_prob = loss_fn, update_prob
        self.interfaces: list[BackwardInterface] = []
        self.forward_interfaces: list[ForwardInterface] = []
        self.steps = 0
        # Which stages update on a step is drawn from this generator (part of the checkpoint).
        self.generator = torch.Generator().manual_seed(seed)

    def network(self) -> nn.Sequential:
        """The plain composed network: what evaluation runs, with no synthesizer cost."""
        return nn.Sequential(*self.stages)

    def _updates(self) -> list[bool]:
        if self.update_prob >= 1.0:
            return [True] * len(self.stages)
        draws = torch.rand(len(self.stages), generator=self.generator)
        return (draws < self.update_prob).tolist()

    def step(self, x: torch.Tensor, y: torch.Tensor, diagnose: bool = False) -> dict:
        raise NotImplementedError

    def set_lr_factor(self, factor: float) -> None:
        """Scale every learning rate (stages and synthesizers) to `factor` x its initial value."""
        set_lr_factor(self.optimizers + [i.optimizer for i in self.all_interfaces()], factor)

    def all_interfaces(self) -> list[Interface]:
        return [*self.interfaces, *self.forward_interfaces]

    def train(self, mode: bool = True) -> StepRule:
        self.stages.train(mode)
        for i in self.all_interfaces():
            i.train(mode)
        return self

    def to(self, device: torch.device | str) -> StepRule:
        self.stages.to(device)
        for opt in self.optimizers:
            optimizer_to(opt, device)
        for i in self.all_interfaces():
            i.to(device)
        return self

    def state_dict(self) -> dict:
        return {
            "method": self.method,
            "stages": self.stages.state_dict(),
            "optimizers": [o.state_dict() for o in self.optimizers],
            "interfaces": [i.state_dict() for i in self.interfaces],
            "forward_interfaces": [i.state_dict() for i in self.forward_interfaces],
            "steps": self.steps,
            "generator": self.generator.get_state(),
        }

    def load_state_dict(self, state: dict) -> None:
        if state["method"] != self.method:
            raise ConfigError(f"checkpoint was trained with {state['method']}, not {self.method}")
        self.stages.load_state_dict(state["stages"])
        for o, s in zip(self.optimizers, state["optimizers"], strict=True):
            o.load_state_dict(s)
        for i, s in zip(self.interfaces, state["interfaces"], strict=True):
            i.load_state_dict(s)
        for i, s in zip(self.forward_interfaces, state.get("forward_interfaces", []), strict=True):
            i.load_state_dict(s)
        self.steps = state["steps"]
        self.generator.set_state(state["generator"])


class Backprop(StepRule):
    """Plain backpropagation through the composed stages (the baseline)."""

    method = "backprop"

    def step(self, x: torch.Tensor, y: torch.Tensor, diagnose: bool = False) -> dict:
        out = x
        for s in self.stages:
            out = s(out)
        loss = self.loss_fn(out, y)
        check_finite(loss, "loss", len(self.stages) - 1, self.steps)
        loss.backward()
        # With update_prob < 1 the backward pass still has to reach the lower stages;
        # each stage applies its update only with probability p.
        for opt, upd in zip(self.optimizers, self._updates(), strict=True):
            if upd:
                opt.step()
            opt.zero_grad(set_to_none=True)
        self.steps += 1
        return {"train_loss": loss.item()}


class DNI(StepRule):
    """Decoupled Neural Interfaces: every stage but the last updates with a synthetic gradient.

    conditioned: cDNI, the synthesizers also see the one-hot label as context.
    target: "bootstrap" (paper, default): the synthesizer below stage k+1 regresses onto the
        gradient that reaches stage k+1's input, itself made of stage k+1's synthetic gradient;
        only the last interface sees the true loss gradient. "backprop": onto the true gradient
        of the loss through all stages above (the original reimplementation's simulation).
    forward_interfaces: for the complete unlock, one per stage k >= 1: stage k then runs on a
        synthetic input predicted from the network input instead of waiting for stage k-1; each
        forward interface regresses onto the real activation, computed by a forward-only pass.
    """

    method = "dni"

    def __init__(self, stages: Sequence[nn.Module], interfaces: Sequence[BackwardInterface],
                 lr: float = 1e-3, optimizer: OptimizerFactory | None = None,
                 loss_fn: LossFn = F.cross_entropy, conditioned: bool = False,
                 num_classes: int | None = None, target: str = "bootstrap",
                 update_prob: float = 1.0, seed: int = 0,
                 forward_interfaces: Sequence[ForwardInterface] | None = None):
        super().__init__(stages, lr, optimizer, loss_fn, update_prob, seed)
        if len(interfaces) != len(stages) - 1:
            raise ConfigError(f"{len(stages)} stages need {len(stages) - 1} interfaces, got {len(interfaces)}")
        if forward_interfaces and len(forward_interfaces) != len(stages) - 1:
            raise ConfigError(f"{len(stages)} stages need {len(stages) - 1} forward interfaces, "
                              f"got {len(forward_interfaces)}")
        if target not in TARGETS:
            raise ConfigError(f"unknown target {target!r}; choose one of: {', '.join(TARGETS)}")
        if conditioned and not num_classes:
            raise ConfigError("cDNI needs num_classes to build the one-hot context")
        self.interfaces = list(interfaces)
        self.forward_interfaces = list(forward_interfaces or [])
        self.conditioned, self.num_classes, self.target = conditioned, num_classes, target
        if conditioned:
            self.method = "cdni"

    @classmethod
    def build(cls, stages: Sequence[nn.Module], sample: torch.Tensor, *, conditioned: bool = False,
              num_classes: int | None = None, lr: float = 1e-3, synth_lr: float = 1e-4,
              synth_hidden: int | None = None, synth_width: int | None = None,
              synth_scale: float = 1.0, synth_warmup: int = 0, unlock: str = "update",
              input_hidden: int = 1, input_width: int = 1024, **kwargs) -> DNI:
        """DNI over `stages` with a default synthesizer at every boundary.

        sample: one input batch [B, ...], used to find each boundary's activation shape.
        synth_hidden: hidden layers per synthesizer; default 2 for DNI and 0 (linear) for cDNI.
        unlock: "update" (synthetic gradients) or "complete" (also synthetic inputs, with
            input synthesizers of `input_hidden` layers of `input_width`, trained at synth_lr).
        """
        if unlock not in UNLOCKS:
            raise ConfigError(f"unknown unlock {unlock!r}; choose one of: {', '.join(UNLOCKS)}")
        hidden = synth_hidden if synth_hidden is not None else (0 if conditioned else 2)
        shapes = activation_shapes(stages, sample)
        ctx = num_classes if conditioned else 0
        interfaces = [
            BackwardInterface(make_synthesizer(shape, hidden, synth_width, ctx), adam(synth_lr),
                              synth_scale, synth_warmup)
            for shape in shapes[:-1]
        ]
        forward = None
        if unlock == "complete":
            forward = [ForwardInterface(InputSynthesizer(tuple(sample.shape[1:]), shape, input_hidden, input_width,
                                                         ctx), adam(synth_lr))
                       for shape in shapes[:-1]]
        return cls(stages, interfaces, lr=lr, conditioned=conditioned, num_classes=num_classes,
                   forward_interfaces=forward, **kwargs)

    def context(self, y: torch.Tensor) -> torch.Tensor | None:
        """The synthesizers' context: the one-hot label [B, num_classes] for cDNI, else None."""
        return F.one_hot(y, self.num_classes).float() if self.conditioned else None

    def step(self, x: torch.Tensor, y: torch.Tensor, diagnose: bool = False) -> dict:
        ctx = self.context(y)
        last = len(self.stages) - 1
        updates = self._updates()
        complete = bool(self.forward_interfaces)
        synth_loss: list[float | None] = [None] * last
        input_loss: list[float | None] = [None] * last
        cosine: list[float | None] = [None] * last
        rel_error: list[float | None] = [None] * last
        pending: tuple[torch.Tensor, torch.Tensor | None] | None = None  # (prediction, true grad) below
        h, loss = x, None
        real = x  # complete unlock: the real activation h_(k-1), from a forward-only pass
        for k, stage in enumerate(self.stages):
            synthetic_input = None
            if complete and k > 0:
                # Stage k does not wait for stage k-1: it runs on a synthetic input predicted from x.
                synthetic_input = self.forward_interfaces[k - 1].predict(x, ctx)
                h = synthetic_input.detach()
            h_in = h  # h_(k-1) as this stage receives it
            # Batch statistics of a synthetic input must not leak into BN running statistics;
            # the forward-only pass on the real input below updates them.
            with frozen_batchnorm_stats([stage]) if complete else contextlib.nullcontext():
                res = stage_step(stage, self.optimizers[k], h, index=k, step=self.steps,
                                 interface=None if k == last else self.interfaces[k], context=ctx,
                                 labels=y, loss_fn=self.loss_fn, input_grad=k > 0, update=updates[k])
            if synthetic_input is not None and updates[k]:
                input_loss[k - 1] = self.forward_interfaces[k - 1].update(synthetic_input, real)
            # The interface below regresses onto what reached this stage's input. With update_prob < 1
            # the stage below may have skipped its step (no prediction yet): predict now, so that the
            # synthesizer learns whenever a target exists (probability p), not only when both stages
            # updated (p^2).
            if k > 0 and res.input_grad is not None:
                if pending is None and self.target == "bootstrap":
                    pending = (self.interfaces[k - 1].predict(h_in, ctx), None)
                if pending is not None:
                    prediction, true_below = pending
                    target = true_below if self.target == "backprop" else res.input_grad
                    synth_loss[k - 1] = self.interfaces[k - 1].update(prediction, target)
            pending = None
            if k < last and res.prediction is not None:
                true_here = None
                if diagnose or self.target == "backprop":
                    # Exact dL/dh_k now: stages above have not moved yet on this step.
                    true_here = true_gradient(self.stages[k + 1:], res.output, y, self.loss_fn)
                    if diagnose:
                        cosine[k], rel_error[k] = gradient_agreement(res.prediction, true_here)
                pending = (res.prediction, true_here)
            h, loss = res.output, res.loss
            if complete:
                with torch.no_grad():
                    real = stage(real)
        if complete:  # report the real network's loss, not the synthetic-input path's
            loss = self.loss_fn(real, y).detach()
        self.steps += 1
        stats: dict = {"train_loss": loss.item() if loss is not None else None,
                       "synth_loss": synth_loss}
        if complete:
            stats["input_loss"] = input_loss
        if diagnose:
            stats["grad_cosine"], stats["grad_rel_error"] = cosine, rel_error
        return stats


def activation_shapes(stages: Sequence[nn.Module], sample: torch.Tensor) -> list[tuple[int, ...]]:
    """The per-example shape of each stage's output, from one forward pass in eval mode."""
    shapes, h = [], sample
    with torch.no_grad():
        for s in stages:
            was = s.training
            s.eval()
            h = s(h)
            s.train(was)
            shapes.append(tuple(h.shape[1:]))
    return shapes
