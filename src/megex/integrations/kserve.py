"""A megex victim served by KServe's own model server, with megex's defences and monitors.

:class:`MegexModel` is a ``kserve.Model`` that answers with megex's
:class:`~megex.oracle.Responder` (the code that answers ``megex serve`` and the in-process
:class:`~megex.oracle.LocalOracle`), so that its answers, defences included, are megex's own
for the same seed:

- Open Inference Protocol (V2): ``GET /v2/models/NAME`` (input ``images``, outputs
  ``probabilities``, ``labels``, ``explanation``) and ``POST /v2/models/NAME/infer``, in JSON or
  with the binary tensor data extension, explanation settings in the request's ``parameters``
  (:func:`megex.serving.explanation_from_parameters`) and the explanation's description in
  its output's ``parameters``, as ``megex serve`` answers; :class:`megex.client.RemoteOracle`
  (``megex attack --victim URL``) works against it unchanged.
- KServe V1 with Vertex AI payloads: ``:predict`` (instances -> predictions) and
  ``:explain`` (instances -> explanations and predictions), parsed and rendered by
  :mod:`megex.serving.v1`.

KServe has no API keys and no ledger: the model counts the images it answered (one count
for all callers), logs it with every request, and returns it in ``X-Queries-Used`` with
``X-Query-Budget: unlimited`` on every response about the model, its metadata included (so
a client reads the count before its first query); a client's budget is enforced by the
client (``megex attack --budget``). A request that would cost more model passes than
`max_passes_per_request` is refused, as ``megex serve`` refuses it. Query monitors
(:mod:`megex.detection`), if any, see every answered request as the stream of one client,
and their flags are logged. Refusals answer ``{"error": ..., "code": ...}`` with megex's
status codes. KServe's model metadata has no ``parameters``: the model serves
probabilities (the prediction mode a client assumes when none is stated).

Run ``python -m megex.integrations.kserve --victim FILE [--defense SPEC ...]``; needs the
``kserve`` extra (``pip install 'megex[kserve]'``).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import logging
import math
import sys
import threading
import uuid
from collections.abc import Sequence
from typing import Any

import kserve
import kserve.model_server
from fastapi import Request
from fastapi.responses import JSONResponse
from kserve.protocol.infer_type import (
    InferOutput,
    InferRequest,
    InferResponse,
    RequestedOutput,
    to_http_parameters,
)
from starlette.datastructures import MutableHeaders

from ..defenses import Defense, build_defense
from ..detection import Flag, Monitor, build_monitor
from ..explain import METHODS, OUTPUTS, Explanation, parse_target
from ..ledger import Usage
from ..oracle import Answer, ExplanationNotOffered, Responder
from ..serving.codec import INPUT_NAME, WireError, dump_json, numeric_array
from ..serving.errors import HTTPError, bad_request, check_passes
from ..serving.limits import DEFAULT_MAX_PASSES_PER_REQUEST
from ..serving.monitoring import MonitorHub
from ..serving.parsing import Parsed, explanation_from_parameters, validated_images
from ..serving.settings import DEFAULT_MODEL_NAME
from ..serving.v1 import parse_v1, render_v1_explain, render_v1_predict
from ..serving.v2 import metadata_document
from ..victim import Victim
from .explainers import ExternalExplainer, build_explainer

__all__ = ["MegexModel", "add_to_app", "build_model", "main"]

log = logging.getLogger("megex.kserve")

# Request parameters of the Open Inference Protocol (and Triton's clients) that do not
# concern explanations: accepted and ignored, as megex serve does.
_PROTOCOL_PARAMETERS = {
    "binary_data_output",
    "sequence_id",
    "sequence_start",
    "sequence_end",
    "priority",
    "timeout",
    "headers",
}
# Error messages may quote what a client sent; they are cut at this length.
_MAX_MESSAGE = 1000
# The monitors' one client: KServe tells the model nothing about who asks.
_ACCOUNT = 0


class _FlagLog:
    """Where the monitors' flags go (MonitorHub logs each one): the latest kept in memory."""

    def __init__(self, keep: int = 10_000):
        self.flags: collections.deque[Flag] = collections.deque(maxlen=keep)

    def record_flags(self, account_id: int, flags: Sequence[Flag]) -> None:
        self.flags.extend(flags)


