"""S26 ``fork``: maps and locks made before ``fork()`` work in the child as if opened there.

The workload lives in ``syncmap.testing.scenarios_fork`` (also run by ``syncmap torture``).  The
guard-off form (``forksafe.enabled = False``: children inherit sockets, registries and holds as
they are) must fail, so the guarded pass means something.
"""

from __future__ import annotations

import pytest

from syncmap.testing.scenario import Env
from syncmap.testing.scenarios_fork import s26


@pytest.mark.scenario
def test_s26_fork_children_work_as_if_opened_there(redis_binary: str) -> None:
    result = s26(Env(redis_binary=redis_binary), 1.0)
    assert result.passed, result.summary()
    assert result.figures["children"] > 1


@pytest.mark.scenario
def test_s26_guard_off_control_fails(redis_binary: str) -> None:
    result = s26(Env(redis_binary=redis_binary), 1.0, guard=False)
    assert not result.passed, "guard-off control passed: S26 cannot fail"
