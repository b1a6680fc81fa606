"""The model an audit measures: a victim file or a service URL, and what the audit must know
of it (dataset, input shape, classes, accuracy, whether it returns explanations)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ... import data as data_mod
from ... import evaluate
from ...pools import VictimImages, load_pool
from ...victim import Victim
from ..runner import served_answers

__all__ = ["AuditTarget", "client_options", "describe_pool", "resolve_target"]


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
    protocol: str = "v2"  # URL: the one it speaks ("v1" or "v2", asked once)
    encoding: str = "auto"  # URL: V2's tensors
    held_out_for_pools: int = 0
    validation_images: int = 0  # held out of the victim's training (a file's sidecar)

    def client_options(self) -> dict[str, Any]:
        """How a run speaks to a URL: megex.client.connect's options."""
        return client_options(self.protocol, self.encoding, self.input_shape, self.classes)

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
    *,
    protocol: str = "auto",
    encoding: str = "auto",
) -> AuditTarget:
    """The audit's target. A file: its sidecar names the dataset and its accuracy. A URL:
    `dataset` names the test split (and, for KServe V1, the images' shape and classes), and
    the service's accuracy is measured on it once (one query per test image, counted by the
    service; kept in `out` for a resumed audit); `protocol` and `encoding` say how it is
    spoken to (megex.client.connect). ValueError names the argument at fault."""
    if victim.startswith(("http://", "https://")):
        return _served(victim, out, dataset, api_key, data_root, protocol, encoding)
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


def client_options(
    protocol: str, encoding: str, input_shape: tuple[int, ...], classes: int
) -> dict[str, Any]:
    """megex.client.connect's options for a URL that speaks `protocol` ("v1" or "v2"): for
    KServe V1, which states neither, the images' shape and classes too."""
    options: dict[str, Any] = {"protocol": protocol, "encoding": encoding}
    if protocol == "v1":
        options.update(input_shape=list(input_shape), num_classes=classes)
    return options


def _served(
    url: str,
    out: Path,
    dataset: str | None,
    api_key: str | None,
    data_root: str | None,
    protocol: str,
    encoding: str,
) -> AuditTarget:
    try:
        from ...client import ServiceError, connect, detect_protocol  # the 'server' extra
    except ModuleNotFoundError as err:
        raise ValueError(
            f"--victim: a URL needs the 'server' extra (pip install 'megex[server]'): {err}"
        ) from None
    if dataset is None:
        raise ValueError(
            "--dataset: a served victim needs the dataset whose test split measures it "
            f"(one of {', '.join(data_mod.DATASETS)})"
        )
    test = data_mod.load(dataset, data_root)

    def reach(call: Callable[[], Any]) -> Any:
        try:
            return call()
        except (ServiceError, OSError, ValueError) as err:
            raise ConnectionError(f"--victim: cannot reach {url}: {err}") from None
        except Exception as err:  # httpx's connection errors (not OSErrors)
            raise ConnectionError(
                f"--victim: cannot reach {url}: {type(err).__name__}: {err}"
            ) from None

    if protocol == "auto":
        protocol = reach(lambda: detect_protocol(url, api_key, retries=1))
    if protocol == "v1" and encoding == "binary":
        raise ValueError(
            "--encoding: binary tensors are the Open Inference Protocol's (V2); "
            f"{url} is spoken to over KServe V1, which sends JSON"
        )
    # KServe V1 states neither the images' shape nor the classes: the dataset's are sent.
    options = client_options(protocol, encoding, test.input_shape, test.num_classes)
    oracle = reach(lambda: connect(url, api_key, retries=1, **options))
    try:
        shape, classes, explains = oracle.input_shape, oracle.num_classes, oracle.offers_explanation
    finally:
        oracle.close()
    if test.input_shape != tuple(shape):
        raise ValueError(
            f"--dataset: {dataset} images are {test.input_shape}; the service takes {tuple(shape)}"
        )
    answers = out / "served-answers.pt"
    measured = served_answers(url, api_key, dataset, data_root, answers, options)
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
        protocol=protocol,
        encoding=encoding,
    )


def describe_pool(spec: str, target: AuditTarget, data_root: str | None) -> dict[str, Any]:
    """The attacker's images as the report names them (the draw of attack seed 0)."""
    info = VictimImages(target.input_shape, target.dataset, 0, target.held_out_for_pools)
    pool = load_pool(spec, info, seed=0, data_root=data_root).describe()
    return {"spec": spec, "size": pool["size"], "description": pool["description"]}