class MegexModel(kserve.Model):
    """A ``kserve.Model`` answering with megex's Responder (see the module's docstring).

    responder: what answers, with its defences and seed (:meth:`from_victim` makes one
    from a victim); it must serve probabilities. monitors: megex query monitors, each with
    a threshold, shown every answered request; their flags are logged and kept in
    :attr:`flags`. max_passes_per_request: the most model passes one request may cost
    (None: no limit). answered: the images answered so far, over all callers and endpoints.
    """

    def __init__(
        self,
        responder: Responder,
        name: str = DEFAULT_MODEL_NAME,
        monitors: Sequence[Monitor] = (),
        max_passes_per_request: int | None = DEFAULT_MAX_PASSES_PER_REQUEST,
    ):
        if responder.prediction != "probabilities":
            # KServe's model metadata cannot state another prediction mode to a client.
            raise ValueError(
                f"responder: serves {responder.prediction!r}; under KServe a megex model "
                "serves probabilities (defences of the probabilities apply)"
            )
        super().__init__(name)
        self.responder = responder
        # What megex.serving.v2.metadata_document reads of a service.
        self.expose_architecture = False
        self.output_names = ["probabilities", "labels"]
        if responder.explanation is not None:
            self.output_names.append("explanation")
        self._flag_log = _FlagLog()
        self.monitors = MonitorHub(monitors, self._flag_log) if monitors else None
        self.max_passes_per_request = max_passes_per_request
        self.answered = 0
        self._count_lock = threading.Lock()

    @classmethod
    def from_victim(
        cls,
        victim: Victim,
        name: str = DEFAULT_MODEL_NAME,
        *,
        explanation: Explanation | None = Explanation("gradient"),
        allow_explanation_choice: bool = True,
        defenses: Sequence[Defense] = (),
        seed: int = 0,
        monitors: Sequence[Monitor] = (),
        max_passes_per_request: int | None = DEFAULT_MAX_PASSES_PER_REQUEST,
        explainer: ExternalExplainer | None = None,
    ) -> MegexModel:
        """A model serving `victim` as ``megex serve`` would with these settings (`explainer`:
        what computes the maps instead of megex's own methods, as ``--explainer``)."""
        responder = Responder(
            victim,
            explanation=explanation,
            allow_explanation_choice=allow_explanation_choice,
            defenses=defenses,
            seed=seed,
            explainer=explainer,
        )
        return cls(responder, name, monitors, max_passes_per_request)

    @property
    def flags(self) -> list[Flag]:
        """The latest flags the monitors raised (oldest first)."""
        return list(self._flag_log.flags)

    # --- KServe's model interface ---------------------------------------------------------

    def load(self) -> bool:
        """Ready to serve, with KServe's app set for this model (:func:`add_to_app`)."""
        if not self.ready:
            add_to_app(self)
        self.ready = True
        return self.ready

    def stop(self) -> None:
        if self.monitors is not None:  # the requests answered so far are observed first
            self.monitors.close()
        super().stop()

    def get_input_types(self) -> list[dict[str, Any]]:
        return metadata_document(self)["inputs"]

    def get_output_types(self) -> list[dict[str, Any]]:
        return metadata_document(self)["outputs"]

    async def predict(
        self, payload: InferRequest | dict[str, Any] | bytes, headers: dict[str, str] | None = None
    ) -> InferResponse | dict[str, Any]:
        """V2 ``infer`` (an InferRequest) or V1 ``:predict`` (a JSON body)."""
        if isinstance(payload, InferRequest):
            parsed = _parse_v2(payload, self.responder, self.output_names)
            answer = await asyncio.to_thread(self._answer, parsed, "v2/infer")
            return _render_v2(answer, parsed, self.name)
        parsed = self._parse_v1(payload, explain=False)
        answer = await asyncio.to_thread(self._answer, parsed, "v1/predict")
        return json.loads(render_v1_predict(answer, parsed)[0])

    async def explain(
        self, payload: dict[str, Any] | bytes, headers: dict[str, str] | None = None
    ) -> dict[str, Any]:
        """V1 ``:explain``: Vertex AI's ExplainResponse, as ``megex serve`` answers it."""
        parsed = self._parse_v1(payload, explain=True)
        answer = await asyncio.to_thread(self._answer, parsed, "v1/explain")
        return json.loads(render_v1_explain(answer, parsed, self.name)[0])

    # --- answering ------------------------------------------------------------------------

    def _parse_v1(self, payload: dict[str, Any] | bytes, explain: bool) -> Parsed:
        # KServe has decoded a JSON body; megex's parser reads the same document.
        body = payload if isinstance(payload, bytes) else dump_json(payload)
        responder = self.responder
        try:
            return parse_v1(
                body,
                responder.input_shape,
                explain,
                responder.explanation,
                num_classes=responder.num_classes,
            )
        except WireError as err:
            raise bad_request(str(err), err.code) from None

    def _answer(self, parsed: Parsed, endpoint: str) -> Answer:
        """The Responder's answer, counted and logged."""
        try:
            spec = self.responder.resolve_explanation(parsed.explanation)
        except ExplanationNotOffered as err:
            raise HTTPError(403, str(err), "explanation_not_offered") from None
        images = parsed.images
        n = int(images.shape[0])
        self._check_compute(n, n * self.responder.passes_per_image(spec))
        if self.monitors is None:
            answer = self.responder.answer(images, spec)
        else:
            answer, honest = self.responder.answer_with_probabilities(images, spec)
            try:
                self.monitors.submit(_ACCOUNT, images, honest)
            except Exception:  # the answer stands whatever happens to the monitors
                log.exception("queueing a request for the monitors")
        with self._count_lock:
            self.answered += n
            total = self.answered
        what = f" with explanations ({spec.describe()})" if spec is not None else ""
        log.info("%s: answered %d image(s)%s; %d in all", endpoint, n, what, total)
        return answer

    def _check_compute(self, n: int, passes: int) -> None:
        check_passes(n, passes, self.max_passes_per_request)


