"""Training rules (methods) in one process: backprop, DNI and cDNI over any model cut into stages.

A rule owns one ``StageRule`` per stage (``synthgrad.stage``: the per-stage rule, written once).
``DNI.step`` runs them stage after stage; the pipeline engine runs the very same ``StageRule``
methods in one process per stage. ``Backprop`` is the baseline: one backward pass through the
composed stages.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from synthgrad.boundary import run_stage
from synthgrad.cutting import uncut
from synthgrad.defaults import DNI_SYNTH_LR, DefaultForwardInterfaces, DefaultInterfaces
from synthgrad.diagnostics import check_finite, gradient_agreement, parameter_agreement, true_gradient
from synthgrad.errors import ConfigError
from synthgrad.health import Health, rms
from synthgrad.interfaces import (
    BackwardInterface,
    ForwardInterface,
    Interface,
    OptimizerFactory,
    adam,
    optimizer_to,
)
from synthgrad.labels import check_num_classes, context
from synthgrad.stage import LossFn, StageRule, check_output, check_unshared, stage_factory, stage_optimizer

METHODS = ("backprop", "dni", "cdni")
TARGETS = ("bootstrap", "backprop")
UNLOCKS = ("update", "complete")
Schedule = Callable[[int], float]  # step (0-based) -> multiplier of every learning rate


class StepRule:
    """A method's training step over stages; owns one StageRule per stage (stage, optimizer, interfaces).

    optimizer: an optimizer factory, called once per stage with its parameters: `sg.adam(lr)`,
        `sg.sgd(lr)`, or any callable `params -> torch.optim.Optimizer`. Default: Adam at `lr`.
    schedule: optional; before each step every learning rate is set to schedule(step) x its
        initial value (e.g. `sg.cosine_schedule(total_steps)`). Call `set_lr_factor` yourself instead
        if you prefer.
    lower_optimizer: optional; the factory for every stage but the last (under DNI the stages that follow
        synthetic gradients), which then no longer use `optimizer`.
    """

    method = "backprop"

    def __init__(self, stages: Sequence[nn.Module], lr: float = 1e-3, optimizer: OptimizerFactory | None = None,
                 loss_fn: LossFn = F.cross_entropy, update_prob: float = 1.0, seed: int = 0,
                 interfaces: Sequence[BackwardInterface | None] | None = None,
                 forward_interfaces: Sequence[ForwardInterface] | None = None, schedule: Schedule | None = None,
                 lower_optimizer: OptimizerFactory | None = None):
        if not 0.0 <= update_prob <= 1.0:
            raise ConfigError(f"update_prob must lie in [0, 1], got {update_prob}")
        if not stages:
            raise ConfigError("a rule needs at least one stage")
        check_unshared(stages)
        make = optimizer or adam(lr)
        n = len(stages)
        above = list(interfaces or [None] * (n - 1)) + [None]  # the last stage has the loss above it
        front = [None, *(forward_interfaces or [None] * (n - 1))]  # nothing in front of the first stage
        self.stage_rules = [StageRule(k, s, stage_optimizer(stage_factory(make, lower_optimizer, k, n), s, k),
                                      interface=above[k],
                                      forward_interface=front[k], loss_fn=loss_fn, update_prob=update_prob, seed=seed)
                            for k, s in enumerate(stages)]
        self.stages = nn.ModuleList(stages)
        self.loss_fn, self.update_prob, self.schedule = loss_fn, update_prob, schedule
        self.steps = 0

    # -- what a rule is made of ----------------------------------------------------------------
    @property
    def optimizers(self) -> list[torch.optim.Optimizer]:
        """The stages' optimizers, stage by stage."""
        return [r.optimizer for r in self.stage_rules]

    @property
    def interfaces(self) -> list[BackwardInterface]:
        """The backward interfaces, boundary by boundary (empty for backprop)."""
        return [r.interface for r in self.stage_rules if r.interface is not None]

    @property
    def forward_interfaces(self) -> list[ForwardInterface]:
        """The complete unlock's forward interfaces, in front of stages 2..K (empty otherwise)."""
        return [r.forward_interface for r in self.stage_rules if r.forward_interface is not None]

    def all_interfaces(self) -> list[Interface]:
        return [*self.interfaces, *self.forward_interfaces]

    def network(self) -> nn.Sequential:
        """A copy of the plain composed network, in eval mode: what evaluation runs, with no synthesizer
        cost. It is a snapshot: training the rule further does not change it, and putting it in eval
        mode leaves the training stages alone."""
        return copy.deepcopy(nn.Sequential(*self.stages)).eval()

    def model_state_dict(self) -> dict:
        """The parameters and buffers keyed by layer, whatever the cut (see `synthgrad.cutting.uncut`): they
        load into the model uncut, or cut into any number of stages by `sg.cut`."""
        return uncut(list(self.stages)).state_dict()

    # -- a step ----------------------------------------------------------------------------------
    def step(self, x: torch.Tensor, y: torch.Tensor, diagnose: bool = False) -> dict:
        """One training step on the batch (x [B, ...], y [B] or soft [B, K]); its statistics (see the subclass)."""
        raise NotImplementedError

    def _begin_step(self, x: torch.Tensor, y: torch.Tensor) -> None:
        if len(x) != len(y):
            raise ConfigError(f"the batch holds {len(x)} inputs but {len(y)} labels: pass one label per example")
        if self.schedule is not None:
            self.set_lr_factor(self.schedule(self.steps))

    def set_lr_factor(self, factor: float) -> None:
        """Scale every learning rate (stages and synthesizers) to `factor` x its initial value."""
        for r in self.stage_rules:
            r.set_lr_factor(factor)

    # -- nn.Module-like bookkeeping ------------------------------------------------------------------
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
        return {"method": self.method, "steps": self.steps, "stage_rules": [r.state_dict() for r in self.stage_rules]}

    def load_state_dict(self, state: dict) -> None:
        if "stage_rules" not in state:
            state = _from_flat_state(state, len(self.stage_rules))
        if state["method"] != self.method:
            raise ConfigError(f"the state was saved by a {state['method']} rule, not {self.method}")
        if len(state["stage_rules"]) != len(self.stage_rules):
            raise ConfigError(f"the state holds {len(state['stage_rules'])} stages, this rule "
                              f"{len(self.stage_rules)}: build the rule with the same cut")
        for r, s in zip(self.stage_rules, state["stage_rules"], strict=True):
            r.load_state_dict(s)
        self.steps = state["steps"]


