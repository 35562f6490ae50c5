"""The FastAPI app, ``APP``: the template's v1 routes and the Open Inference Protocol v2 routes.

    gunicorn kiln_fastapi.main:APP -b 0.0.0.0:8080 -w 4 -k uvicorn.workers.UvicornWorker --chdir src
    uvicorn kiln_fastapi.main:APP --app-dir src --port 8080

Every worker process loads the model when it starts; a missing or unreadable model stops the start
with a message naming it, so a server that answers always has its model.
"""

from __future__ import annotations

import gc
import json
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from starlette.exceptions import HTTPException

from kiln import general_utils
from kiln_fastapi.config import get_settings
from kiln_fastapi.deps import ModelLoadError, load_model
from kiln_fastapi.v1.routers import model as model_routes
from kiln_fastapi.v2 import routes as v2_routes

SETTINGS = get_settings()
logger = logging.getLogger(__name__)


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    general_utils.setup_logging(SETTINGS.LOGGER_CONFIG_PATH)
    try:
        app.state.model = load_model(SETTINGS)
    except ModelLoadError as error:
        logger.error("kiln server not started: %s", error)
        raise
    # The worker's ~200k start-up objects (torch, FastAPI, the model) live as long as it does; frozen, the
    # collector's full passes skip them. Unfrozen, each full pass walked them all for 60-170 ms, during
    # which every request in the worker waited: the intermittent ~1% tail of 90-200 ms under load.
    gc.collect()
    gc.freeze()
    yield
    app.state.model.batcher.close()


class BodySizeLimit:
    """Answers 413 to a body larger than ``max_bytes`` (declared or streamed) before it is read in full."""

    def __init__(self, app: Any, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None:
            if not declared.isdigit():
                await self._answer(send, 400, "Content-Length is not a number", scope["path"])
                return
            if int(declared) > self.max_bytes:
                await self._answer(send, 413, self._too_large(), scope["path"])
                return
        received = 0
        started = False

        async def limited_receive() -> dict[str, Any]:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise _BodyTooLarge
            return message

        async def tracking_send(message: dict[str, Any]) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except _BodyTooLarge:
            if not started:
                await self._answer(send, 413, self._too_large(), scope["path"])

    def _too_large(self) -> str:
        return f"request body larger than {self.max_bytes} bytes (MAX_REQUEST_BYTES)"

    @staticmethod
    async def _answer(send: Any, status: int, detail: str, path: str = "") -> None:
        body = error_body(path, detail)
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})


class _BodyTooLarge(Exception):
    pass


def error_body(path: str, detail: Any) -> bytes:
    """An error answer: ``{"detail": ...}`` as FastAPI writes it, plus ``"error"``, the message as one string,
    on the Open Inference Protocol routes (its error shape, which tritonclient shows). Non-ASCII is
    escaped, so any text a client sent (lone surrogates included) still makes valid UTF-8 JSON."""
    content: dict[str, Any] = {"detail": detail}
    if path.startswith("/v2"):
        if isinstance(detail, list):
            content["error"] = "; ".join(
                f"{'.'.join(str(part) for part in item['loc'])}: {item['msg']}" for item in detail
            )
        else:
            content["error"] = str(detail)
    return json.dumps(content, ensure_ascii=True, default=str).encode()


def _error_response(request: Request, status: int, detail: Any, headers: dict[str, str] | None = None) -> Response:
    return Response(error_body(request.scope["path"], detail), status, headers, media_type="application/json")


async def http_error(request: Request, error: HTTPException) -> Response:
    return _error_response(request, error.status_code, error.detail, error.headers)


async def validation_error(request: Request, error: RequestValidationError) -> Response:
    """422 naming each field at fault, without echoing the client's input (FastAPI's default handler echoes
    it, and answers 500 when that input is bytes that are not UTF-8)."""
    detail = [
        {
            "loc": [part if isinstance(part, int) else str(part) for part in item["loc"]],
            "msg": item["msg"],
            "type": item["type"],
        }
        for item in error.errors()
    ]
    return _error_response(request, 422, detail)


APP = FastAPI(
    title=SETTINGS.API_NAME,
    version=__import__("kiln").__version__,
    openapi_url=f"{SETTINGS.API_V1_STR}/openapi.json",
    docs_url="/docs",
    lifespan=lifespan,
)
APP.add_middleware(BodySizeLimit, max_bytes=SETTINGS.MAX_REQUEST_BYTES)
APP.add_exception_handler(HTTPException, http_error)
APP.add_exception_handler(RequestValidationError, validation_error)

API_ROUTER = APIRouter()
API_ROUTER.include_router(model_routes.ROUTER, prefix="/model", tags=["model"])


@API_ROUTER.get("/health", tags=["health"], summary="Liveness: the process answers")
async def health() -> dict[str, str]:
    return {"status": "ok"}


@API_ROUTER.get("/ready", tags=["health"], summary="Readiness: the model is loaded")
async def ready() -> dict[str, str]:
    return {"status": "ready"}


APP.include_router(API_ROUTER, prefix=SETTINGS.API_V1_STR)
APP.include_router(v2_routes.ROUTER)
