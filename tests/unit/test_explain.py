import pytest
import torch
from torch import nn

from megex import Explanation, explain


def tiny_model():
    torch.manual_seed(0)
    return (
        nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.Tanh(), nn.Flatten(), nn.Linear(3 * 16, 4))
        .double()
        .eval()
    )


def output_of(model, x, output):
    logits = model(x)
    if output == "logit":
        return logits
    if output == "log_probability":
        return torch.log_softmax(logits, 1)
    return torch.softmax(logits, 1)


def finite_difference(model, x, output, h=1e-6):
    """float64 central differences: (N, K, C, H, W) d output_k / d x."""
    n, k = x.shape[0], model(x).shape[1]
    grads = torch.zeros(n, k, *x.shape[1:], dtype=torch.float64)
    flat = x.reshape(n, -1)
    for i in range(flat.shape[1]):
        step = torch.zeros_like(flat)
        step[:, i] = h
        up = output_of(model, (flat + step).view_as(x), output)
        down = output_of(model, (flat - step).view_as(x), output)
        grads.view(n, k, -1)[:, :, i] = (up - down) / (2 * h)
    return grads


@pytest.mark.parametrize("output", ["probability", "log_probability", "logit"])
def test_gradient_matches_float64_finite_differences(output):
    model = tiny_model()
    x = torch.rand(3, 1, 4, 4, dtype=torch.float64)
    reference = finite_difference(model, x, output)
    all_maps = explain(model, x, Explanation("gradient", target="all", output=output))
    assert all_maps.shape == (3, 4, 1, 4, 4)
    torch.testing.assert_close(all_maps, reference, rtol=1e-5, atol=1e-7)
    predicted = model(x).argmax(1)
    pred_maps = explain(model, x, Explanation("gradient", output=output))
    assert pred_maps.shape == (3, 1, 4, 4)
    torch.testing.assert_close(pred_maps, reference[torch.arange(3), predicted])
    class_maps = explain(model, x, Explanation("gradient", target=2, output=output))
    torch.testing.assert_close(class_maps, reference[:, 2])


def test_input_x_gradient_is_signed_input_times_gradient():
    model = tiny_model()
    x = torch.rand(2, 1, 4, 4, dtype=torch.float64)
    reference = finite_difference(model, x, "probability")
    maps = explain(model, x, Explanation("input_x_gradient", target="all"))
    torch.testing.assert_close(maps, reference * x.unsqueeze(1), rtol=1e-5, atol=1e-7)
    assert (maps < 0).any() and (maps > 0).any()  # signed, no abs


def test_smoothgrad_averages_gradients_at_the_seeded_noisy_points():
    model = tiny_model()
    x = torch.rand(2, 1, 4, 4, dtype=torch.float64)
    spec = Explanation("smoothgrad", target=1, output="logit", sigma=0.2, samples=4)
    maps = explain(model, x, spec, generator=torch.Generator().manual_seed(5))
    rng = torch.Generator().manual_seed(5)
    expected = torch.zeros_like(x)
    for _ in range(4):
        noisy = x + 0.2 * torch.randn(x.shape, generator=rng, dtype=x.dtype)
        expected += finite_difference(model, noisy, "logit")[:, 1] / 4
    torch.testing.assert_close(maps, expected, rtol=1e-5, atol=1e-7)


def test_integrated_gradients_completeness_and_reference():
    model = tiny_model()
    x = torch.rand(2, 1, 4, 4, dtype=torch.float64)
    spec = Explanation("integrated_gradients", target="all", output="logit", steps=64)
    maps = explain(model, x, spec)
    # Completeness: attributions sum to f(x) - f(baseline), up to the Riemann error.
    delta = output_of(model, x, "logit") - output_of(model, torch.zeros_like(x), "logit")
    torch.testing.assert_close(maps.sum(dim=(2, 3, 4)), delta, rtol=1e-3, atol=1e-3)
    steps = 8
    few = explain(model, x, Explanation("integrated_gradients", target=0, steps=steps))
    path = sum(
        finite_difference(model, ((i + 0.5) / steps) * x, "probability")[:, 0] for i in range(steps)
    )
    torch.testing.assert_close(few, path / steps * x, rtol=1e-5, atol=1e-7)


def test_explanation_leaves_model_mode_and_checks_arguments():
    with pytest.raises(ValueError, match="method: unknown 'saliency'"):
        Explanation("saliency")
    with pytest.raises(ValueError, match="target"):
        Explanation(target="everything")
    with pytest.raises(ValueError, match="output"):
        Explanation(output="odds")
    with pytest.raises(ValueError, match="not known for 'gradient'"):
        Explanation("gradient", sigma=0.1)
    with pytest.raises(ValueError, match="samples"):
        Explanation("smoothgrad", samples=0)
    model = tiny_model()
    with pytest.raises(ValueError, match="class 7 does not exist"):
        explain(model, torch.rand(1, 1, 4, 4, dtype=torch.float64), Explanation(target=7))
    spec = Explanation("smoothgrad", target="all", sigma=0.05)
    assert Explanation.from_dict(spec.to_dict()) == spec
    assert spec.params == {"sigma": 0.05, "samples": 3}


def test_modules_are_explained_in_eval_mode():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.BatchNorm2d(2), nn.Flatten(),
                          nn.Linear(32, 3)).double()  # fmt: skip
    model[1].running_mean.fill_(0.3)
    x = torch.rand(2, 1, 4, 4, dtype=torch.float64)
    model.train()
    maps = explain(model, x, Explanation(target="all"))
    assert model.training  # restored
    model.eval()
    torch.testing.assert_close(maps, finite_difference(model, x, "probability"))


@pytest.mark.parametrize(
    "params, message",
    [
        ({"method": "smoothgrad", "sigma": float("inf")}, "sigma: expected a number in"),
        ({"method": "smoothgrad", "sigma": float("nan")}, "sigma"),
        ({"method": "smoothgrad", "samples": 10**7}, "samples: expected 1..256"),
        ({"method": "smoothgrad", "samples": 2.5}, "whole number"),
        ({"method": "integrated_gradients", "steps": 10**400}, "steps: expected 1..256"),
        ({"method": "integrated_gradients", "baseline": float("nan")}, "baseline"),
    ],
)
def test_explanation_settings_are_bounded(params, message):
    # One request must not be able to make a service compute for minutes or return NaN.
    params = dict(params)
    with pytest.raises(ValueError, match=message):
        Explanation(params.pop("method"), **params)


def test_given_logits_save_the_forward_pass_and_give_the_same_maps():
    model = tiny_model()
    x = torch.rand(5, 1, 4, 4, dtype=torch.float64)
    with torch.no_grad():
        logits = model(x)
    for spec in (Explanation(target="all"), Explanation(target="predicted")):
        assert torch.equal(explain(model, x, spec, logits=logits), explain(model, x, spec))
    with pytest.raises(ValueError, match="logits: expected 5 rows"):
        explain(model, x, Explanation(), logits=logits[:3])


def test_one_target_parser_for_requests_and_command_lines():
    from megex.explain import parse_target

    for value, want in [("predicted", "predicted"), ("all", "all"), ("3", 3), (" 3 ", 3)]:
        assert parse_target(value) == want
    assert parse_target(4) == 4 and parse_target(4.0) == 4
    for bad in ["everything", "-1", "\u00b2", "3.5", 2.5, True, None, [1]]:
        with pytest.raises(ValueError, match="expected 'predicted', 'all' or a class index"):
            parse_target(bad)
