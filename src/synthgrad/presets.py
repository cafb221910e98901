"""Presets: named sets of classifier settings (`--preset paper`) that fill only what the user left unset.

Our defaults are the best settings we have measured in minutes on a CPU; a preset keeps another set
by name, so that the defaults stay free to change. TrainConfig.resolve applies a preset before the
method's and the model's defaults, and config.json records its name (`preset`).
"""

from __future__ import annotations

from synthgrad.errors import ConfigError

# The paper (Jaderberg et al. 2017, arXiv 1608.05343), MNIST and CIFAR-10 classifiers: Adam at 3e-5 with
# batches of 256 for 500k steps, a constant learning rate; DNI synthesizers with two hidden layers of 1024
# units, cDNI synthesizers linear. The paper gives one learning rate: the synthesizers take it too.
# epochs: 2,137 of MNIST's 234 batches of 256 reach 500k steps, where max_steps stops the run (other data
# sets: other epoch counts; give --epochs or --max-steps to train for less). Where the preset and our
# defaults agree (Adam, bootstrapped targets, zero-initialised synthesizers, unscaled synthetic gradients,
# FCN width 256) it sets nothing. Not checked against the paper's own text from this machine, which
# has no route to it: these values are the project's summary of it (ARCHITECTURE.md, issue 21).
PAPER_STEPS = 500_000
PRESETS: dict[str, dict[str, dict]] = {
    "paper": {
        "all": {"lr": 3e-5, "batch_size": 256, "schedule": "constant", "epochs": 2137, "max_steps": PAPER_STEPS},
        "backprop": {},
        "dni": {"synth_lr": 3e-5, "synth_hidden": 2},
        "cdni": {"synth_lr": 3e-5, "synth_hidden": 0, "synth_center": False, "synth_classifier": False,
                 "synth_local": False, "synth_mean_token": False},
        # 1024 hidden units are the paper's for vector activations (its FCNs, our mlp too); a convolutional
        # synthesizer's width counts channels, which the preset leaves at the synthesizer's default.
        "dni on vectors": {"synth_width": 1024},
    },
}


def preset_names() -> tuple[str, ...]:
    return tuple(PRESETS)


def preset_values(name: str, method: str, model: str) -> dict:
    """The settings `name` gives a `method` run of `model`; raises ConfigError for an unknown preset."""
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}")
    preset = PRESETS[name]
    values = {**preset["all"], **preset.get(method, {})}
    if model == "mlp" or model.startswith("fcn"):  # every boundary of these models is a vector
        values.update(preset.get(f"{method} on vectors", {}))
    return values


def describe(name: str) -> str:
    """One line for --help and `synthgrad models`: every setting of the preset, per method."""
    preset = PRESETS[name]
    common = ", ".join(f"{k} {v:g}" if isinstance(v, float) else f"{k} {v}" for k, v in preset["all"].items())
    methods = "; ".join(f"{m.replace(' on vectors', ' on mlp and fcn-N')}: "
                        + ", ".join(f"{k} {v:g}" if isinstance(v, float) else f"{k} {v}" for k, v in values.items())
                        for m, values in preset.items() if m != "all" and values)
    return f"{name}: {common}; {methods}"
