"""A FastAPI service sharing one map across its workers and servers (docs/asyncio.md).

Run it:  SYNCMAP_URL=redis://127.0.0.1:6379/0 uvicorn examples.fastapi_app:app --workers 2

* the map is opened in the lifespan (one per worker process) and closed with it;
* ``GET /items/{key}`` reads through the near cache (no round trip once cached);
* ``POST /counters/{key}/incr`` is a locked read-modify-write: the key's lock, and the write
  fenced with its token, so a holder whose lease ran out cannot overwrite the next one's work.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, HTTPException

from syncmap import aio

shared = aio.SyncMap("fastapi-example")  # opened in the lifespan: nothing connects at import


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    async with shared:
        yield


app = FastAPI(lifespan=lifespan)


@app.get("/items/{key}")
async def read_item(key: str) -> dict[str, Any]:
    value = shared.get_cached(key)  # a hit needs no await at all
    if value is aio.MISSING:
        value = await shared.get(key, aio.MISSING)
    if value is aio.MISSING:
        raise HTTPException(404, f"no item {key!r}")
    return {"key": key, "value": value}


@app.put("/items/{key}")
async def write_item(key: str, body: dict[str, Any]) -> dict[str, Any]:
    version = await shared.set(key, body.get("value"))
    return {"key": key, "version": version}


@app.post("/counters/{key}/incr")
async def increment(key: str) -> dict[str, Any]:
    async with shared.lock(key, lease=5) as fence:
        value = await shared.get(key, 0, consistent=True) + 1
        await shared.set(key, value, fence=fence)
    return {"key": key, "value": value}
