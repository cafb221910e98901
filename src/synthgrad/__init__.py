"""synthgrad: Decoupled Neural Interfaces (synthetic gradients) for PyTorch.

The public API, enough to decouple any model given as a list of stages::

    import synthgrad as sg
    dni = sg.DNI.build(stages, sample=x[:2], conditioned=True, num_classes=10)
    stats = dni.step(x, y)          # every stage updates without waiting for the ones above
    net = dni.network()             # the plain network, for evaluation

Helpers: ``sg.cut(model, K, sample=x[:2])`` cuts an ``nn.Sequential`` into K stages balanced by
cost; ``sg.load_dataset("mnist")`` (or "fashion-mnist", "cifar10", a path to an .npz) returns the
CLI's datasets as tensors.
"""

__version__ = "0.1.0"

from synthgrad.cutting import cut  # noqa: E402
from synthgrad.data import Dataset, load_dataset  # noqa: E402
from synthgrad.diagnostics import true_gradient  # noqa: E402
from synthgrad.interfaces import BackwardInterface, ForwardInterface, Interface, adam  # noqa: E402
from synthgrad.rnn import LSTMCore, TruncatedBPTT, window_step  # noqa: E402
from synthgrad.rules import DNI, Backprop, StepRule  # noqa: E402
from synthgrad.stage import StageRule, stage_step  # noqa: E402
from synthgrad.synthesizers import (  # noqa: E402
    ConvSynthesizer,
    InputSynthesizer,
    VectorSynthesizer,
    make_synthesizer,
)

__all__ = [
    "DNI",
    "BackwardInterface",
    "Backprop",
    "ConvSynthesizer",
    "Dataset",
    "ForwardInterface",
    "InputSynthesizer",
    "Interface",
    "LSTMCore",
    "StageRule",
    "StepRule",
    "TruncatedBPTT",
    "VectorSynthesizer",
    "__version__",
    "adam",
    "cut",
    "load_dataset",
    "make_synthesizer",
    "stage_step",
    "true_gradient",
    "window_step",
]
