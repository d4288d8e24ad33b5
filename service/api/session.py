"""The streaming halves of the API: the bidirectional ``Session`` and the server-streaming ``WatchJob``.

Session protocol (see unlearning_service.proto for the client's view):

* A **reader** thread consumes the client's messages. Each submission is converted and handed to
  ``engine.submit_erasure``, which returns only after the durable commit; only then is
  ``SubmissionAccepted`` queued for the client (a refusal becomes ``SubmissionRejected`` and the stream
  stays open). Acks never wait for event polling, so ack latency is the commit latency.
* A **poller** thread owns the watch set and the event cursor and is the only producer of events, so
  events reach the client in increasing ``seq``. A new request joins in order: its first event lies above
  the cursor (a poll that raced with its joining is re-read with the larger watch set). A request whose
  history lies below the cursor (an idempotent replay of an old request, a Resume with an old
  ``after_seq``) has that history replayed once, right after its ack ("backfill"), then joins the live
  feed. Per request, events therefore always arrive in increasing ``seq``, which is the invariant a
  reconnecting client relies on: resuming a request with ``after_seq`` = the highest seq it saw for that
  request loses nothing.
* The gRPC thread only yields what the two threads queue (the :class:`_Outbox`).

Limits (``service.api.limits.ApiLimits``): each submission or Resume message takes a token from the
caller's rate limit; a submission that arrives while ``max_unacked_messages`` answers are still waiting for
the client to read them is rejected RESOURCE_EXHAUSTED with a ``retry_delay``, and at twice that many the
reader stops reading (gRPC flow control then holds the client back). Events never overflow: the poller waits
for room instead. So a client that does not read its responses costs a bounded amount of memory.

Scope (:class:`service.api.scope.Scope`): a submitter's submissions carry its identity's keyed hash; it may
resume only its own requests (another's answers PERMISSION_DENIED per request, whether or not it exists),
may not watch ``all_requests``, and never sees other requests' ids or certificates in coalesced jobs' events.
A message that does not decode is rejected INVALID_ARGUMENT in band; the stream stays open.

The engine's ``seq`` is global and strictly increasing in commit order (one SQLite writer); with a
database whose sequence values may commit out of order the invariant above would need a settle delay.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from collections import defaultdict, deque
from collections.abc import Iterator
from dataclasses import dataclass

import grpc

from service import domain
from service.api import converters, errors
from service.api.interceptors import Undecodable
from service.api.limits import ApiLimits
from service.api.pb import service_pb2
from service.api.scope import Scope

log = logging.getLogger(__name__)

DEFAULT_POLL_S = 0.25
"""How long one ``engine.events`` call waits for new events. Bounds how late a newly watched request's
first events start flowing (acks are not affected); 4 polls a second per idle stream is cheap."""

MAX_DISCARDED_POLLS = 3
"""Consecutive poll results dropped to keep seq order while requests join (see ``_poll``); bounded so a
steady stream of submissions cannot starve event delivery."""

UNACKED_RETRY_S = 1.0
"""Retry delay of a submission refused for too many unread answers: the client needs to read, not wait long."""

_END = object()


@dataclass(frozen=True)
class _Watch:
    """Start watching ``request_ids`` (or everything), sending only their events with seq > after_seq."""

    request_ids: tuple[str, ...]
    after_seq: int
    job_ids: tuple[str, ...] = ()  # known from the ack
    all_requests: bool = False
    # The watch of a request just acknowledged: after_seq is its first event's seq - 1, so nothing of it lies
    # at or below after_seq, and after_seq is below the newest event.
    acknowledged: bool = False


class _Failure:
    def __init__(self, error: BaseException):
        self.error = error


class _Outbox:
    """Responses queued for the gRPC thread, with the counts the Session limits read: ``answers`` (acks and
    rejections not yet handed to gRPC: the client's unacknowledged submissions) and ``events``."""

    WAIT_SLICE_S = 0.25  # producers waiting for room re-check whether the stream has stopped this often

    def __init__(self):
        self._items: deque = deque()
        self._condition = threading.Condition()
        self.answers = 0
        self.events = 0

    def put(self, item, kind: str = "control") -> None:
        """``kind``: ``answer`` (ack or rejection), ``event``, or ``control`` (end, failure: never held)."""
        with self._condition:
            self._items.append((kind, item))
            if kind == "answer":
                self.answers += 1
            elif kind == "event":
                self.events += 1
            self._condition.notify_all()

    def wait_for_room(self, kind: str, most: int, stop: threading.Event) -> bool:
        """Block while ``most`` or more items of ``kind`` wait (back-pressure); False when ``stop`` was set."""
        with self._condition:
            while (self.answers if kind == "answer" else self.events) >= most:
                if stop.is_set():
                    return False
                self._condition.wait(self.WAIT_SLICE_S)
        return not stop.is_set()

    def get(self):
        with self._condition:
            while not self._items:
                self._condition.wait()
            kind, item = self._items.popleft()
            if kind == "answer":
                self.answers -= 1
            elif kind == "event":
                self.events -= 1
            self._condition.notify_all()
            return item


class SessionStream:
    """One ``Session`` RPC. ``responses()`` is what the servicer returns to gRPC."""

    def __init__(self, engine: domain.EngineProtocol, requests: Iterator[service_pb2.SessionRequest],
                 context: grpc.ServicerContext, poll_s: float = DEFAULT_POLL_S, scope: Scope | None = None):
        self._engine = engine
        self._requests = requests
        self._context = context
        self._poll_s = poll_s
        self._scope = scope or Scope(engine, None, ApiLimits())
        self._limits = self._scope.limits
        self._outbox = _Outbox()
        self._lock = threading.Lock()
        self._incoming_watches: list[_Watch] = []
        self._client_done = False  # the client half-closed (or went away)
        self._work = threading.Event()  # reader -> poller: new watches, or the client is done
        self._stop = threading.Event()
        # Poller-owned state.
        self._cursor: int | None = None  # highest seq polled live; None until the first watch
        self._all_requests = False
        self._floor_by_request: dict[str, int] = {}  # watched request -> seq the client has already seen
        self._jobs_by_request: dict[str, set[str]] = defaultdict(set)
        # A coalesced job settles its requests with one TERMINAL event each (each carrying that request's
        # certificate), so "terminal" is tracked per (request, job), not per job.
        self._terminal_jobs_by_request: dict[str, set[str]] = defaultdict(set)

    # --------------------------------------------------------------------------------------------- gRPC side
    def responses(self) -> Iterator[service_pb2.SessionResponse]:
        self._context.add_callback(self._on_rpc_done)
        threads = [threading.Thread(target=self._read, name="lethe-session-reader", daemon=True),
                   threading.Thread(target=self._poll, name="lethe-session-poller", daemon=True)]
        for thread in threads:
            thread.start()
        try:
            while True:
                item = self._outbox.get()
                if item is _END:
                    return
                if isinstance(item, _Failure):
                    raise item.error  # mapped to a status by the error interceptor
                yield item
        finally:
            self._stop.set()
            self._work.set()

    def _on_rpc_done(self) -> None:
        self._stop.set()
        self._work.set()
        self._outbox.put(_END)

    # --------------------------------------------------------------------------------------------- reader
    def _read(self) -> None:
        try:
            for message in self._requests:
                if self._stop.is_set():
                    return
                self._handle(message)
                # At twice the cap of unread answers, stop reading: the client is not reading its answers,
                # and gRPC's flow control now holds it back instead of the server's memory growing.
                if not self._outbox.wait_for_room("answer", 2 * self._limits.max_unacked_messages, self._stop):
                    return
        except Exception as error:  # the client cancelled or the connection broke: nothing to answer
            if not self._stop.is_set():
                log.debug("session request stream ended: %r", error)
        finally:
            with self._lock:
                self._client_done = True
            self._work.set()

    def _answer(self, response: service_pb2.SessionResponse) -> None:
        self._outbox.put(response, "answer")

    def _reject(self, error: BaseException, request_id: str, where: str) -> None:
        self._answer(service_pb2.SessionResponse(rejected=errors.rejection(error, request_id, where)))

    def _limited(self, limit: str) -> None:
        if self._limits.limited is not None:
            self._limits.limited.labels(limit).inc()

    def _handle(self, message) -> None:
        if isinstance(message, Undecodable):
            self._reject(message.error(), "", "Session")
            return
        kind = message.WhichOneof("message")
        request_id = getattr(message, kind).request_id if kind in ("erasure", "rectification", "update") else ""
        if kind in ("erasure", "rectification", "update") and \
                self._outbox.answers >= self._limits.max_unacked_messages:
            self._limited("unacked")
            self._reject(domain.ResourceExhausted(
                f"{self._outbox.answers} answers on this stream are still unread (at most "
                f"{self._limits.max_unacked_messages}); read them, then re-send this submission",
                retry_after_s=UNACKED_RETRY_S), request_id, f"Session.{kind}")
            return
        identity = self._scope.identity
        if self._limits.rate is not None and identity is not None:
            try:
                self._limits.rate.check(identity.name)
            except domain.ResourceExhausted as error:
                self._limited("rate")
                self._reject(error, request_id, f"Session.{kind or 'message'}")
                return
        if kind in ("erasure", "update", "rectification"):
            submitter = self._scope.submitter_hash
            try:
                if kind == "erasure":
                    outcome = self._engine.submit_erasure(converters.erasure_from_proto(message.erasure, submitter))
                elif kind == "update":
                    outcome = self._engine.submit_update(converters.update_from_proto(message.update, submitter))
                else:
                    outcome = self._engine.submit_rectification(converters.rectification_from_proto(
                        message.rectification, submitter))
            except Exception as error:
                self._reject(error, request_id, f"Session.{kind}")
                return
            # The ack goes out before the request joins the watch set, so it precedes its events.
            self._answer(service_pb2.SessionResponse(accepted=converters.accepted_to_proto(outcome)))
            self._add_watch(_Watch((outcome.request_id,), max(outcome.first_event_seq - 1, 0), outcome.job_ids,
                                   acknowledged=True))
        elif kind == "resume":
            self._resume(message.resume)
        else:
            self._reject(domain.InvalidArgument("empty session message", (domain.FieldViolation(
                "message", "set one of erasure, resume, rectification, update"),)), "", "Session")

    def _resume(self, resume: service_pb2.Resume) -> None:
        if resume.after_seq < 0:
            self._reject(domain.InvalidArgument("after_seq is negative", (domain.FieldViolation(
                "resume.after_seq", "must be >= 0"),)), "", "Session.resume")
            return
        try:
            self._scope.check_ids(resume.request_ids, "resume.request_ids")
            if resume.all_requests and self._scope.restricted:
                self._scope.denied()  # counted; the message below says which part of the Resume was refused
                raise domain.PermissionDenied("watching every request needs a role that reads every request")
            request_ids = tuple(dict.fromkeys(resume.request_ids))
            mine = self._scope.own_requests(request_ids)
        except Exception as error:
            self._reject(error, "", "Session.resume")
            return
        for request_id in request_ids:
            if request_id not in mine:  # the same answer whether it exists or not
                self._reject(self._scope.denied(), request_id, "Session.resume")
        request_ids = tuple(r for r in request_ids if r in mine)
        if request_ids or resume.all_requests:
            self._add_watch(_Watch(request_ids, resume.after_seq, all_requests=resume.all_requests))

    def _add_watch(self, watch: _Watch) -> None:
        with self._lock:
            self._incoming_watches.append(watch)
        self._work.set()

    # --------------------------------------------------------------------------------------------- poller
    def _poll(self) -> None:
        discarded = 0
        try:
            while not self._stop.is_set():
                with self._lock:
                    incoming, self._incoming_watches = self._incoming_watches, []
                    client_done = self._client_done
                for watch in incoming:
                    self._start_watching(watch)
                if client_done and not incoming and self._settled():
                    self._outbox.put(_END)
                    return
                if self._cursor is None:  # nothing watched yet: sleep until the reader has news
                    self._work.wait(self._poll_s)
                    self._work.clear()
                    continue
                self._work.clear()
                request_ids = () if self._all_requests else tuple(self._floor_by_request)
                events = self._engine.events(after_seq=self._cursor, request_ids=request_ids, wait_s=self._poll_s)
                with self._lock:
                    joined_meanwhile = bool(self._incoming_watches)
                if events and joined_meanwhile and discarded < MAX_DISCARDED_POLLS:
                    # A request joined while we waited: its first events may lie below the newest seq just
                    # read. Re-reading from the same cursor with the larger watch set keeps the feed in seq
                    # order instead of replaying them out of order (the backfill path).
                    discarded += 1
                    continue
                discarded = 0
                for event in events:
                    self._cursor = max(self._cursor, event.seq)
                    self._deliver(event)
        except Exception as error:
            self._outbox.put(_Failure(error))

    def _start_watching(self, watch: _Watch) -> None:
        # A Resume beyond the newest event is clamped to it: nothing newer exists to have been seen, and a
        # cursor or floor in the future would hide every later event of this stream.
        if not watch.acknowledged:
            newest = self._engine.last_event_seq()
            if watch.after_seq > newest:
                watch = dataclasses.replace(watch, after_seq=newest)
        if watch.all_requests:
            self._all_requests = True
        for request_id in watch.request_ids:
            previous = self._floor_by_request.get(request_id)
            self._floor_by_request[request_id] = watch.after_seq if previous is None else min(previous,
                                                                                               watch.after_seq)
            self._jobs_by_request[request_id].update(watch.job_ids)  # (creates the entry: watched)
        if self._cursor is None:
            self._cursor = watch.after_seq
        if watch.acknowledged and watch.after_seq >= self._cursor:
            return  # every event of the request lies above the cursor: the live poll delivers them all
        # Backfill: what the live poll will never return again (seq <= cursor). The whole history is read,
        # so that a resumed request whose events all precede after_seq still learns its jobs and whether
        # they are settled; only events after the client's floor are sent.
        for request_id in watch.request_ids:
            history = self._engine.events(after_seq=0, request_ids=(request_id,))
            if not history and not watch.job_ids:
                # Every accepted request has an ACCEPTED event committed with it: this one was never accepted.
                self._forget(request_id)
                self._reject(domain.NotFound(f"no request {domain.preview(request_id)} to resume", (
                    domain.FieldViolation("resume.request_ids", "unknown request"),)), request_id, "Session.resume")
                continue
            for event in history:
                if event.seq > self._cursor:
                    break
                self._learn(event)
                if event.seq > watch.after_seq:
                    self._deliver(event, only_request=request_id)

    def _forget(self, request_id: str) -> None:
        self._floor_by_request.pop(request_id, None)
        self._jobs_by_request.pop(request_id, None)
        self._terminal_jobs_by_request.pop(request_id, None)

    def _deliver(self, event: domain.JobEvent, only_request: str | None = None) -> None:
        self._learn(event)
        watched = [rid for rid in event.request_ids if rid in self._floor_by_request]
        if only_request is None and not self._all_requests:
            # An event already shown to the client for every watched request it concerns is not re-sent.
            if not watched or all(event.seq <= self._floor_by_request[rid] for rid in watched):
                return
        visible = self._scope.event(event, set(self._floor_by_request))  # a submitter sees only its own
        if visible is not None:
            # Back-pressure: a client reading its events slower than they come (or a large history replay)
            # holds the poller here rather than growing the queue.
            self._outbox.wait_for_room("event", self._limits.max_unacked_messages, self._stop)
            self._outbox.put(service_pb2.SessionResponse(event=converters.event_to_proto(visible)), "event")

    def _learn(self, event: domain.JobEvent) -> None:
        for request_id in event.request_ids:
            if request_id in self._floor_by_request or self._all_requests:
                self._jobs_by_request[request_id].add(event.job_id)
                if event.kind is domain.EventKind.TERMINAL:
                    self._terminal_jobs_by_request[request_id].add(event.job_id)

    def _settled(self) -> bool:
        """Every watched request has a job (a request that matched no records has the job id "", whose
        TERMINAL event carries its "no records found" certificate) and a TERMINAL event for each."""
        return all(jobs and jobs <= self._terminal_jobs_by_request[request_id]
                   for request_id, jobs in self._jobs_by_request.items())


def watch_job(engine: domain.EngineProtocol, job_id: str, after_seq: int,
              poll_s: float = DEFAULT_POLL_S, context: grpc.ServicerContext | None = None,
              scope: Scope | None = None) -> Iterator[service_pb2.WatchJobResponse]:
    """One job's events after ``after_seq``, ending once the job is terminal and its TERMINAL events (one
    per request it settled, each with that request's certificate; one for all when rejected) are sent, or
    at once when the job is already terminal and the client has seen its end. A submitter (``scope``) sees
    only the events of its own requests."""
    scope = scope or Scope(engine, None, ApiLimits())
    if after_seq < 0:
        raise domain.InvalidArgument("after_seq is negative", (domain.FieldViolation("after_seq", "must be >= 0"),))
    mine = set(scope.job(job_id).request_ids)  # NotFound / PermissionDenied before any streaming
    job = engine.get_job(job_id)
    cursor = after_seq
    terminal_requests: set[str] = set()
    while context is None or context.is_active():
        events = engine.events(after_seq=cursor, job_ids=(job_id,), wait_s=poll_s)
        if any(event.kind is domain.EventKind.TERMINAL for event in events):
            job = engine.get_job(job_id)
            mine = scope.own_requests(job.request_ids)  # a request of this caller may have joined the job
        for event in events:
            cursor = max(cursor, event.seq)
            visible = scope.event(event, mine)
            if visible is not None:
                yield service_pb2.WatchJobResponse(event=converters.event_to_proto(visible))
            terminal_requests.update(event.request_ids if event.kind is domain.EventKind.TERMINAL else ())
            if job.state.terminal and set(job.request_ids) <= terminal_requests:
                return
        if not events:
            job = engine.get_job(job_id)
            if job.state.terminal and not engine.events(after_seq=cursor, job_ids=(job_id,)):
                return


__all__ = ["SessionStream", "watch_job"]
