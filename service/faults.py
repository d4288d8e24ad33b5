"""Fault injection for crash tests: TEST-ONLY, and a no-op unless ``LETHE_FAULT_KILL_AT`` is set.

``fault_point(name)`` kills the current process with SIGKILL (as ``kill -9``, an OOM kill or a lost node
would: no ``finally`` blocks, no atexit handlers, no flushed buffers) when ``LETHE_FAULT_KILL_AT`` names that
point. The variable holds either

- the names themselves (one, or several separated by commas): the process dies at the first of them it
  reaches, every time it is started with the variable; or
- ``@<path>``: an ARM FILE read at every fault point. Nothing happens while the file is absent; when it names
  the point (names separated by commas or new lines), the point fires once: the file is renamed to
  ``<path>.fired`` and the name of the point written there, then the process kills itself. A long-lived
  server or worker can so be armed and disarmed at run time: the crash matrix (``tests/service/
  test_crash_matrix.py``) arms a point, sends a request, sees the process die at that point (``.fired``
  says which), and restarts it on the same variable, now disarmed: one process start per kill point, not
  two.

A crash test then checks what the crash matrix asks (docs/reliability.md): every acknowledged request
certified exactly once, no duplicate or orphaned model version or artifact, no dataset version half written,
the audit chain intact, no subject id in clear on disk, in logs or in metrics.

Points (:data:`POINTS`):

- ``intake.before_commit`` / ``intake.after_commit``: an erasure validated, nothing stored yet (the client
  must get no ack) / stored and committed, the ack not yet sent (a replay must find it);
- ``stage:<name>`` at the start of a pipeline stage (``stage:resolve`` ... ``stage:audit``), after its
  PROGRESS event is committed, and ``stage:<name>:inside`` in the middle of the stage's work
  (:data:`INSIDE` says where);
- ``mlflow.run_logged``: the job's MLflow run holds the model, the dataset copy and the ONNX export, no model
  version exists yet (the run is an orphan unless the resumed job deletes it);
- ``registered``: MLflow created the job's model version, the job store does not know it yet (the
  exactly-once window of registration);
- ``audited``: the audit transaction committed (the job is SUCCEEDED), the work that follows a job in its
  process (indexing the new dataset version, purging what an earlier attempt left) not done.

It is read from the environment, not from :class:`service.settings.Settings`, on purpose: it is no setting a
chart or an operator may use. Never set the variable in a deployment: a matching point kills the process.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

ENV = "LETHE_FAULT_KILL_AT"
STAGES = ("resolve", "measure", "apply", "verify", "register", "purge", "audit")
INSIDE = {
    "resolve": "records matched and the scope built, nothing measured yet",
    "measure": "the base model loaded and utility before measured (cached), nothing applied yet",
    "apply": "the attempt's method (an update: its strategy) returned, its result not yet judged",
    "verify": "the gate's library checks done, the ONNX export not yet made",
    "register": "the new dataset version's file written, the evidence not yet stored, nothing in MLflow yet",
    "purge": "the older dataset copies deleted, the older model versions not yet superseded",
    "audit": "certificates, chain entries and states written inside the audit transaction, not committed",
}
# In the order a job passes them (the intake points come before any job exists).
JOB_POINTS = (
    "stage:resolve", "stage:resolve:inside", "stage:measure", "stage:measure:inside",
    "stage:apply", "stage:apply:inside", "stage:verify", "stage:verify:inside",
    "stage:register", "stage:register:inside", "mlflow.run_logged", "registered",
    "stage:purge", "stage:purge:inside", "stage:audit", "stage:audit:inside", "audited",
)
POINTS = ("intake.before_commit", "intake.after_commit", *JOB_POINTS)


def fault_point(name: str) -> None:
    """Die here, now, if ``LETHE_FAULT_KILL_AT`` names this point (or its arm file does)."""
    wanted = os.environ.get(ENV)
    if not wanted:
        return
    if wanted.startswith("@"):
        if _fire_armed(Path(wanted[1:]), name):
            os.kill(os.getpid(), signal.SIGKILL)
    elif name in wanted.split(","):
        os.kill(os.getpid(), signal.SIGKILL)


def _fire_armed(path: Path, name: str) -> bool:
    """True when the arm file names ``name`` and this process took it (rename: one process fires it once)."""
    try:
        armed = path.read_text()
    except OSError:
        return False
    if name not in {entry.strip() for entry in armed.replace("\n", ",").split(",")}:
        return False
    fired = path.with_name(path.name + ".fired")
    try:
        os.rename(path, fired)
    except OSError:  # another process (or thread) fired it first
        return False
    fired.write_text(name)
    return True
