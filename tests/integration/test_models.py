import copy

import torch

from megex import Explanation, explain
from megex.models import build_classifier, build_generator, fast_layout


def _conv_weights(module):
    return [m.weight for m in module.modules() if isinstance(m, torch.nn.Conv2d)]


def test_fast_layout_is_channels_last_on_cpu_and_changes_no_value():
    torch.manual_seed(0)
    plain = build_classifier("lenet5", 10, 1, 28).eval()
    fast = fast_layout(copy.deepcopy(plain), "cpu")
    assert all(w.is_contiguous(memory_format=torch.channels_last) for w in _conv_weights(fast))
    assert not all(w.is_contiguous(memory_format=torch.channels_last) for w in _conv_weights(plain))
    x = torch.rand(16, 1, 28, 28)
    torch.testing.assert_close(fast(x), plain(x), rtol=1e-5, atol=1e-6)
    spec = Explanation("gradient", target="all")
    torch.testing.assert_close(
        explain(fast, x, spec), explain(plain, x, spec), rtol=1e-4, atol=1e-7
    )
    # The state dict keeps its shapes and loads back into a default-layout module.
    again = build_classifier("lenet5", 10, 1, 28).eval()
    again.load_state_dict(fast.state_dict())
    torch.testing.assert_close(again(x), plain(x), rtol=1e-5, atol=1e-6)


def test_fast_layout_generator_matches_and_other_devices_keep_the_default_layout():
    torch.manual_seed(0)
    plain = build_generator("generator_a", 28, 1, 16, 8).eval()
    fast = fast_layout(copy.deepcopy(plain), "cpu")
    z = torch.randn(8, 16)
    torch.testing.assert_close(fast(z), plain(z), rtol=1e-5, atol=1e-6)
    # A device other than the CPU (here: meta, which holds no data) is left as it is.
    elsewhere = fast_layout(build_classifier("lenet5", 10, 1, 28), "meta")
    assert all(w.device.type == "meta" for w in _conv_weights(elsewhere))
    assert all(w.is_contiguous() for w in _conv_weights(elsewhere))


def test_cpu_layout_benchmark_prints_both_layouts_and_ratios():
    import re
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[2] / "benchmarks" / "cpu_layout.py"
    out = subprocess.run(
        [sys.executable, str(script), "--repeats", "1", "--queries", "600"],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    ).stdout
    rows = [
        line
        for line in out.splitlines()
        if re.match(r"\| (explain|clone|generator|megex|dfme)", line)
    ]
    assert len(rows) == 6
    for row in rows:
        slow, fast, ratio = row.strip("| ").split(" | ")[1:]
        slow, fast, ratio = float(slow), float(fast), float(ratio.rstrip("x"))
        assert slow > 0 and fast > 0
        # The ratio is of the unrounded times; the table rounds them to 0.1.
        assert (slow - 0.05) / (fast + 0.05) - 0.01 <= ratio <= (slow + 0.05) / (fast - 0.05) + 0.01
