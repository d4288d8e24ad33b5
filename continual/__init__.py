"""Continual learning for Lethe: learn update and rectification records without forgetting, and without
re-learning anything erased. Pure PyTorch on top of :mod:`unlearn` (never the service, MLflow, gRPC or
Kubernetes).

- :mod:`continual.registry`: strategies by name, :class:`~continual.registry.UpdateRequest` /
  :class:`~continual.registry.UpdateResult`, and ``run(name, model, request, params)``, the one call per job;
- :mod:`continual.strategies`: ``finetune``, ``joint``, ``replay`` (ER / DER++), ``lwf``, ``ewc`` (online),
  ``hft``, ``gere`` (causal LMs) and the ``wise-ft+<base>`` wrappers;
- :mod:`continual.buffer`: the purge-aware replay buffer; :mod:`continual.state`: EWC's Fisher, bound to the
  weights it belongs to;
- :mod:`continual.validation`: bad and erased data are refused before any training;
- :mod:`continual.metrics`: R matrix, ACC, BWT, forgetting, stability gap;
- :mod:`continual.bench`: ``python -m continual.bench --strategy S --scenario X --seed N --json``.
"""