def _from_flat_state(state: dict, n: int) -> dict:
    """A rule's state as saved before 2026-11-30 (one flat dict for all stages), in today's per-stage layout.

    The update-draw generators were one for all stages then; each stage's starts afresh from its seed."""
    def part(sd: dict, k: int) -> dict:
        return {name[len(f"{k}."):]: v for name, v in sd.items() if name.startswith(f"{k}.")}

    above, front = state.get("interfaces", []), state.get("forward_interfaces", [])
    return {"method": state["method"], "steps": state["steps"], "stage_rules": [
        {"stage": part(state["stages"], k), "optimizer": state["optimizers"][k],
         "interface": above[k] if k < len(above) else None,
         "forward_interface": front[k - 1] if 0 < k <= len(front) else None, "generator": None}
        for k in range(n)]}


class Backprop(StepRule):
    """Plain backpropagation through the composed stages (the baseline)."""

    method = "backprop"

    def step(self, x: torch.Tensor, y: torch.Tensor, diagnose: bool = False) -> dict:
        """One backprop step; returns {"train_loss": float}. With update_prob < 1 the backward pass still
        reaches every stage, and each stage applies its update only with probability update_prob."""
        self._begin_step(x, y)
        out = x
        for s in self.stages:
            out = s(out)
        loss = self.loss_fn(out, y)
        check_finite(loss, "loss", len(self.stages) - 1, self.steps)
        loss.backward()
        for r in self.stage_rules:
            if r.draw_update():
                r.optimizer.step()
            r.optimizer.zero_grad(set_to_none=True)
        self.steps += 1
        return {"train_loss": loss.item()}


