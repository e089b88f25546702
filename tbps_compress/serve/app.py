"""The HTTP API of ``tbps-compress serve`` (FastAPI).

Endpoints (``read``: needs the token only with ``--protect-reads``; ``write``: always needs it)::

    GET    /                  open   the search page (static/index.html; its script and style from /static/)
    GET    /static/{name}     open   the page's script and style (a fixed list of names, not a path)
    GET    /healthz           open   {"status": "ok", "gallery_size": N}
    GET    /stats             read   gallery size, artifact, model, index kind, p50 / p99 of recent searches
    POST   /search            read   {"text": ..., "k": 10, "where": {"camera": 3}} -> ranked results
    GET    /thumb/{id}?h=192  read   a JPEG thumbnail of gallery image ``id``
    GET    /image/{id}        read   the gallery image file itself
    POST   /gallery           write  multipart/form-data, one or more ``files`` parts -> the ids given to them
    DELETE /gallery/{id}      write  delete image ``id`` from the folder and the index

Every refusal is a 4xx with a one-line JSON body ``{"error": "..."}`` naming the field and the fix; an unexpected
failure is a 500 with a one-line body (details in the server log), and the server goes on serving.

The guard (:class:`Guard`, plain ASGI, in front of FastAPI) runs before any request body is read:

- ``Host`` must be a loopback name when the server is bound to a loopback address (a page on another site that
  resolves its name to 127.0.0.1, "DNS rebinding", cannot reach the API through the user's browser);
- the bearer token for write endpoints (and read ones with ``protect_reads``), compared in constant time; without a
  configured token the write endpoints are disabled (403);
- a body limit per endpoint, from ``Content-Length`` (a request body without one is refused: 411), so a large upload
  is refused before it is parsed.

Responses carry ``Cache-Control: no-store`` (results and images show people) and a Content-Security-Policy that
allows nothing but this server: the page loads no external script, style or font.
"""

from __future__ import annotations

import hmac
import json
import logging
from importlib import resources
from typing import Any

from fastapi import FastAPI, File, Query, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response
from pydantic import BaseModel, ConfigDict
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import UserError
from .service import GalleryService, ServeError

log = logging.getLogger(__name__)

__all__ = ["LOOPBACK_NAMES", "Guard", "create_app"]

LOOPBACK_NAMES = frozenset({"127.0.0.1", "localhost", "::1", "[::1]"})
_STATIC = {"page.js": "text/javascript; charset=utf-8", "page.css": "text/css; charset=utf-8"}
_CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' blob:; connect-src 'self'; "
        "base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
_IMAGE_TYPES = {".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".png": "image/png", ".bmp": "image/bmp",
                ".webp": "image/webp"}


def _access(method: str, path: str) -> str:
    """``open`` | ``read`` | ``write`` for a request (unknown routes are ``read``: they 404 after the checks)."""
    if path == "/gallery" or path.startswith("/gallery/"):
        return "write"
    if path in ("/", "/healthz", "/favicon.ico") or path.startswith("/static/"):
        return "open"
    return "read"


def _error_body(status: int, message: str) -> bytes:
    return json.dumps({"error": " ".join(str(message).split()), "status": status},
                      separators=(",", ":")).encode("utf-8")


class Guard:
    """ASGI middleware: Host check, bearer token, body-size limit, security headers (see the module doc).

    Args:
        app: the wrapped ASGI application.
        token: the bearer token (None: write endpoints disabled, reads open).
        protect_reads: read endpoints need the token too.
        body_limit: ``body_limit(method, path) -> bytes`` allowed in a request body.
        allowed_hosts: ``Host`` names accepted (without port); None accepts any.
    """

    def __init__(self, app: Any, *, token: str | None, protect_reads: bool, body_limit: Any,
                 allowed_hosts: frozenset[str] | None) -> None:
        self.app = app
        self.token = token.encode("utf-8") if token else None
        self.protect_reads = protect_reads
        self.body_limit = body_limit
        self.allowed_hosts = allowed_hosts

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        refusal = self._check(scope["method"], scope["path"], headers)
        if refusal is not None:
            status, message, extra = refusal
            await _send_json(send, status, message, extra)
            return

        async def send_secure(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                hdrs = list(message.get("headers", []))
                names = {k.lower() for k, _ in hdrs}
                for name, value in _security_headers():
                    if name not in names:
                        hdrs.append((name, value))
                message = {**message, "headers": hdrs}
            await send(message)

        await self.app(scope, receive, send_secure)

    def _check(self, method: str, path: str, headers: dict[str, str]) -> tuple[int, str, list] | None:
        if self.allowed_hosts is not None:
            host = _host_name(headers.get("host", ""))
            if host not in self.allowed_hosts:
                return 400, (f"Host {headers.get('host', '')!r} is not served here; use http://127.0.0.1:PORT "
                             "(start with --host to serve other names)"), []
        access = _access(method, path)
        if access == "write" or (access == "read" and self.protect_reads):
            if self.token is None:
                return 403, ("uploads and deletions are disabled: no token is configured; restart the server "
                             "with --token-file FILE (or TBPS_SERVE_TOKEN set)"), []
            auth = headers.get("authorization", "")
            scheme, _, given = auth.partition(" ")
            challenge = [(b"www-authenticate", b'Bearer realm="tbps-compress"')]
            if scheme.lower() != "bearer" or not given.strip():
                return 401, "missing bearer token: send the header 'Authorization: Bearer <token>'", challenge
            if not hmac.compare_digest(given.strip().encode("utf-8"), self.token):
                return 401, "wrong bearer token: use the token the server was started with", challenge
        if method in ("POST", "PUT", "PATCH"):
            length = headers.get("content-length")
            if length is None:
                return 411, "send a Content-Length header (request bodies of unknown length are not accepted)", []
            try:
                size = int(length)
            except ValueError:
                return 400, f"Content-Length {length!r}: not a number", []
            limit = self.body_limit(method, path)
            if size > limit:
                what = ("shorten the query text" if path == "/search"
                        else "send fewer or smaller files per request")
                return 413, f"{method} {path}: request body of {size} bytes, over the limit of {limit}; {what}", []
        return None


def _host_name(host: str) -> str:
    host = host.strip().lower()
    if host.startswith("["):
        return host[: host.find("]") + 1] if "]" in host else host
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def _security_headers() -> list[tuple[bytes, bytes]]:
    return [(b"cache-control", b"no-store"), (b"x-content-type-options", b"nosniff"),
            (b"referrer-policy", b"no-referrer"), (b"x-frame-options", b"DENY"),
            (b"content-security-policy", _CSP.encode("ascii"))]


async def _send_json(send: Any, status: int, message: str, extra: list[tuple[bytes, bytes]]) -> None:
    body = _error_body(status, message)
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
               *extra, *_security_headers()]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class SearchRequest(BaseModel):
    """The body of ``POST /search``; the values are checked by :meth:`GalleryService.check_query`, so that each
    mistake gets one line naming the field and the fix."""

    model_config = ConfigDict(extra="forbid")
    text: Any = None
    k: Any = 10
    where: Any = None


