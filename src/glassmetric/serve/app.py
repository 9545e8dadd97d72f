"""The FastAPI app of ``glassmetric serve``: the explorer page and its JSON API.

API (schema at ``/openapi.json``, an offline reference page at ``/docs``): ``GET /api/info``; ``GET /api/gallery`` (paged list);
``GET /api/images/{id}`` (PNG); ``POST /api/search`` (upload) or ``GET /api/search?query=g12``
(a gallery image), ordered by the global cosine or, with ``rerank=structural&rerank_k=K``, by
``cos + SS`` after structural re-ranking of the global top-K (each answer's ``ranking`` says
which score ordered it); ``GET /api/explain?query=..&result=g..`` and its figures
``GET /api/explain/figure``; ``POST /api/uncertainty`` / ``GET /api/uncertainty?query=..``.
Model work runs in worker threads, ``workers`` at a time; at most ``limits.max_in_flight``
requests whose bodies have arrived are served at once (503 beyond), a body that takes longer
than ``limits.body_timeout_s`` gets 408, and uploads are checked by
:func:`glassmetric.serve.limits.read_upload` (413, 415). Requests addressed to a foreign Host
get 421, state-changing ones from a foreign Origin 403 (:mod:`glassmetric.serve.hosts`).
"""

from __future__ import annotations

from dataclasses import asdict

import anyio
from fastapi import FastAPI, File, Form, Query, UploadFile
from fastapi.responses import HTMLResponse, JSONResponse, Response

from glassmetric.errors import GlassmetricError
from glassmetric.serve.api_docs import api_docs_page
from glassmetric.serve.explorer import Explorer, UnknownQuery
from glassmetric.serve.hosts import HostCheck
from glassmetric.serve.limits import Limits, RequestError, RequestLimits, read_upload
from glassmetric.serve.page import PAGE

__all__ = ["create_app"]

# the multipart framing around an upload: the body limit allows this much over the file limit
_FORM_OVERHEAD = 64 * 1024


def create_app(explorer: Explorer, limits: Limits = Limits(), *, workers: int = 1, host: str = "127.0.0.1") -> FastAPI:
    """The explorer's app; it answers only requests addressed to ``host`` or a loopback name
    (:class:`glassmetric.serve.hosts.HostCheck`)."""
    # Swagger UI and ReDoc load their scripts from a CDN: offline they stay blank, so /docs is
    # our own page rendered from the schema (glassmetric.serve.api_docs)
    app = FastAPI(
        title="glassmetric explorer",
        version="1",
        docs_url=None,
        redoc_url=None,
        description="Search a gallery with a trained glassmetric checkpoint and see why each result came back.",
    )
    app.add_middleware(
        RequestLimits,
        max_in_flight=limits.max_in_flight,
        max_body_bytes=limits.max_upload_bytes + _FORM_OVERHEAD,
        body_timeout_s=limits.body_timeout_s,
    )
    app.add_middleware(HostCheck, host=host)  # added last: runs first
    compute = anyio.CapacityLimiter(workers)

    async def run(fn, *args):
        return await anyio.to_thread.run_sync(fn, *args, limiter=compute)

    @app.exception_handler(GlassmetricError)
    async def _refused(request, err: GlassmetricError):
        status = err.status if isinstance(err, RequestError) else 404 if isinstance(err, UnknownQuery) else 400
        return JSONResponse({"detail": str(err)}, status_code=status)

    def check_k(k: int) -> int:
        if not 1 <= k <= limits.max_k:
            raise RequestError(422, f"k: expected 1 <= k <= {limits.max_k}, got {k}")
        return k

    async def upload(image: UploadFile) -> str:
        data = await image.read(limits.max_upload_bytes + 1)
        img = read_upload(data, limits, image.filename or "upload")
        return await run(explorer.add_upload, img)

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page() -> str:
        return PAGE

    @app.get("/docs", response_class=HTMLResponse, include_in_schema=False)
    async def docs() -> str:
        return api_docs_page(app.openapi())

    @app.get("/api/info", summary="the checkpoint, the gallery and what the model can explain")
    async def info() -> dict:
        return {**explorer.info(), "limits": asdict(limits)}

    @app.get("/api/gallery", summary="the gallery images, a page at a time")
    async def gallery(offset: int = Query(0, ge=0), limit: int = Query(60, ge=1, le=1000)) -> dict:
        n = len(explorer.gallery)
        return {
            "total": n,
            "offset": offset,
            "items": [explorer.item(i) for i in range(offset, min(n, offset + limit))],
        }

    @app.get(
        "/api/images/{qid}",
        summary="a gallery image or an upload as the model sees it (PNG)",
        response_class=Response,
        responses={200: {"content": {"image/png": {}}}},
    )
    async def image(qid: str) -> Response:
        return Response(
            await run(explorer.view_png, qid), media_type="image/png", headers={"cache-control": "max-age=3600"}
        )

    def check_rerank_k(rerank_k: int | None) -> int | None:
        if rerank_k is not None and not 1 <= rerank_k <= limits.max_k:
            raise RequestError(422, f"rerank_k: expected 1 <= rerank_k <= {limits.max_k}, got {rerank_k}")
        return rerank_k

    @app.post("/api/search", summary="upload a query image: its best gallery images with their scores")
    async def search_upload(
        image: UploadFile = File(...),
        k: int = Form(10),
        rerank: str = Form("global"),
        rerank_k: int | None = Form(None),
    ) -> dict:
        check_k(k)
        return await run(explorer.search, await upload(image), k, rerank, check_rerank_k(rerank_k))

    @app.get("/api/search", summary="search with a gallery image (g<i>) or an earlier upload (u<hash>)")
    async def search(
        query: str,
        k: int = Query(10, description="results returned"),
        rerank: str = Query("global", description="global: by the global cosine; structural: by cos + SS"),
        rerank_k: int | None = Query(None, description="structural: re-rank the global top rerank_k (default k)"),
    ) -> dict:
        return await run(explorer.search, query, check_k(k), rerank, check_rerank_k(rerank_k))

    @app.get("/api/explain", summary="why a result came back for a query: the explanation and its figures")
    async def explain(query: str, result: str) -> dict:
        return await run(explorer.explain, query, result)

    @app.get(
        "/api/explain/figure",
        summary="one figure of a pair's explanation (PNG): kind flows or groups",
        response_class=Response,
        responses={200: {"content": {"image/png": {}}}},
    )
    async def figure(query: str, result: str, kind: str = "flows") -> Response:
        return Response(await run(explorer.figure_png, query, result, kind), media_type="image/png")

    def _uncertainty(qid: str) -> dict:
        u = explorer.uncertainty(qid)
        if u is None:
            raise GlassmetricError("this checkpoint has no uncertainty head (train with model.uncertainty_dim > 0)")
        return {"query": qid, "uncertainty": u}

    @app.post("/api/uncertainty", summary="upload an image: its uncertainty ||u|| (IDML models)")
    async def uncertainty_upload(image: UploadFile = File(...)) -> dict:
        return await run(_uncertainty, await upload(image))

    @app.get("/api/uncertainty", summary="the uncertainty ||u|| of a gallery image or an earlier upload")
    async def uncertainty(query: str) -> dict:
        return await run(_uncertainty, query)

    return app
