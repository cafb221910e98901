"""The zoo benchmark's candidate rules: a variant name of '+'-joined tokens (TOKENS) -> a DNI rule and its hook.

`library` is `sg.DNI.build`'s defaults as a user gets them; every other name is a candidate screened in
benchmarks/results/zoo-notes.md, built from exactly what its tokens say (the library's later defaults stay out
unless a token asks for them, so a recorded variant reruns as recorded). Used by benchmarks/zoo.py.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

import synthgrad as sg
from synthgrad import zoo
from synthgrad.defaults import default_interface
from synthgrad.health import rms
from synthgrad.interfaces import sgd
from synthgrad.localloss import LocalLoss, auxiliary_head, least_squares_mix, mix_moments
from synthgrad.rules import activation_shapes

StepHook = Callable[[], None]  # called after each step's schedule is set: a variant's own learning-rate rule


def library(stages: list[nn.Module], sample: torch.Tensor, conditioned: bool, num_classes: int) -> sg.StepRule:
    """The library's defaults, exactly as a user gets them."""
    return sg.DNI.build(stages, sample, conditioned=conditioned, num_classes=num_classes)


def proposed(stages: list[nn.Module], sample: torch.Tensor, conditioned: bool, num_classes: int) -> sg.StepRule:
    """defaults.default_interface at every boundary, Adam 1e-3 stages: for cDNI what DNI.build builds since
    2026-11-30; for DNI the same linear, centred synthesizer, which DNI.build does not use."""
    shapes = activation_shapes(stages, sample)[:-1]
    return sg.DNI(stages, [default_interface(s, conditioned, num_classes) for s in shapes],
                  conditioned=conditioned, num_classes=num_classes)


