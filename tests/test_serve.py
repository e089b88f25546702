"""``tbps-compress serve``, tested as a user would: the real server (the console command in a subprocess, with torch,
torchvision and open_clip unimportable; or the same app on uvicorn in a thread) on a free local port with a tiny
exported model, driven over HTTP: search, upload, delete, restart, bad requests and tokens, searches during an
upload, and the page in a real headless Chromium (Debian's, driven by Playwright; skipped with the reason when none
is installed).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_search import _gallery, _onnx_artifact

from tbps_compress.retrieval.index import GalleryIndex, scan_images
from tbps_compress.runtime import OnnxEncoder
from tbps_compress.serve.client import ServeClient, ServeHTTPError, multipart_body

REPO = Path(__file__).resolve().parents[1]
# Screenshots go to the test's temporary folder; TBPS_SCREENSHOTS=1 writes them to the committed results instead.
SCREENSHOT_DIR = REPO / "benchmarks" / "results" / "serve" if os.environ.get("TBPS_SCREENSHOTS") else None
QUERY = "a man in a grey hoodie with a black backpack"
TOKEN = "test-token-0123456789abcdef"
BLOCKED = ("torch", "torchvision", "open_clip")

# The server process: torch, torchvision and open_clip cannot be imported (each attempt is also written to a file,
# so an import that something catches still shows), then the CLI's main.
_LAUNCH = f"""
import sys
from importlib.abc import MetaPathFinder

