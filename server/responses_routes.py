"""The Responses API route: ``POST /v1/responses`` (OpenAI's Responses API, text in and out).

Contract: :class:`ResponsesController` only declares the route and its
OpenAPI documentation, lets Litestar parse the body into
:class:`tuneloop.server.responses_protocol.ResponsesRequest` (unknown fields
are a 400 naming them) and hands it to a
:class:`tuneloop.server.responses_serving.ResponsesServing` over the app's
``engine`` and ``router`` (``app.state``), which does the work and builds the
response. Errors are answered by the app's exception handlers
(:mod:`tuneloop.server.errors`). The app mounts it behind the
inference-scope guard, next to :class:`tuneloop.server.api_router.OpenAIController`.
"""

from __future__ import annotations

from typing import Any

from litestar import Controller, Request, Response, post
from litestar.openapi import ResponseSpec
from litestar.params import JSONBody

from tuneloop.server.api_router import streaming_operation
from tuneloop.server.errors import error_responses
from tuneloop.server.responses_protocol import (
    ContentPartEvent,
    ErrorEvent,
    OutputItemEvent,
    ResponseLifecycleEvent,
    ResponseObject,
    ResponsesRequest,
    TextDeltaEvent,
    TextDoneEvent,
)
from tuneloop.server.responses_serving import ResponsesServing

_RESPONSES = {
    200: ResponseSpec(ResponseObject, description="the response (`stream: true`: server-sent events)"),
    **error_responses(
        400,
        401,
        404,
        413,
        503,
        notes={
            400: "invalid request: bad JSON, a wrong type or an out-of-range value, an unknown parameter, a declared "
            "but unsupported one (`previous_response_id`, `tools`, a `text.format` other than text, `include`, "
            "`background`), or `input` over the model's context (`context_length_exceeded`); `param` names it",
            404: "no model by that name is served here (`model_not_found`; see GET /v1/models)",
        },
    ),
}


class ResponsesController(Controller):
    """OpenAI's Responses API (inference scope)."""

    path = "/v1"
    tags = ["OpenAI"]

    @post(
        "/responses",
        status_code=200,
        summary="Create a model response (OpenAI Responses API, text only)",
        description="Generate a reply to `input` (a string, or a list of `{role, content}` messages) after "
        "`instructions` (a system message) with the model named by `model`. The `id` is the request id "
        "(`resp_...`, also `X-Request-Id`, usable with `POST /v1/feedback`). `stream: true` answers with "
        "server-sent events (`event: response.created` ... `response.output_text.delta` ... "
        "`response.completed`). Nothing is stored for `previous_response_id`; tools are not supported.",
        responses=_RESPONSES,
        operation_class=streaming_operation(
            ResponseLifecycleEvent,
            OutputItemEvent,
            ContentPartEvent,
            TextDeltaEvent,
            TextDoneEvent,
            ErrorEvent,
            done=False,
        ),
    )
    async def create_response(self, request: Request, data: JSONBody[ResponsesRequest]) -> Response[Any]:
        st = request.app.state
        return await ResponsesServing(st.engine, st.router).create(request, data)
