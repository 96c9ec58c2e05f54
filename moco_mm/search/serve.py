"""The search service: text->image, image->image and image/text->caption search over an index
directory, on FastAPI + uvicorn, with a web page and a clip-retrieval compatible back end.

    moco-mm serve --index INDEX_DIR [--export EXPORT] [--host 127.0.0.1] [--port 8000]
    python -m moco_mm.serve ...                              # the same program
    app = create_app("index/demo", "exports/demo")          # any ASGI server, or tests

Endpoints (README "Serving search" has the request and response shapes):
    GET  /                 the search page (search.html, package data)
    POST /search           JSON {"text", "k", "target"} or multipart (image file, k, target)
    GET  /thumb/{row}      JPEG thumbnail of image row `row` (from the index's thumbs.bin)
    GET  /healthz          index sizes, model fingerprint, kinds, limits
    POST /knn-service      clip-retrieval's back-end query (its front end talks to us)
    POST /metadata         clip-retrieval's metadata fetch (ids -> url, caption)
    GET  /indices-list     clip-retrieval's list of index names (ours: one)

Nothing a request says is ever opened as a path or fetched as a URL: a row number indexes
the thumbnail store, ids and captions come from the index metadata loaded at start.

Bad input is answered with a 4xx and a JSON {"detail": "..."} naming the problem; overload
with 503 (+ Retry-After). Limits (class Limits): k in [1, max_k]; a text query of at most
max_query_chars characters (longer ones get 422: the model reads only its first max_length
tokens, so a longer text is a client error, not a query); a request body of at most
max_body_bytes (413, decided from Content-Length before any of the body is read, or as soon
as a body without one passes the limit); images of at most max_image_pixels pixels;
max_concurrent queries embed at once, max_queue more wait, any further one gets 503 at once.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import io
import json
import logging
import math
import re
import sys
import threading
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

try:  # the [serve] extra
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.middleware.cors import CORSMiddleware
    from fastapi.responses import HTMLResponse, JSONResponse, Response
    from starlette.concurrency import run_in_threadpool
    from starlette.exceptions import HTTPException as StarletteHTTPException
except ImportError as e:  # `moco-mm serve --help` still works; serving says what to install
    _MISSING: ImportError | None = e
else:
    _MISSING = None

from moco_mm.data.make_shards import ImageError, decode_image, to_rgb
from moco_mm.search.encoder import Encoder, SearchError
from moco_mm.search.export import ExportError
from moco_mm.search.index import KINDS, SearchIndex
from moco_mm.search.thumbs import ThumbStore

log = logging.getLogger(__name__)

PAGE = "search.html"


@dataclass
class Limits:
    """What one request may ask for; README "Serving search" documents each."""

    max_k: int = 1000  # /search: k in [1, max_k]
    max_knn_results: int = 10000  # /knn-service: num_images, num_result_ids in [1, this]
    max_query_chars: int = 1000  # a text query; longer: 422
    max_body_bytes: int = 8 * 1024 * 1024  # whole request body (an upload, base64 JSON); larger: 413
    max_image_pixels: int = 40_000_000  # width * height of an uploaded image; larger: 422
    max_concurrent: int = 2  # queries embedding at once
    max_queue: int = 16  # queries waiting for a slot; beyond it: 503

    def validate(self) -> None:
        for name, value in asdict(self).items():
            if value < (0 if name == "max_queue" else 1):
                raise ValueError(f"--{name.replace('_', '-')}: must be >= {0 if name == 'max_queue' else 1}, "
                                 f"got {value}")


class ApiError(Exception):
    """Answered as `status` with {"detail": message}."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers or {}


# ---------------------------------------------------------------------------------------
# The search itself (no HTTP)
# ---------------------------------------------------------------------------------------


