"""Synthesizers: zero start, shapes, context."""

from __future__ import annotations

import math

import pytest
import torch

from synthgrad.synthesizers import ConvSynthesizer, TokenSynthesizer, VectorSynthesizer, make_synthesizer


@pytest.mark.parametrize("hidden", [0, 1, 2])
def test_vector_synthesizer_starts_at_zero_with_the_activation_shape(hidden: int) -> None:
    s = VectorSynthesizer(32, hidden_layers=hidden, width=16)
    h = torch.randn(8, 32)
    out = s(h)
    assert out.shape == h.shape and torch.count_nonzero(out) == 0


def test_conv_synthesizer_preserves_resolution_and_starts_at_zero() -> None:
    s = ConvSynthesizer(16, hidden_layers=2, width=8, context_dim=10)
    h = torch.randn(4, 16, 14, 14)
    ctx = torch.nn.functional.one_hot(torch.arange(4), 10).float()
    out = s(h, ctx)
    assert out.shape == h.shape and torch.count_nonzero(out) == 0


@pytest.mark.parametrize("shape", [(16, 7, 7), (64,)])
def test_context_changes_the_prediction(shape: tuple[int, ...]) -> None:
    s = make_synthesizer(shape, hidden_layers=1, width=8, context_dim=10)
    torch.nn.init.normal_(s.net[-1].weight)
    s.eval()
    h = torch.randn(4, *shape)
    a = s(h, torch.nn.functional.one_hot(torch.tensor([0, 1, 2, 3]), 10).float())
    b = s(h, torch.nn.functional.one_hot(torch.tensor([4, 5, 6, 7]), 10).float())
    assert not torch.allclose(a, b)


@pytest.mark.parametrize("hidden", [0, 1])
def test_conv_context_equals_broadcast_label_channels(hidden: int) -> None:
    # Oracle: the first convolution over [h, K constant one-hot planes], its label weights at the kernel
    # centre only (so the border sees all of them too), holding the embedding.
    torch.manual_seed(0)
    s = ConvSynthesizer(6, hidden_layers=hidden, width=5, kernel_size=3, context_dim=4)
    torch.nn.init.normal_(s.context.weight)
    torch.nn.init.normal_(s.net[-1].weight)
    s.eval()
    h, y = torch.randn(3, 6, 7, 7), torch.tensor([0, 3, 1])
    ctx = torch.nn.functional.one_hot(y, 4).float()
    first = s.net[0]
    label_w = torch.zeros(first.out_channels, 4, 3, 3)
    label_w[:, :, 1, 1] = s.context.weight
    planes = ctx[:, :, None, None].expand(3, 4, 7, 7)
    z = torch.nn.functional.conv2d(torch.cat([h, planes], 1), torch.cat([first.weight, label_w], 1), first.bias,
                                   padding=1)
    torch.testing.assert_close(s(h, ctx), s.net[1:](z))


def test_conditioned_synthesizer_without_context_says_why() -> None:
    with pytest.raises(ValueError, match="needs the context"):
        VectorSynthesizer(8, context_dim=10)(torch.randn(2, 8))
    with pytest.raises(ValueError, match="needs the context"):
        ConvSynthesizer(4, hidden_layers=0, context_dim=10)(torch.randn(2, 4, 5, 5))


def test_token_synthesizer_is_one_vector_synthesizer_shared_across_positions() -> None:
    # Oracle: the same VectorSynthesizer applied to each position's [h_n, context] separately.
    torch.manual_seed(0)
    s = TokenSynthesizer(6, hidden_layers=1, width=5, context_dim=3)
    assert torch.count_nonzero(s(torch.randn(2, 4, 6), torch.eye(3)[:2])) == 0  # zero start
    torch.nn.init.normal_(s.token.net[-1].weight)
    s.eval()
    h, ctx = torch.randn(2, 4, 6), torch.eye(3)[[0, 2]]
    out = s(h, ctx)
    for n in range(4):
        torch.testing.assert_close(out[:, n], s.token(h[:, n], ctx))