# --- the Open Inference Protocol over KServe's request and response types -----------------


def _parse_v2(request: InferRequest, responder: Responder, output_names: list[str]) -> Parsed:
    """A KServe InferRequest as megex's Parsed, checked as megex serve checks it."""
    try:
        return _parsed_v2(request, responder, output_names)
    except WireError as err:
        raise bad_request(str(err), err.code) from None


def _parsed_v2(request: InferRequest, responder: Responder, output_names: list[str]) -> Parsed:
    inputs = request.inputs or []
    if len(inputs) != 1 or inputs[0].name != INPUT_NAME:
        raise WireError(f"inputs: expected exactly one tensor named {INPUT_NAME!r}")
    tensor = inputs[0]
    if tensor.datatype != "FP32":
        raise WireError(
            f"inputs.{INPUT_NAME}: datatype {str(tensor.datatype)[:20]!r}, expected 'FP32' "
            "(float32 images in [0, 1])",
            "invalid_dtype",
        )
    shape = [int(s) for s in tensor.shape]
    input_shape = list(responder.input_shape)
    if len(shape) != 4 or shape[1:] != input_shape or shape[0] < 1:
        raise WireError(
            f"inputs.{INPUT_NAME}.shape: {shape} does not match {[-1, *input_shape]} "
            "(N >= 1 images)",
            "invalid_images",
        )
    values = numeric_array(tensor.data, f"inputs.{INPUT_NAME}.data").reshape(-1)
    if values.size != math.prod(shape):
        raise WireError(f"inputs.{INPUT_NAME}.data: {values.size} values, shape {shape} needs more")
    images = validated_images(values.reshape(shape), input_shape, INPUT_NAME)

    parameters = to_http_parameters(request.parameters or {})
    binary_default = parameters.get("binary_data_output", False)
    if not isinstance(binary_default, bool):
        raise WireError("parameters.binary_data_output: expected true or false")
    outputs = _requested_outputs(request.request_outputs, output_names, binary_default)
    requested = explanation_from_parameters(
        parameters,
        responder.explanation,
        ignore=_PROTOCOL_PARAMETERS,
        num_classes=responder.num_classes,
    )
    wants_explanation = any(name == "explanation" for name, _ in outputs)
    return Parsed(images, requested if wants_explanation else None, outputs, request.id)


