"""Process-unique ids: request ids and history message ids."""

from __future__ import annotations

import subprocess
import sys

from healthagent_service.history.store import new_message_id
from healthagent_service.ids import UniqueIds


def test_ids_are_distinct_and_as_long_as_before() -> None:
    ids = UniqueIds()
    drawn = [ids() for _ in range(10_000)]
    assert len(set(drawn)) == len(drawn)
    assert all(len(i) == 32 and int(i, 16) >= 0 for i in drawn)
    message_id = new_message_id()
    assert message_id.startswith("hamsg_") and len(message_id) == len("hamsg_") + 24


# in a fresh interpreter: forking the test process, with gRPC's threads in it, is not safe
_FORK_CHECK = """
import os
from healthagent_service.ids import UniqueIds
first, second = UniqueIds(), UniqueIds()
assert first()[:16] != second()[:16]
parent_next = first()
reading, writing = os.pipe()
child = os.fork()
if child == 0:
    os.write(writing, first().encode())
    os._exit(0)
os.close(writing)
child_id = os.read(reading, 64).decode()
os.waitpid(child, 0)
assert len(child_id) == 32, child_id
assert child_id[:16] != parent_next[:16], (child_id, parent_next)
print("ok")
"""


def test_two_generators_and_a_forked_child_do_not_repeat_each_other() -> None:
    done = subprocess.run(
        [sys.executable, "-c", _FORK_CHECK], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"
