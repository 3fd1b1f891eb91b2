"""Typed API errors and the one place that turns any failure into an OpenAI-shaped error.

``{"error": {"message", "type", "param", "code"}}``. Routes and the serving layer raise
:class:`APIError` subclasses; FastAPI's validation errors become 400s naming the field;
tfb_core's ``TFBError`` (bad user input) becomes a 400; anything else a logged 500.
"""

from __future__ import annotations

import json
import logging
import sys

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from tfb_core import TFBError

from .protocol import FieldError

log = logging.getLogger(__name__)


class APIError(Exception):
    """An error answered to the client: HTTP status, OpenAI error type, the offending field."""

    status = 500
    type = "server_error"

    def __init__(self, message: str, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers or {}

    def __reduce__(self):  # sent between processes (server/engine_process.py) as it is
        return _rebuild, (type(self), self.message, self.param, self.code, self.headers, self.status, self.type)


def _rebuild(cls, message, param, code, headers, status, type) -> APIError:
    error = cls.__new__(cls)
    APIError.__init__(error, message, param, code, headers)
    error.status, error.type = status, type
    return error


def portable(exc: BaseException) -> APIError:
    """``exc`` as the client would see it (:func:`public_error`), as an APIError that pickles."""
    if isinstance(exc, APIError):
        return exc
    status, body, headers = public_error(exc)
    e = body["error"]
    return _rebuild(APIError, e["message"], e["param"], e["code"], headers, status, e["type"])


class BadRequest(APIError):
    status, type = 400, "invalid_request_error"


class Unauthorized(APIError):
    status, type = 401, "authentication_error"


class NotFound(APIError):
    status, type = 404, "not_found_error"


class QueueFull(APIError):
    status, type = 429, "rate_limit_error"

    def __init__(self, message: str, retry_after: int = 1):
        super().__init__(message, code="queue_full", headers={"Retry-After": str(retry_after)})


class NotReady(APIError):
    status, type = 503, "service_unavailable"


class RequestTimeout(APIError):
    status, type = 504, "timeout_error"


class ClientClosed(APIError):
    """The client went away before its answer: its work was dropped (nginx's 499; metrics
    count it as ``status="client_closed"``)."""

    status, type = 499, "client_closed"


class OutOfMemory(APIError):
    status, type = 503, "service_unavailable"

    def __init__(self, error: BaseException):
        # the torch error is not kept: its traceback holds the failed forward's tensors
        super().__init__("the server ran out of accelerator memory for this work (KV cache or "
                         "activations); retry later, or ask for fewer num_samples, tokens or items",
                         code="out_of_memory", headers={"Retry-After": "1"})


def as_api_error(error: Exception) -> Exception:
    """A failed forward's exception as the client should see it: out of memory is a 503."""
    torch = sys.modules.get("torch")  # not imported here: a process that never loaded torch has no torch error
    return OutOfMemory(error) if torch is not None and isinstance(error, torch.OutOfMemoryError) else error


def error_body(status: int, message: str, type: str, param: str | None = None,
               code: str | None = None) -> dict:
    """The OpenAI error object (every error response of the server is built here); text that
    UTF-8 cannot carry (a lone surrogate echoed from the input) is escaped."""
    message = message.encode("utf-8", "backslashreplace").decode("utf-8")
    param = param if param is None else param.encode("utf-8", "backslashreplace").decode("utf-8")
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def error_response(status: int, message: str, type: str, param: str | None = None,
                   code: str | None = None, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(error_body(status, message, type, param, code), status_code=status,
                        headers=headers)


def public_error(exc: BaseException) -> tuple[int, dict, dict[str, str] | None]:
    """(status, body, headers) the client sees for a failure, in a JSON answer or an SSE event:
    an APIError as it is, tfb_core's TFBError a 400, anything else a 500 naming only its type
    (its text may hold local paths or tensor contents: it goes to the log)."""
    if isinstance(exc, APIError):
        return exc.status, error_body(exc.status, exc.message, exc.type, exc.param, exc.code), exc.headers
    if isinstance(exc, TFBError):
        return 400, error_body(400, str(exc), "invalid_request_error", code="invalid_value"), None
    return 500, error_body(500, f"internal error: {type(exc).__name__}", "server_error"), None


def sse_error(exc: BaseException) -> tuple[int, str]:
    """(status, event) for a failure in a stream that has started: the OpenAI error event holds
    the body the JSON answer would have (:func:`public_error`)."""
    status, body, _ = public_error(exc)
    return status, f"data: {json.dumps(body)}\n\n"


async def handle_error(request: Request, exc: Exception) -> JSONResponse:
    """The one exception handler: every failure leaves the server as an OpenAI error."""
    if isinstance(exc, (APIError, TFBError)):
        status, body, headers = public_error(exc)
        return JSONResponse(body, status_code=status, headers=headers)
    if isinstance(exc, RequestValidationError):
        content_type = request.headers.get("content-type")
        if content_type is not None and not _is_json(content_type):
            return error_response(400, f"the body must be JSON sent with the header 'Content-Type: "
                                  f"application/json'; this request's Content-Type is {content_type!r} (curl -d "
                                  f"sends application/x-www-form-urlencoded: add -H 'Content-Type: "
                                  f"application/json')", "invalid_request_error", code="invalid_content_type")
        message, param = _validation_message(exc.errors())
        return error_response(400, message, "invalid_request_error", param, code="invalid_value")
    if isinstance(exc, StarletteHTTPException):
        kind = {404: "not_found_error", 405: "invalid_request_error"}.get(exc.status_code, "invalid_request_error")
        message = f"{request.method} {request.url.path}: {exc.detail}"
        return error_response(exc.status_code, message, kind, headers=getattr(exc, "headers", None))
    log.exception("internal error on %s %s", request.method, request.url.path)
    status, body, _ = public_error(exc)
    return JSONResponse(body, status_code=status)


def _is_json(content_type: str) -> bool:
    """application/json or application/*+json (what FastAPI parses as JSON)."""
    media = content_type.split(";")[0].strip().lower()
    return media == "application/json" or (media.startswith("application/") and media.endswith("+json"))


def _validation_message(errors: list[dict]) -> tuple[str, str | None]:
    """(message, param) for pydantic errors: the first error's field path, all messages."""
    parts, first_param = [], None
    for err in errors[:5]:
        if err.get("type") == "json_invalid":
            ctx = err.get("ctx", {}).get("error", "")
            return f"the body is not valid JSON ({ctx}); send a JSON object", None
        # the field path, without pydantic's names of union members (str, list[...], function-after[...])
        loc = [str(p) for p in err.get("loc", ()) if p not in ("body", "single", "batch")
               and not _type_tag(p)]
        # model-level checks of an item carry no field name: point at the item, or the field it blames
        param = ".".join(loc) or None
        blamed = err.get("ctx", {}).get("error")
        if isinstance(blamed, FieldError):
            param = ".".join([*loc, blamed.param])
        first_param = first_param or param
        msg = err.get("msg", "invalid value").removeprefix("Value error, ")
        if err.get("type") == "missing":
            msg = "this field is required"
        elif err.get("type") == "extra_forbidden":
            msg = "unknown field"
        where = f"'{param}'" if param else "the body"
        parts.append(msg if isinstance(blamed, FieldError) else f"{where}: {msg}" + _got(err))
    return "; ".join(parts), first_param


def _type_tag(part) -> bool:
    return isinstance(part, str) and (part in ("str", "int", "float", "bool", "list", "dict")
                                      or any(c in part for c in "[`("))


def _got(err: dict) -> str:
    if err.get("type") in ("missing", "value_error", "extra_forbidden", "json_invalid"):
        return ""
    try:
        got = json.dumps(err.get("input"))
    except (TypeError, ValueError):
        return ""
    return f" (got {got[:80]})" if got is not None else ""


def install_error_handlers(app: FastAPI) -> None:
    for exc_type in (APIError, RequestValidationError, TFBError, StarletteHTTPException, Exception):
        app.add_exception_handler(exc_type, handle_error)
