"""``brainseg serve``: a local web page to upload MR images and see, measure and download the tumour segmentation.

FastAPI serves one static page and a JSON API; the work is `brainseg_monai.webapp.service.Segmenter`. A refused
or broken upload is answered with a message naming the file and the reason, and the server goes on serving.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from fastapi import FastAPI
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse, JSONResponse, Response
from starlette.datastructures import FormData
from starlette.datastructures import UploadFile as StarletteUpload
from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from brainseg_monai.errors import InputError
from brainseg_monai.webapp.service import DEFAULT_TTA, CaseRefused, SegmentationFailed, Segmenter, Upload
from brainseg_monai.webapp.uploads import UploadTooLarge

__all__ = ["create_app", "serve"]

logger = logging.getLogger(__name__)

STATIC = Path(__file__).parent / "static"
FAVICON = ('<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 32 32"><ellipse cx="16" cy="16" rx="13" ry="15" '
           'fill="#666"/><circle cx="20" cy="11" r="5" fill="none" stroke="#f00" stroke-width="2.5"/></svg>')
"""The page's icon (a head with a tumour outlined in red), inline: browsers ask for ``/favicon.ico`` otherwise, and a
404 there fills the server's log and the browser's console."""
#: Room for the multipart framing and form fields on top of the files' own size limit.
_FORM_OVERHEAD = 1 << 20


class _BodyLimit:
    """ASGI middleware refusing request bodies over a limit: by Content-Length at once, else while they stream in.

    Starlette spools a multipart body to disk before the endpoint runs, so the limit must act here, before that.
    """

    def __init__(self, app: ASGIApp, limit_bytes: int) -> None:
        self.app, self.limit_bytes = app, limit_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = dict(scope.get("headers", [])).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.limit_bytes + _FORM_OVERHEAD:
            await _too_large(self.limit_bytes)(scope, receive, send)
            return
        seen = 0

        async def counted() -> Message:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.limit_bytes + _FORM_OVERHEAD:
                raise UploadTooLarge(self.limit_bytes)
            return message

        await self.app(scope, counted, send)


def _too_large(limit_bytes: int) -> JSONResponse:
    return JSONResponse({"error": f"upload refused: {UploadTooLarge(limit_bytes)}"}, status_code=413)


def _error(err: InputError | ValueError, status: int) -> JSONResponse:
    """The JSON of a refusal: the message, the file it names and the reason, and for a case that cannot run as it
    stands its ``inputs`` (the series or files found and the channel choices), so the page can offer them."""
    file = getattr(err, "path", None)
    reason = getattr(err, "reason", str(err))
    body = {"error": f"{file}: {reason}" if file else reason, "file": file, "reason": reason}
    if isinstance(err, CaseRefused):
        body["inputs"] = err.inputs
    return JSONResponse(body, status_code=status)


def _threshold(value: str) -> float | None:
    if value.strip() == "":
        return None
    try:
        return float(value)
    except ValueError as err:
        raise ValueError(f"threshold must be a number in (0, 1) but is {value!r}.") from err


def _channels(value: str) -> dict:
    """The form's ``channels`` field: a JSON object of channel -> choice (see `channel_overrides`), or nothing."""
    if value.strip() == "":
        return {}
    try:
        choices = json.loads(value)
    except ValueError as err:
        raise ValueError(f"channels must be a JSON object of channel choices but is {value!r}.") from err
    if not isinstance(choices, dict):
        raise ValueError(f"channels must be a JSON object of channel choices but is {value!r}.")
    return choices


def _uploads(form: FormData, field: str) -> list[Upload]:
    return [Upload(item.filename or field, item.file) for item in form.getlist(field)
            if isinstance(item, StarletteUpload) and item.filename]


async def _segment_form(segmenter: Segmenter, form: FormData) -> JSONResponse:
    """Answer one ``/api/segment`` form: the result, a list of cases to choose from, or an error naming the file."""
    uploads, truths = _uploads(form, "files"), _uploads(form, "truth")
    try:
        result = await run_in_threadpool(
            segmenter.segment, uploads, truths[0] if truths else None, str(form.get("tta") or DEFAULT_TTA),
            _threshold(str(form.get("threshold") or "")), str(form.get("case") or "") or None,
            _channels(str(form.get("channels") or "")))
    except UploadTooLarge as err:
        return JSONResponse({"error": f"upload refused: {err}"}, status_code=413)
    except InputError as err:
        logger.info("refused: %s", err)
        return _error(err, 422)
    except ValueError as err:
        return _error(err, 400)
    except SegmentationFailed as err:  # logged with its traceback where it happened; the message names no server path
        return JSONResponse({"error": str(err)}, status_code=500)
    except Exception as err:  # the server keeps serving whatever one request hits
        logger.exception("segmentation failed")
        return JSONResponse({"error": f"{', '.join(u.filename for u in uploads)}: could not be segmented "
                                      f"({type(err).__name__})"}, status_code=500)
    return JSONResponse(result)


def create_app(segmenter: Segmenter) -> FastAPI:
    """The web app around ``segmenter``: ``GET /`` (page), ``GET /favicon.ico``, ``GET /api/info``,
    ``POST /api/segment`` (multipart: ``files`` one or more, optional ``truth``, ``tta``, ``threshold``, ``case``,
    ``channels``: a JSON object of channel roles set by hand)."""
    app = FastAPI(title="brainseg-monai", docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(_BodyLimit, limit_bytes=segmenter.max_upload_bytes)

    @app.get("/")
    async def page() -> FileResponse:
        return FileResponse(STATIC / "index.html", media_type="text/html")

    @app.get("/favicon.ico")
    async def favicon() -> Response:
        return Response(FAVICON, media_type="image/svg+xml")

    @app.get("/api/info")
    async def info() -> dict[str, Any]:
        return segmenter.info()

    @app.post("/api/segment")
    async def segment(request: Request) -> JSONResponse:
        try:
            form = await request.form(max_files=100_000)
        except UploadTooLarge as err:
            return _too_large(err.limit_bytes)
        except Exception as err:  # python-multipart's and Starlette's parse errors share no base class
            return JSONResponse({"error": f"the upload is not a readable multipart form ({err})"}, status_code=400)
        try:
            return await _segment_form(segmenter, form)
        finally:
            await form.close()

    return app


def serve(checkpoint: str | os.PathLike, host: str = "127.0.0.1", port: int = 8000, max_upload_mb: float = 512,
          device: str = "auto") -> None:
    """Load the model and serve the app until interrupted (``brainseg serve``).

    Raises:
        InputError: when the checkpoint is missing or unreadable.
    """
    import uvicorn

    app = create_app(Segmenter(checkpoint, max_upload_mb=max_upload_mb, device=device))
    logger.info("serving on http://%s:%d", host, port)
    uvicorn.run(app, host=host, port=port, log_level="info")
