"""Issue 16 goal 1: the threads of a process do not grow with its maps.  Every map's probe and
timer turns run on the process's scheduler (``schedule.py``: ``syncmap-timer`` and
``syncmap-probe``), so ten maps run on the threads one map started.  The control gives each map
a scheduler of its own (two threads per map, as before) and must see them grow.

And one map's stalled probe does not hold another map's probes back: a spare probe thread takes
the other map's turns, whose leases never lapse; the control allows no spare, and they lapse."""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Iterable, Iterator

import pytest

from syncmap import MapConfig, SyncMap, engine, schedule
from syncmap.embedded import EmbeddedRedis
from syncmap.testing import FaultProxy
from syncmap.testing.wait import wait_until

MAPS = 10
SPARE = "syncmap-probe-spare"


def syncmap_threads() -> Counter[str]:
    """This process's syncmap threads by name, spares left out (they come and go while a probe
    stalls, at most ``schedule.SPARES``)."""
    names = Counter(t.name for t in threading.enumerate() if t.name.startswith("syncmap-"))
    assert names.pop(SPARE, 0) <= schedule.SPARES
    return names


def open_maps(url: str, numbers: Iterable[int], cfg: MapConfig) -> list[SyncMap]:
    maps = [SyncMap(f"threads-{i}", url, config=cfg) for i in numbers]
    for i, m in zip(numbers, maps, strict=True):
        m[f"k{i}"] = i
        assert m.get(f"k{i}", consistent=True) == i
    return maps


@pytest.fixture
def opened() -> Iterator[list[SyncMap]]:
    maps: list[SyncMap] = []
    yield maps
    for m in maps:
        m.close()


def one_then_ten(url: str, opened: list[SyncMap]) -> tuple[Counter[str], Counter[str]]:
    """The syncmap threads with one map open, then with ten (both with presence records, whose
    refresh runs on the probe turns, and PING leases, the defaults)."""
    cfg = MapConfig()
    opened += open_maps(url, [0], cfg)
    one = syncmap_threads()
    opened += open_maps(url, range(1, MAPS), cfg)
    return one, syncmap_threads()


def test_ten_maps_run_on_the_threads_of_one(
    redis_server: EmbeddedRedis, opened: list[SyncMap]
) -> None:
    one, ten = one_then_ten(redis_server.url, opened)
    assert one["syncmap-timer"] == 1 and one["syncmap-probe"] == 1, one
    grown = {name: n - one[name] for name, n in ten.items() if n > one[name]}
    assert not grown, f"threads grew from 1 to {MAPS} maps: {grown}"
    for m in opened:  # and every map's turns run: each one's probe answers a wake
        before = min(b.confirmed_at for b in m._core.buckets)
        m._engine.wake_probe()
        wait_until(lambda m=m, t=before: min(b.confirmed_at for b in m._core.buckets) > t, 10)


def test_control_a_scheduler_per_map_grows_two_threads_a_map(
    redis_server: EmbeddedRedis, opened: list[SyncMap], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(schedule, "process", schedule.Scheduler)
    one, ten = one_then_ten(redis_server.url, opened)
    assert ten["syncmap-timer"] - one["syncmap-timer"] == MAPS - 1
    assert ten["syncmap-probe"] - one["syncmap-probe"] == MAPS - 1


@pytest.mark.parametrize("spares", [schedule.SPARES, 0], ids=["spares", "control-no-spares"])
def test_a_stalled_probe_leaves_another_maps_leases_renewed(
    redis_server: EmbeddedRedis,
    opened: list[SyncMap],
    monkeypatch: pytest.MonkeyPatch,
    spares: int,
) -> None:
    """Two maps, one reached through a proxy whose data connections stall (a hung socket: its
    probe waits out ``socket_timeout``, 5 s).  For 1.5 s of that stall the other map's buckets
    must stay renewed, each within Δ of its last probe: a spare runs its probe turns.  With no
    spare (the control) its turns wait behind the stalled probe and its leases lapse."""
    monkeypatch.setattr(schedule, "SPARES", spares)
    delta = 0.4  # probes every 0.1 s, a turn's patience 0.025 s
    cfg = MapConfig(presence=False, ping_leases=False, max_staleness=delta)
    with FaultProxy(redis_server.host, redis_server.port) as proxy:
        stalled = SyncMap("stalled", proxy.url, config=cfg)
        opened.append(stalled)
        healthy = open_maps(redis_server.url, [0], cfg)[0]
        opened.append(healthy)
        proxy.stall(only="others")  # the data connections; the subscriber carries on
        try:
            probe = stalled._engine._probe
            stalled._engine.wake_probe()
            wait_until(lambda: probe.state == schedule.RUNNING, 5, "the stalled map's probe")
            stuck = min(b.confirmed_at for b in stalled._core.buckets)
            oldest = 0.0
            end = time.monotonic() + 1.5
            while (now := time.monotonic()) < end:  # sampled each ms: the oldest renewal's age
                oldest = max(oldest, now - min(b.confirmed_at for b in healthy._core.buckets))
                time.sleep(0.001)
            assert probe.state == schedule.RUNNING  # still stalled, and it held nothing back:
            assert min(b.confirmed_at for b in stalled._core.buckets) == stuck
        finally:
            proxy.heal()
            for m in opened:
                m.close()
            opened.clear()
    if spares:
        assert oldest < delta, f"the healthy map went {oldest:.3f} s without a renewal"
    else:
        assert oldest > delta, f"control: the healthy map was renewed within {oldest:.3f} s"


@pytest.mark.parametrize("wait", [engine.GUARD_WAIT, 30.0], ids=["bounded", "control-blocking"])
def test_a_map_whose_guard_is_held_long_leaves_the_other_maps_timers_running(
    redis_server: EmbeddedRedis,
    opened: list[SyncMap],
    monkeypatch: pytest.MonkeyPatch,
    wait: float,
) -> None:
    """Map A's guard is held (as while a large ``preload`` installs a bucket) and the clock is
    in A's timer turn, waiting for it; map B's timer turn, woken, must still run: A's turn
    waits at most ``GUARD_WAIT`` and comes again after B's.  The control waits for the guard
    as a map's own timer thread could: B's turn waits behind A's guard."""
    monkeypatch.setattr(engine, "GUARD_WAIT", wait)
    a, b = open_maps(redis_server.url, [0, 1], MapConfig(presence=False))
    opened += [a, b]
    ticks: list[float] = []
    tick = b._core.tick

    def counted(now: float) -> float:
        ticks.append(now)
        return tick(now)

    b._core.tick = counted  # type: ignore[method-assign]
    with a._state.guard:
        a._engine.wake_timer()
        turn = a._engine._timer
        wait_until(lambda: turn.state == schedule.RUNNING, 5, "A's timer turn waiting")
        b._engine.wake_timer()
        if wait < 1:
            wait_until(lambda: ticks, 5, "B's timer turn")
        else:
            with pytest.raises(AssertionError):
                wait_until(lambda: ticks, 0.5, "B's timer turn")
    wait_until(lambda: ticks, 5, "B's timer turn, once A's guard is free")
