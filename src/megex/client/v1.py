"""RemoteV1Oracle: the Oracle protocol over KServe V1, ``POST /v1/models/NAME:predict``
(``{"instances": [...]}`` -> ``{"predictions": [...]}``) and ``:explain`` (Vertex AI's
ExplainResponse: ``explanations`` beside ``predictions``), as megex serve and megex's KServe
model answer them.

V1 has no model metadata: the images' shape is given, the number of classes is given or
read from the first answer, and an answer does not say which explanation it holds (the one
asked for, or for a request that names none, the server's own: `default_explanation`).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from ..explain import Explanation
from ..oracle import Answer, ExplanationNotOffered, validate_images
from ..serving.codec import INPUT_NAME, dump_json
from .transport import ServiceClient, ServiceError, requested_parameters

__all__ = ["LAYOUTS", "RemoteV1Oracle"]

LAYOUTS = ("chw", "hwc")
# What the predictions may be: probabilities (top-k, label-only and defended ones included),
# or logits.
PREDICTIONS = ("probabilities", "logits")


class RemoteV1Oracle(ServiceClient):
    """An Oracle whose answers come from a KServe V1 server.

    url: the server root (it must serve exactly one model) or a model URL
    (``http://host:8080/v1/models/NAME``). input_shape: (C, H, W) of the images the model
    takes (required: V1 does not say). num_classes: the model's (default: read from the first
    answer; an attack needs it before, so give it there). The service is asked only
    ``GET /v1/models[/NAME]`` before the first query (its readiness; its counts, where its
    responses carry them), never a query.

    Where things are in a response: `predictions_field` (default "predictions") holds one
    prediction per image, a list of class scores or an object whose `probabilities_key`
    holds them (as TF Serving's row format names its outputs); `prediction` says what the
    scores are ("probabilities", or "logits": then softmaxed). `explanations_field` (default
    "explanations") holds one explanation per image as Vertex AI writes it:
    ``{"attributions": [{"featureAttributions": {"images": map}, "outputIndex": [k]}, ...]}``,
    one attribution per class explained. Explanation settings travel in the request's
    ``parameters`` (``method``, ``target``, ``output``, ...), as megex's servers read them.
    default_explanation: what the server returns to a request that names no explanation
    (``query(x, True)``; default: megex's, the predicted class's probability gradient);
    the answer's target is checked against it. layout: the images sent, "chw" (megex's) or
    "hwc" (channels last, as TensorFlow models take them; maps are read back the same way).
    offers_explanation: V1 cannot say, so it is assumed until the server refuses one.
    Retries, counts and refusals: :class:`ServiceClient`.
    """

    def __init__(
        self,
        url: str,
        api_key: str | None = None,
        *,
        input_shape: Sequence[int] | None = None,
        num_classes: int | None = None,
        default_explanation: Explanation | None = None,
        prediction: str = "probabilities",
        predictions_field: str = "predictions",
        probabilities_key: str = "probabilities",
        explanations_field: str = "explanations",
        layout: str = "chw",
        offers_explanation: bool = True,
        timeout: float = 60.0,
        retries: int = 3,
        backoff: float = 0.25,
        max_rate_limit_waits: int = 100,
    ):
        self._input_shape = _input_shape(input_shape)
        if num_classes is not None and (isinstance(num_classes, bool) or int(num_classes) < 2):
            raise ValueError(f"num_classes: expected a whole number >= 2, got {num_classes!r}")
        if layout not in LAYOUTS:
            raise ValueError(f"layout: expected 'chw' or 'hwc', got {layout!r}")
        if prediction not in PREDICTIONS:
            raise ValueError(
                f"prediction: expected 'probabilities' or 'logits', got {prediction!r}"
            )
        if default_explanation is not None and not isinstance(default_explanation, Explanation):
            raise ValueError(
                "default_explanation: expected an Explanation, "
                f"got {type(default_explanation).__name__}"
            )
        super().__init__(
            url,
            api_key,
            timeout=timeout,
            retries=retries,
            backoff=backoff,
            max_rate_limit_waits=max_rate_limit_waits,
        )
        self.protocol = "v1"
        self._num_classes = None if num_classes is None else int(num_classes)
        self.default_explanation = default_explanation or Explanation()
        self.prediction = prediction
        self.predictions_field, self.probabilities_key = predictions_field, probabilities_key
        self.explanations_field, self.layout = explanations_field, layout
        self._offers_explanation = bool(offers_explanation)
        try:
            self.name = self.name or self.only_model()
            ready = self.get_json(f"/v1/models/{self.name}")
            if ready.get("ready") is False:
                raise ServiceError(f"{self.root}/v1/models/{self.name}: the model is not ready")
        except BaseException:
            self.close()
            raise

    # --- the Oracle protocol ----------------------------------------------------------------

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return self._input_shape

    @property
    def num_classes(self) -> int:
        if self._num_classes is None:
            raise ValueError(
                "num_classes: a KServe V1 service does not say how many classes it has "
                "before its first answer; give num_classes= (megex attack: --dataset)"
            )
        return self._num_classes

    @property
    def offers_explanation(self) -> bool:
        """Whether explanations are offered: V1 cannot say, so True unless told otherwise."""
        return self._offers_explanation

    def query(self, x: Any, explanation: Explanation | bool | None = None) -> Answer:
        """Answer a batch of images (``:explain`` with an explanation, else ``:predict``);
        the server charges one query per image."""
        images = validate_images(x, self.input_shape)
        spec = None
        body: dict[str, Any] = {"instances": self._instances(images)}
        if explanation is not None and explanation is not False:
            if not self._offers_explanation:
                raise ExplanationNotOffered("explanation: this service returns no explanations")
            parameters = requested_parameters(explanation)  # refuses anything else
            spec = explanation if isinstance(explanation, Explanation) else self.default_explanation
            if parameters:
                body["parameters"] = parameters
        verb = "predict" if spec is None else "explain"
        response = self.call(
            "POST",
            f"/v1/models/{self.name}:{verb}",
            content=dump_json(body),
            headers={"Content-Type": "application/json"},
            idempotent=True,
        )
        try:
            doc = json.loads(response.content)
        except ValueError:
            raise ServiceError(f"POST :{verb}: the reply is not JSON") from None
        if not isinstance(doc, dict):
            raise ServiceError(f"POST :{verb}: expected a JSON object, got {type(doc).__name__}")
        scores = self._scores(doc, len(images))
        logits = scores if self.prediction == "logits" else None
        probabilities = torch.softmax(scores, dim=1) if logits is not None else scores
        labels = probabilities.argmax(dim=1)
        maps = None
        if spec is not None:
            maps, explained = self._maps(doc, len(images), spec)
            if spec.target == "predicted":
                # The class each map explains is the server's prediction (its labels; ties
                # in the predictions shown cannot say which).
                labels = explained
        return Answer(probabilities, labels, logits, maps, spec, self.prediction)

    def __repr__(self) -> str:
        return f"RemoteV1Oracle({self.root}/v1/models/{self.name}, used={self._used})"

    # --- the wire ---------------------------------------------------------------------------

    def _instances(self, images: torch.Tensor) -> list[Any]:
        if self.layout == "hwc":
            images = images.permute(0, 2, 3, 1)
        return images.numpy().tolist()

    def _scores(self, doc: dict[str, Any], n: int) -> torch.Tensor:
        field = self.predictions_field
        rows = _items(doc, field, n, "predictions")
        key = self.probabilities_key
        if any(isinstance(row, dict) for row in rows):
            missing = [
                i for i, row in enumerate(rows) if not isinstance(row, dict) or key not in row
            ]
            if missing:
                first = rows[missing[0]]
                has = _keys(first) if isinstance(first, dict) else type(first).__name__
                raise ServiceError(
                    f"{field}[{missing[0]}]: has no {key!r} (it has {has}); name the key that "
                    "holds the class scores (probabilities_key=)"
                )
            rows = [row[key] for row in rows]
        try:
            scores = np.asarray(rows, dtype=np.float32)
        except (ValueError, TypeError):
            scores = None
        if scores is None or scores.ndim != 2 or scores.shape[1] < 2:
            raise ServiceError(
                f"{field}: expected one list of class scores per image (N, K), got "
                f"{_short(rows)}; a server that returns only labels cannot be read as scores"
            )
        if not np.isfinite(scores).all():
            raise ServiceError(f"{field}: holds NaN or infinite values")
        if self.prediction == "probabilities" and (scores.min() < -1e-6 or scores.max() > 1 + 1e-6):
            raise ServiceError(
                f"{field}: values from {scores.min():.4g} to {scores.max():.4g} are not "
                "probabilities; if they are logits, pass prediction='logits'"
            )
        classes = scores.shape[1]
        if self._num_classes is None:
            self._num_classes = classes
        elif classes != self._num_classes:
            raise ServiceError(
                f"{field}: {classes} classes per prediction, expected {self._num_classes}"
            )
        return torch.from_numpy(scores)

    def _maps(
        self, doc: dict[str, Any], n: int, spec: Explanation
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The maps, (N, K, C, H, W) for target "all" else (N, C, H, W), and the class each
        image's map explains (for "all": the first)."""
        field = self.explanations_field
        items = _items(doc, field, n, "explanations")
        classes = self.num_classes
        maps, explained = [], []
        for i, item in enumerate(items):
            where = f"{field}[{i}]"
            pairs = sorted(self._attributions(item, where), key=lambda pair: pair[0])
            indices = [k for k, _ in pairs]
            if spec.target == "all":
                if indices != list(range(classes)):
                    raise ServiceError(
                        f"{where}: maps of classes {indices}, expected one per class "
                        f"0..{classes - 1} (target 'all'){_told(spec, self.default_explanation)}"
                    )
                maps.append(np.stack([m for _, m in pairs]))
            else:
                if len(pairs) != 1 or (isinstance(spec.target, int) and indices[0] != spec.target):
                    raise ServiceError(
                        f"{where}: maps of classes {indices}, expected one of "
                        f"{'the predicted class' if spec.target == 'predicted' else spec.target}"
                        f"{_told(spec, self.default_explanation)}"
                    )
                if not 0 <= indices[0] < classes:
                    raise ServiceError(f"{where}: outputIndex {indices[0]} is not a class")
                maps.append(pairs[0][1])
            explained.append(indices[0])
        return torch.from_numpy(np.stack(maps)), torch.tensor(explained, dtype=torch.int64)

    def _attributions(self, item: Any, where: str) -> list[tuple[int, np.ndarray]]:
        """(class, map as (C, H, W)) of each attribution of one image's explanation."""
        attributions = item.get("attributions") if isinstance(item, dict) else None
        if not isinstance(attributions, list) or not attributions:
            raise ServiceError(f"{where}: expected {{'attributions': [...]}}, got {_short(item)}")
        pairs = []
        for j, attribution in enumerate(attributions):
            what = f"{where}.attributions[{j}]"
            try:
                features = attribution["featureAttributions"]
                index = attribution["outputIndex"]
                if isinstance(index, list):
                    (index,) = index
                values = (
                    features[INPUT_NAME] if len(features) != 1 else next(iter(features.values()))
                )
                arr = np.asarray(values, dtype=np.float32)
                pairs.append((int(index), arr))
            except (KeyError, TypeError, ValueError, AttributeError) as err:
                raise ServiceError(
                    f"{what}: expected featureAttributions (one map) and outputIndex ({err!r})"
                ) from None
            c, h, w = self.input_shape
            shape = (h, w, c) if self.layout == "hwc" else (c, h, w)
            if arr.shape != shape:
                raise ServiceError(f"{what}: a map of shape {arr.shape}, expected {shape}")
            if self.layout == "hwc":
                pairs[-1] = (pairs[-1][0], np.ascontiguousarray(arr.transpose(2, 0, 1)))
        return pairs


