"""Delayed true gradients (DDG, Huo et al. 2018): a stage runs forward at once and updates when the true
gradient of that step arrives from above, K - 1 - k steps late, by replaying the input it stored.

Stage k < K - 1 does not wait: its step is a forward pass only (its output goes up). When dL/dh_k of
a past step s comes down, `take_gradient` runs the stage forward again on the stored input of step s,
with the current parameters, the same random draws (dropout) and BN statistics left alone, backpropagates
the gradient, updates, and returns the gradient at the stage input for the stage below. Replaying is what
the features-replay variant of delayed gradients does (Huo et al. 2018b); keeping each step's graph
instead is not possible here, since the optimizer updates the parameters in place. With no delay (a
gradient taken before the next step) the replay sees the very parameters of the first pass, and the
rule is backprop's, step for step.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import torch

from synthgrad.boundary import run_stage
from synthgrad.diagnostics import check_finite, frozen_batchnorm_stats
from synthgrad.stage import GradientFn, StageResult, StageRule, backward_from_output


@dataclass
class _Stored:
    step: int
    inp: torch.Tensor  # h_(k-1) of that step, detached
    rng: torch.Tensor  # the CPU random state before its forward pass (dropout draws it again)


class DelayedStageRule(StageRule):
    """Stage k's rule under delayed true gradients: forward now, update when the gradient of the step comes."""

    def __init__(self, *args: object, **kwargs: object):
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.stored: deque[_Stored] = deque(maxlen=self.pending.maxlen)

    def step(self, inp: torch.Tensor | None, labels: torch.Tensor, step: int, *,
             context: torch.Tensor | None = None, network_input: torch.Tensor | None = None,
             upstream: GradientFn | None = None, on_output: Callable[[torch.Tensor], None] | None = None,
             input_grad: bool = True, keep_graph: bool = True) -> StageResult:
        """A forward pass only: h_k goes up (on_output); the update waits for `take_gradient(step, ...)`."""
        assert inp is not None
        inp = inp.detach()
        self.stored.append(_Stored(step, inp, torch.get_rng_state()))
        with torch.no_grad():
            out = run_stage(self.stage, inp)
        if on_output is not None:
            on_output(out)
        return StageResult(out, None, None, updated=False)

    def take_gradient(self, step: int, grad: torch.Tensor, input_grad: bool = True) -> torch.Tensor | None:
        """dL/dh_k of `step` arrived (batch-mean units): replay that step's forward pass, backpropagate it,
        update. Returns the gradient at the stage input (for the stage below), or None when the step's input
        is no longer stored (too stale: dropped)."""
        while self.stored and self.stored[0].step < step:
            self.stored.popleft()
        if not self.stored or self.stored[0].step != step:
            self.dropped += 1
            return None
        s = self.stored.popleft()
        check_finite(grad, "delayed gradient", self.index, step)
        inp = s.inp.requires_grad_(input_grad)
        with torch.random.fork_rng(devices=[]), frozen_batchnorm_stats([self.stage]):
            torch.set_rng_state(s.rng)  # the same dropout masks as the first pass
            out = run_stage(self.stage, inp)
        backward_from_output(out, grad)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return inp.grad if input_grad else None
