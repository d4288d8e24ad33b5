"""Continual-learning benchmarks: ``python -m continual.bench --strategy S --scenario X --seed N --json``.

Scenarios: :mod:`continual.bench.digits` (``digits-incremental``, ``digits-domain-shift``,
``digits-erase-then-update``) and :mod:`continual.bench.fictitious` (``fictitious-updates``). Each run takes
the strategy, ``finetune`` and ``joint`` through the same updates in one process
(:func:`continual.bench.harness.compare`). ``python -m continual.bench.sweep`` runs the recorded sweep.
"""