class Block(MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {BLOCKED!r}:
            with open(sys.argv[1], "a") as f:
                f.write(name + "\\n")
            raise ImportError(f"blocked import of {{name}}")
        return None

sys.meta_path.insert(0, Block())
from tbps_compress.cli import main
sys.exit(main(sys.argv[2:]))
"""


def _png(colour: tuple[int, int, int], size: tuple[int, int] = (24, 48)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format="PNG")
    return buf.getvalue()


def _post_json(client: ServeClient, payload: object, **kw) -> object:
    body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    return client.request("POST", "/search", body, {"Content-Type": "application/json"}, **kw)


def _upload(client: ServeClient, files, **kw):
    body, ctype = multipart_body(files)
    return client.request("POST", "/gallery", body, {"Content-Type": ctype}, **kw)


def _brute_force(art: Path, gallery: Path, text: str) -> list[tuple[str, float]]:
    """(relative path, score) of every gallery image, best first, computed here without the server."""
    enc = OnnxEncoder(art)
    paths = scan_images(gallery)
    img = enc.encode_images([Image.open(p).convert("RGB") for p in paths])
    scores = img @ enc.encode_texts([text])[0]
    order = np.argsort(-scores, kind="stable")
    return [(paths[i].relative_to(gallery).as_posix(), float(scores[i])) for i in order]


class CliServer:
    """``tbps-compress serve`` in a subprocess (torch blocked); ``start()`` waits for its ``serving`` line."""

    def __init__(self, tmp: Path, args: list[str]) -> None:
        self.tmp, self.args = tmp, args
        self.blocked = tmp / "blocked-imports.txt"
        self.proc: subprocess.Popen | None = None
        self.url = ""
        self.starts = 0

    def start(self, timeout: float = 90) -> str:
        self.starts += 1
        self.out = self.tmp / f"server-{self.starts}.log"
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        env.pop("TBPS_SERVE_TOKEN", None)
        with open(self.out, "wb") as log:
            self.proc = subprocess.Popen([sys.executable, "-c", _LAUNCH, str(self.blocked), "serve", *self.args],
                                         stdout=log, stderr=subprocess.STDOUT, cwd=REPO, env=env)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in self.out.read_text(errors="replace").splitlines():
                if line.startswith("serving http://"):
                    self.url = line.split()[1]
                    return self.url
            if self.proc.poll() is not None:
                raise AssertionError(f"server exited with {self.proc.returncode}:\n{self.log()}")
            time.sleep(0.05)
        raise AssertionError(f"server did not start in {timeout} s:\n{self.log()}")

    def log(self) -> str:
        return self.out.read_text(errors="replace")

    def stop(self) -> bool:
        """SIGTERM, as a service manager stops it: True when it shut down cleanly (uvicorn re-raises the signal
        after its graceful shutdown, so the exit status is 0 or -SIGTERM)."""
        assert self.proc is not None
        self.proc.terminate()
        try:
            code = self.proc.wait(timeout=30)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
        return code in (0, -signal.SIGTERM) and "Application shutdown complete" in self.log()


@contextlib.contextmanager
def thread_server(service, **app_kw) -> Iterator[str]:
    """The serve app over ``service`` on uvicorn in a thread, on a free loopback port: yields the base URL."""
    import uvicorn

    from tbps_compress.serve.app import create_app

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    config = uvicorn.Config(create_app(service, **app_kw), log_config=None, access_log=False, lifespan="off")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started and thread.is_alive() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert server.started, "uvicorn did not start"
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(15)
        sock.close()


@pytest.fixture(scope="module")
def onnx_art(tmp_path_factory) -> Path:
    return _onnx_artifact(tmp_path_factory.mktemp("serve_art") / "art")


# ---------------------------------------------------------------------------------------------------------------------
# the console command in a subprocess: the API end to end, bad requests, restart
# ---------------------------------------------------------------------------------------------------------------------


def test_serve_cli_end_to_end(tmp_path, onnx_art):
    gallery = _gallery(tmp_path / "g", n=6)
    outside = tmp_path / "outside"
    outside.mkdir()
    token_file = tmp_path / "token.txt"
    token_file.write_text(TOKEN + "\n")
    token_file.chmod(0o600)
    server = CliServer(tmp_path, [str(onnx_art), "--gallery", str(gallery), "--port", "0",
                                  "--token-file", str(token_file), "--threads", "1"])
    url = server.start()
    assert url.startswith("http://127.0.0.1:")
    client = ServeClient(url, token=TOKEN)
    try:
        assert client.healthz() == {"status": "ok", "gallery_size": 6}
        stats = client.stats()
        assert stats["gallery_size"] == 6 and stats["artifact"] == str(onnx_art) and stats["index_kind"] == "flat"

        # search: the ranking, scores and query embedding the model gives, computed here independently
        expected = _brute_force(onnx_art, gallery, QUERY)
        res = client.search(QUERY, k=4)
        assert [h["path"] for h in res["results"]] == [p for p, _ in expected[:4]]
        np.testing.assert_allclose([h["score"] for h in res["results"]], [s for _, s in expected[:4]], atol=1e-4)
        assert [h["rank"] for h in res["results"]] == [1, 2, 3, 4]
        np.testing.assert_allclose(res["embedding"], OnnxEncoder(onnx_art).encode_texts([QUERY])[0], atol=1e-5)
        assert res["search_ms"] > 0 and res["gallery_size"] == 6
        top = res["results"][0]
        thumb = client.request("GET", top["thumbnail"])
        assert thumb.status == 200 and thumb.headers["content-type"] == "image/jpeg"
        assert Image.open(io.BytesIO(thumb.body)).format == "JPEG"
        full = client.request("GET", top["image"])
        assert full.status == 200 and full.body == (gallery / top["path"]).read_bytes()
        assert full.headers["cache-control"] == "no-store" and "default-src 'none'" in full.headers[
            "content-security-policy"]

        # add: stored under uploads/ with a server-chosen name, indexed and saved before the call returns
        added = client.add([("my photo.jpg", _png((250, 20, 20)))])
        assert added["gallery_size"] == 7
        (new,) = added["added"]
        assert new["path"].startswith("uploads/") and new["path"].endswith(".png") and "photo" not in new["path"]
        assert (gallery / new["path"]).is_file()
        (manifest,) = (gallery / ".tbps_index").glob("*/manifest.json")
        assert json.loads(manifest.read_text())["rows"] == 7
        hits = client.search(QUERY, k=3, where={"path": "uploads/*"})["results"]
        assert [h["id"] for h in hits] == [new["id"]]
        assert client.search(QUERY, k=10)["gallery_size"] == 7

        # delete: an original image goes from the folder and the index
        victim = next(h for h in client.search(QUERY, k=10)["results"] if not h["path"].startswith("uploads/"))
        out = client.delete(victim["id"])
        assert out["gallery_size"] == 6 and out["deleted"]["path"] == victim["path"]
        assert not (gallery / victim["path"]).exists()
        assert victim["path"] not in [h["path"] for h in client.search(QUERY, k=10)["results"]]
        assert json.loads(manifest.read_text())["rows"] == 6

        # bad requests: each a 4xx with a one-line message; the server keeps serving
        files_before = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*") if p.is_file()
                              and ".tbps_index" not in p.parts and not p.name.startswith("server-"))
        noise = Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8))
        buf = io.BytesIO()
        noise.save(buf, format="PNG")
        truncated = buf.getvalue()[: len(buf.getvalue()) // 2]
        bad = [
            (_post_json(client, {"text": ""}), 400, "text: give a non-empty description"),
            (_post_json(client, {"text": "   "}), 400, "text: give a non-empty description"),
            (_post_json(client, {"text": "x" * 1_000_000}), 413, "over the limit of 65536; shorten the query text"),
            (_post_json(client, {"text": "x" * 1001}), 400, "text: 1001 characters, over the limit of 1000"),
            (_post_json(client, b"{not json"), 422, "body: not valid JSON"),
            (_post_json(client, {"text": QUERY, "k": 0}), 400, "k: must be an integer from 1 to 100"),
            (_post_json(client, {"text": QUERY, "where": {"colour": "red"}}), 400,
             "where colour=red: unknown column 'colour'"),
            (_post_json(client, {"text": QUERY, "where": {"camera": 1}}), 400, "no indexed image has a known camera"),
            (_upload(client, [("notes.png", b"this is not an image at all")]), 415, "not an image"),
            (_upload(client, [("cut.png", truncated)]), 415, "cannot be decoded"),
            (_upload(client, [("../outside/evil.png", _png((0, 0, 0)))]), 400, "must be a plain file name"),
            (_upload(client, [("..\\..\\evil.png", _png((0, 0, 0)))]), 400, "must be a plain file name"),
            (_upload(client, [("ok.png", _png((0, 0, 0)))], token=False), 401, "missing bearer token"),
            (_upload(client, [("ok.png", _png((0, 0, 0)))], token="x" * 26), 401, "wrong bearer token"),
            (client.request("DELETE", f"/gallery/{new['id']}", token=False), 401, "missing bearer token"),
            (client.request("DELETE", "/gallery/424242"), 404, "no gallery image has id 424242"),
            (client.request("GET", "/thumb/424242"), 404, "no gallery image has id 424242"),
            (client.request("GET", "/image/../../etc/passwd"), 404, "no such endpoint"),
            (client.request("GET", "/", headers={"Host": "attacker.example"}), 400, "is not served here"),
        ]
        for resp, status, message in bad:
            assert resp.status == status, (status, message, resp.status, resp.body)
            text = resp.body.decode()
            assert "\n" not in text.strip(), text
            assert message in resp.json()["error"], (message, text)
            assert client.healthz()["status"] == "ok"
        files_after = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*") if p.is_file()
                             and ".tbps_index" not in p.parts and not p.name.startswith("server-"))
        assert files_after == files_before, "a refused request wrote a file"
        assert not list(outside.iterdir())
        assert client.stats()["gallery_size"] == 6
    finally:
        assert server.stop(), server.log()

    # restart: what was added is still there, nothing is re-embedded
    server.start()
    client = ServeClient(server.url, token=TOKEN)
    try:
        assert "(6 reused, 0 added, 0 changed, 0 removed" in " ".join(server.log().split())
        hits = client.search(QUERY, k=3, where={"path": "uploads/*"})["results"]
        assert [h["path"] for h in hits] == [new["path"]]
        assert client.stats()["gallery_size"] == 6
    finally:
        assert server.stop(), server.log()
    assert not server.blocked.exists(), f"the server tried to import {server.blocked.read_text()}"


def test_serve_cli_errors(tmp_path, onnx_art, run_cli, monkeypatch):
    gallery = _gallery(tmp_path / "g", n=2)
    monkeypatch.delenv("TBPS_SERVE_TOKEN", raising=False)
    short = tmp_path / "short.txt"
    short.write_text("abc\n")
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen(1)
    cases = [
        (["--protect-reads"], "error: --protect-reads needs a token: pass --token-file FILE or set TBPS_SERVE_TOKEN"),
        (["--token-file", tmp_path / "none.txt"], f"error: --token-file {tmp_path / 'none.txt'}: no such file"),
        (["--token-file", short], "the token has 3 characters, at least 16 are needed"),
        (["--port", str(busy.getsockname()[1])], "cannot listen there"),
        (["--port", "70000"], "error: --port 70000: must be from 0 to 65535"),
    ]
    try:
        for flags, message in cases:
            code, out, err = run_cli(["serve", onnx_art, "--gallery", gallery, *flags])
            assert code == 2, (flags, out, err)
            assert message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err, (flags, err)
    finally:
        busy.close()
    code, _, err = run_cli(["serve", gallery, "--gallery", gallery, "--port", "0"])
    assert code == 2 and len(err.strip().splitlines()) == 1 and str(gallery) in err, err
    code, _, err = run_cli(["serve", onnx_art, "--gallery", tmp_path / "missing", "--port", "0"])
    assert code == 2 and "gallery folder does not exist" in err, err
    assert not (gallery / ".tbps_index").exists() and not (gallery / "uploads").exists()


# ---------------------------------------------------------------------------------------------------------------------
# the app in a thread: tokens, concurrency, the in-memory filters
# ---------------------------------------------------------------------------------------------------------------------


def test_read_only_and_protected_reads(tmp_path, onnx_art):
    from tbps_compress.serve.service import GalleryService

    gallery = _gallery(tmp_path / "g", n=3)
    service = GalleryService(onnx_art, gallery, threads=1)
    with thread_server(service) as url:  # no token: reads open, writes disabled
        client = ServeClient(url)
        assert client.search(QUERY, k=2)["results"]
        resp = _upload(client, [("a.png", _png((9, 9, 9)))])
        assert resp.status == 403 and "uploads and deletions are disabled" in resp.error
        assert client.request("DELETE", "/gallery/1").status == 403
    with thread_server(service, token=TOKEN, protect_reads=True) as url:
        client = ServeClient(url, token=TOKEN)
        for path in ("/stats", "/thumb/1", "/image/1"):
            assert client.request("GET", path, token=False).status == 401, path
            assert client.request("GET", path).status == 200, path
        assert _post_json(client, {"text": QUERY}, token=False).status == 401
        assert _post_json(client, {"text": QUERY}, token="y" * 30).status == 401
        assert client.search(QUERY, k=2)["results"]
        page = client.request("GET", "/", token=False)  # the page holds no data: open, so that a token can be typed
        assert page.status == 200 and b"<script src=\"/static/page.js\"" in page.body
        assert client.request("GET", "/healthz", token=False).status == 200
        with pytest.raises(ServeHTTPError, match="413"):
            client.add([(f"f{i}.png", _png((i, i, i))) for i in range(17)])


def test_searches_not_blocked_by_upload(tmp_path, onnx_art):
    """While an upload embeds (made slow here: 2 s), searches keep answering from the previous snapshot; the new
    image is searchable once the upload returns."""
    from tbps_compress.serve.service import GalleryService

    gallery = _gallery(tmp_path / "g", n=5)
    service = GalleryService(onnx_art, gallery, threads=1)
    fast = service.encoder.encode_images

    def slow(images, *a, **kw):
        time.sleep(2.0)
        return fast(images, *a, **kw)

    service.encoder.encode_images = slow
    with thread_server(service, token=TOKEN) as url:
        uploading = threading.Event()
        done = threading.Event()
        latencies: list[float] = []
        sizes: set[int] = set()
        errors: list[str] = []

        def searcher() -> None:
            client = ServeClient(url)
            uploading.wait(10)
            while not done.is_set():
                t0 = time.perf_counter()
                try:
                    sizes.add(client.search(QUERY, k=3)["gallery_size"])
                except Exception as exc:  # noqa: BLE001 - any failure is a test failure, reported below
                    errors.append(repr(exc))
                latencies.append(time.perf_counter() - t0)

        threads = [threading.Thread(target=searcher) for _ in range(3)]
        for t in threads:
            t.start()
        client = ServeClient(url, token=TOKEN)
        uploading.set()
        t0 = time.perf_counter()
        added = client.add([("slow.png", _png((10, 200, 10)))])
        upload_s = time.perf_counter() - t0
        done.set()
        for t in threads:
            t.join(30)
        assert not errors, errors
        assert upload_s >= 2.0 and added["gallery_size"] == 6
        assert len(latencies) >= 6, latencies
        assert max(latencies) < 1.0, f"a search waited {max(latencies):.2f} s during a {upload_s:.2f} s upload"
        assert 5 in sizes, sizes  # answered from the old snapshot while the upload ran
        hits = client.search(QUERY, k=1, where={"path": "uploads/*"})["results"]
        assert hits[0]["id"] == added["added"][0]["id"]


def test_in_memory_filters_match_sqlite(tmp_path, onnx_art, tiny_dataset):
    """The served snapshot answers ``where`` from memory; it must select what the SQLite query selects."""
    from tbps_compress.artifacts import open_artifact
    from tbps_compress.retrieval.search import artifact_hash, dataset_annotations
    from tbps_compress.serve.service import ServedIndex

    root = tmp_path / "ds"
    shutil.copytree(tiny_dataset, root)
    enc = OnnxEncoder(onnx_art)
    h = artifact_hash(open_artifact(onnx_art))
    ann = dataset_annotations(root)
    reference = GalleryIndex(root, enc, h, annotations=ann)
    reference.refresh()
    served = ServedIndex(root, enc, h, annotations=ann)
    served.refresh()
    served.close()
    cameras = sorted({r.camera for r in reference.rows if r.camera is not None})
    idents = sorted({r.identity for r in reference.rows})
    assert cameras and len(idents) > 2
    filters = [{"camera": cameras[0]}, {"camera": cameras[:2]}, {"identity": idents[1]},
               {"identity": idents[:3], "camera": cameras[-1]}, {"path": "imgs/test/*"}, {"path": ["*1.jpg"]}]
    for where in filters:
        want = np.sort(reference.where_ids(where))
        got = np.sort(served.where_ids(where))
        assert len(want) and np.array_equal(want, got), where
    with pytest.raises(Exception, match="no indexed image matches"):
        served.where_ids({"identity": 999999})
    reference.close()


# ---------------------------------------------------------------------------------------------------------------------
# the page in a real browser
# ---------------------------------------------------------------------------------------------------------------------


def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser"):
        path = shutil.which(name)
        if path:
            return path
    return None


def _wait_js(page, predicate: str, timeout: float = 20.0) -> None:
    """Poll ``predicate`` (a JS function source) with ``page.evaluate`` until it is true. (Playwright's
    ``wait_for_function`` evaluates strings in the page, which the page's Content-Security-Policy forbids.)"""
    deadline = time.monotonic() + timeout
    while not page.evaluate(predicate):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {predicate}")
        time.sleep(0.05)


def test_page_in_headless_chromium(tmp_path, onnx_art, tiny_dataset):
    shots = SCREENSHOT_DIR or tmp_path / "screenshots"
    browser_path = _chromium()
    if browser_path is None:
        pytest.skip("no Chromium installed (apt-get install chromium; `make test` installs it where apt-get works)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install -e .[dev])")
    from tbps_compress.serve.service import GalleryService

    gallery = tmp_path / "ds"
    shutil.copytree(tiny_dataset, gallery)  # a dataset root: identities and cameras are known
    text = "a person wearing a red top and blue trousers"
    expected = _brute_force(onnx_art, gallery, text)
    assert expected[0][1] - expected[1][1] > 1e-3, "no clear top result for this query: pick another"
    service = GalleryService(onnx_art, gallery, threads=1)
    requests: list[str] = []
    with thread_server(service) as url, sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=browser_path, headless=True,
                                     args=["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"])
        try:
            page = browser.new_page(viewport={"width": 1100, "height": 760})
            page.on("request", lambda r: requests.append(r.url))
            errors: list[str] = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            page.goto(url + "/")
            page.fill("#query", text)
            page.select_option("#k", "10")
            page.click("#go")
            _wait_js(page, "() => document.querySelectorAll('figure.hit').length === 10")
            _wait_js(page, "() => [...document.querySelectorAll('figure.hit img')].every(i => i.complete && "
                           "i.naturalWidth > 0)")
            first = page.locator("figure.hit").first
            assert first.get_attribute("data-path") == expected[0][0]
            assert first.get_attribute("data-rank") == "1"
            assert f"{expected[0][1]:.3f}" in first.inner_text()
            assert "id " in first.inner_text()  # identities shown: the gallery is a dataset root
            shown = [float(s) for s in page.locator("figure.hit .score").all_inner_texts()]
            assert shown == sorted(shown, reverse=True)
            np.testing.assert_allclose(shown, [s for _, s in expected[:10]], atol=2e-3)
            assert "10 results of" in page.inner_text("#status")
            shots.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(shots / "page-results.png"), full_page=True)

            first.click()  # opens the full image
            _wait_js(page, "() => !document.getElementById('viewer').hidden && "
                           "document.getElementById('viewer-img').naturalWidth > 0")
            natural = page.evaluate("() => [document.getElementById('viewer-img').naturalWidth, "
                                    "document.getElementById('viewer-img').naturalHeight]")
            with Image.open(gallery / expected[0][0]) as im:
                assert tuple(natural) == im.size
            page.screenshot(path=str(shots / "page-viewer.png"))
            page.keyboard.press("Escape")
            assert page.locator("#viewer").is_hidden()

            page.fill("#query", "   ")
            page.click("#go")
            assert "type a description" in page.inner_text("#status")
            page.fill("#query", "x" * 1000 + "y")  # maxlength keeps the box at 1000 characters
            assert len(page.input_value("#query")) == 1000
            assert not errors, errors
        finally:
            browser.close()
    outside = [u for u in requests if not (u.startswith(url + "/") or u.startswith("blob:"))]
    assert not outside, f"the page fetched from elsewhere: {outside}"
