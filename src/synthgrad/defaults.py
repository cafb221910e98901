"""Default interfaces: what `DNI.build` and the pipeline engine put at a boundary when the user gives none.

They are picklable factories, called with a boundary's index and activation shape, so that each
process of the pipeline engine builds only the interfaces of its own stage.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from torch import nn

from synthgrad.errors import ConfigError
from synthgrad.interfaces import BackwardInterface, ForwardInterface, adam, classifier_on
from synthgrad.synthesizers import ClassifierGradient, InputSynthesizer, LowRankSynthesizer, make_synthesizer

# The synthesizers' defaults, single process and pipeline alike. DNI keeps the paper's rate. cDNI's linear
# synthesizer learns 10x faster than the paper's 1e-4 so that it keeps up with the stage below (a synthesizer
# linear in h that lags behind h feeds activation drift), and the stage applies the synthetic gradient centred
# over the batch (its batch mean is what a synthesizer learns first and a true gradient barely has). Over the
# zoo of user-like models (issue 17) that took cDNI's mean gap to backprop from -9.3 to -4.2 points after 3
# epochs (benchmarks/results/zoo-ablation-cdni.md), and it held on Fashion-MNIST and on held-out models
# (zoo-fashion-cdni.md, zoo-holdout-cdni.md). The paper's models keep or gain accuracy at 20 epochs except
# the original cnn, whose registry entry keeps the old settings (reproduction.md). DNI did not gain from the
# same change (zoo-ablation-dni.md, dni-cost-tradeoff.md). Centring is decided where it is applied
# (interfaces.CDNI_CENTER).
DNI_SYNTH_LR = 1e-4
CDNI_SYNTH_LR = 1e-3
# cDNI's token synthesizers also carry a term that mixes the positions (TokenSynthesizer(mean_token=True)): on the
# zoo's transformer and LSTM it took 4-stage cDNI closer to backprop (benchmarks/results/zoo-notes.md, section 9).
CDNI_MEAN_TOKEN = True
# cDNI's synthesizers also carry a local classifier's input gradient (interfaces.CDNI_CLASSIFIER). Single
# process only: the pipeline keeps the synthesizers its timings were measured with (PIPELINE_CDNI_RANK,
# PIPELINE_CDNI_CLASSIFIER below).

# What a pipeline changes (sg.Pipeline and `synthgrad train --stages`). Its synthesizers must cost a fraction
# of their stage: rank 64 with the label embedded was the fastest to 97% and 98% on fcn-6 width 1024
# (benchmarks/results/tta-study-fcn6.md). Asynchrony makes the targets a step or two late, and on a pre-norm
# residual MLP (zoo resmlp, width 512) that lag tipped stages moving at Adam's full 1e-3 into collapse (31%
# after 186 steps; lockstep: 87%): stages at 3e-4 reach 92% there and lose nothing on fcn-6
# (benchmarks/results/pipeline-defaults.md).
PIPELINE_CDNI_RANK = 64
PIPELINE_CDNI_CLASSIFIER = False  # its time-to-accuracy tables were measured without the classifier term
PIPELINE_CDNI_LOCAL_LOSS = False  # nor the local loss
PIPELINE_STAGE_LR = 3e-4  # the stages' (Adam), DNI and cDNI pipelines


@dataclass(frozen=True)
class DefaultInterfaces:
    """Builds the backward interface above stage k from the per-example shape of h_k.

    conditioned: cDNI (the synthesizer also sees the one-hot label; needs num_classes).
    hidden: hidden layers of each synthesizer; None: 2 for DNI, 0 (linear) for cDNI.
    width: hidden width (vectors) or channels (feature maps); None: the synthesizer's default.
    lr: the synthesizers' Adam learning rate; None: DNI_SYNTH_LR for DNI, CDNI_SYNTH_LR for cDNI.
    center: None: BackwardInterface's own default (CDNI_CENTER for cDNI, off for DNI). scale, warmup_steps,
        update_every, center: see BackwardInterface.
    rank: a low-rank linear synthesizer of this rank (LowRankSynthesizer, the label embedded) for vector
        activations, instead of the `hidden`-layer one; None: no.
    classifier: add a local classifier's input gradient to each synthesizer (ClassifierGradient; needs
        num_classes); None: CDNI_CLASSIFIER for cDNI, off for DNI.
    trust: the stage below moves at its learning rate times the interface's trust factor (BackwardInterface).
    local_loss: the stage below mixes a local loss's gradient into its synthetic one (BackwardInterface); None:
        CDNI_LOCAL_LOSS for cDNI, off for DNI.
    mean_token: token synthesizers also add a map of the mean token to every position (TokenSynthesizer); None:
        CDNI_MEAN_TOKEN for cDNI, off for DNI.
    """

    conditioned: bool = False
    num_classes: int | None = None
    hidden: int | None = None
    width: int | None = None
    lr: float | None = None
    scale: float = 1.0
    warmup_steps: int = 0
    rank: int | None = None
    update_every: int = 1
    center: bool | None = None
    classifier: bool | None = None
    trust: bool = False
    local_loss: bool | None = None
    mean_token: bool | None = None

    def __call__(self, k: int, shape: tuple[int, ...]) -> BackwardInterface:
        hidden = self.hidden if self.hidden is not None else (0 if self.conditioned else 2)
        context = (self.num_classes or 0) if self.conditioned else 0
        if self.rank and len(shape) != 3:
            synth: nn.Module = LowRankSynthesizer(math.prod(shape), self.rank, context)
        else:
            mean_token = self.mean_token if self.mean_token is not None else CDNI_MEAN_TOKEN and self.conditioned
            synth = make_synthesizer(shape, hidden, self.width, context, mean_token=mean_token)
        if classifier_on(self.classifier, self.conditioned):  # built here, where the shape is known
            if not self.num_classes:
                raise ConfigError("a synthesizer with a classifier term needs num_classes (the classifier's outputs)")
            synth = ClassifierGradient(synth, shape, self.num_classes)
        lr = self.lr if self.lr is not None else (CDNI_SYNTH_LR if self.conditioned else DNI_SYNTH_LR)
        return BackwardInterface(synth, adam(lr), self.scale, self.warmup_steps, update_every=self.update_every,
                                 center=self.center, classifier=self.classifier, trust=self.trust,
                                 local_loss=self.local_loss)


def pipeline_interfaces(method: str, num_classes: int | None) -> DefaultInterfaces:
    """A pipeline's default interfaces for `method` (dni or cdni): for cDNI of rank PIPELINE_CDNI_RANK."""
    if method == "cdni":
        return DefaultInterfaces(True, num_classes, rank=PIPELINE_CDNI_RANK, classifier=PIPELINE_CDNI_CLASSIFIER,
                                 local_loss=PIPELINE_CDNI_LOCAL_LOSS)
    return DefaultInterfaces()