# A candidate rule is named by '+'-joined tokens, e.g. "lin+trust+sgd"; "library" is DNI.build's defaults and
# "default" defaults.default_interface's. Both follow the library: "default" was "lin+slr1e-3+pos+center" when its runs
# were recorded (2026-11-30); for cDNI it has since gained the classifier term, the local loss and the mean-token term.
TOKENS = {
    "lin": "linear synthesizers for DNI too (cDNI's are linear already)",
    "trust": "BackwardInterface(trust=True): alpha = E[p.t] / E[p.p] in [0, 1] scales the stage below; runs recorded "
             "before 2026-11-30 (fifth session) scaled the applied synthetic gradient by it, later ones the stage's "
             "learning rate, set at each step (so a learning-rate hook, lrtrust, lrcos or hold, is overridden)",
    "proj": "BackwardInterface(project=True): the prediction's component along h removed, per example",
    "pos": "token synthesizers with a learned gain and bias per position (TokenSynthesizer(positions=N))",
    "sgd": "every stage SGD (Nesterov momentum 0.9, lr 0.01) instead of Adam (lr 1e-3)",
    "sgdlow": "stages below an interface SGD (lr 0.01), the last stage Adam (lr 1e-3)",
    "lrtrust": "Adam stages; each stage's learning rate times its interface's trust factor (needs trust)",
    "lrcos": "Adam stages; each stage's learning rate times its interface's agreement (pooled cosine to targets)",
    "chain": "with lrtrust/lrcos: stage k's factor is the product of the factors of interfaces k and above",
    "lrpeak": "Adam stages; every lower stage's learning rate times the top interface's agreement (to the true "
              "gradient) over its highest value so far: full rate until the label-free signal fades",
    "slr<x>": "synthesizer learning rate x (default 1e-4)",
    "sgdlr<x>": "the SGD stages' learning rate x (default 0.01)",
    "lowlr<x>": "stages below an interface Adam with learning rate x, the last stage Adam 1e-3 (or stagelr's)",
    "stagelr<x>": "every stage Adam with learning rate x instead of 1e-3 (with lowlr, the last stage only): is a "
                  "gain of lowlr the lower stages' rate relative to the top's, or a higher rate that backprop gets "
                  "too (zoo.py --backprop-lr)?",
    "hold<n>": "stages below an interface do not move for the first n steps (learning rate 0)",
    "stop<n>": "stages below an interface stop moving (learning rate 0) from step n on: what a label-free stage "
               "learned early is kept, and its later steps along noise are not taken",
    "ramp<n>": "stages below an interface ramp their learning rate linearly from 0 to full over the first n steps",
    "trustdrift<x>": "each stage below an interface moves at its full rate until its output's RMS has grown x times "
                     "its first step's; from then on at its rate times its interface's trust factor (as trust)",
    "hid1": "synthesizers with one hidden layer: 256 units on vectors, 64 on tokens, 16 channels on feature maps",
    "narrow": "DNI's two hidden layers as wide as the activation's features (D units on vectors [D] and tokens [N, D], "
              "C channels on feature maps [C, H, W]) instead of the paper's 1024 (vectors), 256 (tokens) and 64 "
              "channels: a synthesizer that costs about what a layer of its stage does",
    "norm": "the synthesizer sees each example's activation divided by its RMS (a scale-free input)",
    "center": "BackwardInterface(center=True): the applied synthetic gradient minus its mean over the batch "
              "(per feature); the synthesizer still regresses onto the whole target",
    "decay<x>": "trust_decay x (default 0.99)",
    "cls": "sg.ClassifierGradient around the synthesizer: plus U (softmax(V h) - y), a local classifier's input "
           "gradient (U from 0); cDNI's default since 2026-12-01",
    "clsonly": "only the classifier term and a learned bias, U (softmax(V h) - y) + b: no linear map of h",
    "wd<x>": "stages below an interface AdamW (lr 1e-3, decoupled weight decay x), the last stage Adam (lr 1e-3)",
    "clsh<w>": "with cls: the local classifier V is an MLP, Linear(D, w) + ReLU + Linear(w, K), instead of a Linear",
    "clsce": "with cls (cDNI): V learns by the local cross-entropy of softmax(V h) against the label, not by the "
             "regression, so the term's error is a trained local classifier's; U and the base still regress",
    "aux<w>": "(cDNI) the stage below an interface also descends w x a local loss: DGL's auxiliary classifier "
              "(sg.auxiliary.auxiliary_head) on h, added to the applied synthetic gradient; targets unchanged",
    "auxgate": "with aux<w>: the local loss's weight is w x (1 - the interface's agreement), so a synthesizer "
               "that its targets bear out takes over from the local loss",
    "local": "BackwardInterface(local_loss=True): the library's local loss (synthgrad.localloss), a c + b l with "
             "(a, b) the least-squares fit of the targets; cDNI's default since the seventh session; its head on "
             "feature maps pools to 2 x 2 (the library's LocalLoss pooled to 2 x 2 until the eighth session)",
    "auxfit": "with aux<w>: a c + b l, the least-squares fit of the targets by the applied synthetic gradient c "
              "and the local loss's l, (a, b) >= 0 from moving averages (w only before the first target)",
    "lhmlp": "with local: the local loss's head has a hidden layer, Linear(F, 128) + ReLU + Linear(128, K), on "
             "what the default head's Linear sees (F features: the flattened vector or tokens, or the 2x2-pooled map)",
    "lhpool4": "with local: feature maps pool to 4 x 4 instead of 2 x 2 before the head's Linear (LocalLoss(pool=4))",
    "lhmean": "with local: token activations [N, D] reach the head's Linear as the model's readout sees them, "
              "LayerNorm then the mean over tokens (D features), instead of flattened (N D features)",
    "tokmix": "token synthesizers also add a linear map (from zero) of the mean token to every token: a term that "
              "mixes tokens, as attention does",
    "tokattn": "token synthesizers also add M softmax(q k^T / sqrt(d)) h to every token (M [D, D] from zero; q, k "
               "linear maps of the layer-normed tokens to d = min(D, 32)): tokmix's mixing weighted per pair of "
               "positions, as the attention of the stage above weighs them",
    "fpos": "feature-map synthesizers with a learned gain (from 1) and bias (from 0) per channel and position, "
            "[C, H, W] each, on their output: pos for feature maps, where a convolution predicts the same at every "
            "position",
    "lhconv": "with local: feature maps reach the local loss's head through a 3x3 convolution (C to C channels) and "
              "a ReLU before lhpool4's 4 x 4 pooling and Linear (DGL's heads start with a convolution)",
}


