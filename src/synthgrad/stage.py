"""The per-stage rule, written once: what one stage computes in one step, whoever schedules it.

``StageRule`` owns stage k, its optimizer, the backward interface above it (DNI, cDNI) and the
forward interface in front of it (the complete unlock). Its three entry points are the only
places where anything is computed for that stage:

- ``step``: forward (on the activation from below, or on a synthetic input), backward with the
  loss, the synthetic gradient of the interface above, or a gradient handed in by the caller
  (the locked pipeline), then the stage's update; the update itself is drawn here;
- ``take_target``: the interface above regresses onto the gradient that reached stage k+1's
  input (bootstrap) or onto any other target the caller gives;
- ``take_real_input``: the complete unlock's forward interface regresses onto the real
  activation from below, and the stage runs it forward to produce its own real activation.

The single-process ``DNI.step`` calls them stage after stage; the pipeline engine calls them in
one process per stage as messages arrive. In lockstep (every target taken before the next step)
both give the same numbers, bit for bit.
"""

from __future__ import annotations

import contextlib
import inspect
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from synthgrad.boundary import run_stage
from synthgrad.diagnostics import check_finite, frozen_batchnorm_stats
from synthgrad.errors import ConfigError
from synthgrad.interfaces import BackwardInterface, ForwardInterface, OptimizerFactory, set_lr_factor

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
GradientFn = Callable[[torch.Tensor], torch.Tensor]  # h_k (with graph) -> dL/dh_k to backpropagate, [B, ...]


@dataclass
class StageResult:
    """What one stage step produced."""

    output: torch.Tensor  # h_k, detached: what crosses the boundary above
    input_grad: torch.Tensor | None  # dL/dh_(k-1) as it reached the stage input (batch-mean units)
    loss: torch.Tensor | None = None  # the true loss, last stage only
    updated: bool = True  # False: the update draw skipped this step (no backward pass, no update)


def stage_step(stage: nn.Module, optimizer: torch.optim.Optimizer, inp: torch.Tensor, *, index: int, step: int,
               output_grad: GradientFn | None = None, labels: torch.Tensor | None = None,
               loss_fn: LossFn = F.cross_entropy, input_grad: bool = True, update: bool = True,
               on_output: Callable[[torch.Tensor], None] | None = None) -> StageResult:
    """Forward, backward with the loss or a given output gradient, update: the bare mechanics of one stage.

    inp: h_(k-1), the activation from below (or the network input), [B, ...].
    output_grad: maps the stage output h_k (with its graph) to the gradient dL/dh_k to backpropagate
        (batch-mean units); None for the last stage, which backpropagates loss_fn(h_k, labels).
    input_grad: keep the gradient at the stage input (the target for the interface below).
    update: False skips the backward pass and the update (random update frequency).
    on_output: called with h_k (detached) as soon as it exists, before the backward pass (a pipeline
        sends it up there, so the stage above can start).
    """
    if not update:
        with torch.no_grad():
            out = check_output(run_stage(stage, inp), index)
            loss = loss_fn(out, labels) if output_grad is None else None
        if on_output is not None:
            on_output(out)
        return StageResult(out, None, loss, updated=False)
    inp = inp.detach().requires_grad_(input_grad)
    out = check_output(run_stage(stage, inp), index)
    if on_output is not None:
        on_output(out.detach())
    loss = None
    if output_grad is None:
        loss = loss_fn(out, labels)
        check_finite(loss, "loss", index, step)
        loss.backward()
    else:
        backward_from_output(out, output_grad(out))
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return StageResult(out.detach(), inp.grad if input_grad else None, None if loss is None else loss.detach())


def backward_from_output(out: torch.Tensor, grad: torch.Tensor) -> None:
    """Backpropagate dL/dh_k (`grad`) from the stage output `out` into the stage and its input; nothing when `out`
    has no graph, because nothing below h_k trains (frozen parameters, an input that needs no gradient)."""
    if out.requires_grad:
        out.backward(grad)


def check_output(out: object, index: int) -> torch.Tensor:
    """`out` if it is one tensor (what an interface can sit on); a ConfigError that says how to fix it if not."""
    if not isinstance(out, torch.Tensor):
        kind = type(out).__name__
        raise ConfigError(f"stage {index + 1} returned a {kind}, not one tensor: a boundary carries a single "
                          f"activation [B, ...]. Wrap the stage so that it returns the tensor the next stage reads "
                          f"(an nn.LSTM returns (output, (h, c)): keep output); see sg.cut for a list of layers")
    return out


