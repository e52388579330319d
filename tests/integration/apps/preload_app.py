"""A WSGI app as a pre-fork service writes one: the map is opened at import, in gunicorn's
master when it runs with ``--preload``, and used by every worker it forks (tests/test_gunicorn)."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable
from typing import Any

from syncmap import Lock, SyncMap, forksafe
from syncmap.config import MapConfig

if os.environ.get("SYNCMAP_TEST_FORK_GUARD") == "off":
    forksafe.enabled = False  # the test's guard-off control

URL = os.environ["SYNCMAP_URL"]
KEYS = [f"k{i}" for i in range(20)]
MAP = SyncMap("gunicorn", URL, config=MapConfig(max_staleness=0.2, socket_timeout=1.0))
MAP.update({k: {"k": k} for k in KEYS})
for _k in KEYS:
    MAP[_k]  # cached in the master: every worker inherits these entries
with Lock("gunicorn-warm", URL, lease=1.0):  # the master's watchdog and waker exist too
    pass
_first_client_id: list[int] = []


def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    path = environ["PATH_INFO"].strip("/").split("/")
    if path[0] == "health":  # no Redis: readiness only
        body: Any = {"pid": os.getpid()}
    elif path[0] == "get":
        body = {"value": MAP.get(path[1])}
    elif path[0] == "incr":
        body = {"value": MAP.transform(path[1], lambda n: n + 1, 0)}
    elif path[0] == "whoami":  # which Redis connection this worker's map talks on
        if not _first_client_id:
            _first_client_id.append(int(MAP._executor.call([("CLIENT", "ID")], write=False)[0]))
        body = {"client_id": _first_client_id[0]}
    elif path[0] == "stats":
        MAP.get("k0")
        before = MAP.statistics().hits
        MAP.get("k0")
        body = {"hit": MAP.statistics().hits - before}
    else:
        start_response("404 Not Found", [("Content-Type", "text/plain")])
        return [b"no such route"]
    body["pid"] = os.getpid()
    start_response("200 OK", [("Content-Type", "application/json")])
    return [json.dumps(body).encode()]
