"""Health of a decoupled run, watched by sampling: do the synthetic gradients agree with the true ones, and do
the activations at the boundaries stay in range? It warns once per problem, with what to try.

Every `every` steps the rule measures, per interface, the synthetic gradient against the true one
(cosine, and the error relative to the true gradient's norm), both as the synthesizer predicted it and as
the stage below applied it (centred, scaled, and mixed with a local loss's gradient where there is one),
and the RMS of each boundary's activation. An interface is *no better than nothing* when what its stage
applied lies farther from the true gradient than zero does (relative error >= 1) in most samples of a
sustained window: the stage then learns nothing or drifts. The applied gradient is judged, not the
prediction, because a stage that a local loss carries learns while its synthesizer still lags. An
activation *runs away* when its RMS grows past `runaway` times its first sample, or times `unit_rms` (1)
if it started below that: an activation initialised small grows to the unit scale of a normalised network
by learning alone (a tanh MLP's last boundary grows 5.1x under backprop, benchmarks/results/health-check-growth.md).
"""

from __future__ import annotations

import statistics
import warnings
from dataclasses import dataclass, field

import torch


class HealthWarning(UserWarning):
    """A decoupled run looks unhealthy: a synthesizer no better than nothing, or activations running away."""


def rms(h: torch.Tensor) -> float:
    """Root mean square of an activation, over the batch and every feature."""
    return h.detach().double().pow(2).mean().sqrt().item()


