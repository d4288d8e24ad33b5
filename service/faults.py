"""Fault injection for the crash matrix: TEST-ONLY, and a no-op unless ``LETHE_FAULT_KILL_AT`` is set.

``fault_point("intake.after_commit")`` kills the current process with SIGKILL (as ``kill -9`` would: no
``finally`` blocks, no atexit handlers, no flushed buffers) when ``LETHE_FAULT_KILL_AT`` names that point
(one name, or several separated by commas). A crash test sets the variable for a server or worker process,
sends a request, waits for the process to die at the named point, restarts it without the variable, and
checks what the issue's crash matrix asks (every acknowledged request certified exactly once...). Points
are named ``<module>.<moment>``; :data:`POINTS` lists the ones placed so far.

Never set the variable in a deployment: a point that matches kills the process on every pass.
"""

from __future__ import annotations

import os
import signal

ENV = "LETHE_FAULT_KILL_AT"

POINTS = (
    "intake.before_commit",  # an erasure validated, nothing stored yet: the client must get no ack
    "intake.after_commit",  # stored and committed, the ack not yet sent: a replay must find it
)


def fault_point(name: str) -> None:
    """Die here, now, if ``LETHE_FAULT_KILL_AT`` names this point."""
    wanted = os.environ.get(ENV)
    if wanted and name in wanted.split(","):
        os.kill(os.getpid(), signal.SIGKILL)
