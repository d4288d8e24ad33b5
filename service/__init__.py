"""Lethe's service: everything operational around the :mod:`unlearn` library.

Dependencies point one way: ``service`` imports ``unlearn`` and ``continual``, never the reverse.
The gRPC layer (:mod:`service.api`) only converts messages and calls the engine through the domain
contract in :mod:`service.domain`.
"""
