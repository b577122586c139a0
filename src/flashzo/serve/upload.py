"""POST /v1/files bodies: multipart/form-data streamed straight to disk, then checked as JSONL.

The body is parsed as it arrives (python-multipart's push parser): the `file` part's bytes go to
DATA_DIR/files/<id>.part chunk by chunk, the small fields (`purpose`) are kept in memory up to
FIELD_BYTES each. Memory stays a few chunks whatever the file's size; the size limit is the
request body's (app.py: BodyLimit). At most `--max-concurrent-uploads` bodies are read at once
(`UploadSlots`); one more is answered 429.
"""

from __future__ import annotations

import json
import threading

from python_multipart.multipart import MultipartParser, parse_options_header

from flashzo.errors import InputError

from .errors import ServeError

FIELD_BYTES = 1024  # the largest form field other than the file
MAX_PARTS = 8


class UploadSlots:
    """At most `n` uploads read at once (a non-blocking semaphore: one more is refused, never queued)."""

    def __init__(self, n: int):
        self.n = n
        self._sem = threading.BoundedSemaphore(n)

    def __enter__(self) -> UploadSlots:
        if not self._sem.acquire(blocking=False):
            raise ServeError(429, f"{self.n} uploads are already in progress on this server; retry when one ends",
                             code="too_many_uploads")
        return self

    def __exit__(self, *exc) -> None:
        self._sem.release()


class _Form:
    """The push parser's callbacks: fields in memory, the `file` part written to `out`."""

    def __init__(self, out):
        self.out, self.fields, self.filename = out, {}, None
        self.bytes = 0
        self._name, self._value, self._headers, self._part = b"", b"", {}, None
        self._parts, self._file_seen = 0, False

    def callbacks(self) -> dict:
        return {"on_part_begin": self._begin, "on_part_data": self._data, "on_part_end": self._end,
                "on_header_field": self._header_field, "on_header_value": self._header_value,
                "on_header_end": self._header_end, "on_headers_finished": self._headers_done}

    def _begin(self) -> None:
        self._parts += 1
        if self._parts > MAX_PARTS:
            raise ServeError(400, f"the form has more than {MAX_PARTS} parts (expected file and purpose)",
                             code="invalid_body")
        self._headers, self._part = {}, None

    def _header_field(self, data: bytes, start: int, end: int) -> None:
        self._name += data[start:end]

    def _header_value(self, data: bytes, start: int, end: int) -> None:
        self._value += data[start:end]

    def _header_end(self) -> None:
        self._headers[self._name.lower()] = self._value
        self._name, self._value = b"", b""

    def _headers_done(self) -> None:
        _, options = parse_options_header(self._headers.get(b"content-disposition", b""))
        name = options.get(b"name", b"").decode("utf-8", "replace")
        if not name:
            raise ServeError(400, "a form part has no name", code="invalid_body")
        if name == "file":
            if self._file_seen:
                raise ServeError(400, "the form has two file parts", param="file", code="invalid_body")
            self._file_seen = True
            self.filename = options.get(b"filename", b"upload.jsonl").decode("utf-8", "replace")
            self._part = ("file", None)
        else:
            self._part = (name, bytearray())

    def _data(self, data: bytes, start: int, end: int) -> None:
        name, buf = self._part
        if buf is None:
            self.out.write(data[start:end])
            self.bytes += end - start
            return
        buf += data[start:end]
        if len(buf) > FIELD_BYTES:
            raise ServeError(400, f"form field {name!r} is longer than {FIELD_BYTES} bytes", param=name,
                             code="invalid_body")

    def _end(self) -> None:
        name, buf = self._part
        if buf is not None:
            self.fields[name] = buf.decode("utf-8", "replace")


async def receive_form(request, out) -> tuple[dict, str | None, bool]:
    """Stream the request's multipart body into the open binary file `out`: (fields, the file's name,
    whether a file part came)."""
    ctype, options = parse_options_header(request.headers.get("content-type", ""))
    boundary = options.get(b"boundary")
    if ctype != b"multipart/form-data" or not boundary:
        raise ServeError(400, "an upload must be multipart/form-data with a file and a purpose field",
                         code="invalid_body")
    form = _Form(out)
    parser = MultipartParser(boundary, form.callbacks())
    async for chunk in request.stream():
        parser.write(chunk)
    parser.finalize()
    return form.fields, form.filename, form._file_seen


def check_jsonl(path: str, max_errors: int = 5) -> int:
    """Lines of an uploaded JSONL file; InputError naming the first bad lines (JSON syntax only: the
    examples are checked against the model when a job uses the file)."""
    bad, n = [], 0
    with open(path, "rb") as f:
        for i, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise InputError(f"line {i} is not UTF-8 text (byte {e.start + 1}: {e.reason})") from None
            if not line.strip():
                continue
            n += 1
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                bad.append(f"line {i}: not valid JSON ({e.msg} at column {e.colno})")
            except RecursionError:
                bad.append(f"line {i}: nested too deeply")
            else:
                if not isinstance(rec, dict):
                    bad.append(f"line {i}: expected a JSON object, got {type(rec).__name__}")
            if len(bad) >= max_errors:
                break
    if bad:
        raise InputError("file is not JSONL (one JSON object per line): " + "; ".join(bad))
    if not n:
        raise InputError("file has no records")
    return n
