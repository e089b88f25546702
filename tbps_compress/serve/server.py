"""``tbps-compress serve``: load the token, index the gallery, bind the socket, run uvicorn.

The socket is bound here, before uvicorn starts, so that a port in use or a forbidden address is one
:class:`~tbps_compress.errors.UserError` line (exit code 2), and ``--port 0`` picks a free port; the address served is
printed on one line (``serving http://127.0.0.1:PORT ...``) once the gallery is indexed and the socket listens
(connections made from then on are served).
"""

from __future__ import annotations

import ipaddress
import logging
import os
import socket
import stat
from pathlib import Path

from ..errors import UserError
from .service import GalleryService, Limits

log = logging.getLogger(__name__)

__all__ = ["TOKEN_ENV", "load_token", "run_server"]

TOKEN_ENV = "TBPS_SERVE_TOKEN"
MIN_TOKEN_CHARS = 16
_MAKE_TOKEN = "python -c 'import secrets; print(secrets.token_urlsafe(32))' > token.txt; chmod 600 token.txt"


def load_token(token_file: Path | None) -> str | None:
    """The bearer token: from ``token_file`` (first line, stripped) or else the ``TBPS_SERVE_TOKEN`` environment
    variable; None when neither is given. Too short, empty or unreadable is a one-line :class:`UserError`."""
    if token_file is not None:
        path = Path(token_file)
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise UserError(f"--token-file {path}: no such file; create one with: {_MAKE_TOKEN}") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise UserError(f"--token-file {path}: cannot read it ({getattr(exc, 'strerror', None) or exc})") from None
        token, source = (text.splitlines() or [""])[0].strip(), f"--token-file {path}"
        try:
            if path.stat().st_mode & (stat.S_IRWXG | stat.S_IRWXO):
                log.warning("%s: readable by other users; chmod 600 it", path)
        except OSError:
            pass
    else:
        env = os.environ.get(TOKEN_ENV)
        if env is None:
            return None
        token, source = env.strip(), TOKEN_ENV
    if len(token) < MIN_TOKEN_CHARS:
        raise UserError(f"{source}: the token has {len(token)} characters, at least {MIN_TOKEN_CHARS} are needed; "
                        f"make one with: {_MAKE_TOKEN}")
    if any(c.isspace() or not c.isprintable() for c in token):
        raise UserError(f"{source}: the token contains spaces or control characters; use letters, digits, - and _")
    return token


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _bind(host: str, port: int) -> socket.socket:
    if not 0 <= port <= 65535:
        raise UserError(f"--port {port}: must be from 0 to 65535 (0 picks a free port)")
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise UserError(f"--host {host}: cannot resolve it ({exc.strerror}); use an address such as 127.0.0.1") \
            from None
    family, kind, proto, _, addr = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(addr)
        sock.listen(128)
    except OSError as exc:
        sock.close()
        hint = "pass another --port (0 picks a free one)" if exc.errno in (98, 48) else "check --host and --port"
        raise UserError(f"--host {host} --port {port}: cannot listen there ({exc.strerror}); {hint}") from None
    sock.set_inheritable(True)
    return sock


def run_server(artifact: Path, gallery: Path, *, host: str = "127.0.0.1", port: int = 8000,
               token_file: Path | None = None, protect_reads: bool = False, index_dir: Path | None = None,
               data: Path | None = None, threads: int | None = None, limits: Limits | None = None,
               access_log: bool = False) -> None:
    """Serve ``gallery`` with ``artifact`` until interrupted (SIGINT / SIGTERM end it cleanly)."""
    import uvicorn

    from .app import LOOPBACK_NAMES, create_app

    token = load_token(token_file)
    if protect_reads and token is None:
        raise UserError(f"--protect-reads needs a token: pass --token-file FILE or set {TOKEN_ENV}")
    loopback = _is_loopback(host)
    sock = _bind(host, port)  # before the (possibly long) indexing: a busy port fails at once
    try:
        service = GalleryService(artifact, gallery, index_dir=index_dir, data=data, threads=threads, limits=limits)
        allowed = LOOPBACK_NAMES | {host.lower()} if loopback else None
        app = create_app(service, token=token, protect_reads=protect_reads, allowed_hosts=allowed)
        if not loopback and not protect_reads:
            log.warning("serving on %s without --protect-reads: anyone who can reach this port can search the "
                        "gallery and see its images", host)
        bound = sock.getsockname()
        shown = f"[{bound[0]}]" if ":" in bound[0] else bound[0]
        writes = "uploads and deletions need the token" if token else "read-only (no token: uploads disabled)"
        reads = ", reads need the token" if protect_reads else ""
        config = uvicorn.Config(app, log_config=None, access_log=access_log, server_header=False,
                                timeout_keep_alive=5, limit_concurrency=256, timeout_graceful_shutdown=10)
        server = uvicorn.Server(config)
        print(f"serving http://{shown}:{bound[1]} ({len(service.current())} images, model {service.model_name}; "
              f"{writes}{reads})", flush=True)
        server.run(sockets=[sock])
    finally:
        sock.close()
