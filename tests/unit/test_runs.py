"""Output files written whole or not at all."""

from __future__ import annotations

from pathlib import Path

import pytest

from megex.runs import save_figure_atomic


def test_a_figure_that_fails_to_save_leaves_the_previous_plot(tmp_path):
    pytest.importorskip("matplotlib")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots()
    ax.plot([0, 1], [0, 1])
    path = tmp_path / "plot.png"
    assert save_figure_atomic(fig, path, dpi=50) == path
    before = path.read_bytes()
    assert before.startswith(b"\x89PNG")

    # A save that fails half way (a disk that fills up after some bytes) keeps the old file
    # and leaves no temporary file behind.
    def fails_half_way(target, **options):
        Path(target).write_bytes(b"\x89PNG half")
        raise OSError("No space left on device")

    fig.savefig = fails_half_way
    with pytest.raises(OSError, match="No space"):
        save_figure_atomic(fig, path, dpi=50)
    plt.close(fig)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plot.png"]
