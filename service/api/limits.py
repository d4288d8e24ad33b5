"""Per-identity limits of the front: a token-bucket rate limit and a cap on open streams.

Both refuse with :class:`service.domain.ResourceExhausted` carrying ``retry_after_s`` (the status's
``google.rpc.RetryInfo``), before any database work. State is per replica and in memory: a limit protects
this process's threads and the store behind it; a client spread over N replicas gets N times the rate,
which is what scaling out is for.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from service.domain import ResourceExhausted

MAX_TRACKED_IDENTITIES = 10_000
"""Buckets kept in memory. Identities come from the credentials file (a handful) or, in the open mode over
mutual TLS, from certificate names; the least recently seen bucket is dropped beyond this (it was full
anyway unless it is being hammered right now, in which case it is recent)."""


class RateLimiter:
    """A token bucket per identity: ``rate_per_s`` sustained, ``burst`` at once. ``rate_per_s`` 0 = off."""

    def __init__(self, rate_per_s: float, burst: int, clock=time.monotonic):
        self.rate_per_s = rate_per_s
        self.burst = burst
        self._clock = clock
        self._lock = threading.Lock()
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()  # name -> (tokens, as of)

    def check(self, identity: str, cost: float = 1.0) -> None:
        """Take ``cost`` tokens from ``identity``'s bucket, or raise ResourceExhausted with the wait."""
        if self.rate_per_s <= 0:
            return
        now = self._clock()
        with self._lock:
            tokens, since = self._buckets.pop(identity, (float(self.burst), now))
            tokens = min(float(self.burst), tokens + (now - since) * self.rate_per_s)
            if tokens >= cost:
                self._buckets[identity] = (tokens - cost, now)
                refused_for = 0.0
            else:
                self._buckets[identity] = (tokens, now)
                refused_for = (cost - tokens) / self.rate_per_s
            while len(self._buckets) > MAX_TRACKED_IDENTITIES:
                self._buckets.popitem(last=False)
        if refused_for:
            raise ResourceExhausted(f"rate limit of {self.rate_per_s:g} calls per second (burst {self.burst}) "
                                    f"reached for this identity; retry in {refused_for:.2f} s",
                                    retry_after_s=refused_for)


class StreamSlots:
    """At most ``per_identity`` open streams per identity on this replica."""

    RETRY_AFTER_S = 5.0  # a stream slot frees when a stream ends: seconds to hours, so no exact wait exists

    def __init__(self, per_identity: int):
        self.per_identity = per_identity
        self._lock = threading.Lock()
        self._open: dict[str, int] = {}

    def acquire(self, identity: str) -> None:
        with self._lock:
            count = self._open.get(identity, 0)
            if count >= self.per_identity:
                raise ResourceExhausted(f"this identity already holds {self.per_identity} open streams on this "
                                        "replica (LETHE_MAX_STREAMS_PER_IDENTITY); close one or retry later",
                                        retry_after_s=self.RETRY_AFTER_S)
            self._open[identity] = count + 1

    def release(self, identity: str) -> None:
        with self._lock:
            count = self._open.get(identity, 0) - 1
            if count > 0:
                self._open[identity] = count
            else:
                self._open.pop(identity, None)

    def open_streams(self, identity: str) -> int:
        with self._lock:
            return self._open.get(identity, 0)


@dataclass(frozen=True)
class ApiLimits:
    """What the servicer checks itself, before any engine call: id shape and count of the ids a call names
    (``Settings.max_id_length``, ``max_ids_per_request``), the Session's unacknowledged submissions
    (``max_unacked_messages``), and the rate limit per Session message. ``limited`` counts limit refusals
    (``lethe_grpc_limited_total``), ``auth_refusals`` a submitter's refused reads of others' requests."""

    max_id_length: int = 256
    max_ids_per_request: int = 10_000
    max_unacked_messages: int = 1000
    rate: RateLimiter | None = None
    limited: Any = None  # a prometheus Counter labelled by limit, or None
    auth_refusals: Any = None  # lethe_grpc_auth_refusals_total (grpc_method, grpc_code), or None