class DNI(StepRule):
    """Decoupled Neural Interfaces: every stage but the last updates with a synthetic gradient.

    interfaces: one BackwardInterface per boundary (len(stages) - 1); any nn.Module called as
        synth(h, context) and returning a tensor shaped like h can be its synthesizer.
    conditioned: cDNI, the synthesizers also see the one-hot label as context (needs num_classes).
        Custom synthesizers then receive that context: build them with room for it.
    target: "bootstrap" (paper, default): the synthesizer below stage k+1 regresses onto the
        gradient that reaches stage k+1's input, itself made of stage k+1's synthetic gradient;
        only the last interface sees the true loss gradient. "backprop": onto the true gradient
        of the loss through all stages above (the original reimplementation's simulation).
    forward_interfaces: for the complete unlock, one per stage k >= 1: stage k then runs on a
        synthetic input predicted from the network input instead of waiting for stage k-1; each
        forward interface regresses onto the real activation, computed by a forward-only pass.
    health: how often to sample the synthetic gradients against the true ones and the activations'
        RMS, and when to warn (`synthgrad.health.Health`; default: every 100 steps).
    """

    method = "dni"

    def __init__(self, stages: Sequence[nn.Module], interfaces: Sequence[BackwardInterface],
                 lr: float = 1e-3, optimizer: OptimizerFactory | None = None,
                 loss_fn: LossFn = F.cross_entropy, conditioned: bool = False,
                 num_classes: int | None = None, target: str = "bootstrap",
                 update_prob: float = 1.0, seed: int = 0,
                 forward_interfaces: Sequence[ForwardInterface] | None = None, schedule: Schedule | None = None,
                 health: Health | None = None, lower_optimizer: OptimizerFactory | None = None):
        if len(interfaces) != len(stages) - 1:
            raise ConfigError(f"{len(stages)} stages need {len(stages) - 1} interfaces, got {len(interfaces)}")
        if forward_interfaces and len(forward_interfaces) != len(stages) - 1:
            raise ConfigError(f"{len(stages)} stages need {len(stages) - 1} forward interfaces, "
                              f"got {len(forward_interfaces)}")
        if target not in TARGETS:
            raise ConfigError(f"unknown target {target!r}; choose one of: {', '.join(TARGETS)}")
        if conditioned and not num_classes:
            raise ConfigError("cDNI (conditioned=True) needs num_classes to build the one-hot context")
        super().__init__(stages, lr, optimizer, loss_fn, update_prob, seed, interfaces, forward_interfaces, schedule,
                         lower_optimizer)
        self.conditioned, self.num_classes, self.target = conditioned, num_classes, target
        self.health = health if health is not None else Health()
        if conditioned:
            self.method = "cdni"

    @classmethod
    def build(cls, stages: Sequence[nn.Module], sample: torch.Tensor, *, conditioned: bool = False,
              num_classes: int | None = None, lr: float = 1e-3, synth_lr: float | None = None,
              synth_hidden: int | None = None, synth_width: int | None = None,
              synth_scale: float = 1.0, synth_warmup: int = 0, synth_rank: int | None = None,
              synth_every: int = 1, synth_center: bool | None = None, synth_classifier: bool | None = None,
              synth_trust: bool = False, synth_local: bool | None = None, synth_mean_token: bool | None = None,
              lower_lr: float | None = None, unlock: str = "update", input_hidden: int = 1, input_width: int = 1024,
              **kwargs) -> DNI:
        """DNI over `stages` with a default synthesizer at every boundary.

        sample: one input batch [B, ...], used to find each boundary's activation shape.
        synth_lr: the synthesizers' Adam learning rate; default 1e-4 for DNI, 1e-3 for cDNI (defaults.py).
        synth_hidden: hidden layers per synthesizer; default 2 for DNI and 0 (linear) for cDNI.
        synth_rank: low-rank linear synthesizers of this rank for vector activations (the label embedded).
        synth_every: each synthesizer regresses onto every this-many-th target only.
        synth_center: the stages apply the synthetic gradient minus its batch mean (BackwardInterface);
            default on for cDNI, off for DNI.
        synth_classifier: each synthesizer also carries a local classifier's input gradient
            (ClassifierGradient); default on for cDNI, off for DNI.
        synth_local: each stage below an interface mixes a local loss's gradient (an auxiliary classifier on
            its output) into its synthetic gradient, by the least-squares fit of the targets by the two
            (BackwardInterface(local_loss=...), localloss.py); default on for cDNI, off for DNI.
        synth_mean_token: token synthesizers also add a map of the mean token to every position
            (TokenSynthesizer(mean_token=...)); default on for cDNI, off for DNI.
        synth_trust: each stage below an interface moves at its learning rate times the interface's trust
            factor (BackwardInterface); off by default.
        lower_lr: the Adam learning rate of every stage below an interface (those that follow synthetic
            gradients); the last stage keeps `lr`. Default: `lr`. Not with `optimizer` (give lower_optimizer).
        unlock: "update" (synthetic gradients) or "complete" (also synthetic inputs, with
            input synthesizers of `input_hidden` layers of `input_width`, trained at synth_lr, default 1e-4).
        kwargs: passed on to DNI (optimizer, lower_optimizer, target, update_prob, seed, loss_fn, schedule, health).
        """
        if unlock not in UNLOCKS:
            raise ConfigError(f"unknown unlock {unlock!r}; choose one of: {', '.join(UNLOCKS)}")
        if lower_lr is not None:
            if kwargs.get("optimizer") is not None or kwargs.get("lower_optimizer") is not None:
                raise ConfigError("lower_lr sets the lower stages' Adam rate; with an optimizer factory of your own, "
                                  "pass lower_optimizer=sg.adam(...) or sg.sgd(...) instead of lower_lr")
            if not lower_lr > 0:
                raise ConfigError(f"lower_lr must be positive, got {lower_lr}")
            kwargs["lower_optimizer"] = adam(lower_lr)
        specs = activation_specs(stages, sample)
        shapes = [shape for shape, _ in specs]
        check_num_classes(shapes[-1], num_classes, kwargs.get("loss_fn", F.cross_entropy))
        make = DefaultInterfaces(conditioned, num_classes, synth_hidden, synth_width, synth_lr, synth_scale,
                                 synth_warmup, synth_rank, synth_every, synth_center, synth_classifier, synth_trust,
                                 synth_local, synth_mean_token)
        interfaces = [make(k, shape) for k, shape in enumerate(shapes[:-1])]
        for iface, (_, dtype) in zip(interfaces, specs, strict=False):
            if dtype.is_floating_point:  # a float64 (or bfloat16) model gets synthesizers of its own precision
                iface.model.to(dtype)
        forward = None
        if unlock == "complete":
            make_input = DefaultForwardInterfaces(conditioned, num_classes, input_hidden, input_width,
                                                  synth_lr if synth_lr is not None else DNI_SYNTH_LR)
            forward = [make_input(k + 1, tuple(sample.shape[1:]), shape) for k, shape in enumerate(shapes[:-1])]
        return cls(stages, interfaces, lr=lr, conditioned=conditioned, num_classes=num_classes,
                   forward_interfaces=forward, **kwargs)

    def context(self, y: torch.Tensor) -> torch.Tensor | None:
        """The synthesizers' context: the label [B, num_classes] for cDNI (one-hot, or the soft labels given),
        else None."""
        return context(y, self.num_classes) if self.conditioned else None

    def step(self, x: torch.Tensor, y: torch.Tensor, diagnose: bool | None = None) -> dict:
        """One DNI step on the batch (x [B, ...], y [B]): every stage updates with its synthetic gradient
        (the last with the loss), and every synthesizer regresses onto its target.

        diagnose: measure each synthetic gradient against the true gradient (one extra forward and
            backward pass through the stages above each boundary) and each boundary's activation RMS.
            None (default): on the health schedule's steps (every `health.every`); True / False: now / not.
        Returns {"train_loss": float, "synth_loss": [per interface, None where no target came],
            "input_loss": [...] (complete unlock); on a diagnosed step also "grad_cosine",
            "grad_rel_error" (the synthesizer's prediction against the true gradient), "applied_cosine" and
            "applied_rel_error" (what the stage below applied against it: the prediction centred, scaled and
            mixed with a local loss's gradient; the health warnings judge this one), "param_cosine" and
            "param_rel_error" (the stage's parameter gradient under what it applied against under the true
            gradient: what its update followed), "act_rms" and
            "act_rms_drift" (RMS over its first sample), and "mix_synthetic" and "mix_local", the (a, b) of a
            stage's local-loss mix (None without one): [per interface]}.
        """
        diagnose = self.health.due(self.steps) if diagnose is None else diagnose
        self._begin_step(x, y)
        ctx = self.context(y)
        rules, last, t = self.stage_rules, len(self.stage_rules) - 1, self.steps
        complete = bool(self.forward_interfaces)
        synth_loss: list[float | None] = [None] * last
        input_loss: list[float | None] = [None] * last
        cosine: list[float | None] = [None] * last
        rel_error: list[float | None] = [None] * last
        applied_cos: list[float | None] = [None] * last
        applied_rel: list[float | None] = [None] * last
        param_cos: list[float | None] = [None] * last
        param_rel: list[float | None] = [None] * last
        act_rms: list[float | None] = [None] * last
        true_below: torch.Tensor | None = None  # dL/dh_(k-1), for "backprop" targets
        h, real, loss = x, x, None  # real: the real activation, under the complete unlock
        for k, rule in enumerate(rules):
            inp = real if complete else h  # the stage's real input, h_(k-1) (diagnosis only)
            res = rule.step(h, y, t, context=ctx, network_input=x, input_grad=k > 0)
            if k > 0:  # the interface below regresses onto what reached this stage's input
                target = true_below if self.target == "backprop" else res.input_grad
                synth_loss[k - 1] = rules[k - 1].take_target(t, target)
            true_below = None
            if k < last and res.updated and (diagnose or self.target == "backprop"):
                # Exact dL/dh_k now: the stages above have not moved yet on this step.
                true_below = true_gradient(self.stages[k + 1:], res.output, y, self.loss_fn)
                if diagnose:
                    pending = rule.pending[-1]
                    cosine[k], rel_error[k] = gradient_agreement(pending.prediction, true_below)
                    # What the stage learned from (centred, scaled, mixed with a local loss): the health
                    # judgement's subject. Recomputed exactly: the mix moves only when a target arrives.
                    applied = rule.interface.stage_gradient(pending.prediction, t, conditioned=ctx is not None,
                                                            local=pending.local)  # [B, ...], batch-mean units
                    applied_cos[k], applied_rel[k] = gradient_agreement(applied * applied.shape[0], true_below)
                    # What the stage's update followed: the parameter gradients under both (the stage has just
                    # taken this step's update; one step's change in its Jacobian is left out).
                    agreement = parameter_agreement(rule.stage, inp, applied, true_below)
                    if agreement is not None:
                        param_cos[k], param_rel[k] = agreement
            if diagnose and k < last:
                act_rms[k] = rms(res.output)
            h, loss = res.output, res.loss
            if complete and k > 0:
                real, input_loss[k - 1] = rule.take_real_input(t, real, network_input=x, context=ctx)
            elif complete:
                real = res.output  # the first stage runs on the real input: its output is the real h_1
        if complete:  # report the real network's loss, not the synthetic-input path's
            loss = self.loss_fn(real, y).detach()
        self.steps += 1
        stats: dict = {"train_loss": loss.item() if loss is not None else None, "synth_loss": synth_loss}
        if complete:
            stats["input_loss"] = input_loss
        if diagnose:
            stats["grad_cosine"], stats["grad_rel_error"] = cosine, rel_error
            stats["applied_cosine"], stats["applied_rel_error"] = applied_cos, applied_rel
            stats["param_cosine"], stats["param_rel_error"] = param_cos, param_rel
            # How each stage mixes its local loss in, a c + b l (localloss.py); None where it has none.
            mixes = [None if getattr(i, "local", None) is None else i.local.coefficients() for i in self.interfaces]
            stats["mix_synthetic"] = [None if m is None else m[0] for m in mixes]
            stats["mix_local"] = [None if m is None else m[1] for m in mixes]
            stats.update(self.health.observe(t, applied_rel, act_rms, self.conditioned,
                                             local=[m is not None for m in mixes], param_cosine=param_cos))
        return stats

    def state_dict(self) -> dict:
        return {**super().state_dict(), "health": self.health.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        if "health" in state:
            self.health.load_state_dict(state["health"])


def activation_shapes(stages: Sequence[nn.Module], sample: torch.Tensor) -> list[tuple[int, ...]]:
    """The per-example shape of each stage's output, from one forward pass in eval mode."""
    return [shape for shape, _ in activation_specs(stages, sample)]


def activation_specs(stages: Sequence[nn.Module], sample: torch.Tensor) -> list[tuple[tuple[int, ...], torch.dtype]]:
    """The per-example shape and the dtype of each stage's output, from one forward pass in eval mode."""
    specs, h = [], sample
    with torch.no_grad():
        for k, s in enumerate(stages):
            was = s.training
            s.eval()
            h = check_output(run_stage(s, h), k)  # a copy: `sample` is the caller's
            s.train(was)
            if h.dim() == 0 or len(h) != len(sample):
                raise ConfigError(f"stage {k + 1} maps a batch of {len(sample)} to an output of shape {list(h.shape)}: "
                                  f"a boundary's first dimension must be the batch. A sequence-first layer "
                                  "(nn.LSTM, nn.GRU, nn.TransformerEncoderLayer without batch_first=True) gives "
                                  "[T, B, ...]: pass batch_first=True or transpose inside the stage")
            specs.append((tuple(h.shape[1:]), h.dtype))
    return specs
