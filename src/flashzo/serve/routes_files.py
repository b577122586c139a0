"""/v1/files: upload (streamed to disk), list, retrieve, content, delete."""

from __future__ import annotations

import os
from typing import Optional
from urllib.parse import quote

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import StreamingResponse
from starlette.concurrency import run_in_threadpool

from flashzo.errors import InputError

from . import jobs as J
from .deps import file_or_404, require_key
from .errors import ServeError, not_found
from .store import new_id
from .upload import check_jsonl, receive_form

router = APIRouter(dependencies=[Depends(require_key)])
FILE_PURPOSES = ("fine-tune",)
CHUNK = 1 << 20


@router.post("/v1/files")
async def upload(request: Request):
    st = request.app.state
    with st.uploads:
        file_id = new_id("file")
        tmp = st.store.new_file_path(file_id)
        try:
            with open(tmp, "wb") as out:
                fields, filename, got_file = await receive_form(request, out)
            purpose = fields.get("purpose")
            if not got_file:
                raise ServeError(400, "the form has no file part", param="file", code="invalid_body")
            if purpose not in FILE_PURPOSES:
                raise ServeError(400, f"purpose must be one of {', '.join(FILE_PURPOSES)}, got {purpose!r}",
                                 param="purpose", code="invalid_purpose")
            try:
                await run_in_threadpool(check_jsonl, tmp)
            except InputError as e:
                raise ServeError(400, f"{filename}: {e}", param="file", code="invalid_file") from None
            name = os.path.basename(filename or "upload.jsonl")[:255]
            row = await run_in_threadpool(st.store.add_file, file_id, purpose, name, tmp)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    return J.file_object(row)


@router.get("/v1/files")
def list_files(request: Request, purpose: Optional[str] = None, limit: int = Query(10000), after: Optional[str] = None,
               order: str = "desc"):
    if order not in ("asc", "desc"):
        raise ServeError(400, f"order must be asc or desc, got {order!r}", param="order")
    if not 1 <= limit <= 10000:
        raise ServeError(400, f"limit must be in 1..10000, got {limit}", param="limit")
    rows = request.app.state.store.list_files(purpose=purpose, after=after, limit=limit + 1, order=order)
    return {"object": "list", "data": [J.file_object(r) for r in rows[:limit]], "has_more": len(rows) > limit,
            "first_id": rows[0]["id"] if rows else None, "last_id": rows[:limit][-1]["id"] if rows else None}


@router.get("/v1/files/{file_id}")
def get_file(request: Request, file_id: str):
    return J.file_object(file_or_404(request.app.state.store, file_id))


@router.get("/v1/files/{file_id}/content")
def file_content(request: Request, file_id: str):
    """The file as it is when it is opened here: a DELETE after that does not cut the answer short (the
    open file outlives its name), one before it makes this a 404."""
    store = request.app.state.store
    row = file_or_404(store, file_id)
    try:
        f = open(store.file_path(file_id), "rb")
    except FileNotFoundError:
        raise not_found("file", file_id, param="file_id", code="file_not_found") from None
    size = os.fstat(f.fileno()).st_size

    def chunks():
        with f:
            while block := f.read(CHUNK):
                yield block

    media = "application/gzip" if row["filename"].endswith(".tar.gz") else "application/octet-stream"
    headers = {"content-length": str(size),
               "content-disposition": f"attachment; filename*=utf-8''{quote(row['filename'])}"}
    return StreamingResponse(chunks(), media_type=media, headers=headers)


@router.delete("/v1/files/{file_id}")
def delete_file(request: Request, file_id: str):
    store = request.app.state.store
    file_or_404(store, file_id)
    users = store.files_in_use(file_id)
    if users:
        raise ServeError(409, f"file {file_id} is the data of {', '.join(users)}, which has not ended; cancel it "
                         "or wait for it to end", param="file_id", code="file_in_use")
    store.delete_file(file_id)
    return {"id": file_id, "object": "file", "deleted": True}