def check_unshared(stages: Sequence[nn.Module]) -> None:
    """ConfigError when two stages hold the same parameter (a layer used in both, tied weights): each stage
    updates its parameters with its own optimizer, and in a pipeline in its own process, so a shared one would
    be stepped twice per step from different gradients, or silently become two copies."""
    owner: dict[int, tuple[int, str]] = {}
    for k, stage in enumerate(stages):
        for name, p in stage.named_parameters():
            first, first_name = owner.setdefault(id(p), (k, name))
            if first != k:
                raise ConfigError(f"stages {first + 1} and {k + 1} share a parameter ({first_name!r} in stage "
                                  f"{first + 1}, {name!r} in stage {k + 1}): a layer used in two stages, or tied "
                                  "weights. Decoupled stages update their own parameters; keep the shared layer "
                                  "within one stage (cut elsewhere) or untie the weights")


def stage_factory(optimizer: OptimizerFactory, lower_optimizer: OptimizerFactory | None, index: int,
                  num_stages: int) -> OptimizerFactory:
    """Stage `index`'s optimizer factory: `lower_optimizer`, where given, for every stage but the last (the stages
    that follow synthetic gradients under DNI; the last learns from the loss itself), else `optimizer`."""
    return lower_optimizer if lower_optimizer is not None and index < num_stages - 1 else optimizer


def stage_optimizer(make: OptimizerFactory, stage: nn.Module, index: int) -> torch.optim.Optimizer:
    """Stage `index`'s optimizer (0-based; messages count from 1, as check_output's), from the factory;
    ConfigError for a stage with no parameters to train."""
    params = list(stage.parameters())
    if not params:
        raise ConfigError(f"stage {index + 1} ({type(stage).__name__}) has no parameters: every stage needs something "
                          "to train; join it to a neighbouring stage (sg.cut never makes such a stage)")
    return make(iter(params))  # the factory gets what stage.parameters() gives: an iterator


def check_signature(model: nn.Module, where: str) -> None:
    """Refuse, with what to write, a synthesizer that cannot be called as synth(h, context)."""
    try:
        inspect.signature(model.forward).bind(None, None)
    except TypeError:
        raise ConfigError(f"{where}: its synthesizer {type(model).__name__} cannot be called as synth(h, context); "
                          "give its forward the signature forward(self, h, context=None) (context is None for DNI "
                          "and the one-hot label [B, num_classes] for cDNI)") from None
    except ValueError:  # no signature to read (a builtin): calls will tell
        pass


@dataclass
class _Pending:
    """A step of this stage whose target has not arrived yet."""

    step: int
    h: torch.Tensor  # h_k, detached, [B, ...]
    context: torch.Tensor | None
    prediction: torch.Tensor | None  # the synthetic gradient it applied, graph kept; None: none, or stale
    predicted: bool  # a prediction was made (so BN statistics of the synthesizer already saw h)
    local: torch.Tensor | None = None  # the local loss's gradient it mixed in, if any (localloss.py), [B, ...]


@dataclass
class _SyntheticInput:
    """Complete unlock: a step's synthetic input, until the real activation of that step arrives."""

    prediction: torch.Tensor | None  # graph kept; None when stale (the forward interface moved since)
    updated: bool  # whether the stage updated on that step (the forward interface regresses only then)


