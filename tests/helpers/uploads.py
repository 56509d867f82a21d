"""Malformed multipart uploads for /predict_image, and a loopback listener that records any
request (a URL sent as an upload must never be fetched). Used in-process and over live HTTP."""

from __future__ import annotations

from typing import Any

from tests.helpers.images import png


class Listener:
    """A loopback HTTP server that records every request it gets (it must get none)."""

    def __init__(self) -> None:
        import http.server
        import threading

        self.hits: list[str] = []
        hits = self.hits

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                hits.append(self.path)
                self.send_response(200)
                self.end_headers()
                self.wfile.write(png())

            def log_message(self, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/digit.png"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def multipart(*parts: tuple[str, str | None, bytes], boundary: str = "b0undary") -> bytes:
    """A multipart/form-data body from (field name, file name or None for a text field, data)."""
    chunks = []
    for name, filename, data in parts:
        disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename else "")
        chunks.append(f"--{boundary}\r\nContent-Disposition: {disposition}\r\n\r\n".encode())
        chunks.append(data + b"\r\n")
    return b"".join(chunks) + f"--{boundary}--\r\n".encode()


def upload_cases(url: str) -> list[tuple[str, bytes, str]]:
    """(case, multipart body, what the 400 must name) for every malformed upload."""
    image = png()
    return [
        ("no field", multipart(), "missing the form field 'image'"),
        (
            "wrong field name",
            multipart(("file", "a.png", image)),
            "missing the form field 'image' (an uploaded image file) (got ['file'])",
        ),
        ("empty file", multipart(("image", "a.png", b"")), "field 'image' is an empty file"),
        ("text", multipart(("image", None, b"a digit")), "field 'image' must be an uploaded file"),
        ("url as text", multipart(("image", None, url.encode())), "URLs are not fetched"),
        ("quoted url", multipart(("image", None, f'"{url}"'.encode())), "URLs are not fetched"),
        (
            "two files",
            multipart(("image", "a.png", image), ("image", "b.png", image)),
            "send exactly one file",
        ),
        (
            "file and url",
            multipart(("image", "a.png", image), ("image", None, url.encode())),
            "send exactly one file",
        ),
        (
            "extra field",
            multipart(("image", "a.png", image), ("url", None, url.encode())),
            "unexpected form field(s) ['url']",
        ),
        ("truncated", multipart(("image", "a.png", image))[:-30], "no closing boundary"),
        ("no parts", b"--b0undary--\r\n", "missing the form field 'image'"),
        (
            "garbage part",
            b"--b0undary\r\nnonsense\r\n\r\nx\r\n--b0undary--\r\n",
            "malformed multipart body",
        ),
    ]
