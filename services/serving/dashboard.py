"""`GET /dashboard`: one HTML page of how the system is doing, for an operator's browser.

No front-end build and no CDN (operators' networks are often closed): the page is a template
with the figures embedded as JSON and a small inline script that draws SVG charts; it reloads
itself every 30 s. Behind the read key when keys are set; besides the usual headers, a browser
may answer the HTTP Basic prompt with any user name and a key as the password.
"""

from __future__ import annotations

import asyncio
import base64
import json
import time
from importlib.resources import files
from typing import Any

from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import HTMLResponse

from core.experiments import Experiment
from services.infra.experiment_metrics import arm_metrics
from services.infra.series import read_series
from services.infra.settings import Settings
from services.serving.auth import ApiAuth
from services.serving.follower import UpdateFollower
from services.serving.snapshots import Snapshot

VERSIONS_SHOWN = 20
SHOWN_METRICS = ("precision@10", "ndcg@10", "coverage@10", "novelty@10", "diversity@10", "popularity_lift@10")


def index_info(snap: Snapshot) -> dict[str, dict[str, Any]]:
    """Per index: search breadth and, when it was chosen by measurement, the recall seen."""
    return {
        space: {
            "ef": idx.ef,
            "ef_per_band": list(idx.band_ef),
            "recall@10": snap.ef[space].recall if snap.ef else None,
            "recall@10_lower_95": snap.ef[space].lower if snap.ef else None,
        }
        for space, idx in (("ip", snap.ip), ("cosine", snap.cosine))
    }


def gather(settings: Settings, follower: UpdateFollower) -> dict[str, Any]:
    """Every figure the page shows (blocking Redis reads: run off the event loop)."""
    models = follower.models
    r, keys = models.r, models.keys
    current, candidate = models.current_version(), models.candidate_version()
    versions = []
    for version, published in models.versions()[-VERSIONS_SHOWN:]:
        meta = models.text_meta(version)
        versions.append(
            {
                "version": version,
                "published_at": published,
                "current": version == current,
                "candidate": version == candidate,
                "engine": meta.get("engine"),
                "hyperparameters": json.loads(meta["hyperparameters"]) if "hyperparameters" in meta else None,
                **{m: float(meta[m]) for m in SHOWN_METRICS if m in meta},
            }
        )
    snap = follower.snapshot
    experiment = Experiment.parse(settings.experiment)
    return {
        "generated_at": time.time(),
        "series": read_series(r, keys),
        "versions": versions,
        "index": index_info(snap) if snap is not None else {},
        "serving": {"version": snap.version if snap else None, "tracks": len(snap.ip) if snap else 0},
        "experiment": {
            "name": experiment.name if experiment else None,
            "arms": {a: {"share": w, "version": models.resolve(a)} for a, w in experiment.arms} if experiment else {},
            "online": arm_metrics(r, keys),
        },
    }


def page(data: dict[str, Any]) -> str:
    template = (files(__package__) / "dashboard.html").read_text(encoding="utf-8")
    # JSON inside <script>: "</" must not end the element early.
    return template.replace("__DATA__", json.dumps(data).replace("</", "<\\/"))


def install(app: FastAPI, settings: Settings, follower: UpdateFollower, auth: ApiAuth) -> None:
    def require(request: Request) -> None:
        if auth.open:
            return
        header = request.headers.get("authorization", "")
        if header.lower().startswith("basic "):
            try:
                _user, _, key = base64.b64decode(header[6:]).decode().partition(":")
            except (ValueError, UnicodeDecodeError):
                key = ""
            if key and (auth.read.holds(key.encode()) | auth.admin.holds(key.encode())):
                return
        else:
            try:
                auth.check_read(request)
                return
            except HTTPException:
                pass
        raise HTTPException(401, "a read or admin key is required", {"WWW-Authenticate": 'Basic realm="encore"'})

    @app.get("/dashboard", response_class=HTMLResponse, include_in_schema=False)
    async def dashboard(request: Request) -> HTMLResponse:
        require(request)
        data = await asyncio.to_thread(gather, settings, follower)
        return HTMLResponse(page(data), headers={"Cache-Control": "no-store"})