def _requested_outputs(
    requested: list[RequestedOutput] | None, output_names: list[str], binary_default: bool
) -> list[tuple[str, bool]]:
    """(name, binary) of each output asked for; without a list, every output but the
    explanation, which costs far more than a prediction and must be asked for by name."""
    if not requested:
        return [(name, binary_default) for name in output_names if name != "explanation"]
    outputs = []
    for item in requested:
        if item.name == "explanation" and item.name not in output_names:
            raise HTTPError(
                403, "explanation: this model returns no explanations", "explanation_not_offered"
            )
        if item.name not in output_names:
            raise WireError(
                f"outputs: unknown {str(item.name)[:80]!r}; this model has "
                f"{', '.join(output_names)}"
            )
        params = to_http_parameters(item.parameters or {})
        if params.get("classification"):
            raise WireError("the classification extension is not supported; read 'probabilities'")
        binary = params.get("binary_data", binary_default)
        if not isinstance(binary, bool):
            raise WireError(f"outputs.{item.name}.parameters.binary_data: expected true or false")
        outputs.append((item.name, binary))
    return outputs


def _render_v2(answer: Answer, parsed: Parsed, model_name: str) -> InferResponse:
    """The answer's outputs as asked; the explanation's output describes it in its
    parameters, as megex serve's does."""
    tensors = {
        "probabilities": answer.probabilities,
        "labels": answer.labels,
        "explanation": answer.explanation,
    }
    outputs, asked = [], []
    for name, binary in parsed.outputs:
        values = tensors[name].numpy()
        integer = values.dtype.kind in "iu"
        values = values.astype("<i8" if integer else "<f4", copy=False)
        spec = answer.explanation_spec
        params = spec.to_dict() if name == "explanation" and spec is not None else None
        datatype = "INT64" if integer else "FP32"
        outputs.append(InferOutput(name, list(values.shape), datatype, values, params))
        asked.append(RequestedOutput(name, {"binary_data": binary}))
    return InferResponse(
        parsed.request_id if parsed.request_id is not None else uuid.uuid4().hex,
        model_name,
        outputs,
        model_version="1",
        requested_outputs=asked,
    )


# --- KServe's app -------------------------------------------------------------------------


async def _http_error(request: Request, err: HTTPError) -> JSONResponse:
    message = err.message
    if len(message) > _MAX_MESSAGE:
        message = message[: _MAX_MESSAGE - 3] + "..."
    return JSONResponse({"error": message, "code": err.code, **err.extra}, err.status, err.headers)


class _CountHeaders:
    """ASGI middleware: the model's count on every response about it (metadata included,
    which KServe's model interface cannot reach), as megex serve's quota headers, so that
    a client reads the count before its first query."""

    def __init__(self, app: Any, model: MegexModel):
        self.app, self.model = app, model
        self._v1 = f"/v1/models/{model.name}"
        self._v2 = f"/v2/models/{model.name}"

    def _about_the_model(self, path: str) -> bool:
        return any(
            path == prefix or path[len(prefix) : len(prefix) + 1] in ("/", ":")
            for prefix in (self._v1, self._v2)
            if path.startswith(prefix)
        )

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or not self._about_the_model(scope["path"]):
            await self.app(scope, receive, send)
            return

        async def send_with_count(message: Any) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                for key, value in Usage(self.model.answered, None).headers().items():
                    headers[key] = value
            await send(message)

        await self.app(scope, receive, send_with_count)


def add_to_app(model: MegexModel, app: Any = None) -> None:
    """Set KServe's app (default: the one its ModelServer serves) for `model`: megex's
    refusals (HTTPError) answered as megex serve answers them (their status,
    ``{"error", "code"}``), and the model's count in the ``X-Queries-*`` headers of every
    response about it. Before the server starts (MegexModel.load does it)."""
    app = kserve.model_server.app if app is None else app
    app.add_exception_handler(HTTPError, _http_error)
    app.add_middleware(_CountHeaders, model=model)


