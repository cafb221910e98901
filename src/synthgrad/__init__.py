"""synthgrad: Decoupled Neural Interfaces (synthetic gradients) for PyTorch.

The public API, enough to decouple any model given as a list of stages::

    import synthgrad as sg
    dni = sg.DNI.build(stages, sample=x[:2], conditioned=True, num_classes=10)
    stats = dni.step(x, y)          # every stage updates without waiting for the ones above
    net = dni.network()             # the plain network, for evaluation
"""

__version__ = "0.1.0"

from synthgrad.interfaces import BackwardInterface, ForwardInterface, Interface, adam  # noqa: E402
from synthgrad.rnn import LSTMCore, TruncatedBPTT, window_step  # noqa: E402
from synthgrad.rules import DNI, Backprop, StepRule, stage_step, true_gradient  # noqa: E402
from synthgrad.synthesizers import (  # noqa: E402
    ConvSynthesizer,
    InputSynthesizer,
    TokenSynthesizer,
    VectorSynthesizer,
    make_synthesizer,
)

__all__ = [
    "DNI",
    "BackwardInterface",
    "Backprop",
    "ConvSynthesizer",
    "ForwardInterface",
    "InputSynthesizer",
    "Interface",
    "LSTMCore",
    "StepRule",
    "TokenSynthesizer",
    "TruncatedBPTT",
    "VectorSynthesizer",
    "__version__",
    "adam",
    "make_synthesizer",
    "stage_step",
    "true_gradient",
    "window_step",
]
