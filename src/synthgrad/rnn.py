"""Synthetic gradients through time: an LSTM trained by truncated BPTT, with a BackwardInterface per window end.

A truncation boundary is the same concept as a boundary in depth. The activation that
crosses it is the carried LSTM state s = [h, c], one tensor [B, 2H]; the "stage" is a
window of T time steps. The rule for one window is written once, in ``window_step``:

- ``bptt`` (interface None): plain truncated BPTT. The state is detached at the window
  end, so no gradient arrives from the future.
- ``dni``: at the window end the interface predicts B * dL_future/ds from s, and the
  window's backward pass receives that prediction (via ``stage_gradient``) as the
  gradient arriving from the future. The synthesizer is regressed onto the bootstrapped
  target: the gradient that reaches the start state of the *next* window once that
  window's own backward pass (with its own synthetic gradient at its end) is done.
- ``dni`` with the auxiliary task (``aux_weight`` > 0; the paper's "DNI + Aux", in our reading):
  a linear head on the LSTM output at every step t of the window predicts the synthetic
  gradient that the window's end will produce (T - t steps in the future). Its MSE, times
  ``aux_weight``, joins the window's loss, so the core is pushed towards states that carry
  what the future gradient will be.

Units: a window's loss is the sum over its time steps of the per-step batch-mean loss, so
the loss of a whole sequence is the sum of its windows' losses and gradients from
different windows add up exactly as in full BPTT over the sequence.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from synthgrad.diagnostics import check_finite
from synthgrad.errors import ConfigError
from synthgrad.interfaces import BackwardInterface, OptimizerFactory, adam, set_lr_factor
from synthgrad.synthesizers import VectorSynthesizer

# loss_fn(logits [T, B, O], *targets sliced to the window) -> scalar: sum over steps of batch-mean loss
SequenceLoss = Callable[..., torch.Tensor]
SEQUENCE_METHODS = ("bptt", "dni")


class LSTMCore(nn.Module):
    """A one-layer LSTM and a linear readout; the carried state is the single tensor [h, c] of shape [B, 2H].

    vocab: when given, inputs are token indices [T, B] fed through an embedding of size
        `input_size`; otherwise inputs are float vectors [T, B, input_size].
    """

    def __init__(self, input_size: int, hidden_size: int, output_size: int, vocab: int | None = None):
        super().__init__()
        self.hidden_size = hidden_size
        self.embed = nn.Embedding(vocab, input_size) if vocab else None
        self.lstm = nn.LSTM(input_size, hidden_size)  # time-major; one fused call per window
        self.readout = nn.Linear(hidden_size, output_size)

    @property
    def state_size(self) -> int:
        return 2 * self.hidden_size

    def zero_state(self, batch: int, device: torch.device | str | None = None) -> torch.Tensor:
        return torch.zeros(batch, self.state_size, device=device or self.readout.weight.device,
                           dtype=self.readout.weight.dtype)

    def forward(self, x: torch.Tensor, state: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits [T, B, O], end state [B, 2H]) from inputs x and the start state (None: zeros)."""
        out, end = self.hidden(x, state)
        return self.readout(out), end

    def hidden(self, x: torch.Tensor, state: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(LSTM outputs h_t [T, B, H], end state [B, 2H]): `forward` before the readout."""
        if self.embed is not None:
            x = self.embed(x)  # [T, B] -> [T, B, E]
        if state is None:
            state = self.zero_state(x.shape[1], x.device)
        h0, c0 = state.chunk(2, dim=1)  # [B, H] each
        out, (hn, cn) = self.lstm(x, (h0.unsqueeze(0).contiguous(), c0.unsqueeze(0).contiguous()))
        return out, torch.cat([hn[0], cn[0]], dim=1)


@dataclass
class WindowResult:
    """What one window step produced."""

    state: torch.Tensor  # s at the window end, detached: what crosses the boundary into the next window
    start_grad: torch.Tensor | None  # dL/ds at the window start (batch-mean units): the bootstrap target
    loss: torch.Tensor  # this window's loss, detached
    logits: torch.Tensor  # [T, B, O], detached
    prediction: torch.Tensor | None  # the synthetic gradient used at the end (per-example units), detached
    aux_loss: torch.Tensor | None = None  # the auxiliary task's MSE (before aux_weight), detached


def window_step(model: LSTMCore, optimizer: torch.optim.Optimizer | None, x: torch.Tensor,
                targets: tuple[torch.Tensor, ...], state: torch.Tensor | None, *, loss_fn: SequenceLoss,
                interface: BackwardInterface | None = None, step: int = 0, last: bool = False,
                start_grad: bool = False, clip: float | None = None, aux: nn.Module | None = None,
                aux_weight: float = 0.0, discount: float | None = None) -> WindowResult:
    """The per-window rule: forward from `state`, backward with the loss plus the synthetic future gradient, update.

    x: the window's inputs [T, B, ...]; targets: the loss_fn's targets for the same T steps.
    interface: None for plain truncated BPTT; otherwise its prediction at the end state is the
        gradient arriving from the future. `last` (the end of an episode) means no future: none.
    start_grad: keep dL/ds at the window start (the target for the previous window's synthesizer).
    optimizer: None accumulates the gradients into .grad without stepping (tests, exact comparisons).
    aux: the auxiliary head (H -> 2H) of DNI + Aux; with aux_weight > 0 and a synthetic gradient at the
        end, every step's h_t regresses onto that gradient (optimized with the model: pass its
        parameters to `optimizer` too).
    discount: the weight of the end's synthetic gradient inside the returned start gradient (the previous
        window's bootstrapped target), in place of the interface's scale that the update applies. None: the
        scale, so the target is the gradient the window really received. As in TD(lambda), a discount
        below 1 shortens the horizon the synthesizer learns to predict, independently of how strongly the
        core follows it.
    """
    if start_grad:
        state = (state if state is not None else model.zero_state(x.shape[1], x.device)).detach()
        state.requires_grad_(True)
    elif state is not None:
        state = state.detach()
    hidden, end = model.hidden(x, state)  # [T, B, H], [B, 2H]
    logits = model.readout(hidden)
    loss = loss_fn(logits, *targets)
    check_finite(loss, "loss", 0, step)
    prediction = aux_loss = None
    if interface is not None and not last:
        prediction = interface.predict(end).detach()  # B * dL_future/ds, [B, 2H]
        check_finite(prediction, "synthetic gradient", 0, step)
        total = loss
        if aux is not None and aux_weight > 0:
            # Every step predicts the synthetic gradient of the window's end: [T, B, 2H] against [B, 2H].
            aux_loss = F.mse_loss(aux(hidden), prediction.expand(hidden.shape[0], -1, -1))
            total = loss + aux_weight * aux_loss
        future = interface.stage_gradient(prediction, step)  # scale * ramp * prediction / B, [B, 2H]
        reweigh = start_grad and discount is not None and discount != interface.scale
        if reweigh:
            # The future's share of the start gradient, J^T future (J = d end / d start), to move its weight
            # from the scale to the discount: one more backward pass through the window, to the state only.
            (through,) = torch.autograd.grad(end, state, future, retain_graph=True)
        # d(loss + <future, end>)/dθ: the window's own loss plus the predicted future.
        torch.autograd.backward([total, end], [torch.ones_like(total), future])
        if reweigh:
            state.grad += through * (discount / interface.scale - 1)
    else:
        loss.backward()
    grad = state.grad if start_grad else None
    if optimizer is not None:
        if clip is not None:
            params = [p for group in optimizer.param_groups for p in group["params"]]
            torch.nn.utils.clip_grad_norm_(params, clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return WindowResult(end.detach(), grad, loss.detach(), logits.detach(), prediction,
                        None if aux_loss is None else aux_loss.detach())


class TruncatedBPTT:
    """Trains a sequence model window by window: truncated BPTT, or DNI through time with an interface.

    Episodes (`episode`): the state starts at zero and the sequence is cut into windows of
    `truncation` steps; the last window has no future, so no synthetic gradient.
    Streams (`window` called repeatedly): the state and the pending boundary carry over.
    Every window is one optimizer step.
    """

    def __init__(self, model: nn.Module, truncation: int, loss_fn: SequenceLoss, lr: float = 1e-3,
                 interface: BackwardInterface | None = None, clip: float | None = None,
                 optimizer: OptimizerFactory | None = None, aux_weight: float = 0.0,
                 discount: float | None = None):
        if truncation < 1:
            raise ConfigError(f"truncation must be >= 1, got {truncation}")
        if interface is not None and interface.trust:
            raise ConfigError("trust=True scales the learning rate of the stage below an interface; through time the "
                              "model is the stage on both sides of it, so build the interface with trust=False")
        if aux_weight < 0 or (aux_weight > 0 and interface is None):
            raise ConfigError(f"the auxiliary task (aux_weight={aux_weight}) needs a backward interface (DNI) and a "
                              "weight >= 0")
        self.model, self.truncation, self.loss_fn = model, truncation, loss_fn
        # DNI + Aux: a head from h_t [.., H] to the synthetic gradient's shape [.., 2H], zero-initialised like a
        # synthesizer (it starts by predicting 0), trained with the core by the core's optimizer.
        self.aux_weight = aux_weight
        self.aux: nn.Linear | None = None
        params = list(model.parameters())
        if aux_weight > 0:
            ref = next(model.parameters())
            self.aux = nn.Linear(model.hidden_size, model.state_size, device=ref.device, dtype=ref.dtype)
            nn.init.zeros_(self.aux.weight)
            nn.init.zeros_(self.aux.bias)
            params += list(self.aux.parameters())
        self.optimizer = (optimizer or adam(lr))(params)
        if discount is not None and (interface is None or discount < 0):
            raise ConfigError(f"a bootstrap discount ({discount}) needs a backward interface (DNI) and a value >= 0")
        self.interface, self.clip, self.discount = interface, clip, discount
        self.state: torch.Tensor | None = None  # carried state [B, 2H], detached
        # The boundary state whose synthetic gradient awaits its bootstrapped target. Only the
        # state is kept, not the prediction's graph: the same synthesizer serves every window,
        # so its optimizer steps in between and would invalidate a saved graph. `update`
        # re-predicts from this state with the current synthesizer, which is the regression
        # of the current model onto the target anyway.
        self.pending: torch.Tensor | None = None
        self.steps = 0  # optimizer steps taken (windows)

    @property
    def method(self) -> str:
        return "bptt" if self.interface is None else "dni"

    def set_lr_factor(self, factor: float) -> None:
        """Scale the model's and the synthesizer's learning rates to `factor` x their initial values."""
        set_lr_factor([self.optimizer] + ([self.interface.optimizer] if self.interface is not None else []), factor)

    def reset(self) -> None:
        """Forget the carried state (a new episode, or the stream wrapped around)."""
        self.state = self.pending = None

    def window(self, x: torch.Tensor, *targets: torch.Tensor, last: bool = False) -> dict:
        """One window of T steps and one update; returns its loss, logits and synthesizer loss."""
        res = window_step(self.model, self.optimizer, x, targets, self.state, loss_fn=self.loss_fn,
                          interface=self.interface, step=self.steps, last=last,
                          start_grad=self.pending is not None, clip=self.clip, aux=self.aux,
                          aux_weight=self.aux_weight, discount=self.discount)
        synth_loss = None
        if self.pending is not None:
            assert self.interface is not None and res.start_grad is not None
            # Bootstrapped target: the true gradient that reached this window's start state,
            # which already contains this window's own synthetic gradient from its end.
            synth_loss = self.interface.update(self.interface.predict(self.pending), res.start_grad)
        self.pending = res.state if res.prediction is not None else None
        self.state = None if last else res.state
        self.steps += 1
        return {"loss": res.loss.item(), "logits": res.logits, "synth_loss": synth_loss,
                "prediction": res.prediction, "aux_loss": None if res.aux_loss is None else res.aux_loss.item()}

    def episode(self, x: torch.Tensor, *targets: torch.Tensor) -> dict:
        """A whole sequence from the zero state: x [L, B, ...] and targets [L, ...] cut into windows.

        Returns the sequence loss (sum of window losses), logits [L, B, O] and the mean synthesizer and
        auxiliary losses over the windows that had them.
        """
        self.reset()
        length, total, logits, synth, aux = x.shape[0], 0.0, [], [], []
        for t in range(0, length, self.truncation):
            end = min(t + self.truncation, length)
            out = self.window(x[t:end], *(y[t:end] for y in targets), last=end == length)
            total += out["loss"]
            logits.append(out["logits"])
            if out["synth_loss"] is not None:
                synth.append(out["synth_loss"])
            if out["aux_loss"] is not None:
                aux.append(out["aux_loss"])
        return {"loss": total, "logits": torch.cat(logits), "synth_loss": sum(synth) / len(synth) if synth else None,
                "aux_loss": sum(aux) / len(aux) if aux else None, "windows": len(logits)}

    def state_dict(self) -> dict:
        return {"method": self.method, "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "interface": None if self.interface is None else self.interface.state_dict(),
                "aux": None if self.aux is None else self.aux.state_dict(),
                "state": self.state, "pending": self.pending, "steps": self.steps}

    def load_state_dict(self, state: dict) -> None:
        if state["method"] != self.method:
            raise ConfigError(f"checkpoint was trained with {state['method']}, not {self.method}")
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.interface is not None:
            self.interface.load_state_dict(state["interface"])
        if self.aux is not None:
            self.aux.load_state_dict(state["aux"])
        self.state, self.pending, self.steps = state["state"], state["pending"], state["steps"]


def build_rule(model: LSTMCore, method: str, truncation: int, loss_fn: SequenceLoss, *, lr: float = 1e-3,
               synth_lr: float = 1e-3, synth_hidden: int = 0, synth_width: int = 256, synth_scale: float = 1.0,
               synth_warmup: int = 0, clip: float | None = None, aux_weight: float = 0.0,
               synth_discount: float | None = None) -> TruncatedBPTT:
    """Truncated BPTT (`bptt`) or DNI through time (`dni`) with a zero-initialised synthesizer on [h, c]
    (aux_weight > 0: with the auxiliary task of predicting the synthetic gradient, DNI + Aux; synth_discount:
    the next window's weight in the bootstrapped target, None: synth_scale)."""
    if method not in SEQUENCE_METHODS:
        raise ConfigError(f"sequence rules are {' or '.join(SEQUENCE_METHODS)}, not {method!r}")
    interface = None
    if method == "dni":
        synth = VectorSynthesizer(model.state_size, synth_hidden, synth_width)
        interface = BackwardInterface(synth, adam(synth_lr), synth_scale, synth_warmup)
    return TruncatedBPTT(model, truncation, loss_fn, lr=lr, interface=interface, clip=clip, aux_weight=aux_weight,
                         discount=synth_discount)
