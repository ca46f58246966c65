"""The small Redis client of the shared backends (openai_proxy/redis_link.py)."""

from __future__ import annotations

import os

from openai_proxy.redis_link import RedisLink


def test_a_forked_child_drops_the_parents_connections():
    link = RedisLink("redis://127.0.0.1:1/0", 0.25)
    parents = object()
    link._free.append(parents)  # type: ignore[arg-type]
    pid = os.fork()
    if pid == 0:  # the child: its copy of the socket is the parent's, never to be used here
        os._exit(0 if link._free == [] else 1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert link._free == [parents]
