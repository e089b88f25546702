"""A small client for the ``tbps-compress serve`` API, on the standard library only (``http.client``).

    client = ServeClient("http://127.0.0.1:8000", token=open("token.txt").read().strip())
    hits = client.search("a woman in a red coat", k=5)["results"]
    new = client.add([("crop.jpg", open("crop.jpg", "rb").read())])["added"][0]["id"]
    client.delete(new)

Each call opens its own connection (so one client may be used from one thread at a time, and several clients from
several threads). Error responses raise :class:`ServeHTTPError` with the status and the server's one-line message;
:meth:`ServeClient.request` returns any response without raising.
"""

from __future__ import annotations

import http.client
import json
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

__all__ = ["Response", "ServeClient", "ServeHTTPError", "multipart_body"]


class ServeHTTPError(Exception):
    """An error response: ``status`` and the server's one-line ``message``."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"HTTP {status}: {message}")
        self.status = status
        self.message = message


@dataclass
class Response:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body.decode("utf-8"))

    @property
    def error(self) -> str | None:
        """The server's one-line error message, for a 4xx / 5xx response with a JSON body."""
        if self.status < 400:
            return None
        try:
            return str(self.json().get("error"))
        except (ValueError, AttributeError):
            return self.body.decode("utf-8", "replace")


def multipart_body(files: Sequence[tuple[str, bytes]], field: str = "files",
                   content_type: str = "application/octet-stream") -> tuple[bytes, str]:
    """A ``multipart/form-data`` body with one ``field`` part per ``(file name, bytes)``: ``(body, content type)``."""
    boundary = "tbps" + secrets.token_hex(16)
    parts = []
    for name, data in files:
        quoted = name.replace("\\", "\\\\").replace('"', '\\"')
        head = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"{field}\"; filename=\"{quoted}\"\r\n"
                f"Content-Type: {content_type}\r\n\r\n")
        parts.append(head.encode("utf-8") + data + b"\r\n")
    parts.append(f"--{boundary}--\r\n".encode("ascii"))
    return b"".join(parts), f"multipart/form-data; boundary={boundary}"


class ServeClient:
    """The API of one server at ``base_url`` (``http://HOST:PORT``), with an optional bearer ``token``."""

    def __init__(self, base_url: str, token: str | None = None, timeout: float = 60.0) -> None:
        url = urlsplit(base_url)
        if url.scheme != "http" or not url.hostname:
            raise ValueError(f"base_url must be http://HOST:PORT, got {base_url!r}")
        self.host, self.port = url.hostname, url.port or 80
        self.token = token
        self.timeout = timeout

    def request(self, method: str, path: str, body: bytes | None = None, headers: Mapping[str, str] | None = None,
                token: str | None | bool = True) -> Response:
        """One request; ``token``: True sends the client's token, False none, a string that one."""
        hdrs = dict(headers or {})
        tok = self.token if token is True else (None if token is False else token)
        if tok:
            hdrs["Authorization"] = f"Bearer {tok}"
        conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
        try:
            conn.request(method, path, body=body, headers=hdrs)
            resp = conn.getresponse()
            return Response(resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read())
        finally:
            conn.close()

    def _json(self, method: str, path: str, payload: Any = None, **kw: Any) -> Any:
        body = None if payload is None else json.dumps(payload).encode("utf-8")
        headers = {"Content-Type": "application/json"} if body is not None else {}
        return self._check(self.request(method, path, body, headers, **kw))

    @staticmethod
    def _check(resp: Response) -> Any:
        if resp.status >= 400:
            raise ServeHTTPError(resp.status, resp.error or "")
        return resp.json()

    def search(self, text: str, k: int = 10, where: Mapping[str, Any] | None = None) -> dict[str, Any]:
        payload: dict[str, Any] = {"text": text, "k": k}
        if where:
            payload["where"] = dict(where)
        return self._json("POST", "/search", payload)

    def add(self, files: Sequence[tuple[str, bytes]]) -> dict[str, Any]:
        body, ctype = multipart_body(files)
        return self._check(self.request("POST", "/gallery", body, {"Content-Type": ctype}))

    def delete(self, file_id: int) -> dict[str, Any]:
        return self._json("DELETE", f"/gallery/{int(file_id)}")

    def stats(self) -> dict[str, Any]:
        return self._json("GET", "/stats")

    def healthz(self) -> dict[str, Any]:
        return self._json("GET", "/healthz")
