"""``Watch.close()`` ends a ``for e in watch`` loop that runs in another thread."""

from __future__ import annotations

import threading

from syncmap import SyncMap
from syncmap.core.nearcache import Event


def test_close_ends_an_iteration_blocked_in_another_thread(shared_redis_url: str) -> None:
    with SyncMap("watched", shared_redis_url) as m:
        watch = m.watch()
        seen: list[Event] = []
        first = threading.Event()

        def consume() -> None:
            for event in watch:
                seen.append(event)
                first.set()

        thread = threading.Thread(target=consume, name="watch-consumer", daemon=True)
        thread.start()
        m["k"] = 1
        assert first.wait(10), "the watch never delivered the write"
        # The consumer is now blocked waiting for the next event: close must wake it.
        watch.close()
        thread.join(10)
        assert not thread.is_alive(), "close() left the for-loop waiting forever"
        assert [e.key for e in seen] == ["k"]
        m["k"] = 2  # a closed watch gets nothing more, and nothing blocks
        watch.close()  # closing twice is harmless
        assert watch.get(timeout=0) is None


def test_close_before_the_iteration_starts_ends_it_at_once(shared_redis_url: str) -> None:
    with SyncMap("watched", shared_redis_url) as m:
        watch = m.watch()
        watch.close()
        done = threading.Event()
        thread = threading.Thread(target=lambda: (list(watch), done.set()), daemon=True)
        thread.start()
        assert done.wait(10)