def _input_shape(input_shape: Sequence[int] | None) -> tuple[int, int, int]:
    if input_shape is None:
        raise ValueError(
            "input_shape: a KServe V1 service does not state the shape of the images it takes; "
            "give it as (C, H, W), e.g. input_shape=(1, 28, 28) (megex attack: --dataset)"
        )
    try:
        shape = tuple(int(s) for s in input_shape)
    except (TypeError, ValueError):
        shape = ()
    if len(shape) != 3 or min(shape) < 1:
        raise ValueError(f"input_shape: expected (C, H, W), got {input_shape!r}")
    return shape  # type: ignore[return-value]


def _told(spec: Explanation, default: Explanation) -> str:
    if spec is default:
        return (
            "; the server's own explanation is not the one this client was told "
            "(default_explanation=)"
        )
    return ""


def _items(doc: dict[str, Any], field: str, n: int, what: str) -> list[Any]:
    """The reply's list of `n` `what` (predictions or explanations) in `field`."""
    if field not in doc:
        raise ServiceError(
            f"the reply has no {field!r} field (it has {_keys(doc)}); name the field that "
            f"holds the {what} ({what}_field=)"
        )
    items = doc[field]
    if not isinstance(items, list) or len(items) != n:
        got = f"{len(items)} items" if isinstance(items, list) else type(items).__name__
        raise ServiceError(f"{field}: expected a list of {n} {what}, got {got}")
    return items


def _keys(doc: dict[str, Any]) -> str:
    keys = [str(k)[:40] for k in list(doc)[:10]]
    return ", ".join(repr(k) for k in keys) or "nothing"


def _short(value: Any, limit: int = 120) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
