"""Every map operation, written once as a pure generator of effects (docs/design.md, "Flows").

A flow decides and records under the map's guard, yields an effect (:mod:`.effects`) for a
driver to perform, and settles what came back under the guard again.  It never does I/O itself
and never yields while holding the guard (``tests/unit/test_flows_source.py`` checks the source),
so the thread driver (``syncmap.sync.run``) and an asyncio driver run the same code, and the
model test runs it against an in-memory executor.
"""
