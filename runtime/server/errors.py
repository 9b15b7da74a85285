"""chatfn errors as HTTP responses: ``{"error": {"code", "message"}}`` with a status that
follows the code. Messages are the errors' own (never a traceback or a secret)."""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from sandbox.errors import ChatfnError

STATUS: dict[str, int] = {
    "invalid_request": 400,
    "unauthorized": 401,
    "not_found": 404,
    "user_not_found": 404,
    "not_deployed": 404,
    "already_exists": 409,
    "user_exists": 409,
    "session_active": 409,
    "deploy_rejected": 422,
    "dependency_error": 422,
    "overloaded": 503,
    "storage_error": 503,
}
_HTTP_CODES = {
    401: "unauthorized",
    404: "not_found",
    405: "invalid_request",
    413: "invalid_request",
}


def error_response(code: str, message: str, status: int | None = None) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if code == "unauthorized" else None
    return JSONResponse(
        {"error": {"code": code, "message": message}},
        status_code=status or STATUS.get(code, 500),
        headers=headers,
    )


def install(app: FastAPI) -> None:
    @app.exception_handler(ChatfnError)
    async def _chatfn(_request: Request, exc: ChatfnError) -> JSONResponse:
        return error_response(exc.code, exc.message)

    @app.exception_handler(RequestValidationError)
    async def _validation(_request: Request, exc: RequestValidationError) -> JSONResponse:
        if any(err.get("type") == "json_invalid" for err in exc.errors()):
            return error_response("invalid_request", "the body is not valid JSON")
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err.get('loc', ()) if p != 'body') or 'body'}: "
            f"{err.get('msg', 'invalid')}"
            for err in exc.errors()
        )
        return error_response("invalid_request", problems[:1000] or "invalid request")

    @app.exception_handler(StarletteHTTPException)
    async def _http(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = _HTTP_CODES.get(exc.status_code, "invalid_request")
        return error_response(code, str(exc.detail), exc.status_code)