class StageRule:
    """Stage `index`'s whole rule: its stage, optimizer and interfaces, and the update draws.

    interface: the backward interface above this stage (DNI, cDNI); None for the last stage and for
        the locked pipeline, whose gradient from above is handed to `step` as `upstream`.
    forward_interface: the complete unlock's interface in front of this stage (index >= 1).
    update_prob: this stage's backward pass and update happen with this probability on each step,
        drawn from the stage's own generator (seeded from `seed` and `index`), so that one process
        per stage draws what a single process draws.
    keep: how many steps may wait for their targets (older ones are dropped as too stale).
    """

    def __init__(self, index: int, stage: nn.Module, optimizer: torch.optim.Optimizer, *,
                 interface: BackwardInterface | None = None, forward_interface: ForwardInterface | None = None,
                 loss_fn: LossFn = F.cross_entropy, update_prob: float = 1.0, seed: int = 0, keep: int = 16):
        self.index, self.stage, self.optimizer = index, stage, optimizer
        self.interface, self.forward_interface = interface, forward_interface
        for i, where in ((interface, f"the interface above stage {index + 1}"),
                         (forward_interface, f"the forward interface in front of stage {index + 1}")):
            if i is not None and getattr(i, "calls_model_with_context", True):
                check_signature(i.model, where)
        self.loss_fn, self.update_prob = loss_fn, update_prob
        self.generator = torch.Generator().manual_seed(seed * 1009 + 7 + index)
        self.pending: deque[_Pending] = deque(maxlen=keep)
        self.synthetic_inputs: dict[int, _SyntheticInput] = {}
        self.dropped = 0  # targets that came for steps no longer pending (too stale)
        self.lr_factor = 1.0  # the schedule's factor on every initial learning rate (set_lr_factor)

    # -- the step --------------------------------------------------------------------------------
    def draw_update(self) -> bool:
        """Whether this step updates the stage: always at update_prob 1, else a draw from its generator."""
        return self.update_prob >= 1.0 or bool(torch.rand(1, generator=self.generator) < self.update_prob)

    def step(self, inp: torch.Tensor | None, labels: torch.Tensor, step: int, *,
             context: torch.Tensor | None = None, network_input: torch.Tensor | None = None,
             upstream: GradientFn | None = None, on_output: Callable[[torch.Tensor], None] | None = None,
             input_grad: bool = True, keep_graph: bool = True) -> StageResult:
        """One step of this stage on `inp` (h_(k-1)); under the complete unlock on a synthetic input
        predicted from `network_input` instead (inp is then ignored).

        upstream: the gradient from above for a stage without an interface that is not the last one
            (the locked pipeline waits for the true gradient there).
        on_output: called with h_k (detached) as soon as it exists (a pipeline sends it up there).
        input_grad: keep the gradient at the stage input (the target of the interface below).
        keep_graph: keep the predictions' graphs until their targets come, so that the regression
            reuses them. False when the targets will come after the interface has moved anyway (an
            asynchronous pipeline): predicting without a graph is cheaper, and the regression
            predicts again.
        """
        update = self.draw_update()
        frozen = contextlib.nullcontext()
        if self.forward_interface is not None:
            if network_input is None:
                raise ValueError(f"stage {self.index + 1} has a forward interface: step() needs network_input")
            with contextlib.nullcontext() if keep_graph else torch.no_grad():
                synthetic = self.forward_interface.predict(network_input, context)
            self.synthetic_inputs[step] = _SyntheticInput(synthetic if update and keep_graph else None, update)
            inp = synthetic.detach()
            # Batch statistics of a synthetic input must not reach BN running statistics; the
            # real input's forward pass (take_real_input) updates them.
            frozen = frozen_batchnorm_stats([self.stage])
        assert inp is not None
        if self.interface is not None and self.interface.trust:
            # The stage moves at its (scheduled) rate times the trust in the synthetic gradients it gets.
            set_lr_factor([self.optimizer], self.lr_factor * float(self.interface.trust_factor))
        prediction: list[torch.Tensor] = []
        local: list[torch.Tensor | None] = []
        grad_fn = upstream
        if self.interface is not None:
            interface = self.interface

            def grad_fn(out: torch.Tensor) -> torch.Tensor:
                with contextlib.nullcontext() if keep_graph else torch.no_grad():
                    p = self._predict(out, context)
                check_finite(p, "synthetic gradient", self.index, step)
                prediction.append(p)
                local.append(interface.local_gradient(out, context))  # None unless a local loss is mixed in
                return interface.stage_gradient(p, step, conditioned=context is not None, local=local[0])

        with frozen:
            res = stage_step(self.stage, self.optimizer, inp, index=self.index, step=step, output_grad=grad_fn,
                             labels=labels, loss_fn=self.loss_fn, input_grad=input_grad, update=update,
                             on_output=on_output)
        if self.interface is not None:
            p = prediction[0] if prediction else None
            self.pending.append(_Pending(step, res.output, context, p if keep_graph else None, p is not None,
                                         local[0] if local else None))
        return res

    def _predict(self, h: torch.Tensor, context: torch.Tensor | None) -> torch.Tensor:
        """The interface above's synthetic gradient for h_k, checked to be shaped like h_k."""
        assert self.interface is not None
        p = self.interface.predict(h, context)
        if p.shape != h.shape:
            raise ConfigError(f"the synthesizer of the interface above stage {self.index + 1} "
                              f"({type(self.interface.model).__name__}) returned a tensor of shape {list(p.shape)}; "
                              f"it must return one shaped like the activation it sits on, {list(h.shape)}")
        return p

    # -- the interface above: regression onto the target -----------------------------------------
    def take_target(self, step: int, target: torch.Tensor | None) -> float | None:
        """The interface above regresses onto `target` (dL/dh_k of `step`, batch-mean units): the
        gradient that reached the stage above's input, or None when that stage skipped its update.
        Returns the synthesizer's loss, or None when there was nothing to regress."""
        assert self.interface is not None, "take_target needs a backward interface above the stage"
        while self.pending and self.pending[0].step < step:
            self.pending.popleft()  # steps whose target never came (the stage above skipped its update)
        if not self.pending or self.pending[0].step != step:
            if target is not None:
                self.dropped += 1  # its activation left the bounded history: too stale to use
            return None
        p = self.pending.popleft()
        if target is None or not self.interface.accept_target():
            return None
        prediction = p.prediction
        if prediction is None:
            # No prediction (the stage skipped its update), or a stale one (the synthesizer has moved
            # since, and graphs do not outlive a parameter update): predict now. When one was made
            # already, its BN statistics saw h once; this pass leaves them alone.
            with frozen_batchnorm_stats([self.interface.model]) if p.predicted else contextlib.nullcontext():
                prediction = self._predict(p.h, p.context)
        # (local only when there is one: an interface subclass written before local losses keeps working)
        loss = (self.interface.update(prediction, target) if p.local is None
                else self.interface.update(prediction, target, local=p.local))
        for q in self.pending:  # the synthesizer just moved: the other predictions' graphs are stale
            q.prediction = None
        return loss

    # -- the interface in front: the real input (complete unlock) --------------------------------
    def take_real_input(self, step: int, real: torch.Tensor, *, network_input: torch.Tensor | None = None,
                        context: torch.Tensor | None = None) -> tuple[torch.Tensor, float | None]:
        """Complete unlock: the real h_(k-1) of `step` arrived. The forward interface regresses onto it
        (when the stage updated on that step), then the stage runs it forward without a graph, which
        also moves BN running statistics. Returns (the real h_k, the forward interface's loss or None).

        network_input, context: that step's network input and context, needed only when the forward
            interface has moved since the step (then its prediction is made again)."""
        fi = self.forward_interface
        assert fi is not None, "take_real_input needs a forward interface in front of the stage"
        loss = None
        entry = self.synthetic_inputs.pop(step, None)
        for s in [s for s in self.synthetic_inputs if s < step]:
            del self.synthetic_inputs[s]  # steps whose real input will never come
        if entry is not None and entry.updated:
            prediction = entry.prediction
            if prediction is None:
                if network_input is None:
                    raise ValueError("the forward interface moved since this step: pass its network_input")
                with frozen_batchnorm_stats([fi.model]):
                    prediction = fi.predict(network_input, context)
            if prediction.shape != real.shape:
                raise ConfigError(f"the forward interface in front of stage {self.index + 1} "
                                  f"({type(fi.model).__name__}) predicted a tensor of shape {list(prediction.shape)}; "
                                  f"the real input of the stage has shape {list(real.shape)}")
            loss = fi.update(prediction, real)
            for later in self.synthetic_inputs.values():  # the forward interface just moved
                later.prediction = None
        with torch.no_grad():
            out = run_stage(self.stage, real)
        return out, loss

    # -- bookkeeping -----------------------------------------------------------------------------
    def set_lr_factor(self, factor: float) -> None:
        """Scale every learning rate of this stage's rule to `factor` x its initial value (a schedule's step);
        a stage below a trusting interface also gets the interface's trust factor at each step."""
        self.lr_factor = factor
        set_lr_factor(self.optimizers(), factor)

    def optimizers(self) -> list[torch.optim.Optimizer]:
        """Every optimizer of this stage's rule: the stage's, then its interfaces'."""
        return [self.optimizer] + [i.optimizer for i in (self.interface, self.forward_interface) if i is not None]

    def state_dict(self) -> dict:
        return {"stage": self.stage.state_dict(), "optimizer": self.optimizer.state_dict(),
                "interface": None if self.interface is None else self.interface.state_dict(),
                "forward_interface": None if self.forward_interface is None else self.forward_interface.state_dict(),
                "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.stage.load_state_dict(state["stage"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.interface is not None:
            self.interface.load_state_dict(state["interface"])
        if self.forward_interface is not None:
            self.forward_interface.load_state_dict(state["forward_interface"])
        if state.get("generator") is not None:
            self.generator.set_state(state["generator"])
