"""Layer 5: `/dashboard`, a live page of every model's latency, throughput, queue, KV-cache and cache hit rates.

The page and its scripts (uPlot, vendored under inferd/server/static/uplot with its licence) are static and hold
no data, so they are served without an API key; the numbers come from `/dashboard/data`, which follows the rule
of /metrics (open unless `--metrics-require-key`; the page then asks for a key and sends it as a bearer token).
`/dashboard/data?since=T` returns only samples newer than T (unix seconds), which is how the page polls.
The samples come from `DashboardStats` (inferd/server/dashboard_stats.py), started in this router's lifespan.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import APIRouter, FastAPI, Query, Request
from fastapi.responses import FileResponse, JSONResponse

from inferd.server.dashboard_stats import start_sampler

STATIC_DIR = Path(__file__).resolve().parents[1] / "static"
# URL path -> (file under STATIC_DIR, media type); nothing else is served from there.
_STATIC_FILES = {
    "/dashboard/static/uPlot.iife.min.js": ("uplot/uPlot.iife.min.js", "text/javascript"),
    "/dashboard/static/uPlot.min.css": ("uplot/uPlot.min.css", "text/css"),
    "/dashboard/static/LICENSE-uPlot.txt": ("uplot/LICENSE", "text/plain"),
    "/dashboard/static/dashboard.js": ("dashboard.js", "text/javascript"),
    "/dashboard/static/dashboard.css": ("dashboard.css", "text/css"),
}
DASHBOARD_PAGE_PATHS = frozenset({"/dashboard", *_STATIC_FILES})  # served without an API key: no data in them
DASHBOARD_DATA_PATH = "/dashboard/data"  # guarded like /metrics


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    app.state.dashboard, task = start_sampler(app.state.inferd)
    try:
        yield
    finally:
        task.cancel()


router = APIRouter(lifespan=lifespan)


@router.get("/dashboard", tags=["inferd"], summary="Live dashboard (HTML) of every served model",
            response_class=FileResponse)
async def dashboard_page() -> FileResponse:
    return FileResponse(STATIC_DIR / "dashboard.html", media_type="text/html", headers={"Cache-Control": "no-cache"})


@router.get(DASHBOARD_DATA_PATH, tags=["inferd"],
            summary="The dashboard's series: per model, one value a second for the last minutes")
async def dashboard_data(request: Request, since: float | None = Query(
        None, description="only samples newer than this (unix seconds)")) -> JSONResponse:
    return JSONResponse(request.app.state.dashboard.to_json(since), headers={"Cache-Control": "no-store"})


def _static_route(url_path: str, file_name: str, media_type: str) -> None:
    async def serve_static() -> FileResponse:
        return FileResponse(STATIC_DIR / file_name, media_type=media_type,
                            headers={"Cache-Control": "public, max-age=3600"})

    router.add_api_route(url_path, serve_static, methods=["GET"], include_in_schema=False)


for _path, (_file, _media_type) in _STATIC_FILES.items():
    _static_route(_path, _file, _media_type)
