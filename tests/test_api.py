"""The public API as a user meets it: only names exported from synthgrad, docstrings, errors that say what to do."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import synthgrad as sg
from synthgrad.errors import ConfigError


def _data(n: int = 1024, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 20, generator=g)
    return x, (x[:, 0] > 0).long() + (x[:, 1] > 0).long()


class MySynthesizer(nn.Module):
    """A user's synthesizer: one hidden layer on [h, label]; it records whether the label came."""

    def __init__(self, dim: int, num_classes: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim + num_classes, 32), nn.ReLU(), nn.Linear(32, dim))
        nn.init.zeros_(self.net[-1].weight)
        nn.init.zeros_(self.net[-1].bias)
        self.saw_context = False

    def forward(self, h: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        assert context is not None, "cDNI must hand the label to a custom synthesizer"
        self.saw_context = True
        return self.net(torch.cat([h, context], dim=1))


def test_the_readme_path_with_a_custom_synthesizer_cdni_a_schedule_and_sgd_stages() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 3))
    x, y = _data()
    stages = sg.cut(model, 3, sample=x[:2], balance="count")
    widths = [64, 64]
    synths = [MySynthesizer(w, 3) for w in widths]
    interfaces = [sg.BackwardInterface(s, sg.adam(1e-3)) for s in synths]
    steps = 8 * (len(x) // 64)
    dni = sg.DNI(stages, interfaces, conditioned=True, num_classes=3, optimizer=sg.sgd(0.05),
                 schedule=sg.cosine_schedule(steps))
    assert isinstance(dni.optimizers[0], torch.optim.SGD)
    before = model(x).argmax(1).eq(y).float().mean().item()
    for epoch in range(8):
        order = torch.randperm(len(x), generator=torch.Generator().manual_seed(epoch))
        for i in range(0, len(x) - 63, 64):
            stats = dni.step(x[order[i:i + 64]], y[order[i:i + 64]])
    assert all(s.saw_context for s in synths)
    # cDNI's classifier term was added around each custom synthesizer, as around the library's.
    assert all(isinstance(i.synthesizer, sg.ClassifierGradient) and i.synthesizer.base is s
               for i, s in zip(interfaces, synths, strict=True))
    assert all(v is not None for v in stats["synth_loss"])
    assert dni.optimizers[0].param_groups[0]["lr"] < 1e-3  # the cosine schedule ran its course
    after = dni.network()(x).argmax(1).eq(y).float().mean().item()
    assert after > before + 0.15 and after > 0.6  # chance: 0.5 (the middle class)
    # The model itself was trained: the stages share its modules.
    assert model(x).argmax(1).eq(y).float().mean().item() == pytest.approx(after, abs=0.02)


def test_network_is_an_eval_mode_copy_and_training_stays_in_train_mode() -> None:
    stages = [nn.Sequential(nn.Linear(20, 16), nn.BatchNorm1d(16), nn.Dropout(0.5)), nn.Linear(16, 3)]
    dni = sg.DNI.build(stages, torch.zeros(2, 20))
    net = dni.network()
    assert not net.training and all(s.training for s in dni.stages)
    x, y = _data(64)
    dni.step(x, y)
    assert int(stages[0][1].num_batches_tracked) == 1 and int(net[0][1].num_batches_tracked) == 0  # a snapshot


def test_a_synthesizer_of_the_wrong_shape_is_named_with_the_shape_it_must_return() -> None:
    stages = [nn.Linear(20, 16), nn.Linear(16, 3)]

    class Wrong(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(16, 8)

        def forward(self, h: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
            return self.fc(h)

    dni = sg.DNI(stages, [sg.BackwardInterface(Wrong(), sg.adam(1e-3))])
    with pytest.raises(ConfigError, match=r"interface above stage 1 \(Wrong\) returned a tensor of shape \[32, 8\]; "
                                          r"it must return one shaped like the activation it sits on, \[32, 16\]"):
        dni.step(*_data(32))


def test_a_synthesizer_without_a_context_argument_is_refused_with_the_signature_to_write() -> None:
    class OnlyH(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(16, 16)

        def forward(self, h: torch.Tensor) -> torch.Tensor:
            return self.fc(h)

    with pytest.raises(ConfigError, match=r"stage 1: its synthesizer OnlyH cannot be called as synth\(h, context\); "
                                          r"give its forward the signature forward\(self, h, context=None\)"):
        sg.DNI([nn.Linear(20, 16), nn.Linear(16, 3)], [sg.BackwardInterface(OnlyH(), sg.adam(1e-3))])


def test_model_state_dict_loads_into_the_model_uncut_or_cut_otherwise() -> None:
    def model() -> nn.Sequential:
        return nn.Sequential(nn.Linear(20, 32), nn.ReLU(), nn.Linear(32, 32), nn.BatchNorm1d(32), nn.ReLU(),
                             nn.Linear(32, 3))

    x, y = _data(256)
    trained = model()
    dni = sg.DNI.build(sg.cut(trained, 2, sample=x[:2]), x[:2], conditioned=True, num_classes=3)
    for _ in range(5):
        dni.step(x, y)
    state = dni.model_state_dict()
    assert set(state) == set(trained.state_dict())  # keyed by layer: "2.weight", not "1.0.weight"
    fresh = model()
    fresh.load_state_dict(state)
    four = sg.uncut(sg.cut(model(), 4, balance="count"))
    four.load_state_dict(state)
    with torch.no_grad():
        assert torch.equal(fresh.eval()(x), dni.network()(x)) and torch.equal(four.eval()(x), fresh(x))


def test_every_public_name_is_documented() -> None:
    undocumented = [name for name in sg.__all__ if name != "__version__" and not (getattr(sg, name).__doc__ or "")
                    .strip()]
    assert undocumented == []