# Tokens that carry a number: (prefix, option, type), tried in this order after the exact tokens.
NUMBERED = (("hold", "hold", int), ("stop", "stop", int), ("ramp", "ramp", int),
            ("trustdrift", "trustdrift", float), ("aux", "aux", float),
            ("clsh", "cls_hidden", int), ("sgdlr", "sgd_lr", float), ("slr", "synth_lr", float),
            ("stagelr", "stage_lr", float),
            ("decay", "decay", float))


def parse_variant(name: str) -> dict:
    """The options a variant name stands for; ValueError naming the unknown token."""
    opts: dict = {"lin": False, "trust": False, "proj": False, "pos": False, "opt": "adam", "lrtrust": False,
                  "lrcos": False, "chain": False, "lrpeak": False, "hold": 0, "stop": 0, "ramp": 0, "trustdrift": 0.0,
                  "center": False, "norm": False, "hid1": False, "cls": False, "clsonly": False, "clsce": False,
                  "aux": 0.0, "auxgate": False, "auxfit": False, "local": False, "cls_hidden": 0, "wd": 0.0,
                  "tokmix": False, "tokattn": False, "fpos": False, "narrow": False, "local_head": "",
                  "synth_lr": 1e-4, "decay": 0.99, "sgd_lr": 0.01, "stage_lr": 1e-3}
    if name in ("library", "default"):
        return opts
    for tok in name.split("+"):
        if tok in ("lin", "trust", "proj", "lrtrust", "lrcos", "lrpeak", "pos", "chain", "center", "norm", "hid1",
                   "cls", "narrow", "clsonly", "clsce", "auxgate", "auxfit", "local", "tokmix", "tokattn", "fpos"):
            opts[tok] = True
        elif tok in ("lhmlp", "lhpool4", "lhmean", "lhconv"):
            opts["local_head"] = tok
        elif tok in ("sgd", "sgdlow"):
            opts["opt"] = tok
        elif tok.startswith("lowlr"):
            opts["opt"], opts["low_lr"] = "lowlr", float(tok[5:])
        elif tok.startswith("wd"):
            opts["opt"], opts["wd"] = "wd", float(tok[2:])
        elif prefixed := next((p for p in NUMBERED if tok.startswith(p[0])), None):
            prefix, key, kind = prefixed
            opts[key] = kind(tok[len(prefix):])
        else:
            raise ValueError(f"unknown variant token {tok!r}; tokens: {', '.join(TOKENS)}")
    return opts