# default_interface's synthesizer learning rate, for DNI as for cDNI (the zoo's screens used it for both).
DEFAULT_SYNTH_LR = CDNI_SYNTH_LR


def default_interface(activation_shape: tuple[int, ...], conditioned: bool = False, num_classes: int | None = None,
                      synth_lr: float = DEFAULT_SYNTH_LR) -> BackwardInterface:
    """A cheap, robust backward interface for a boundary activation of per-example shape `activation_shape`:
    for cDNI what `DNI.build` puts there by default; for DNI the same linear, centred synthesizer (without
    the classifier term, which needs num_classes: DefaultInterfaces(classifier=True) gives it).

    A linear synthesizer fitted to the shape (`make_synthesizer` with no hidden layer: a Linear on [D],
    a 5x5 convolution on [C, H, W], a Linear shared by the N positions of [N, D] with a gain and bias per
    position), seeing the one-hot label too when `conditioned` (cDNI); Adam at `synth_lr`; the applied
    synthetic gradient centred over the batch (`center=True`); for cDNI plus a local classifier's input
    gradient (ClassifierGradient).
    """
    if conditioned and not num_classes:
        raise ValueError("a conditioned (cDNI) interface needs num_classes for the one-hot context")
    return DefaultInterfaces(conditioned, num_classes, hidden=0, lr=synth_lr, center=True)(0, tuple(activation_shape))


@dataclass(frozen=True)
class DefaultForwardInterfaces:
    """Builds the complete unlock's forward interface in front of stage k (k >= 1): an input synthesizer
    from the network input's shape to the shape of h_(k-1), `hidden` layers of `width`, Adam at `lr`."""

    conditioned: bool = False
    num_classes: int | None = None
    hidden: int = 1
    width: int = 1024
    lr: float = 1e-4

    def __call__(self, k: int, input_shape: tuple[int, ...], shape: tuple[int, ...]) -> ForwardInterface:
        context = (self.num_classes or 0) if self.conditioned else 0
        return ForwardInterface(InputSynthesizer(input_shape, shape, self.hidden, self.width, context), adam(self.lr))
