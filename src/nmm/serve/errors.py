"""Every failure in OpenAI's error shape, ``{"error": {"message", "type", "param", "code"}}``.

`ApiError` (nmm.serve.schemas) is what the server's own checks raise; the handlers here also turn
FastAPI's validation errors, Starlette's 404/405 and any bug into that shape, so a client never sees
FastAPI's ``{"detail": ...}``.
"""

from __future__ import annotations

import re

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from nmm.serve.schemas import ApiError

NOT_JSON = ApiError(400, "the request body must be a JSON object (Content-Type: application/json)",
                    code="invalid_json")


def error_response(error: ApiError) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if error.status == 401 else None
    return JSONResponse(error.body(), status_code=error.status, headers=headers)


async def api_error(_request, error: ApiError):
    return error_response(error)


async def invalid_request(_request, error: RequestValidationError):
    first = error.errors()[0] if error.errors() else {}
    # loc is like ("body", "messages", 0, "content", "constrained-str"): keep the field names and indices
    loc = [x for x in first.get("loc", ())[1:] if isinstance(x, int) or re.fullmatch(r"\w+", x)]
    if first.get("type") == "json_invalid" or not loc:
        return error_response(NOT_JSON)
    param = "".join(f"[{x}]" if isinstance(x, int) else f".{x}" for x in loc).lstrip(".")
    return error_response(ApiError(400, f"{param}: {first.get('msg', 'invalid value')}", param=param,
                                   code="invalid_value"))


async def http_error(_request, error: HTTPException):
    if error.status_code == 400:  # FastAPI could not parse the body (e.g. JSON nested too deep)
        return error_response(NOT_JSON)
    code = {404: "not_found", 405: "method_not_allowed"}.get(error.status_code)
    return error_response(ApiError(error.status_code, str(error.detail), code=code))


async def server_error(_request, _error: Exception):  # a bug: say so in OpenAI's shape
    return error_response(ApiError(500, "internal server error", type="server_error"))


def add_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(ApiError, api_error)
    app.add_exception_handler(RequestValidationError, invalid_request)
    app.add_exception_handler(HTTPException, http_error)
    app.add_exception_handler(Exception, server_error)  # Starlette answers it in ServerErrorMiddleware
