"""The floor for bench/api.py: the least a FastAPI app on the same server can do per request.

GET /jobs/{id} reads an in-memory dict; POST /upscale parses the same multipart form and
writes one row (with the thumbnail) to a SQLite file in WAL mode. Run under uvicorn
exactly as the API is, so the ratio of the two measures the API's own cost.
"""

from __future__ import annotations

import os
import sqlite3
import tempfile
import uuid
from pathlib import Path
from typing import Annotated

from fastapi import FastAPI, File, Form, HTTPException, UploadFile

DB = Path(os.environ.get("MINIMAL_DB") or tempfile.mkdtemp()) / "minimal.sqlite3"
conn = sqlite3.connect(DB, isolation_level=None, check_same_thread=False)
conn.execute("PRAGMA journal_mode=WAL")
conn.execute("PRAGMA synchronous=NORMAL")
conn.execute("CREATE TABLE IF NOT EXISTS jobs (id TEXT PRIMARY KEY, steps INT, data BLOB)")
jobs: dict[str, dict[str, object]] = {}
app = FastAPI()


@app.get("/healthz")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@app.post("/upscale", status_code=202)
async def upscale(
    thumbnail: Annotated[UploadFile, File()], steps: Annotated[int, Form()] = 100
) -> dict[str, str]:
    job_id = uuid.uuid4().hex
    data = await thumbnail.read()
    conn.execute("INSERT INTO jobs VALUES (?, ?, ?)", (job_id, steps, data))
    jobs[job_id] = {"id": job_id, "status": "queued", "steps": steps}
    return {"id": job_id, "status": "queued"}


@app.get("/jobs/{job_id}")
async def get_job(job_id: str) -> dict[str, object]:
    job = jobs.get(job_id)
    if job is None:
        raise HTTPException(404)
    return job
