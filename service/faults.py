"""Fault injection for crash tests: TEST-ONLY, and a no-op unless ``LETHE_FAULT_KILL_AT`` is set.

``fault_point(name)`` kills the current process with SIGKILL (as ``kill -9``, an OOM kill or a lost node
would: no ``finally`` blocks, no atexit handlers, no flushed buffers) when ``LETHE_FAULT_KILL_AT`` names that
point (one name, or several separated by commas). A crash test sets the variable for a server or worker
process, sends a request, waits for the process to die at the named point, restarts it (or lets another
worker reclaim the job when its lease expires) without the variable, and checks what the crash matrix asks:
every acknowledged request certified exactly once, no duplicate or orphaned model version, the audit chain
intact (docs/reliability.md).

Points placed so far (:data:`POINTS`):

- ``intake.before_commit`` / ``intake.after_commit``: an erasure validated, nothing stored yet (the client
  must get no ack) / stored and committed, the ack not yet sent (a replay must find it);
- ``stage:<name>`` at the start of a pipeline stage (``stage:resolve`` ... ``stage:audit``), after its
  PROGRESS event is committed, and ``stage:<name>:inside`` in the middle of the stage's work;
- ``registered``: MLflow created the job's model version, the job store does not know it yet (the
  exactly-once window of registration).

It is read from the environment, not from :class:`service.settings.Settings`, on purpose: it is no setting a
chart or an operator may use. Never set the variable in a deployment: a matching point kills the process on
every pass.
"""

from __future__ import annotations

import os
import signal

ENV = "LETHE_FAULT_KILL_AT"
STAGES = ("resolve", "measure", "apply", "verify", "register", "purge", "audit")
POINTS = ("intake.before_commit", "intake.after_commit", "registered",
          *(f"stage:{stage}" for stage in STAGES), *(f"stage:{stage}:inside" for stage in STAGES))


def fault_point(name: str) -> None:
    """Die here, now, if ``LETHE_FAULT_KILL_AT`` names this point."""
    wanted = os.environ.get(ENV)
    if wanted and name in wanted.split(","):
        os.kill(os.getpid(), signal.SIGKILL)