def test_make_synthesizer_dispatches_tokens_to_a_token_synthesizer() -> None:
    assert isinstance(make_synthesizer((16, 32), hidden_layers=0), TokenSynthesizer)
    assert isinstance(make_synthesizer((32,), hidden_layers=0), VectorSynthesizer)
    assert isinstance(make_synthesizer((4, 7, 7), hidden_layers=0), ConvSynthesizer)
    with pytest.raises(ValueError, match="needs the context"):
        TokenSynthesizer(8, context_dim=10)(torch.randn(2, 3, 8))


def test_low_rank_synthesizer_starts_at_zero_embeds_the_label_and_is_thin() -> None:
    from synthgrad.synthesizers import LowRankSynthesizer

    s = LowRankSynthesizer(256, rank=16, context_dim=10)
    h, ctx = torch.randn(8, 256), torch.eye(10)[torch.arange(8)]
    assert torch.equal(s(h, ctx), torch.zeros(8, 256))
    assert sum(p.numel() for p in s.parameters()) == 2 * 256 * 16 + 256 + 10 * 256  # V, U (+ bias), embedding
    with torch.no_grad():
        s.label.weight.normal_()
    out = s(h, ctx)
    assert torch.allclose(out, s.label.weight.t()[torch.arange(8)] + s.up.bias)  # U is still zero: the label's own
    with pytest.raises(ValueError, match="needs the context"):
        s(h)


def test_token_synthesizer_positions_scale_and_shift_each_position() -> None:
    torch.manual_seed(0)
    s = TokenSynthesizer(6, hidden_layers=0, context_dim=3, positions=4)
    h, ctx = torch.randn(2, 4, 6), torch.eye(3)[[1, 2]]
    assert torch.count_nonzero(s(h, ctx)) == 0  # zero start: the gain multiplies a zero prediction
    torch.nn.init.normal_(s.token.net[-1].weight)
    torch.nn.init.normal_(s.gain)
    torch.nn.init.normal_(s.bias)
    out = s(h, ctx)
    for n in range(4):  # oracle: the shared map at position n, times gain_n, plus bias_n
        torch.testing.assert_close(out[:, n], s.token(h[:, n], ctx) * s.gain[n] + s.bias[n])
    with pytest.raises(ValueError, match="built for 4 positions, got 5"):
        s(torch.randn(2, 5, 6), ctx)


@pytest.mark.parametrize("shape", [(12,), (3, 4, 4), (5, 6)])
def test_classifier_gradient_starts_as_its_base(shape: tuple[int, ...]) -> None:
    from synthgrad.synthesizers import ClassifierGradient

    torch.manual_seed(0)
    base = make_synthesizer(shape, hidden_layers=0, context_dim=4)
    torch.nn.init.normal_(next(p for p in base.parameters() if p.dim() > 1))  # a base that predicts something
    s = ClassifierGradient(base, shape, num_classes=4)
    h, ctx = torch.randn(6, *shape), torch.eye(4)[[0, 1, 2, 3, 0, 1]]
    torch.testing.assert_close(s(h, ctx), base(h, ctx))  # U = 0: the term adds nothing yet


@pytest.mark.parametrize("shape", [(12,), (3, 4, 4)])
def test_classifier_gradient_can_be_exactly_a_linear_readouts_input_gradient(shape: tuple[int, ...]) -> None:
    # Oracle: below a linear softmax readout (W, c), the per-example input gradient is W^T (softmax(W h + c) - y);
    # with V = W, its bias = c, U = W^T and a zero base the synthesizer predicts exactly that.
    from synthgrad.synthesizers import ClassifierGradient

    torch.manual_seed(1)
    readout = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(math.prod(shape), 5))
    s = ClassifierGradient(make_synthesizer(shape, hidden_layers=0, context_dim=5), shape, num_classes=5)
    with torch.no_grad():
        s.logits.weight.copy_(readout[1].weight)
        s.logits.bias.copy_(readout[1].bias)
        s.error_map.weight.copy_(readout[1].weight.T)
    h, y = torch.randn(7, *shape, requires_grad=True), torch.randint(0, 5, (7,))
    torch.nn.functional.cross_entropy(readout(h), y, reduction="sum").backward()  # per-example gradients
    torch.testing.assert_close(s(h.detach(), torch.nn.functional.one_hot(y, 5).float()), h.grad)


