"""Fixtures for the data tests: small generated images of every awkward kind, and a local HTTP server."""

from __future__ import annotations

import http.server
import io
import threading
import time
from pathlib import Path

import pytest
from PIL import Image


def jpeg_bytes(w: int = 64, h: int = 48, color=(200, 30, 30), exif_orientation: int | None = None) -> bytes:
    img = Image.new("RGB", (w, h), color)
    img.paste((20, 20, 220), (0, 0, w // 2, h // 2))  # a marker in the top-left quarter
    buf = io.BytesIO()
    if exif_orientation:
        exif = Image.Exif()
        exif[0x0112] = exif_orientation
        img.save(buf, "JPEG", exif=exif.tobytes())
    else:
        img.save(buf, "JPEG")
    return buf.getvalue()


def make_images(folder: Path) -> dict[str, Path]:
    """One file per case the ingestion must handle; names say what they are."""
    folder.mkdir(parents=True, exist_ok=True)
    files: dict[str, Path] = {}

    def put(name: str, data: bytes) -> None:
        files[name] = folder / name
        files[name].write_bytes(data)

    for i in range(6):
        put(f"ok{i}.jpg", jpeg_bytes(60 + 4 * i, 40 + 2 * i, color=(40 * i, 100, 50)))
    put("rotated.jpg", jpeg_bytes(80, 40, exif_orientation=6))  # stored landscape, shown portrait
    buf = io.BytesIO()
    Image.new("CMYK", (50, 50), (0, 255, 255, 0)).save(buf, "JPEG")
    put("cmyk.jpg", buf.getvalue())
    buf = io.BytesIO()
    pal = Image.new("P", (40, 40), 1)
    pal.putpalette([255, 255, 255, 0, 128, 0] + [0] * 762)
    pal.save(buf, "PNG", transparency=0)
    put("palette.png", buf.getvalue())
    buf = io.BytesIO()
    Image.new("RGBA", (40, 30), (0, 0, 255, 0)).save(buf, "PNG")  # fully transparent -> white
    put("alpha.png", buf.getvalue())
    buf = io.BytesIO()
    Image.new("L", (44, 44), 128).save(buf, "WEBP")
    put("grey.webp", buf.getvalue())
    full = jpeg_bytes(64, 64)
    put("truncated.jpg", full[: len(full) // 2])
    put("not_an_image.jpg", b"<html>404 not found</html>")
    put("empty.jpg", b"")
    put("tiny.jpg", jpeg_bytes(8, 8))
    return files


@pytest.fixture
def images(tmp_path: Path) -> dict[str, Path]:
    return make_images(tmp_path / "images")


class _Handler(http.server.BaseHTTPRequestHandler):
    """Routes: /img/<name> serves a file; /status/<code>; /slow (sleeps past the client timeout);
    /flaky/<name> fails with 503 on the first request; /ua echoes the User-Agent as an error body."""

    files: dict[str, bytes] = {}
    hits: dict[str, int] = {}
    user_agents: list[str] = []

    def log_message(self, *args) -> None:  # keep pytest output clean
        pass

    def do_GET(self) -> None:
        path = self.path
        type(self).hits[path] = type(self).hits.get(path, 0) + 1
        type(self).user_agents.append(self.headers.get("User-Agent", ""))
        if path.startswith("/img/") and path[5:] in self.files:
            return self._send(200, self.files[path[5:]])
        if path.startswith("/flaky/") and path[7:] in self.files:
            if self.hits[path] == 1:
                return self._send(503, b"try again")
            return self._send(200, self.files[path[7:]])
        if path.startswith("/status/"):
            return self._send(int(path[8:]), b"error")
        if path == "/slow":
            time.sleep(1.5)
            return self._send(200, b"late")
        return self._send(404, b"not found")

    def _send(self, code: int, body: bytes) -> None:
        try:
            self.send_response(code)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):
            pass


@pytest.fixture
def http_server(images):
    """A threaded HTTP server on 127.0.0.1 (random port) serving the generated images; yields its base URL."""
    _Handler.files = {name: p.read_bytes() for name, p in images.items()}
    _Handler.hits = {}
    _Handler.user_agents = []
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", _Handler
    finally:
        server.shutdown()
        server.server_close()
