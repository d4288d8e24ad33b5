"""The gRPC front of Lethe (``lethe.v1``, defined in ``proto/lethe/v1/``).

- :mod:`service.api.pb`: the generated modules, (re)built on import by :mod:`service.api.codegen`.
- :mod:`service.api.converters`: protobuf <-> :mod:`service.domain`, nothing else.
- :mod:`service.api.errors`: the one mapping of exceptions to gRPC status with rich details, and beside it
  the one table of the roles allowed to call each RPC (``ALLOWED_ROLES``).
- :mod:`service.api.servicer` (thin) and :mod:`service.api.session` (the Session and WatchJob streams).
- :mod:`service.api.auth` (credentials to identities), :mod:`service.api.scope` (what a caller may read),
  :mod:`service.api.limits` (rate, stream and unacknowledged-message limits), :mod:`service.api.tls`
  (TLS, mutual TLS, certificate rotation).
- :mod:`service.api.interceptors` and :mod:`service.api.server`: logging, metrics, errors, access, stream
  cap, unary deadline, safe decoding; health and reflection; ``build_server`` and ``serve``.
- :mod:`service.api.client` and :mod:`service.api.progress`: the Python client the CLI, demo, benchmark
  and tests use.
"""