def test_dni_build_gives_cdni_the_classifier_term_and_lets_it_be_turned_off() -> None:
    import synthgrad as sg
    from synthgrad.errors import ConfigError
    from synthgrad.synthesizers import ClassifierGradient

    stages = [torch.nn.Sequential(torch.nn.Linear(20, 16), torch.nn.ReLU()), torch.nn.Linear(16, 3)]
    x = torch.randn(2, 20)
    assert isinstance(sg.DNI.build(stages, x, conditioned=True, num_classes=3).interfaces[0].model, ClassifierGradient)
    off = sg.DNI.build(stages, x, conditioned=True, num_classes=3, synth_classifier=False)
    assert not isinstance(off.interfaces[0].model, ClassifierGradient)
    assert not isinstance(sg.DNI.build(stages, x).interfaces[0].model, ClassifierGradient)  # DNI: off
    assert isinstance(sg.DNI.build(stages, x, num_classes=3, synth_classifier=True).interfaces[0].model,
                      ClassifierGradient)
    with pytest.raises(ConfigError, match="num_classes"):
        sg.DNI.build(stages, x, synth_classifier=True)


def test_the_mean_token_term_starts_at_zero_and_mixes_the_positions() -> None:
    torch.manual_seed(0)
    plain = TokenSynthesizer(6, hidden_layers=0, context_dim=3, positions=4)
    after_plain = torch.rand(1)
    torch.manual_seed(0)
    s = TokenSynthesizer(6, hidden_layers=0, context_dim=3, positions=4, mean_token=True)
    assert torch.equal(torch.rand(1), after_plain)  # built without a draw: the run's other draws do not move
    h, ctx = torch.randn(2, 4, 6), torch.eye(3)[[1, 2]]
    torch.nn.init.normal_(s.token.net[-1].weight)
    plain.load_state_dict({k: v for k, v in s.state_dict().items() if k != "mean_map"})
    torch.testing.assert_close(s(h, ctx), plain(h, ctx))  # M = 0: the term adds nothing yet
    torch.nn.init.normal_(s.mean_map)
    out = s(h, ctx)
    for n in range(4):  # oracle: the per-position prediction plus M times the mean of all positions
        torch.testing.assert_close(out[:, n], plain(h, ctx)[:, n] + h.mean(1) @ s.mean_map.T)
    moved = h.clone()
    moved[:, 3] += 1.0  # another position moves: position 0's prediction follows
    assert not torch.allclose(s(moved, ctx)[:, 0], out[:, 0])


def test_cdni_token_synthesizers_get_the_mean_token_term_by_default_and_dni_ones_do_not() -> None:
    from synthgrad.defaults import DefaultInterfaces
    from synthgrad.interfaces import BackwardInterface

    def mean_map(iface: BackwardInterface) -> torch.Tensor | None:
        return next((m.mean_map for m in iface.model.modules() if isinstance(m, TokenSynthesizer)), None)

    assert mean_map(DefaultInterfaces(True, 3)(0, (5, 6))) is not None
    assert mean_map(DefaultInterfaces(True, 3, mean_token=False)(0, (5, 6))) is None
    assert mean_map(DefaultInterfaces(False)(0, (5, 6))) is None
    assert mean_map(DefaultInterfaces(False, mean_token=True)(0, (5, 6))) is not None
