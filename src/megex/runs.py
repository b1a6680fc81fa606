"""A run folder: config.json, metrics.jsonl, checkpoint.pt, result.json, clone.safetensors.

Every write is atomic (write a temporary file, then rename), so an interrupted run never
leaves a half-written file behind and can always be resumed from its last checkpoint.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "RunFolder",
    "read_metrics",
    "read_weights_description",
    "save_described_weights",
    "save_figure_atomic",
    "write_json_atomic",
    "write_text_atomic",
]


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write `text` to a temporary file beside `path`, then rename it over `path`."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def save_figure_atomic(fig: Any, path: str | os.PathLike, **options: Any) -> Path:
    """Save a matplotlib figure to a temporary PNG beside `path`, then rename it over
    `path`: a failure half way leaves the previous plot, not a broken one. The figure is
    closed either way (pyplot keeps every open figure in memory)."""
    import matplotlib.pyplot as plt

    path = Path(path)
    tmp = path.with_name(path.stem + ".tmp" + path.suffix)
    try:
        fig.savefig(tmp, **options)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
        plt.close(fig)
    return path


def save_described_weights(
    path: str | os.PathLike, module: torch.nn.Module, info: dict[str, Any]
) -> None:
    """A module's weights as safetensors, described in the file's own metadata (so that a
    crash between two writes cannot pair new weights with an old description) and in a
    JSON sidecar beside it (`path` with the suffix .json) for people and tools."""
    from safetensors.torch import save_file

    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    state = {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}
    save_file(state, str(tmp), metadata={"megex": json.dumps(info)})
    os.replace(tmp, path)
    write_json_atomic(path.with_suffix(".json"), info)


def read_weights_description(path: str | os.PathLike) -> dict[str, Any] | None:
    """The description stored in a safetensors file's metadata (None if it has none)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            text = (handle.metadata() or {}).get("megex")
    except Exception as err:  # safetensors raises its own error types for bad files
        raise ValueError(f"{path} is not a readable safetensors file ({err})") from None
    return json.loads(text) if text else None


def read_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
    path = Path(path)
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


class RunFolder:
    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    def create(self) -> RunFolder:
        self.path.mkdir(parents=True, exist_ok=True)
        return self

    @property
    def config_path(self) -> Path:
        return self.path / "config.json"

    @property
    def metrics_path(self) -> Path:
        return self.path / "metrics.jsonl"

    @property
    def checkpoint_path(self) -> Path:
        return self.path / "checkpoint.pt"

    @property
    def result_path(self) -> Path:
        return self.path / "result.json"

    @property
    def clone_path(self) -> Path:
        return self.path / "clone.safetensors"

    def has_checkpoint(self) -> bool:
        return self.checkpoint_path.is_file()

    def is_finished(self) -> bool:
        return self.result_path.is_file()

    def write_config(self, config: dict[str, Any]) -> None:
        """Write config.json, keeping keys written earlier (e.g. by the CLI) unless replaced."""
        merged = self.read_config() if self.config_path.is_file() else {}
        merged.update(config)
        write_json_atomic(self.config_path, merged)

    def read_config(self) -> dict[str, Any]:
        return json.loads(self.config_path.read_text())

    def write_metrics(self, rows: list[dict[str, Any]]) -> None:
        # Rewritten whole (it is small) so that it always matches the checkpoint on resume.
        tmp = self.metrics_path.with_name(self.metrics_path.name + ".tmp")
        tmp.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in rows))
        os.replace(tmp, self.metrics_path)

    def read_metrics(self) -> list[dict[str, Any]]:
        return read_metrics(self.metrics_path)

    def save_checkpoint(self, state: dict[str, Any]) -> None:
        tmp = self.checkpoint_path.with_name(self.checkpoint_path.name + ".tmp")
        torch.save(state, tmp)
        os.replace(tmp, self.checkpoint_path)

    def load_checkpoint(self) -> dict[str, Any]:
        # Only tensors, numbers, strings and containers: safe with weights_only.
        return torch.load(self.checkpoint_path, map_location="cpu", weights_only=True)

    def write_result(self, result: dict[str, Any]) -> None:
        write_json_atomic(self.result_path, result)

    def read_result(self) -> dict[str, Any]:
        return json.loads(self.result_path.read_text())

    def save_clone(self, clone: torch.nn.Module, info: dict[str, Any]) -> None:
        save_described_weights(self.clone_path, clone, info)
