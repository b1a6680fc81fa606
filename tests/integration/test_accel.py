"""The speed settings (megex.accel): off by default with unchanged results; each checked
against the plain loop on a small case on the CPU."""

import json
import sys

import pytest
import torch

from megex import Explanation, LocalOracle, explain
from megex.accel import same_device, scaled_learning_rates
from megex.attacks import DFME, MEGEX
from megex.attacks.config import SettingError
from megex.attacks.replay import ReplayBuffer
from megex.engine import changed_settings, run
from megex.models import build_classifier
from megex.oracle import InvalidQuery, validate_images
from megex.runs import RunFolder
from megex.victim import Victim

# torch.compile imports torch.jit pieces that warn of their own deprecation.
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script_method`:DeprecationWarning")

SMALL = {"batch_size": 32, "clone_steps": 2, "replay_size": 500}
ALL = Explanation("gradient", target="all")


def weights(module):
    return torch.cat([p.detach().flatten() for p in module.state_dict().values()])


def test_speed_settings_default_off_and_are_checked():
    c = MEGEX().config
    assert (c.precision, c.compile, c.on_device, c.lr_scaling) == ("fp32", "off", False, "none")
    with pytest.raises(SettingError, match="precision"):
        MEGEX(precision="fp16")
    with pytest.raises(SettingError, match="compile"):
        DFME(compile="fast")


@pytest.mark.parametrize("attack_class", [MEGEX, DFME])
def test_on_device_on_a_cpu_is_the_plain_run_exactly(digits_victim, attack_class):
    # On a CPU the attacker's device is the host: the same draws, losses logged as tensors.
    results = []
    for on_device in (False, True):
        oracle = LocalOracle(digits_victim, explanation=ALL, answer_on_device=on_device)
        attack = attack_class(seed=2, on_device=on_device, **SMALL)
        results.append(
            run(attack, oracle, 1500, progress=False, evaluator=lambda m: {"clone_accuracy": 0.5})
        )
    plain, fast = results
    assert torch.equal(weights(plain.clone), weights(fast.clone))
    assert plain.metrics[-1]["clone_loss"] == fast.metrics[-1]["clone_loss"]
    assert isinstance(fast.metrics[-1]["clone_loss"], float)


@pytest.mark.parametrize("attack_class", [MEGEX, DFME])
def test_bf16_generator_step_follows_the_fp32_gradient(digits_victim, attack_class):
    # bf16 wraps the attacker's forward passes only: the generator's gradient stays that of
    # fp32 (for DFME only if the victim ignores the caller's autocast and the probe losses
    # stay fp32, since the differences are below bf16's resolution).
    grads = {}
    for precision in ("fp32", "bf16"):
        oracle = LocalOracle(digits_victim, explanation=ALL)
        attack = attack_class(seed=1, precision=precision, train_on_generator_queries=False)
        attack.setup(oracle, 10)
        attack.clone.train()
        attack.generator.train()
        captured = {}
        step = attack.generator_opt.step

        def capture(*args, captured=captured, attack=attack, step=step, **kwargs):
            captured["g"] = torch.cat([p.grad.flatten() for p in attack.generator.parameters()])
            return step(*args, **kwargs)

        attack.generator_opt.step = capture
        attack.generator_step(oracle)
        grads[precision] = captured["g"]
    cosine = torch.nn.functional.cosine_similarity(grads["fp32"], grads["bf16"], dim=0)
    assert cosine > 0.99
    ratio = grads["bf16"].norm() / grads["fp32"].norm()
    assert 0.95 < ratio < 1.05


def test_bf16_clone_keeps_learning_after_its_updates(digits_victim):
    # Autocast's cache of bf16 weights lasts an autocast region: a region around the
    # optimiser's steps would keep using the first weights. 60 replayed updates on the same
    # answers must bring the loss down about as far as in fp32.
    x = torch.rand(256, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    probs = torch.softmax(digits_victim(x), 1).detach()
    losses = {}
    for precision in ("fp32", "bf16"):
        attack = DFME(seed=0, precision=precision, batch_size=64)
        attack.setup(LocalOracle(digits_victim), 10)
        attack.observe(x, probs)
        first = attack.replay(1)
        losses[precision] = (first, attack.replay(60))
    (start, fp32), (_, bf16) = losses["fp32"], losses["bf16"]
    # At least 90% of fp32's progress (stale weights made about 40%).
    assert bf16 - fp32 < 0.1 * (start - fp32)


def test_the_oracle_ignores_its_callers_autocast(digits_victim):
    oracle = LocalOracle(digits_victim, explanation=ALL)
    x = torch.rand(16, 1, 8, 8)
    plain = oracle.query(x, explanation=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = oracle.query(x, explanation=True)
    assert torch.equal(plain.probabilities, inside.probabilities)
    assert torch.equal(plain.explanation, inside.explanation)


def test_compiled_forward_passes_match_eager(digits_victim):
    oracle = LocalOracle(digits_victim, explanation=ALL)
    outputs = []
    for mode in ("off", "default"):
        attack = MEGEX(seed=0, compile=mode, **SMALL)
        attack.setup(oracle, 10)
        z = attack.sample_latent(8)
        pre, x = attack.generate(z)
        outputs.append((pre, attack.clone_forward(x)))
    (pre0, logits0), (pre1, logits1) = outputs
    torch.testing.assert_close(pre1, pre0, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(logits1, logits0, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    "spec",
    [
        Explanation("gradient", target="all"),
        Explanation("gradient", target="all", output="log_probability"),
        Explanation("smoothgrad", target="all", samples=3),
        Explanation("integrated_gradients", target="all", steps=4),
    ],
)
def test_all_class_maps_in_one_batched_pass_equal_the_per_class_loop(monkeypatch, spec):
    torch.manual_seed(0)
    model = build_classifier("resnet18_8x", 10, 3, 8).eval()
    x = torch.rand(3, 3, 8, 8)
    loop = explain(model, x, spec, generator=torch.Generator().manual_seed(1))
    # (sys.modules: the package's name `explain` is the function.)
    monkeypatch.setattr(sys.modules["megex.explain"], "_BATCH_CLASSES_ON_CPU", True)
    batched = explain(model, x, spec, generator=torch.Generator().manual_seed(1))
    assert batched.shape == loop.shape == (3, 10, 3, 8, 8)
    torch.testing.assert_close(batched, loop, rtol=1e-5, atol=1e-7)


def test_replay_without_masks_keeps_what_the_masked_copy_keeps():
    # Off the CPU the reservoir places a batch with one indexed copy (rejected pairs and the
    # earlier of two pairs drawing one slot go to a spare row); on the CPU it must keep
    # exactly what the masked copy keeps, slot for slot.
    buffers = []
    for mask_free in (False, True):
        buffer = ReplayBuffer(50, (1, 2, 2), 3, "reservoir")
        buffer.mask_free = mask_free
        gen = torch.Generator().manual_seed(0)
        for start in range(0, 2000, 200):  # batches of 200 into 50 slots: many collisions
            ids = torch.arange(start, start + 200, dtype=torch.float32)
            images = (ids / 4096).view(-1, 1, 1, 1).expand(-1, 1, 2, 2)
            buffer.add(images, torch.stack([ids, ids + 0.5, ids], 1), gen)
        buffers.append(buffer)
    masked, mask_free = buffers
    assert len(mask_free) == 50 and mask_free.added == 2000
    assert torch.equal(masked.probs, mask_free.probs)
    assert torch.equal(masked.images, mask_free.images)
    kept = mask_free.probs[:, 0]
    assert torch.equal(mask_free.images[:, 0, 0, 0].float() * 4096, kept)  # whole pairs
    assert (kept >= 1000).sum() > 15  # later pairs replace earlier ones


def test_device_images_are_checked_with_clear_errors():
    good = torch.rand(4, 1, 8, 8)
    assert validate_images(good, (1, 8, 8), keep_device=True).dtype == torch.float32
    for bad, message in [
        (torch.rand(4, 1, 8, 7), "does not match"),
        (torch.zeros(0, 1, 8, 8), "empty"),
        (torch.full((2, 1, 8, 8), float("nan")), "NaN"),
        (torch.full((2, 1, 8, 8), 1.5), r"\[0, 1\]"),
        (torch.ones(2, 1, 8, 8, dtype=torch.int64), "floating point"),
    ]:
        with pytest.raises(InvalidQuery, match=message):
            validate_images(bad, (1, 8, 8), keep_device=True)


def test_answers_on_the_device_refuse_defenses(digits_victim):
    from megex.defenses import build_defense

    with pytest.raises(ValueError, match="answer_on_device"):
        LocalOracle(digits_victim, answer_on_device=True, defenses=[build_defense("round")])
    oracle = LocalOracle(digits_victim, answer_on_device=True)
    assert oracle.query_device == "cpu"
    with pytest.raises(ValueError, match="answer_on_device"):
        oracle.defenses = [build_defense("round")]
    oracle.answer_on_device = False
    oracle.defenses = [build_defense("round")]
    with pytest.raises(ValueError, match="answer_on_device"):
        oracle.answer_on_device = True


def test_learning_rates_scale_with_the_batch():
    base = {"clone_lr": 0.1, "generator_lr": 1e-3}
    assert scaled_learning_rates(DFME(batch_size=1024, **base).config) == (0.1, 1e-3)
    linear = scaled_learning_rates(DFME(batch_size=1024, lr_scaling="linear", **base).config)
    assert linear == pytest.approx((0.4, 4e-3))
    root = scaled_learning_rates(DFME(batch_size=1024, lr_scaling="sqrt", **base).config)
    assert root == pytest.approx((0.2, 2e-3))
    attack = DFME(batch_size=64, lr_scaling="linear", **base)
    module = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10))
    attack.setup(LocalOracle(Victim.from_module(module, (1, 8, 8), 10)), 10)
    assert attack.clone_opt.param_groups[0]["lr"] == pytest.approx(0.025)


def test_same_device():
    assert same_device("cpu", torch.device("cpu"))
    assert not same_device("cpu", "meta")


def test_runs_recorded_before_the_speed_settings_resume(tmp_path, digits_victim):
    # A run folder written before these settings existed ran with their defaults.
    oracle = LocalOracle(digits_victim)
    folder = RunFolder(tmp_path / "run")
    run(DFME(seed=0, **SMALL), oracle, 600, run_dir=folder.path, progress=False)
    config = json.loads(folder.config_path.read_text())
    for key in ("precision", "compile", "on_device", "lr_scaling"):
        config.pop(key)
    folder.config_path.write_text(json.dumps(config))
    from megex.engine import describe_run

    assert changed_settings(folder, describe_run(DFME(seed=0, **SMALL), oracle, 600)) == []
    changed = changed_settings(
        folder, describe_run(DFME(seed=0, precision="bf16", **SMALL), oracle, 600)
    )
    assert changed == ["precision: not recorded then, 'bf16' now"]
    # The device may change on resumption, unless the random generator lives on it.
    config["device"] = "meta"
    folder.config_path.write_text(json.dumps(config))
    assert changed_settings(folder, describe_run(DFME(seed=0, **SMALL), oracle, 600)) == []
    config["on_device"] = True
    folder.config_path.write_text(json.dumps(config))
    moved = describe_run(DFME(seed=0, on_device=True, **SMALL), oracle, 600)
    assert changed_settings(folder, moved) == ["device: 'meta' then, 'cpu' now"]


def test_the_command_line_takes_the_speed_settings(tmp_path, digits_victim, capsys):
    from megex.cli import main

    victim_file = str(tmp_path / "victim.safetensors")
    digits_victim.save(victim_file)
    out = tmp_path / "run"
    argv = ["attack", "--victim", victim_file, "--out", str(out), "--quiet", "--budget", "600"]
    argv += ["--set", "precision=bf16", "--set", "on_device=true", "--set", "lr_scaling=sqrt"]
    assert main(argv) == 0
    config = json.loads((out / "config.json").read_text())
    assert (config["precision"], config["on_device"], config["lr_scaling"]) == (
        "bf16",
        True,
        "sqrt",
    )
    assert json.loads((out / "result.json").read_text())["queries_used"] <= 600
    assert main([*argv[:-6], "--set", "precision=fp16", "--force"]) == 2
    assert "precision" in capsys.readouterr().err
