"""Synthesizers: small models that predict the gradient dL/dh of a boundary activation.

A synthesizer is any ``nn.Module`` called as ``synth(h, context)`` that returns a
tensor shaped like ``h``. ``context`` is None for DNI and the one-hot label
[B, num_classes] for cDNI. The last layer starts at zero, so a fresh synthesizer
predicts a zero gradient (the paper's initialisation).
"""

from __future__ import annotations

import math

import torch
from torch import nn


def _zero_(module: nn.Module) -> nn.Module:
    nn.init.zeros_(module.weight)
    if module.bias is not None:
        nn.init.zeros_(module.bias)
    return module


class VectorSynthesizer(nn.Module):
    """For activations [B, D]: `hidden_layers` x (Linear + BN + ReLU) of `width`, then a zero Linear.

    With a context [B, C] the input is the concatenation [h, context] of size D + C.
    hidden_layers=0 gives the linear synthesizer the paper uses for cDNI.
    """

    def __init__(self, dim: int, hidden_layers: int = 2, width: int = 1024, context_dim: int = 0):
        super().__init__()
        self.dim, self.context_dim = dim, context_dim
        layers: list[nn.Module] = []
        d = dim + context_dim
        for _ in range(hidden_layers):
            layers += [nn.Linear(d, width), nn.BatchNorm1d(width), nn.ReLU()]
            d = width
        layers.append(_zero_(nn.Linear(d, dim)))
        self.net = nn.Sequential(*layers)

    def forward(self, h: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        flat = h.flatten(1)  # [B, D]; accepts any [B, ...] activation with D features
        if self.context_dim:
            if context is None:
                raise ValueError("this synthesizer was built for cDNI and needs the context (one-hot labels)")
            flat = torch.cat([flat, context.to(flat.dtype)], dim=1)  # [B, D + C]
        return self.net(flat).view_as(h)


class LowRankSynthesizer(nn.Module):
    """For activations [B, D]: a linear synthesizer of rank `rank`, U V h, with the cDNI label embedded.

    Two thin matrices (D x rank each) instead of one D x D: about 2 rank / D of a linear synthesizer's
    arithmetic (rank 64 at D = 1024: an eighth). With a context [B, C] (cDNI's one-hot label) a
    learned vector per class is added, the label's embedding, instead of widening the input to D + C.
    U and the embedding start at zero, so a fresh synthesizer predicts a zero gradient.
    """

    def __init__(self, dim: int, rank: int = 64, context_dim: int = 0):
        super().__init__()
        self.dim, self.context_dim = dim, context_dim
        self.down = nn.Linear(dim, rank, bias=False)  # V: [rank, D], random
        self.up = _zero_(nn.Linear(rank, dim))  # U: [D, rank], zero
        self.label: nn.Linear | None = _zero_(nn.Linear(context_dim, dim, bias=False)) if context_dim else None

    def forward(self, h: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        flat = h.flatten(1)  # [B, D]
        out = self.up(self.down(flat))  # [B, rank] -> [B, D]
        if self.label is not None:
            if context is None:
                raise ValueError("this synthesizer was built for cDNI and needs the context (one-hot labels)")
            out = out + self.label(context.to(flat.dtype))  # + the label's embedding [B, D]
        return out.view_as(h)


class ConvSynthesizer(nn.Module):
    """For feature maps [B, C, H, W]: resolution-preserving convolutions, the last one zero.

    `hidden_layers` x (Conv kxk + BN + ReLU) of `width` channels, then a zero Conv back to C
    channels. A context [B, K] (cDNI's one-hot label) is embedded: a learned bias per class and
    channel added to the first convolution's output. That is what broadcasting it as K constant
    input channels gives away from the border, without convolving K more channels (on `cnn` those
    made a linear cDNI synthesizer 1.6x the cost of a DNI one; see benchmarks/results/cost.md).
    """

    def __init__(self, channels: int, hidden_layers: int = 2, width: int = 64, kernel_size: int = 5,
                 context_dim: int = 0):
        super().__init__()
        self.channels, self.context_dim = channels, context_dim
        pad = kernel_size // 2
        layers: list[nn.Module] = []
        c = channels
        for _ in range(hidden_layers):
            layers += [nn.Conv2d(c, width, kernel_size, padding=pad), nn.BatchNorm2d(width), nn.ReLU()]
            c = width
        layers.append(_zero_(nn.Conv2d(c, channels, kernel_size, padding=pad)))
        self.net = nn.Sequential(*layers)
        # [K] -> [first conv's channels]; zero when the first convolution is the last (zero) one.
        self.context: nn.Linear | None = None
        if context_dim:
            self.context = nn.Linear(context_dim, width if hidden_layers else channels, bias=False)
            if not hidden_layers:
                _zero_(self.context)

    def forward(self, h: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        if self.context is None:
            return self.net(h)
        if context is None:
            raise ValueError("this synthesizer was built for cDNI and needs the context (one-hot labels)")
        z = self.net[0](h) + self.context(context.to(h.dtype))[:, :, None, None]  # [B, C1, H, W] + [B, C1, 1, 1]
        return self.net[1:](z)


class TokenSynthesizer(nn.Module):
    """For token or sequence activations [B, N, D]: one VectorSynthesizer on D, shared across the N positions.

    Each position's gradient is predicted from that position's activation (and the context, the same
    for every position), as a Linear over D would act on tokens: D x D weights instead of a flattened
    (N D) x (N D) matrix, and the same map at every position of a sequence of any length.

    positions: if N > 0, the shared prediction f(h_n, context) becomes gain_n * f(h_n, context) + bias_n,
        with a learned gain (from 1) and bias (from 0) per position and feature, [N, D] each. A gradient's
        size often depends on the position more than on the activation there (a sequence read at its
        last step: the gradient fades towards the start); the shared map alone cannot say so. Sequences
        must then have exactly N positions.
    mean_token: also add M mean_n(h_n) to every position, M [D, D] from zero: a term that mixes the
        positions, as attention and recurrence do, where the shared map sees one position alone. It costs
        D^2 multiply-adds per example, not per position (benchmarks/results/zoo-notes.md, section 9).
    """

    def __init__(self, dim: int, hidden_layers: int = 0, width: int = 256, context_dim: int = 0, positions: int = 0,
                 mean_token: bool = False):
        super().__init__()
        self.dim, self.context_dim, self.positions = dim, context_dim, positions
        self.token = VectorSynthesizer(dim, hidden_layers, width, context_dim)
        self.gain = nn.Parameter(torch.ones(positions, dim)) if positions else None
        self.bias = nn.Parameter(torch.zeros(positions, dim)) if positions else None
        # From zero, and built without drawing from the random stream: a fresh synthesizer predicts as without it.
        self.mean_map = nn.Parameter(torch.zeros(dim, dim)) if mean_token else None

    def forward(self, h: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        b, n, d = h.shape
        if self.context_dim:
            if context is None:
                raise ValueError("this synthesizer was built for cDNI and needs the context (one-hot labels)")
            context = context[:, None, :].expand(b, n, context.shape[1]).reshape(b * n, -1)  # [B N, C]
        out = self.token(h.reshape(b * n, d), context).view(b, n, d)
        if self.gain is not None:
            if n != self.positions:
                raise ValueError(f"this synthesizer was built for {self.positions} positions, got {n}: for sequences "
                                 "whose length varies, give the interfaces yourself with TokenSynthesizer(dim) (no "
                                 "positions) and BackwardInterface(..., classifier=False, local_loss=False)")
            out = out * self.gain + self.bias  # [B, N, D] * [N, D] + [N, D]
        if self.mean_map is not None:
            out = out + h.mean(1, keepdim=True) @ self.mean_map.T  # [B, N, D] + [B, 1, D]
        return out


class ClassifierGradient(nn.Module):
    """A synthesizer plus the input gradient of a local linear classifier: base(h, y) + U^T (softmax(V h) - y).

    Below a linear softmax readout the true gradient is exactly W^T (softmax(W h + c) - y): nonlinear in h,
    and with the label inside the softmax's error, which a synthesizer linear in h and y cannot represent.
    Lower down it is that error carried back through the stages above, so the same form still fits much of
    it. V [K, D] and U [D, K] (D = prod of the activation's shape, K classes) are learned by the interface's
    regression, like every synthesizer parameter: no label reaches the stage any other way. They cost
    2 D K multiply-adds per example, little beside a linear synthesizer's D^2 (benchmarks/results/zoo-notes.md
    measures what the term gains). U starts at zero, so a fresh synthesizer predicts what `base` predicts.
    Without a context (DNI) the term is U^T softmax(V h). The activation must keep its shape (a fixed number
    of positions for tokens).
    """

    def __init__(self, base: nn.Module, activation_shape: tuple[int, ...], num_classes: int):
        super().__init__()
        dim = math.prod(activation_shape)
        self.base = base
        self.logits = nn.Linear(dim, num_classes)  # V (and the classifier's bias), random
        self.error_map = _zero_(nn.Linear(num_classes, dim, bias=False))  # U, zero

    def forward(self, h: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        if h[0].numel() != self.error_map.out_features:
            raise ValueError(f"this classifier term was built for activations of {self.error_map.out_features} "
                             f"values per example, got {list(h.shape[1:])}: activations whose size varies "
                             "(sequences of any length) need classifier=False (--no-synth-classifier)")
        error = torch.softmax(self.logits(h.flatten(1)), dim=1)  # [B, K]
        if context is not None:
            error = error - context.to(error.dtype)  # softmax(V h) - y, the local classifier's error
        return self.base(h, context) + self.error_map(error).view_as(h)  # [B, ...] + [B, D] viewed as h


class InputSynthesizer(nn.Module):
    """Predicts a stage's input activation (any shape) from the network input (any shape).

    `hidden_layers` x (Linear + BN + ReLU) of `width` on the flattened input [B, prod(in)]
    (plus the context [B, C] for cDNI), then a Linear to prod(out), reshaped to [B, *out].
    Used by forward interfaces (synthetic inputs, the complete unlock).
    """

    def __init__(self, input_shape: tuple[int, ...], output_shape: tuple[int, ...], hidden_layers: int = 1,
                 width: int = 1024, context_dim: int = 0):
        super().__init__()
        self.output_shape, self.context_dim = tuple(output_shape), context_dim
        d = int(torch.tensor(input_shape).prod()) + context_dim
        layers: list[nn.Module] = []
        for _ in range(hidden_layers):
            layers += [nn.Linear(d, width), nn.BatchNorm1d(width), nn.ReLU()]
            d = width
        layers.append(nn.Linear(d, int(torch.tensor(output_shape).prod())))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        flat = x.flatten(1).to(self.net[0].weight.dtype)  # [B, prod(input_shape)]; token indices become numbers
        if self.context_dim:
            if context is None:
                raise ValueError("this input synthesizer was built for cDNI and needs the context (one-hot labels)")
            flat = torch.cat([flat, context.to(flat.dtype)], dim=1)
        return self.net(flat).view(x.shape[0], *self.output_shape)


def make_synthesizer(activation_shape: tuple[int, ...], hidden_layers: int, width: int | None = None,
                     context_dim: int = 0, kernel_size: int = 5, mean_token: bool = False) -> nn.Module:
    """A synthesizer that fits an activation of shape [C, H, W] (conv), [N, D] (tokens) or [D] / other (vector).

    Tokens get a TokenSynthesizer with a gain and bias per position (for exactly N positions), and with
    `mean_token` its term that mixes the positions.
    """
    if len(activation_shape) == 3:
        return ConvSynthesizer(activation_shape[0], hidden_layers, width or 64, kernel_size, context_dim)
    if len(activation_shape) == 2:
        return TokenSynthesizer(activation_shape[1], hidden_layers, width or 256, context_dim,
                                positions=activation_shape[0], mean_token=mean_token)
    dim = int(torch.tensor(activation_shape).prod())
    return VectorSynthesizer(dim, hidden_layers, width or 1024, context_dim)
