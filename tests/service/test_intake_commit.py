"""Intake's batch commit (:mod:`service.intake_commit`) on SQLite and PostgreSQL (``store_url``).

One statement per table per batch must store exactly what committing the same submissions one by one
stores: the same requests, jobs, links, record counts, events (and each request's first event seq), audit
entries and "no records" certificates, with every request's outcome its own (new, replayed or refused).
"""

from __future__ import annotations

import json

import sqlalchemy as sa

from service import store as db
from service.audit import verify_chain
from service.domain import AlreadyExists, ErasureRequest, SubmitOutcome
from service.intake_commit import Submission, commit_batch
from tests.service.test_store_scaleout import KEY, _target, add_model, make_context


def _submission(request_id: str, *targets, digest: str = "", submitter: str | None = None,
                method_params: dict | None = None) -> Submission:
    request = ErasureRequest(request_id=request_id, subject_ids=(f"s-{request_id}",), submitter_hash=submitter,
                             method_params=method_params or {})
    return Submission(request, [f"h-{request_id}"], [], digest or f"d-{request_id}", None, list(targets))


def _matched(name: str, records: int, params: dict | None = None) -> dict:
    return {**_target(name), "matched": records, "params": params or {}}


def _stored(ctx) -> dict:
    """The store's content as intake leaves it, with generated job ids and times replaced by stable names."""
    with ctx.store.read() as conn:
        jobs = conn.execute(sa.select(db.jobs)).all()
        first_mentions = conn.execute(sa.select(db.events.c.job_id).where(db.events.c.job_id != "")
                                      .order_by(db.events.c.seq)).scalars()
        names = {job_id: f"job{index}" for index, job_id in enumerate(dict.fromkeys(first_mentions))}
        requests = {row.request_id: (row.payload_digest, row.model_names, [names[j] for j in row.outcome_job_ids],
                                     row.state, row.submitter_hash)
                    for row in conn.execute(sa.select(db.requests))}
        links = sorted((names[row.job_id], row.request_id, row.attempt)
                       for row in conn.execute(sa.select(db.job_requests)))
        job_rows = sorted((names[job.job_id], job.model_name, job.coalesce_key, job.records, job.method_params)
                          for job in jobs)
        events: dict[str, list] = {}  # per request, in seq order (a batch appends request by request per phase)
        for row in conn.execute(sa.select(db.events).order_by(db.events.c.seq)):
            job = names.get(row.job_id, row.job_id)
            for request_id in row.request_ids:
                events.setdefault(request_id, []).append(
                    (job, row.kind, row.state, row.stage, row.message.replace(row.job_id, job) if row.job_id else row.message))
        first_events = {row.request_id: conn.execute(sa.select(sa.func.min(db.event_requests.c.seq)).where(
            db.event_requests.c.request_id == row.request_id)).scalar() == row.first_event_seq
            for row in conn.execute(sa.select(db.requests))}
        audit = sorted(json.dumps({k: v for k, v in json.loads(row.body_json).items()
                                   if k not in ("time", "certificate_sha256", "certificate_id")}, sort_keys=True)
                       for row in db.audit_entries(conn))
        certificates = sorted((row.request_id, row.model_name) for row in db.all_certificates(conn))
        chain = verify_chain(conn, KEY)
    assert chain.valid, chain.errors
    assert all(first_events.values()), f"first_event_seq is not each request's first event: {first_events}"
    return {"requests": requests, "links": links, "jobs": job_rows, "events": events, "audit": audit,
            "certificates": certificates}


def _submissions() -> list[Submission]:
    """Two models; two coalescing keys on one of them; a request matching nothing; one touching both models."""
    return [
        _submission("r-1", _matched("m", 3)),
        _submission("r-2", _matched("m", 2), _matched("n", 4)),
        _submission("r-3", _matched("m", 1, {"alpha": 5}), method_params={"alpha": 5}),
        _submission("r-4", _matched("m", 0)),
        _submission("r-5", _matched("m", 7)),
    ]


def test_a_batch_stores_what_one_by_one_commits_store(store_url, request, tmp_path):
    one_by_one = make_context(store_url, tmp_path / "a", coalescing_window_s=60)
    second_url = (request.getfixturevalue("postgres_server").create_database() if store_url.startswith("postgresql")
                  else f"sqlite:///{tmp_path / 'b.db'}")
    batched = make_context(second_url, tmp_path / "b", coalescing_window_s=60)
    for ctx in (one_by_one, batched):
        add_model(ctx, "m")
        add_model(ctx, "n")
    singles = [commit_batch(one_by_one, [submission])[0] for submission in _submissions()]
    together = commit_batch(batched, _submissions())
    assert all(isinstance(outcome, SubmitOutcome) and outcome.created for outcome in singles + together)
    assert [len(o.job_ids) for o in together] == [len(o.job_ids) for o in singles] == [1, 2, 1, 0, 1]
    assert _stored(batched) == _stored(one_by_one)
    stored = _stored(batched)
    assert [records for _, model, _, records, _ in stored["jobs"] if model == "m"] == [12, 1], \
        "r-1, r-2 and r-5 share one job (3 + 2 + 7 records); r-3's parameters open another"
    assert stored["certificates"] == [("r-4", "m")], "a request matching nothing is certified at once"
    for ctx in (one_by_one, batched):
        ctx.store.dispose()


def test_each_submission_of_a_batch_gets_its_own_outcome(store_url, tmp_path):
    ctx = make_context(store_url, tmp_path, coalescing_window_s=60)
    add_model(ctx, "m")
    earlier = commit_batch(ctx, [_submission("stored", _matched("m", 1), submitter="alice")])[0]
    outcomes = commit_batch(ctx, [
        _submission("new", _matched("m", 2)),
        _submission("stored", _matched("m", 1), submitter="alice"),  # a retry: replayed
        _submission("stored", _matched("m", 1), submitter="bob"),  # another identity's id: refused
        _submission("stored", _matched("m", 1), digest="other", submitter="alice"),  # another payload: refused
        _submission("new", _matched("m", 2)),  # the same id twice in one batch: the second replays the first
        _submission("new", _matched("m", 2), digest="other"),  # ... or is refused with another payload
    ])
    new, replay, foreign, changed, again, different = outcomes
    assert new.created and not again.created and (again.job_ids, again.first_event_seq) == (
        new.job_ids, new.first_event_seq)
    assert not replay.created and (replay.job_ids, replay.first_event_seq) == (earlier.job_ids,
                                                                                earlier.first_event_seq)
    assert all(isinstance(o, AlreadyExists) for o in (foreign, changed, different))
    assert new.job_ids == earlier.job_ids, "coalesced into the open job"
    stored = _stored(ctx)
    assert sorted(stored["requests"]) == ["new", "stored"]
    received = [json.loads(entry)["request_id"] for entry in stored["audit"]
                if json.loads(entry)["kind"] == "request_received"]
    assert sorted(received) == ["new", "stored"], "one request_received entry per stored request"
    ctx.store.dispose()


def test_without_a_coalescing_window_every_request_opens_its_own_job(store_url, tmp_path):
    ctx = make_context(store_url, tmp_path, coalescing_window_s=0)
    add_model(ctx, "m")
    outcomes = commit_batch(ctx, [_submission(f"r-{i}", _matched("m", 1)) for i in range(3)])
    assert len({job for outcome in outcomes for job in outcome.job_ids}) == 3
    ctx.store.dispose()