# --- the entry point ----------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m megex.integrations.kserve",
        description="Serve a victim saved by Victim.save with KServe's ModelServer (V1 "
        ":predict/:explain and V2 infer over HTTP; no gRPC), with megex's defences and query "
        "monitors inside it. KServe has no API keys or budgets: clients enforce their own.",
    )
    p.add_argument("--victim", required=True, metavar="FILE", help="victim .safetensors file")
    p.add_argument(
        "--defense",
        action="append",
        default=[],
        metavar="SPEC",
        help="a defence applied to what is returned (repeatable, applied in order; "
        "`megex defenses` lists them)",
    )
    p.add_argument(
        "--monitor",
        action="append",
        default=[],
        metavar="SPEC",
        help="a query-stream monitor shown every answered request, its flags logged: "
        "prada[:threshold=W,...] or ood:threshold=T[,...] or NAME:calibration=FILE "
        "(repeatable, one per kind)",
    )
    p.add_argument("--model-name", default=DEFAULT_MODEL_NAME, help="the model's name in URLs")
    p.add_argument("--http-port", type=int, default=8080, help="HTTP port")
    p.add_argument("--seed", type=int, default=0, help="seed of SmoothGrad and defence noise")
    p.add_argument(
        "--max-passes-per-request",
        type=int,
        default=DEFAULT_MAX_PASSES_PER_REQUEST,
        metavar="N",
        help="model passes one request may cost (0: no limit)",
    )
    p.add_argument(
        "--explanation-method",
        choices=(*METHODS, "none"),
        default="gradient",
        help="explanation returned on request; 'none' offers no explanations",
    )
    p.add_argument(
        "--explanation-target",
        type=parse_target,
        default="predicted",
        help="'predicted', 'all' or a class index",
    )
    p.add_argument(
        "--explanation-output",
        choices=OUTPUTS,
        default="probability",
        help="quantity differentiated",
    )
    p.add_argument(
        "--explainer",
        metavar="SPEC",
        help="compute the maps with the explainer you ship instead of megex's own: "
        "captum:NAME[:key=value,...] (needs captum) or module:function (as megex serve's "
        "--explainer); its maps are labelled with captum's megex equivalent, else with "
        "--explanation-method",
    )
    p.add_argument(
        "--fixed-explanation",
        action="store_true",
        help="requests get only the configured explanation (default: they may choose)",
    )
    return p


def build_model(args: argparse.Namespace) -> MegexModel:
    """The model that the parsed arguments describe (ValueError on a bad setting)."""
    if args.max_passes_per_request < 0:
        raise ValueError("--max-passes-per-request: expected >= 0 (0: no limit)")
    defenses = [build_defense(spec) for spec in args.defense]
    monitors = [build_monitor(spec) for spec in args.monitor]
    explainer, method = None, args.explanation_method
    if args.explainer:
        if method == "none":
            raise ValueError(
                "--explainer: the model offers no explanations (--explanation-method none)"
            )
        try:
            explainer = build_explainer(args.explainer)
        except ValueError as err:
            raise ValueError(f"--explainer: {err}") from None
        method = explainer.method or method
    explanation = None
    if method != "none":
        explanation = Explanation(
            method,
            target=args.explanation_target,
            output=args.explanation_output,
        )
    victim = Victim.load(args.victim)
    for monitor in monitors:
        shape = monitor.calibrated_on.get("input_shape")
        if shape is not None and tuple(shape) != tuple(victim.input_shape):
            raise ValueError(
                f"--monitor {monitor.name}: calibrated on images of shape {tuple(shape)}; "
                f"this victim takes {tuple(victim.input_shape)}"
            )
    return MegexModel.from_victim(
        victim,
        args.model_name,
        explanation=explanation,
        allow_explanation_choice=not args.fixed_explanation,
        defenses=defenses,
        seed=args.seed,
        monitors=monitors,
        max_passes_per_request=args.max_passes_per_request or None,
        explainer=explainer,
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Parse the arguments, build the model and run KServe's ModelServer until stopped."""
    parser = _parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO,
        stream=sys.stderr,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
    )
    try:
        model = build_model(args)
    except (ValueError, OSError) as err:
        parser.error(str(err))
    model.load()
    defenses = ", ".join(d.spec() for d in model.responder.defenses) or "none"
    monitors = model.monitors.monitors if model.monitors is not None else []
    log.info(
        "serving %s as %r on port %d; defences: %s; monitors: %s; no budget (clients "
        "enforce their own)",
        args.victim,
        model.name,
        args.http_port,
        defenses,
        ", ".join(m.name for m in monitors) or "none",
    )
    # One process (the count and the monitors' state are in it), HTTP only.
    server = kserve.ModelServer(http_port=args.http_port, workers=1, enable_grpc=False)
    server.start([model])
    return 0


if __name__ == "__main__":
    sys.exit(main())