@dataclass
class Health:
    """The sampled health figures of one rule's interfaces, and the warnings already given.

    every: sample every this many steps (0: never, unless a step asks with diagnose=True).
    window: samples that make a sustained judgement. runaway: RMS growth that counts as running away, over
    the first sample's RMS or `unit_rms`, whichever is larger.
    warmup: steps before any judgement (a fresh synthesizer predicts zero: no better than nothing, yet).
    """

    every: int = 100
    window: int = 10
    runaway: float = 5.0
    warmup: int = 500
    unit_rms: float = 1.0
    rel_errors: list[list[float]] = field(default_factory=list)  # per interface, the recent samples
    param_cosines: list[list[float]] = field(default_factory=list)  # per interface, the recent samples
    first_rms: list[float | None] = field(default_factory=list)
    warned: set[str] = field(default_factory=set)

    def due(self, step: int) -> bool:
        return self.every > 0 and step % self.every == 0

    def observe(self, step: int, rel_error: list[float | None], act_rms: list[float | None],
                conditioned: bool = False, local: list[bool] | None = None,
                param_cosine: list[float | None] | None = None) -> dict:
        """Take one sample (per interface); returns the figures for the step's stats, and warns if it must.
        rel_error: of the gradient each stage applied, against the true one. conditioned: the synthesizers
        see the label (cDNI), so the advice leaves out what is on already. local: per interface, whether its
        stage mixes in a local loss (the message says so). param_cosine: per interface, the cosine of the
        stage's parameter gradient under what it applied to that under the true gradient (the message gives
        its median: what the stage's updates still follow)."""
        n = len(act_rms)
        if not self.first_rms:
            self.first_rms, self.rel_errors = [None] * n, [[] for _ in range(n)]
        if len(self.param_cosines) != n:  # a fresh judge, or one restored from a state without them
            self.param_cosines = [[] for _ in range(n)]
        for k, c in enumerate(param_cosine or []):
            if c is not None:
                self.param_cosines[k] = (self.param_cosines[k] + [c])[-self.window:]
        drift: list[float | None] = [None] * n
        for k in range(n):
            if act_rms[k] is not None:
                if self.first_rms[k] is None:
                    self.first_rms[k] = act_rms[k]
                base = self.first_rms[k]
                drift[k] = act_rms[k] / base if base else None
            if rel_error[k] is not None:
                self.rel_errors[k] = (self.rel_errors[k] + [rel_error[k]])[-self.window:]
        if step >= self.warmup:
            # Growth over max(first, unit): from a small initialisation up to the unit scale is learning.
            growth = [None if a is None or f is None else a / max(f, self.unit_rms)
                      for a, f in zip(act_rms, self.first_rms, strict=True)]
            self._judge(step, drift, growth, conditioned, local or [False] * n)
        return {"act_rms": act_rms, "act_rms_drift": drift}

    def _judge(self, step: int, drift: list[float | None], growth: list[float | None], conditioned: bool,
               local: list[bool]) -> None:
        for k, errors in enumerate(self.rel_errors):
            if len(errors) >= self.window and statistics.median(errors) >= 1.0:
                first = ("The label is given already (cDNI); try" if conditioned else
                         "Try cDNI (conditioned=True: the label makes the gradient predictable; its synthesizers "
                         "also get a local classifier's gradient term unless classifier=False, and their stages a "
                         "local loss unless local_loss=False),")
                what = ("its synthesizer's prediction mixed with its local loss's gradient" if local[k] else
                        "its synthesizer's prediction")
                # Without the label a synthesizer can at best predict E[dL/dh | h], which shrinks once the stages
                # above fit the labels (zoo-notes, section 13). What is left can still add up over many steps: a
                # 4-stage LSTM whose lower stages stopped at step 500 ended 6.4 points lower (section 14).
                why = ("" if conditioned else "Without the label this is expected once the stages above fit the "
                       "training labels: a synthesizer then has little of the gradient left to predict at each "
                       "step, though what stays consistent over many steps can still teach the stage, so compare "
                       "the run with its lower stages frozen before you act. ")
                cosines = self.param_cosines[k]  # observe keeps one window per interface
                update = (f"; the stage's parameter updates follow the true ones at a median cosine of "
                          f"{statistics.median(cosines):.2f} over the same samples" if cosines else "")
                self._warn(f"useless-{k}", (
                    f"step {step}: the gradient that stage {k + 1} learns from ({what}, as applied) has been no "
                    f"better than nothing for the last {self.window} samples (it lies farther from the true "
                    f"gradient than zero: median relative error {statistics.median(errors):.2f}{update}). The stage "
                    f"learns little or drifts. {why}{first} a faster synthesizer (synth_lr=1e-3, cDNI's default, so "
                    "that it keeps up with its stage), stages that move at their rate times their interface's trust "
                    "(sg.BackwardInterface(..., trust=True), --synth-trust), SGD stages (optimizer=sg.sgd(...)), "
                    "a lower stage learning rate, or fewer stages"))
        for k, (d, g) in enumerate(zip(drift, growth, strict=True)):
            if d is not None and g is not None and g > self.runaway:
                self._warn(f"runaway-{k}", (
                    f"step {step}: the activation above stage {k + 1} has grown {d:.1f}x in RMS since the first "
                    "sample: the synthetic gradient pushes the stage where the true one would not. Unless they are on "
                    "already (cDNI's defaults), try a faster synthesizer (synth_lr=1e-3: one that lags behind its "
                    "stage feeds the drift) and centring the synthetic gradient (sg.BackwardInterface(..., "
                    "center=True)); then stages that move at their rate times their interface's trust "
                    "(sg.BackwardInterface(..., trust=True), --synth-trust), a lower stage learning rate, SGD "
                    "stages (optimizer=sg.sgd(...)), a normalisation layer at the end of the stage, or fewer stages"))

    def _warn(self, key: str, message: str) -> None:
        if key not in self.warned:
            self.warned.add(key)
            warnings.warn(message, HealthWarning, stacklevel=5)  # _warn, _judge, observe, DNI.step: its caller

    def state_dict(self) -> dict:
        return {"rel_errors": self.rel_errors, "first_rms": self.first_rms, "warned": sorted(self.warned),
                "param_cosines": self.param_cosines}

    def load_state_dict(self, state: dict) -> None:
        self.rel_errors, self.first_rms = state["rel_errors"], state["first_rms"]
        self.param_cosines = state.get("param_cosines", [])  # absent from checkpoints before the tenth session
        self.warned = set(state["warned"])
