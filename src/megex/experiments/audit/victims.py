"""The model an audit measures: a victim file or a service URL, and what the audit must know
of it (dataset, input shape, classes, accuracy, whether it returns explanations)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ... import data as data_mod
from ... import evaluate
from ...pools import VictimImages, load_pool
from ...victim import Victim
from ..runner import served_answers

__all__ = ["AuditTarget", "describe_pool", "resolve_target"]


@dataclass(frozen=True)
class AuditTarget:
    source: str  # as the user gave it
    kind: str  # "file" or "url"
    location: str  # what a run job's "victim" is: an absolute path, or the URL
    dataset: str
    input_shape: tuple[int, int, int]
    classes: int
    accuracy: float
    accuracy_source: str
    explanations: bool
    api_key: str | None = None
    answers: str | None = None  # URL: the service's labels on the test split (runner)
    held_out_for_pools: int = 0
    validation_images: int = 0  # held out of the victim's training (a file's sidecar)

    def describe(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "kind": self.kind,
            "dataset": self.dataset,
            "input_shape": list(self.input_shape),
            "classes": self.classes,
            "accuracy": self.accuracy,
            "accuracy_source": self.accuracy_source,
        }


def resolve_target(
    victim: str,
    out: Path,
    dataset: str | None = None,
    api_key: str | None = None,
    data_root: str | None = None,
) -> AuditTarget:
    """The audit's target. A file: its sidecar names the dataset and its accuracy. A URL:
    `dataset` names the test split, and the service's accuracy is measured on it once (one
    query per test image, counted by the service; kept in `out` for a resumed audit).
    ValueError names the argument at fault."""
    if victim.startswith(("http://", "https://")):
        return _served(victim, out, dataset, api_key, data_root)
    path = Path(victim)
    if not path.is_file():
        raise ValueError(f"--victim: no victim file at {victim}")
    try:
        model = Victim.load(path)
    except Exception as err:  # a file that is not a victim: say so, not a traceback
        raise ValueError(f"--victim: {victim} is not a megex victim file ({err})") from None
    info = model.info()
    if dataset and dataset != info.get("dataset"):
        raise ValueError(
            f"--dataset: the victim was trained on {info.get('dataset')}, not {dataset}"
        )
    if info.get("dataset") not in data_mod.DATASETS:
        raise ValueError(
            f"--victim: its sidecar names no dataset megex can read ({info.get('dataset')!r})"
        )
    accuracy, source = model.accuracy, "the victim file's sidecar (test split)"
    if accuracy is None:  # a victim saved without its accuracy: measured here
        x, y = data_mod.load(info["dataset"], data_root).test_tensors()
        accuracy, source = evaluate.accuracy(model, x, y), "measured here on the test split"
    return AuditTarget(
        source=victim,
        kind="file",
        location=str(path.resolve()),
        dataset=info["dataset"],
        input_shape=tuple(model.input_shape),
        classes=model.num_classes,
        accuracy=float(accuracy),
        accuracy_source=source,
        explanations=True,
        held_out_for_pools=int(info.get("pool_images") or 0),
        validation_images=int(info.get("validation_images") or 0),
    )


def _served(
    url: str, out: Path, dataset: str | None, api_key: str | None, data_root: str | None
) -> AuditTarget:
    try:
        from ...client import RemoteOracle, ServiceError  # the 'server' extra: httpx
    except ModuleNotFoundError as err:
        raise ValueError(
            f"--victim: a URL needs the 'server' extra (pip install 'megex[server]'): {err}"
        ) from None
    if dataset is None:
        raise ValueError(
            "--dataset: a served victim needs the dataset whose test split measures it "
            f"(one of {', '.join(data_mod.DATASETS)})"
        )
    try:
        oracle = RemoteOracle(url, api_key=api_key, retries=1)
    except (ServiceError, OSError, ValueError) as err:
        raise ConnectionError(f"--victim: cannot reach {url}: {err}") from None
    except Exception as err:  # httpx's connection errors (not OSErrors)
        raise ConnectionError(
            f"--victim: cannot reach {url}: {type(err).__name__}: {err}"
        ) from None
    try:
        shape, classes, explains = oracle.input_shape, oracle.num_classes, oracle.offers_explanation
    finally:
        oracle.close()
    test_shape = tuple(data_mod.load(dataset, data_root).test_tensors()[0].shape[1:])
    if test_shape != tuple(shape):
        raise ValueError(
            f"--dataset: {dataset} images are {test_shape}; the service takes {tuple(shape)}"
        )
    answers = out / "served-answers.pt"
    measured = served_answers(url, api_key, dataset, data_root, answers)
    return AuditTarget(
        source=url,
        kind="url",
        location=url,
        dataset=dataset,
        input_shape=tuple(shape),
        classes=classes,
        accuracy=measured["accuracy"],
        accuracy_source=(
            f"measured through the service on the {dataset} test split "
            f"({measured['queries']} queries)"
        ),
        explanations=explains,
        api_key=api_key,
        answers=str(answers.resolve()),
    )


def describe_pool(spec: str, target: AuditTarget, data_root: str | None) -> dict[str, Any]:
    """The attacker's images as the report names them (the draw of attack seed 0)."""
    info = VictimImages(target.input_shape, target.dataset, 0, target.held_out_for_pools)
    pool = load_pool(spec, info, seed=0, data_root=data_root).describe()
    return {"spec": spec, "size": pool["size"], "description": pool["description"]}