class SearchService:
    """An index directory (images, and captions when built with --captions), its thumbnails
    and the export that built it, ready for queries from several threads."""

    def __init__(self, index_dir: str | Path, export: str | Path | None = None, *, device: str = "cpu",
                 name: str | None = None, limits: Limits | None = None):
        self.root = Path(index_dir)
        self.limits = limits or Limits()
        self.limits.validate()
        self.indexes: dict[str, SearchIndex] = {"images": SearchIndex.load(self.root, "images")}
        if "captions" in self.indexes["images"].info["parts"]:
            self.indexes["captions"] = SearchIndex.load(self.root, "captions")
        export = export or self.indexes["images"].info.get("export")
        if not export:
            raise SearchError(f"{self.root}: the index does not record its export; pass --export")
        self.encoder = Encoder.from_export(export, device=device)
        self.indexes["images"].check_encoder(self.encoder)
        self.thumbs = ThumbStore.load(self.root)
        if self.thumbs is not None and len(self.thumbs) != len(self.indexes["images"]):
            raise SearchError(f"{self.root}: {len(self.thumbs)} thumbnails for {len(self.indexes['images'])} "
                              f"images: rebuild the index")
        self.name = name or self.root.resolve().name
        # a caption hit shows its image: image id -> image row (first row of a repeated id)
        self.row_of: dict[str, int] = {}
        for row, meta in enumerate(self.indexes["images"].meta):
            self.row_of.setdefault(str(meta["id"]), row)
        # Fast tokenizers mutate their padding/truncation state per call ("Already borrowed"
        # when two threads tokenize at once); the forward itself runs in parallel.
        self._tokenize_lock = threading.Lock()

    @property
    def kinds(self) -> list[str]:
        return [k for k in KINDS if k in self.indexes]

    def health(self) -> dict:
        return {"status": "ok", "name": self.name, "model_fingerprint": self.encoder.fingerprint,
                "embed_dim": self.encoder.embed_dim, "kinds": self.kinds,
                "size": {k: len(v) for k, v in self.indexes.items()},
                "thumbnails": 0 if self.thumbs is None else len(self.thumbs),
                "max_text_tokens": self.encoder.max_length, "limits": asdict(self.limits)}

    # -- queries -> unit vectors [1, D] ---------------------------------------------------

    def check_text(self, text: Any) -> str:
        if not isinstance(text, str):
            raise ApiError(422, f"text must be a string, got {type(text).__name__}")
        if not text.strip():
            raise ApiError(422, "text is empty: give a query")
        if len(text) > self.limits.max_query_chars:
            raise ApiError(422, f"text is {len(text)} characters; at most {self.limits.max_query_chars} are "
                                f"accepted (the model reads only its first {self.encoder.max_length} tokens)")
        return text

    def embed_text(self, text: str) -> np.ndarray:
        with self._tokenize_lock:
            ids, mask = self.encoder.tokenize([text])
        return self.encoder.text_features(ids, mask).numpy()

    def embed_image_bytes(self, data: bytes) -> np.ndarray:
        from PIL import Image

        if not data:
            raise ApiError(422, "the image is empty (0 bytes)")
        try:  # the header alone says the size: refuse a huge image before decoding it
            with Image.open(io.BytesIO(data)) as probe:
                w, h = probe.size
        except Exception:
            raise ApiError(422, "the upload is not an image PIL can read (JPEG, PNG, WebP, GIF, ...)") from None
        if w * h > self.limits.max_image_pixels:
            raise ApiError(422, f"the image is {w}x{h} pixels; at most {self.limits.max_image_pixels} pixels "
                                f"are accepted")
        try:
            img = to_rgb(decode_image(data))
        except ImageError as e:
            raise ApiError(422, f"the upload is not a usable image: {e}") from None
        pixels = self.encoder.pixels([img])
        return self.encoder.image_features(self.encoder.normalize(pixels)).numpy()

    def embed_vector(self, values: Any) -> np.ndarray:
        d = self.encoder.embed_dim
        if not isinstance(values, list) or len(values) != d or not all(
                isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
            raise ApiError(422, f"embedding_input must be a list of {d} numbers")
        vec = np.asarray(values, dtype=np.float32)[None]
        norm = float(np.linalg.norm(vec))
        if not math.isfinite(norm) or norm == 0:
            raise ApiError(422, "embedding_input must be finite and not all zeros")
        return vec / norm

    def embed_row(self, row: int) -> np.ndarray:
        """The thumbnail of image row `row`, embedded (clip-retrieval's "search with this
        result" sends our own thumbnail URL back)."""
        if self.thumbs is None or not 0 <= row < len(self.thumbs) or not self.thumbs.get(row):
            raise ApiError(404, f"no thumbnail for image row {row}")
        return self.embed_image_bytes(self.thumbs.get(row))

    # -- unit vectors -> hits --------------------------------------------------------------

    def check_kind(self, kind: str) -> None:
        if kind not in self.indexes:
            hint = " (build the index with `moco-mm search index ... --captions`)" if kind == "captions" else ""
            raise ApiError(422, f"target {kind!r}: this index holds only {' and '.join(self.kinds)}{hint}")

    def search(self, query: np.ndarray, kind: str, k: int) -> list[dict]:
        """-> up to k hits, best first: rank, score, row (the image row: what /thumb takes),
        id (the sample id), caption, and for image hits every caption."""
        self.check_kind(kind)
        out = []
        for hit in self.indexes[kind].search(query, k)[0]:
            meta = hit.meta
            if kind == "images":
                captions = list(meta.get("captions") or [])
                caption = captions[0] if captions else ""
            else:
                captions, caption = None, meta.get("caption", "")
            row = self.row_of.get(str(meta["id"]))
            item = {"rank": hit.rank, "score": hit.score, "id": meta["id"], "row": row, "caption": caption}
            if captions is not None:
                item["captions"] = captions
            out.append(item)
        return out

    def has_thumb(self, row: int | None) -> bool:
        return row is not None and self.thumbs is not None and 0 <= row < len(self.thumbs) and \
            self.thumbs.offsets[row + 1] > self.thumbs.offsets[row]


class Gate:
    """At most `running` calls at once in worker threads, at most `waiting` more queued;
    any further call is refused at once with 503 (the server stays responsive under a
    flood instead of queueing without bound)."""

    def __init__(self, running: int, waiting: int):
        self.running, self.limit, self.inside = running, running + waiting, 0
        self._sem: asyncio.Semaphore | None = None

    async def run(self, fn, *args):
        if self._sem is None:
            self._sem = asyncio.Semaphore(self.running)
        if self.inside >= self.limit:
            raise ApiError(503, f"busy: {self.running} queries running and {self.limit - self.running} waiting; "
                                f"retry shortly", {"Retry-After": "1"})
        self.inside += 1
        try:
            async with self._sem:
                return await run_in_threadpool(fn, *args)
        finally:
            self.inside -= 1


# ---------------------------------------------------------------------------------------
# HTTP
# ---------------------------------------------------------------------------------------


def _error_body(status: int, message: str, headers: dict[str, str] | None = None) -> tuple[dict, bytes]:
    body = json.dumps({"detail": message}).encode()
    hdrs = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    hdrs += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    return {"type": "http.response.start", "status": status, "headers": hdrs}, body


class BodyLimit:
    """ASGI middleware: a request body over `max_bytes` gets 413. A Content-Length over the
    limit is answered before any of the body is read; a body without one is counted as it
    arrives and answered once it passes the limit. What the client still sends after the
    answer is discarded by uvicorn as it arrives, never buffered (closing at once instead
    would reset the connection under a client still sending, which then loses the 413)."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        too_large = f"request body over {self.max_bytes} bytes ({self.max_bytes / 2 ** 20:.1f} MiB): refused"
        if length is not None:
            if not length.isdigit():
                return await self._send(send, 400, "Content-Length is not a number")
            if int(length) > self.max_bytes:
                return await self._send(send, 413, f"{too_large} (Content-Length {int(length)})")
        seen = 0

        async def counted():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise ApiError(413, too_large)
            return message

        await self.app(scope, counted, send)

    @staticmethod
    async def _send(send, status: int, message: str, headers: dict[str, str] | None = None):
        start, body = _error_body(status, message, headers)
        await send(start)
        await send({"type": "http.response.body", "body": body})


def _int_field(value: Any, name: str, lo: int, hi: int) -> int:
    if isinstance(value, str) and re.fullmatch(r"\s*-?\d{1,12}\s*", value):
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool):
        raise ApiError(422, f"{name} must be an integer in [{lo}, {hi}], got {value!r:.40}")
    if not lo <= value <= hi:
        raise ApiError(422, f"{name} = {value} is out of range: allowed {lo} to {hi}")
    return value


async def _json_body(request) -> dict:
    """The body as a JSON object, whatever the Content-Type says (clip-retrieval's front end
    posts JSON as text/plain)."""
    raw = await request.body()
    if not raw.strip():
        raise ApiError(400, "empty request body: send a JSON object")
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise ApiError(400, f"malformed JSON: {e}") from None
    if not isinstance(data, dict):
        raise ApiError(400, f"the body must be a JSON object, got {type(data).__name__}")
    return data


_DATA_URL = re.compile(r"^data:[\w/+.-]*;base64,", re.IGNORECASE)


def _b64_image(value: Any) -> bytes:
    if not isinstance(value, str):
        raise ApiError(422, "image must be a base64 string")
    try:
        return base64.b64decode(_DATA_URL.sub("", value, count=1), validate=True)
    except (binascii.Error, ValueError):
        raise ApiError(422, "image is not valid base64") from None


def create_app(index_dir: str | Path, export: str | Path | None = None, *, limits: Limits | None = None,
               device: str = "cpu", name: str | None = None, cors_origins: tuple[str, ...] = ("*",),
               service: SearchService | None = None):
    """The ASGI app (FastAPI) serving `index_dir` with `export` (default: the export that built
    the index). Loads everything now, so a broken index fails here, not at the first query."""
    if _MISSING is not None:
        raise SearchError(f"serving needs FastAPI and uvicorn: pip install 'moco-mm[serve]' ({_MISSING})")
    svc = service or SearchService(index_dir, export, device=device, name=name, limits=limits)
    lim = svc.limits
    gate = Gate(lim.max_concurrent, lim.max_queue)
    page = resources.files("moco_mm.search").joinpath(PAGE).read_text(encoding="utf-8")

    app = FastAPI(title="moco_mm search", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.service = svc
    app.state.gate = gate

    @app.exception_handler(ApiError)
    async def _api_error(request, exc: ApiError):
        return JSONResponse({"detail": exc.message}, status_code=exc.status, headers=exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, exc):
        return JSONResponse({"detail": str(exc.detail)}, status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request, exc):
        msgs = [f"{'.'.join(str(p) for p in e.get('loc', ()))}: {e.get('msg')}" for e in exc.errors()]
        return JSONResponse({"detail": "; ".join(msgs)}, status_code=422)

    @app.exception_handler(Exception)
    async def _crash(request, exc):  # never a traceback to the client; the server keeps serving
        log.exception("internal error on %s %s", request.method, request.url.path)
        return JSONResponse({"detail": f"internal error: {type(exc).__name__}"}, status_code=500)

    page_headers = {"Content-Security-Policy": "default-src 'none'; script-src 'unsafe-inline'; style-src "
                                               "'unsafe-inline'; img-src 'self' blob:; connect-src 'self'; "
                                               "form-action 'none'; base-uri 'none'",
                    "X-Content-Type-Options": "nosniff"}

    @app.get("/", response_class=HTMLResponse)
    async def index_page():
        return HTMLResponse(page, headers=page_headers)

    @app.get("/favicon.ico")
    async def favicon():
        return Response(status_code=204)

    @app.get("/healthz")
    async def healthz():
        return svc.health()

    def thumb_path(request: Request, row: int | None) -> str | None:
        return f"{request.scope.get('root_path', '')}/thumb/{row}" if svc.has_thumb(row) else None

    def thumb_url(request: Request, row: int | None) -> str | None:
        return str(request.url_for("thumb", row=row)) if svc.has_thumb(row) else None

    @app.get("/thumb/{row}", name="thumb")
    async def thumb(row: int):
        if not svc.has_thumb(row):
            raise ApiError(404, f"no thumbnail for row {row} (the index has "
                                f"{0 if svc.thumbs is None else len(svc.thumbs)} image rows)")
        return Response(svc.thumbs.get(row), media_type="image/jpeg",
                        headers={"Cache-Control": "public, max-age=3600", "X-Content-Type-Options": "nosniff"})

    @app.post("/search")
    async def search(request: Request):
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        image: bytes | None = None
        if ctype == "multipart/form-data":
            form = await request.form(max_files=1, max_fields=8, max_part_size=64 * 1024)
            fields = {key: value for key, value in form.items()}
            upload = fields.pop("image", None)
            if upload is not None and not isinstance(upload, str):
                image = await upload.read()
            elif isinstance(upload, str) and upload:
                raise ApiError(422, "image must be an uploaded file (multipart file field `image`)")
        else:  # JSON, whatever the Content-Type says (as /knn-service)
            fields = await _json_body(request)
            if "image" in fields:
                image = _b64_image(fields.pop("image"))
        unknown = sorted(set(fields) - {"text", "k", "target"})
        if unknown:
            raise ApiError(422, f"unknown field(s) {unknown}: expected text or image, k, target")
        k = _int_field(fields.get("k", 10), "k", 1, lim.max_k)
        target = fields.get("target") or "images"
        if target not in KINDS:
            raise ApiError(422, f"target must be one of {list(KINDS)}, got {target!r:.40}")
        text = fields.get("text")
        if text is not None and image is not None:
            raise ApiError(422, "give text or an image, not both")
        if image is not None:
            embed, arg, query = svc.embed_image_bytes, image, {"image_bytes": len(image)}
        elif text is not None:
            embed, arg, query = svc.embed_text, svc.check_text(text), {"text": text}
        else:
            raise ApiError(422, "no query: give text (JSON {\"text\": ...}) or an image (multipart field `image`)")
        svc.check_kind(target)

        def work():
            return svc.search(embed(arg), target, k)

        hits = await gate.run(work)
        for h in hits:
            h["thumb_url"] = thumb_path(request, h["row"])
        return {"query": query, "target": target, "k": k, "results": hits}

    # -- clip-retrieval's back end (clip_retrieval/clip_back.py) ---------------------------

    @app.get("/indices-list")
    async def indices_list():
        return [svc.name]

    def check_indice(data: dict) -> None:
        name = data.get("indice_name")
        if name not in (None, "", svc.name):
            raise ApiError(422, f"indice_name {name!r:.60}: this server has {[svc.name]}")

    @app.post("/knn-service")
    async def knn_service(request: Request):
        data = await _json_body(request)
        check_indice(data)
        modality = data.get("modality") or "image"
        if modality not in ("image", "text"):
            raise ApiError(422, f"modality must be 'image' or 'text', got {modality!r:.40}")
        target = "images" if modality == "image" else "captions"
        num_images = _int_field(data.get("num_images", 40), "num_images", 1, lim.max_knn_results)
        num_ids = data.get("num_result_ids")
        num_ids = num_images if num_ids in (None, "") else _int_field(num_ids, "num_result_ids", 1,
                                                                      lim.max_knn_results)
        text, image, url, emb = (data.get(f) for f in ("text", "image", "image_url", "embedding_input"))
        if text not in (None, ""):
            embed, arg = svc.embed_text, svc.check_text(text)
        elif image not in (None, ""):
            embed, arg = svc.embed_image_bytes, _b64_image(image)
        elif url not in (None, ""):
            row = _own_thumb_row(request, url)
            if row is None:
                raise ApiError(422, "image_url: this server never fetches URLs (closed network, and a "
                                    "server-side fetch of a client's URL is an SSRF hole); send the image "
                                    "itself as base64 in `image`")
            embed, arg = svc.embed_row, row
        elif emb is not None:
            embed, arg = svc.embed_vector, emb
        else:
            raise ApiError(422, "no query: fill one of text, image (base64), embedding_input")
        svc.check_kind(target)  # modality "text" searches the captions
        dedup = bool(data.get("deduplicate", False))

        def work():
            # With deduplicate (one result per image), ask for more, then drop repeats.
            hits = svc.search(embed(arg), target, min(num_ids * (4 if dedup else 1), lim.max_knn_results))
            if dedup:
                seen: set = set()
                hits = [h for h in hits if not (h["row"] in seen or seen.add(h["row"]))]
            return hits[:num_ids]

        hits = await gate.run(work)
        out = []
        for n, h in enumerate(hits):
            item: dict[str, Any] = {"id": h["row"], "similarity": h["score"]}
            if n < num_images:  # as clip-retrieval: metadata for the first num_images only
                item.update(url=thumb_url(request, h["row"]), caption=h["caption"], sample_id=h["id"])
            out.append(item)
        return out

    @app.post("/metadata")
    async def metadata(request: Request):
        data = await _json_body(request)
        check_indice(data)
        ids = data.get("ids")
        if not isinstance(ids, list) or len(ids) > lim.max_knn_results:
            raise ApiError(422, f"ids must be a list of at most {lim.max_knn_results} image rows")
        meta = svc.indexes["images"].meta
        out = []
        for i in ids:
            if isinstance(i, int) and not isinstance(i, bool) and 0 <= i < len(meta):
                caps = meta[i].get("captions") or [""]
                out.append({"id": i, "metadata": {"url": thumb_url(request, i), "caption": caps[0],
                                                  "sample_id": meta[i]["id"]}})
        return out

    app.add_middleware(BodyLimit, max_bytes=lim.max_body_bytes)
    if cors_origins:  # clip-retrieval's front end is served from another origin
        app.add_middleware(CORSMiddleware, allow_origins=list(cors_origins), allow_methods=["GET", "POST"],
                           allow_headers=["*"])
    return app


def _own_thumb_row(request, url: Any) -> int | None:
    """Our own thumbnail URL (as /knn-service hands out) -> its image row; anything else
    None. Nothing is fetched: the row indexes the thumbnail store."""
    if not isinstance(url, str):
        return None
    m = re.fullmatch(r"(?:(https?)://([^/?#]+))?(/[^?#]*)/?", url.strip())
    if not m:
        return None
    if m.group(2) is not None and m.group(2).lower() != request.headers.get("host", "").lower():
        return None
    root = request.scope.get("root_path", "")
    path = m.group(3)
    rest = path[len(root):] if root and path.startswith(root) else path
    t = re.fullmatch(r"/thumb/(\d{1,12})", rest)
    return int(t.group(1)) if t else None


# ---------------------------------------------------------------------------------------
# The program
# ---------------------------------------------------------------------------------------

USAGE = """Serve text->image, image->image and ->caption search over an index directory.

    moco-mm serve --index INDEX_DIR [--export EXPORT] [--host 127.0.0.1] [--port 8000]
    python -m moco_mm.serve ...            (the same program)

Open http://HOST:PORT/ for the search page. POST /search takes JSON {"text": "...", "k": 10,
"target": "images"|"captions"} or multipart/form-data with an `image` file (and optional k,
target); GET /thumb/ROW is a result's thumbnail; GET /healthz says what is loaded.
POST /knn-service, POST /metadata and GET /indices-list speak clip-retrieval's back-end API,
so its web front end can search this index. --export defaults to the export that built the
index; another model's export is refused. Every limit below is answered with a 4xx and a
JSON {"detail": ...}; more than --max-concurrent + --max-queue queries at once get 503.
Exit status 2 when the index or export cannot be loaded."""


def main(argv: list[str] | None = None) -> int:
    d = Limits()
    ap = argparse.ArgumentParser(prog="moco-mm serve", description=USAGE,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--index", required=True, help="index directory (moco-mm search index)")
    ap.add_argument("--export", default=None, help="export directory (default: the one that built the index)")
    ap.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1; 0.0.0.0 for all)")
    ap.add_argument("--port", type=int, default=8000)
    ap.add_argument("--name", default=None, help="the index name /indices-list reports (default: the folder name)")
    ap.add_argument("--device", default="cpu", help="torch device for the encoders (cpu, cuda, cuda:1)")
    ap.add_argument("--max-k", type=int, default=d.max_k, help="largest k of /search")
    ap.add_argument("--max-knn-results", type=int, default=d.max_knn_results,
                    help="largest num_images / num_result_ids of /knn-service")
    ap.add_argument("--max-query-chars", type=int, default=d.max_query_chars, help="longest text query")
    ap.add_argument("--max-body-mb", type=float, default=d.max_body_bytes / 2 ** 20,
                    help="largest request body, MiB (uploads)")
    ap.add_argument("--max-image-pixels", type=int, default=d.max_image_pixels, help="largest uploaded image")
    ap.add_argument("--max-concurrent", type=int, default=d.max_concurrent, help="queries embedding at once")
    ap.add_argument("--max-queue", type=int, default=d.max_queue,
                    help="queries waiting for a slot; any more get 503 at once")
    ap.add_argument("--max-connections", type=int, default=256,
                    help="open connections uvicorn accepts before answering 503 (its limit_concurrency)")
    ap.add_argument("--cors-origins", default="*",
                    help="comma-separated origins allowed to call the API from a browser ('*': any, as "
                         "clip-retrieval; '': none)")
    ap.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"))
    args = ap.parse_args(argv)
    limits = Limits(max_k=args.max_k, max_knn_results=args.max_knn_results, max_query_chars=args.max_query_chars,
                    max_body_bytes=int(args.max_body_mb * 2 ** 20), max_image_pixels=args.max_image_pixels,
                    max_concurrent=args.max_concurrent, max_queue=args.max_queue)
    try:
        limits.validate()
        app = create_app(args.index, args.export, limits=limits, device=args.device, name=args.name,
                         cors_origins=tuple(o.strip() for o in args.cors_origins.split(",") if o.strip()))
    except (SearchError, ExportError, ValueError, OSError) as e:
        print(f"serve: error: {e}", file=sys.stderr)
        return 2
    try:
        import uvicorn
    except ImportError as e:
        print(f"serve: error: serving needs uvicorn: pip install 'moco-mm[serve]' ({e})", file=sys.stderr)
        return 2
    svc: SearchService = app.state.service
    print(f"serve: {svc.name}: {', '.join(f'{len(v)} {k}' for k, v in svc.indexes.items())}, model "
          f"{svc.encoder.fingerprint}; http://{args.host}:{args.port}/", file=sys.stderr)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level, limit_concurrency=args.max_connections,
                timeout_keep_alive=5)
    return 0
