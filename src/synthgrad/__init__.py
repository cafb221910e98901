"""synthgrad: Decoupled Neural Interfaces (synthetic gradients) for PyTorch.

The public API, enough to decouple any model given as a list of stages::

    import synthgrad as sg
    dni = sg.DNI.build(stages, sample=x[:2], conditioned=True, num_classes=10)
    stats = dni.step(x, y)          # every stage updates without waiting for the ones above
    net = dni.network()             # a copy of the plain network, in eval mode

    pipe = sg.Pipeline(make_stage, 2, method="cdni", num_classes=10)   # one process per stage
    result = pipe.fit((x, y), epochs=2, batch_size=128)                # .network, .metrics

Pieces: synthesizers (`VectorSynthesizer`, `ConvSynthesizer`, `TokenSynthesizer`, `LowRankSynthesizer`,
`InputSynthesizer`, `ClassifierGradient` around any of them, or any module called as synth(h, context)),
interfaces (`BackwardInterface`,
`ForwardInterface`; `default_interface(shape)` builds the zoo's candidate default; `LocalLoss`, the local loss a
cDNI stage mixes into its synthetic gradient), optimizer
factories (`adam`, `sgd`), schedules (`cosine_schedule`), the per-stage rule (`StageRule`,
`stage_step`), rules (`Backprop`, `DNI`; `DGL` with `AuxiliaryClassifier`s as a baseline),
diagnostics (`true_gradient`; `Health` samples agreement and activation RMS and warns with
`HealthWarning`), the engine (`Pipeline`, also with methods "ddg" and "dgl").
Helpers: `cut(model, K, sample=x[:2])` cuts an nn.Sequential into K stages balanced by cost, and
`uncut(stages)` puts them back together (`rule.model_state_dict()` is keyed by layer, whatever the cut);
`load_dataset("mnist")` (or "fashion-mnist", "cifar10", an .npz path) returns the CLI's datasets
as tensors.
"""

__version__ = "0.1.0"

from synthgrad.auxiliary import DGL, AuxiliaryClassifier  # noqa: E402
from synthgrad.cutting import cut, uncut  # noqa: E402
from synthgrad.data import Dataset, load_dataset  # noqa: E402
from synthgrad.defaults import DefaultForwardInterfaces, DefaultInterfaces, default_interface  # noqa: E402
from synthgrad.diagnostics import true_gradient  # noqa: E402
from synthgrad.engine import Pipeline, PipelineResult  # noqa: E402
from synthgrad.health import Health, HealthWarning  # noqa: E402
from synthgrad.interfaces import (  # noqa: E402
    BackwardInterface,
    ForwardInterface,
    Interface,
    adam,
    sgd,
)
from synthgrad.localloss import LocalLoss  # noqa: E402
from synthgrad.rnn import LSTMCore, TruncatedBPTT, window_step  # noqa: E402
from synthgrad.rules import DNI, Backprop, StepRule  # noqa: E402
from synthgrad.schedules import cosine_schedule  # noqa: E402
from synthgrad.stage import StageRule, stage_step  # noqa: E402
from synthgrad.synthesizers import (  # noqa: E402
    ClassifierGradient,
    ConvSynthesizer,
    InputSynthesizer,
    LowRankSynthesizer,
    TokenSynthesizer,
    VectorSynthesizer,
    make_synthesizer,
)

__all__ = [
    "DGL",
    "DNI",
    "AuxiliaryClassifier",
    "BackwardInterface",
    "Backprop",
    "ClassifierGradient",
    "ConvSynthesizer",
    "Dataset",
    "DefaultForwardInterfaces",
    "DefaultInterfaces",
    "ForwardInterface",
    "Health",
    "HealthWarning",
    "InputSynthesizer",
    "Interface",
    "LSTMCore",
    "LocalLoss",
    "LowRankSynthesizer",
    "Pipeline",
    "PipelineResult",
    "StageRule",
    "StepRule",
    "TokenSynthesizer",
    "TruncatedBPTT",
    "VectorSynthesizer",
    "__version__",
    "adam",
    "cosine_schedule",
    "cut",
    "default_interface",
    "load_dataset",
    "make_synthesizer",
    "sgd",
    "stage_step",
    "true_gradient",
    "uncut",
    "window_step",
]