class LearnedBias(nn.Module):
    """A synthesizer that predicts one learned vector, the same for every example (clsonly's base)."""

    def __init__(self, shape: tuple[int, ...]):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(shape))

    def forward(self, h: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        return self.bias.expand_as(h)


class LocalClassifierGradient(sg.ClassifierGradient):
    """clsce: the term's V trained by its own cross-entropy against the label; its error enters the term detached."""

    def __init__(self, base: nn.Module, shape: tuple[int, ...], num_classes: int):
        super().__init__(base, shape, num_classes)
        self.local_loss: torch.Tensor | None = None

    def forward(self, h: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        logits = self.logits(h.flatten(1))  # [B, K]
        error = torch.softmax(logits.detach(), dim=1)
        if context is not None:
            self.local_loss = -(context * F.log_softmax(logits, dim=1)).sum(1).mean()
            error = error - context.to(error.dtype)
        return self.base(h, context) + self.error_map(error).view_as(h)


class LocalLossInterface(sg.BackwardInterface):
    """Regresses as any interface and adds its synthesizer's local loss (LocalClassifierGradient's) to the step."""

    def regress(self, prediction: torch.Tensor, target: torch.Tensor) -> float:
        loss = F.mse_loss(prediction, target.detach())
        extra = getattr(self.model, "local_loss", None)
        self.optimizer.zero_grad(set_to_none=True)
        (loss if extra is None else loss + extra).backward()
        self.optimizer.step()
        return loss.item()


class LocalLossMix(sg.BackwardInterface):
    """aux<w>: the stage below descends the synthetic gradient plus w x a DGL head's local-loss gradient.

    The screens' copy (zoo-screen-aux-k4.md and its kin were run with it); the library's form of `auxfit` is
    sg.BackwardInterface(local_loss=...) (synthgrad.localloss), cDNI's default since then, which starts at
    (a, b) = (1, 0) rather than (1, w) and seeds its head apart from the run's random stream.

    mix "fixed": weight w; "gate": w x (1 - agreement); "fit": a c + b l, where c is the applied synthetic
    gradient (centred), l the local loss's, and (a, b) >= 0 the least-squares fit of the targets by the two,
    from moving averages of their dot products (the trust factor's E[p.t] / E[p.p], for two predictors).
    """

    def __init__(self, synthesizer: nn.Module, optimizer: sg.interfaces.OptimizerFactory, head: nn.Module,
                 weight: float, mix: str, **kw: object):
        super().__init__(synthesizer, optimizer, **kw)
        self.head, self.weight, self.mix = sg.AuxiliaryClassifier(head, sg.adam(1e-3)), weight, mix
        # B x d(local CE)/dh of the step, [B, ...] (not `self.local`: that is the library's own LocalLoss, off here)
        self.local_grad: torch.Tensor | None = None
        self.moments = torch.zeros(5, dtype=torch.float64)  # E[c.c], E[c.l], E[l.l], E[c.t], E[l.t]

    def predict(self, h: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        self.local_grad = self.head.predict(h, context)  # the head steps too
        return super().predict(h, context)

    def coefficients(self) -> tuple[float, float]:
        if self.mix == "fixed":
            return 1.0, self.weight
        if self.mix == "gate":
            return 1.0, self.weight * (1.0 - float(self.agreement))
        mix = least_squares_mix(self.moments)
        return (1.0, self.weight) if mix is None else mix

    def stage_gradient(self, prediction: torch.Tensor, step: int = 0, conditioned: bool = False,
                       local: torch.Tensor | None = None) -> torch.Tensor:
        assert self.local_grad is not None
        a, b = self.coefficients()
        return (a * super().stage_gradient(prediction, step, conditioned)
                + b * self.local_grad / len(self.local_grad))

    def update(self, prediction: torch.Tensor, target_grad: torch.Tensor, local: torch.Tensor | None = None) -> float:
        if self.mix == "fit" and self.local_grad is not None:
            with torch.no_grad():
                c, t = self.applied(prediction, conditioned=True), target_grad * prediction.shape[0]
                m = mix_moments(c, self.local_grad, t)
                self.moments.mul_(self.trust_decay).add_(m, alpha=1.0 - self.trust_decay)
        return super().update(prediction, target_grad)


class MeanTokenMix(nn.Module):
    """tokmix: the wrapped token synthesizer plus M mean_n(h) for every token (M [D, D] from zero), [B, N, D]."""

    def __init__(self, synth: nn.Module, dim: int):
        super().__init__()
        self.synth, self.mix = synth, nn.Linear(dim, dim, bias=False)
        nn.init.zeros_(self.mix.weight)

    def forward(self, h: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        return self.synth(h, context) + self.mix(h.mean(1, keepdim=True))  # [B, N, D] + [B, 1, D]


class PositionGain(nn.Module):
    """fpos: the wrapped synthesizer's output times a learned gain (from 1) plus a bias (from 0) per element of
    the activation's per-example shape, e.g. [C, H, W]."""

    def __init__(self, synth: nn.Module, shape: tuple[int, ...]):
        super().__init__()
        self.synth = synth
        self.gain, self.bias = nn.Parameter(torch.ones(shape)), nn.Parameter(torch.zeros(shape))

    def forward(self, h: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        return self.synth(h, context) * self.gain + self.bias  # [B, C, H, W] * [C, H, W] + [C, H, W]


class AttentionTokenMix(nn.Module):
    """tokattn: the wrapped token synthesizer plus M A h for every token, A = softmax(q k^T / sqrt(d)) [B, N, N]
    over the layer-normed tokens (M [D, D] from zero; q, k drawn from a generator of their own)."""

    def __init__(self, synth: nn.Module, dim: int, seed: int = 0):
        super().__init__()
        self.synth, self.d = synth, min(dim, 32)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.query, self.key = nn.Linear(dim, self.d, bias=False), nn.Linear(dim, self.d, bias=False)
        self.mix = nn.Linear(dim, dim, bias=False)
        nn.init.zeros_(self.mix.weight)

    def forward(self, h: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        x = F.layer_norm(h, h.shape[-1:])
        scores = self.query(x) @ self.key(x).transpose(1, 2) / math.sqrt(self.d)  # [B, N, N]
        return self.synth(h, context) + self.mix(scores.softmax(-1) @ h)  # [B, N, D] + [B, N, D]


def candidate_head(kind: str, shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """A local-loss head other than localloss.auxiliary_head's (lhmlp, lhmean, lhconv)."""
    if len(shape) == 3 and kind == "lhconv":
        conv = nn.Conv2d(shape[0], shape[0], 3, padding=1)  # DGL's heads start with a convolution
        trunk: nn.Module = nn.Sequential(conv, nn.ReLU(), nn.AdaptiveAvgPool2d(4), nn.Flatten())
        features = 16 * shape[0]
    elif len(shape) == 3:
        trunk = nn.Sequential(nn.AdaptiveAvgPool2d(2), nn.Flatten())
        features = 4 * shape[0]
    elif len(shape) == 2 and kind == "lhmean":
        trunk, features = nn.Sequential(nn.LayerNorm(shape[1]), zoo.MeanTokens()), shape[1]  # the ViT's readout
    else:
        trunk, features = nn.Flatten(), math.prod(shape)
    if kind == "lhmlp":
        return nn.Sequential(trunk, nn.Linear(features, 128), nn.ReLU(), nn.Linear(128, num_classes))
    return nn.Sequential(trunk, nn.Linear(features, num_classes))


class CandidateHeadInterface(sg.BackwardInterface):
    """local (+ lh*): the library's local loss with the head the tokens say: DGL's 2 x 2 one for `local` alone
    (what the screens before LOCAL_POOL = 4 ran), LocalLoss(pool=4) for lhpool4, a candidate head (seeded
    apart from the run's stream, as the library's) for lhmlp, lhmean and lhconv."""

    def __init__(self, *args: object, head_kind: str, **kw: object):
        super().__init__(*args, **kw)
        self.head_kind = head_kind

    def local_gradient(self, h: torch.Tensor, context: torch.Tensor | None) -> torch.Tensor | None:
        if self.local is None and context is not None and self.local_loss:
            pool = 4 if self.head_kind == "lhpool4" else 2
            local = LocalLoss(tuple(h.shape[1:]), context.shape[1], decay=self.trust_decay, like=h, pool=pool)
            if self.head_kind in ("lhmlp", "lhmean", "lhconv"):
                with torch.random.fork_rng(devices=[]):
                    torch.manual_seed(local.seed)
                    local.head = candidate_head(self.head_kind, local.shape, local.num_classes).to(h.device, h.dtype)
                local.optimizer = torch.optim.Adam(local.head.parameters(), lr=1e-3)
            self.local = local
        return super().local_gradient(h, context)


class NormalizedInput(nn.Module):
    """A candidate: the wrapped synthesizer sees h / RMS(h), per example, so its output does not grow with h."""

    def __init__(self, synth: nn.Module):
        super().__init__()
        self.synth = synth

    def forward(self, h: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        rms = h.flatten(1).pow(2).mean(1).add(1e-12).sqrt().view(-1, *[1] * (h.dim() - 1))  # [B, 1, ...]
        return self.synth(h / rms, context)


def build_variant(name: str, stages: list[nn.Module], sample: torch.Tensor, conditioned: bool,
                  num_classes: int) -> tuple[sg.StepRule, StepHook | None]:
    if name == "library":
        return library(stages, sample, conditioned, num_classes), None
    if name == "default":
        return proposed(stages, sample, conditioned, num_classes), None
    o = parse_variant(name)
    ctx = num_classes if conditioned else 0
    hidden = 1 if o["hid1"] else 0 if (o["lin"] or conditioned) else 2

    def synthesizer(shape: tuple[int, ...]) -> nn.Module:
        width = ({1: 256, 2: 64, 3: 16}[len(shape)] if o["hid1"] else None) if len(shape) <= 3 else None
        if o["narrow"]:
            width = shape[0] if len(shape) == 3 else shape[-1]
        if o["pos"] and len(shape) == 2:
            synth = sg.TokenSynthesizer(shape[1], hidden, width or 256, ctx, positions=shape[0])
        else:
            synth = sg.make_synthesizer(shape, hidden, width, ctx)
        if o["fpos"] and len(shape) == 3:  # inside the classifier term, as pos is for tokens
            synth = PositionGain(synth, shape)
        if o["cls"] or o["clsonly"]:
            term = LocalClassifierGradient if o["clsce"] else sg.ClassifierGradient
            synth = term(LearnedBias(shape) if o["clsonly"] else synth, shape, num_classes)
            if o["cls_hidden"]:  # a nonlinear local classifier: closer to the stages above than a Linear can be
                w = o["cls_hidden"]
                synth.logits = nn.Sequential(nn.Linear(math.prod(shape), w), nn.ReLU(), nn.Linear(w, num_classes))
        if o["tokmix"] and len(shape) == 2:
            synth = MeanTokenMix(synth, shape[1])
        if o["tokattn"] and len(shape) == 2:
            synth = AttentionTokenMix(synth, shape[1], seed=math.prod(shape))
        return NormalizedInput(synth) if o["norm"] else synth

    def interface(shape: tuple[int, ...]) -> sg.BackwardInterface:
        # A variant is what its tokens say and nothing else: the library's later cDNI defaults (the classifier
        # term, the local loss) stay out unless a token asks for them, so a recorded variant reruns as recorded.
        kw = dict(trust=o["trust"], trust_decay=o["decay"], project=o["proj"], center=o["center"],
                  classifier=o["cls"] or o["clsonly"], local_loss=o["local"])
        if o["aux"]:
            return LocalLossMix(synthesizer(shape), sg.adam(o["synth_lr"]), auxiliary_head(shape, num_classes),
                                o["aux"], "fit" if o["auxfit"] else "gate" if o["auxgate"] else "fixed", **kw)
        if o["local"]:
            return CandidateHeadInterface(synthesizer(shape), sg.adam(o["synth_lr"]), head_kind=o["local_head"], **kw)
        kind = LocalLossInterface if o["clsce"] else sg.BackwardInterface
        return kind(synthesizer(shape), sg.adam(o["synth_lr"]), **kw)

    interfaces = [interface(shape) for shape in activation_shapes(stages, sample)[:-1]]
    opt = sgd(o["sgd_lr"]) if o["opt"] == "sgd" else sg.adam(o["stage_lr"])
    low = None  # the stages below an interface get their own optimizer; the last: Adam
    if o["opt"] in ("lowlr", "sgdlow", "wd"):
        low = (sg.adam(o["low_lr"]) if o["opt"] == "lowlr" else sgd(o["sgd_lr"]) if o["opt"] == "sgdlow"
               else functools.partial(torch.optim.AdamW, lr=1e-3, weight_decay=o["wd"], fused=True))
    rule = sg.DNI(stages, interfaces, optimizer=opt, lower_optimizer=low, conditioned=conditioned,
                  num_classes=num_classes)
    hook = None
    if o["trustdrift"]:
        return rule, drift_gated_trust(rule, o["trustdrift"])
    if o["lrpeak"]:
        return rule, faded_signal_gate(rule)
    if o["lrtrust"] or o["lrcos"] or o["hold"] or o["ramp"] or o["stop"]:
        def hook() -> None:  # after set_lr_factor: lower stage k's lr times interface k's trust or agreement
            if o["lrtrust"] or o["lrcos"]:
                factors = [float(i.trust_factor if o["lrtrust"] else i.agreement) for i in rule.interfaces]
            else:
                factors = [1.0] * len(rule.interfaces)
            if rule.steps < o["hold"] or (o["stop"] and rule.steps >= o["stop"]):
                factors = [0.0] * len(factors)
            if o["ramp"]:
                factors = [f * min(1.0, (rule.steps + 1) / o["ramp"]) for f in factors]
            if o["chain"]:  # bootstrapped targets are only as good as the interfaces above: multiply down
                for k in range(len(factors) - 2, -1, -1):
                    factors[k] *= factors[k + 1]
            for opt_k, factor in zip(rule.optimizers[:-1], factors, strict=True):
                scale_lr(opt_k, factor)
    return rule, hook


def scale_lr(optimizer: torch.optim.Optimizer, factor: float) -> None:
    """Every learning rate of `optimizer` times `factor`, on top of what the schedule set this step."""
    for group in optimizer.param_groups:
        group["lr"] *= factor


def drift_gated_trust(rule: sg.DNI, threshold: float) -> Callable[[], None]:
    """The hook for trustdrift<x>: stage k moves at its full rate until its output's RMS exceeds `threshold` x its
    first step's, then (for the rest of the run) at its rate times alpha_k = E[p.t] / E[p.p] in [0, 1]."""
    first: list[float | None] = [None] * len(rule.interfaces)
    now: list[float] = [0.0] * len(rule.interfaces)
    engaged = [False] * len(rule.interfaces)

    def record(k: int) -> Callable:
        def fn(mod: nn.Module, _inp: tuple, out: torch.Tensor) -> None:
            if not mod.training:  # an evaluation (rule.network() copies the hooks too): not the training run
                return
            value = rms(out)
            now[k] = value
            first[k] = value if first[k] is None else first[k]
        return fn

    for k, stage in enumerate(rule.stages[:-1]):
        stage.register_forward_hook(record(k))

    def hook() -> None:  # after set_lr_factor: the stages' rates as the schedule set them, times the gate
        for k, (opt_k, i) in enumerate(zip(rule.optimizers[:-1], rule.interfaces, strict=True)):
            engaged[k] = engaged[k] or (first[k] is not None and now[k] > threshold * first[k])
            if engaged[k]:
                scale_lr(opt_k, float(i.fit_scale))  # trust's alpha, which the interface (trust off) does not apply
    return hook


def faded_signal_gate(rule: sg.DNI) -> Callable[[], None]:
    """The hook for lrpeak: every stage below an interface moves at its rate times a / max(a so far), a the top
    interface's agreement with its targets (the true gradient there): the signal a label-free synthesizer has left
    (zoo-notes section 13), relative to what it had while the stages learned."""
    peak = [0.0]

    def hook() -> None:  # after set_lr_factor
        a = float(rule.interfaces[-1].agreement)
        peak[0] = max(peak[0], a)
        for opt_k in rule.optimizers[:-1]:
            scale_lr(opt_k, a / peak[0] if peak[0] > 0 else 1.0)
    return hook
