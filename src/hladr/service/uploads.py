"""Receiving a multipart upload without holding it: streamed to disk, capped, hashed on the way.

:func:`read_form` parses ``multipart/form-data`` chunk by chunk as it arrives. File parts go to
private ``.part`` files in the upload folder (1 MiB at a time, written and hashed in a thread,
never on the event loop); a part larger than the limit is refused with 413 as soon as it passes
it; a client silent for longer than the read timeout gets 408; a full disk gives 507. Whatever is
refused is deleted before the answer. The caller owns the accepted parts (:meth:`Form.discard`).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hashlib
import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, parse_options_header

MAX_TEXT_FIELD = 64 * 1024
MAX_PARTS = 8
FLUSH_BYTES = 1 << 20
PART_PREFIX = ".upload-"


class Refused(Exception):
    """An upload the service does not take: the HTTP status and the one-line reason."""

    def __init__(self, status: int, detail: str, headers: dict[str, str] | None = None):
        super().__init__(detail)
        self.status, self.detail, self.headers = status, detail, headers


@dataclass
class UploadedFile:
    """One received file part: where it is, its client's base name, SHA-256 and size."""

    name: str
    path: Path
    sha256: str
    size: int


@dataclass
class Form:
    files: dict[str, UploadedFile] = field(default_factory=dict)
    fields: dict[str, str] = field(default_factory=dict)

    def discard(self) -> None:
        """Delete the received files that were not moved into place."""
        for upload in self.files.values():
            with contextlib.suppress(FileNotFoundError):
                upload.path.unlink()


def client_name(filename: str | None, default: str) -> str:
    """The base name of a client's file name, for display only (never used as a path)."""
    name = re.split(r"[\\/]", filename or "")[-1].strip()
    name = "".join(ch for ch in name if ch.isprintable())[:200]
    return name if name not in ("", ".", "..") else default


def _sink(fd: int, digest: Any, data: bytes) -> None:
    digest.update(data)
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


class _Part:
    def __init__(self, field_name: str, filename: str | None, folder: Path | None):
        self.field, self.filename = field_name, filename
        self.size = 0
        self.buffer = bytearray()
        self.digest = hashlib.sha256() if folder else None
        self.fd, self.path = (None, None)
        if folder is not None:
            fd, path = tempfile.mkstemp(dir=folder, prefix=PART_PREFIX, suffix=".part")
            self.fd, self.path = fd, Path(path)

    async def flush(self, final: bool = False) -> None:
        if self.fd is None:
            return
        data, self.buffer = bytes(self.buffer), bytearray()
        try:
            if data:
                await asyncio.to_thread(_sink, self.fd, self.digest, data)
            if final:
                await asyncio.to_thread(os.fsync, self.fd)
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise Refused(
                    507, "no space left to store the upload; retry later", {"Retry-After": "60"}
                ) from None
            raise

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def drop(self) -> None:
        self.close()
        if self.path is not None:
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()


async def read_form(
    scope: dict,
    receive: Any,
    folder: Path,
    *,
    file_fields: set[str],
    text_fields: set[str],
    file_limit: int,
    read_timeout: float,
) -> Form:
    """Parse a ``multipart/form-data`` request body as it streams in (see the module docstring)."""
    headers = {k.lower(): v for k, v in scope["headers"]}
    content_type, options = parse_options_header(headers.get(b"content-type", b""))
    boundary = options.get(b"boundary")
    if content_type != b"multipart/form-data" or not boundary:
        raise Refused(422, "expected a multipart/form-data body")
    events: list[tuple[str, Any]] = []
    header: dict[str, bytearray] = {"field": bytearray(), "value": bytearray()}
    part_headers: dict[bytes, bytes] = {}

    def on_header_field(data: bytes, start: int, end: int) -> None:
        header["field"] += data[start:end]

    def on_header_value(data: bytes, start: int, end: int) -> None:
        header["value"] += data[start:end]

    def on_header_end() -> None:
        part_headers[bytes(header["field"]).lower()] = bytes(header["value"])
        header["field"], header["value"] = bytearray(), bytearray()

    def on_headers_finished() -> None:
        events.append(("headers", dict(part_headers)))
        part_headers.clear()

    def on_part_data(data: bytes, start: int, end: int) -> None:
        events.append(("data", data[start:end]))

    def on_part_end() -> None:
        events.append(("end", None))

    parser = MultipartParser(
        boundary,
        {
            "on_header_field": on_header_field,
            "on_header_value": on_header_value,
            "on_header_end": on_header_end,
            "on_headers_finished": on_headers_finished,
            "on_part_data": on_part_data,
            "on_part_end": on_part_end,
        },
    )
    form, part, parts = Form(), None, 0
    try:
        more = True
        while more:
            try:
                message = await asyncio.wait_for(receive(), read_timeout)
            except asyncio.TimeoutError:
                raise Refused(408, f"no data from the client for {read_timeout:g} s") from None
            if message["type"] == "http.disconnect":
                raise Refused(400, "the client went away during the upload")
            more = message.get("more_body", False)
            try:
                parser.write(message.get("body", b""))
            except FormParserError as exc:
                raise Refused(422, f"malformed multipart body: {exc}") from None
            for kind, value in events:
                if kind == "headers":
                    parts += 1
                    _, disposition = parse_options_header(value.get(b"content-disposition", b""))
                    name = disposition.get(b"name", b"").decode("latin-1")
                    if parts > MAX_PARTS or name not in file_fields | text_fields:
                        raise Refused(422, f"unexpected form field {name[:40]!r}")
                    if name in form.files or name in form.fields:
                        raise Refused(422, f"form field {name!r} given twice")
                    filename = disposition.get(b"filename")
                    part = _Part(
                        name,
                        filename.decode("utf-8", "replace") if filename else None,
                        folder if name in file_fields else None,
                    )
                elif kind == "data" and part is not None:
                    part.size += len(value)
                    part.buffer += value
                    if part.fd is None and part.size > MAX_TEXT_FIELD:
                        raise Refused(422, f"form field {part.field!r} is too long")
                    if part.fd is not None and part.size > file_limit:
                        raise Refused(413, f"{part.field} is larger than the {file_limit:,}-byte limit")
                    if len(part.buffer) >= FLUSH_BYTES:
                        await part.flush()
                elif kind == "end" and part is not None:
                    if part.fd is None:
                        try:
                            form.fields[part.field] = bytes(part.buffer).decode("utf-8")
                        except UnicodeDecodeError:
                            raise Refused(422, f"form field {part.field!r} is not UTF-8 text") from None
                    else:
                        await part.flush(final=True)
                        part.close()
                        form.files[part.field] = UploadedFile(
                            client_name(part.filename, f"{part.field}.fcs"),
                            part.path,
                            part.digest.hexdigest(),
                            part.size,
                        )
                    part = None
            events.clear()
        parser.finalize()
        if part is not None:
            raise Refused(422, "the multipart body ended inside a part")
    except BaseException:
        if part is not None:
            part.drop()
        form.discard()
        raise
    return form


def sweep(folder: Path, keep: set[str]) -> int:
    """Delete interrupted uploads and stored files no job needs (``keep``: SHA-256s still needed)."""
    removed = 0
    for path in folder.iterdir():
        stem = path.name.split(".")[0]
        if path.name.startswith(PART_PREFIX) or (path.suffix == ".fcs" and stem not in keep):
            with contextlib.suppress(OSError):
                path.unlink()
                removed += 1
    return removed