def _static(name: str) -> bytes:
    return resources.files(__package__).joinpath("static", name).read_bytes()


def create_app(service: GalleryService, *, token: str | None = None, protect_reads: bool = False,
               allowed_hosts: frozenset[str] | None = LOOPBACK_NAMES) -> Guard:
    """The ASGI application: FastAPI routes over ``service``, wrapped in :class:`Guard`."""
    limits = service.limits
    page = _static("index.html")
    static = {name: _static(name) for name in _STATIC}
    app = FastAPI(title="tbps-compress serve", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.service = service

    @app.exception_handler(ServeError)
    async def _serve_error(_: Request, exc: ServeError) -> JSONResponse:
        return JSONResponse({"error": exc.message, "status": exc.status}, status_code=exc.status)

    @app.exception_handler(UserError)
    async def _user_error(_: Request, exc: UserError) -> JSONResponse:
        return JSONResponse({"error": " ".join(str(exc).split()), "status": 400}, status_code=400)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        first = errors[0] if errors else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body") or "body"
        msg = first.get("msg", "invalid request")
        if first.get("type") == "json_invalid":
            msg, where = "not valid JSON; send {\"text\": \"...\", \"k\": 10}", "body"
        more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
        return JSONResponse({"error": f"{where}: {msg}{more}", "status": 422}, status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        msg = str(exc.detail)
        if exc.status_code == 404 and msg == "Not Found":
            msg = f"no such endpoint: {request.method} {request.url.path} (see GET / for the page)"
        elif exc.status_code == 405:
            msg = f"{request.method} is not allowed on {request.url.path}"
        return JSONResponse({"error": msg, "status": exc.status_code}, status_code=exc.status_code,
                            headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _crash(request: Request, exc: Exception) -> JSONResponse:
        log.error("%s %s failed: %s: %s", request.method, request.url.path, type(exc).__name__, exc, exc_info=exc)
        return JSONResponse({"error": f"internal error ({type(exc).__name__}); see the server log", "status": 500},
                            status_code=500)

    @app.get("/", response_class=HTMLResponse)
    def index_page() -> Response:
        return Response(page, media_type="text/html; charset=utf-8")

    @app.get("/favicon.ico")
    def favicon() -> Response:
        return Response(status_code=204)

    @app.get("/static/{name}")
    def static_file(name: str) -> Response:
        if name not in static:
            raise ServeError(404, f"no static file {name!r}")
        return Response(static[name], media_type=_STATIC[name])

    @app.get("/healthz")
    def healthz() -> dict[str, Any]:
        return {"status": "ok", "gallery_size": len(service.current())}

    @app.get("/stats")
    def stats() -> dict[str, Any]:
        return service.stats()

    @app.post("/search")
    def search(body: SearchRequest) -> dict[str, Any]:
        return service.search(body.text, body.k, body.where)

    @app.get("/thumb/{file_id}")
    def thumb(file_id: int, h: int = Query(192, ge=16, le=512)) -> Response:
        return Response(service.thumbnail(file_id, h), media_type="image/jpeg")

    @app.get("/image/{file_id}")
    def image(file_id: int) -> Response:
        _, path = service.file_of(file_id)
        media = _IMAGE_TYPES.get(path.suffix.lower(), "application/octet-stream")
        if not path.is_file():
            raise ServeError(404, f"image {file_id} was removed from disk")
        return FileResponse(path, media_type=media)

    @app.post("/gallery")
    def add(files: list[UploadFile] = File(...)) -> dict[str, Any]:
        uploads = []
        for f in files:
            data = f.file.read(limits.max_upload_bytes + 1)
            uploads.append((f.filename, data))
        return service.add(uploads)

    @app.delete("/gallery/{file_id}")
    def delete(file_id: int) -> dict[str, Any]:
        return service.delete(file_id)

    def body_limit(method: str, path: str) -> int:
        return limits.max_upload_request_bytes if path == "/gallery" else limits.max_json_bytes

    return Guard(app, token=token, protect_reads=protect_reads, body_limit=body_limit, allowed_hosts=allowed_hosts)
