"""``lethe demo``: the whole story on the digits model, through the real gRPC API, in a minute or two.

1. A fresh state directory (temporary unless given): embedded MLflow (SQLite) and job store.
2. Train the digits CNN (or take it from the benchmark cache) and register it unlearnable
   (:func:`lethe_demo.data.build_digits_demo`); train a tiny GPT on 8 fictitious people and register it
   with its tokenizer and prompt/answer dataset (:func:`lethe_demo.data.build_tiny_lm`).
3. Start the engine, the Prometheus exporter and the gRPC server in this process (the server runs on
   its own threads, exactly as ``lethe serve`` would).
4. Through ONE bidirectional ``Session`` stream: 20 erasures for different data subjects, one
   whole-class erasure and one person erased from the language model; progress bars while the jobs run
   (the 20 subject erasures coalesce into one job).
5. An update of the digits model with 30 new records, one of them from a subject erased in step 4:
   refused (FAILED_PRECONDITION naming the record), then resent without it and learned; and a
   rectification on the language model (a fictitious person's corrected birthplace: learned, the old
   one forgotten and tombstoned). Then every certificate as JSON, each verified by the server
   (``VerifyCertificate``).
6. Verify the whole audit chain offline (:func:`service.audit.verify_audit`).
7. Scrape ``/metrics`` and print the key series.

Exit status 0 only when every request SUCCEEDED with a valid certificate, the chain verifies and the
metrics were scraped.
"""

from __future__ import annotations

import json
import shutil
import socket
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path

DEMO_CLASS = 7
LM_PERSON = "person-01"  # a trained-on fictitious person of the tiny GPT
ERASED_SUBJECT = "subject-0000"  # erased by the first erasure of step 4; an update then brings a record of theirs
LM_RECTIFIED_PERSON, LM_NEW_BIRTHPLACE = "person-03", "Valparaiso"
KEY_METRICS = ("lethe_requests_total", "lethe_jobs_in_flight", "lethe_job_duration_seconds_count",
               "lethe_job_duration_seconds_sum", "lethe_records_erased_total", "lethe_verification_total",
               "lethe_coalesced_batch_size_count", "lethe_coalesced_batch_size_sum",
               "lethe_oldest_pending_request_age_seconds", "lethe_grpc_server_handled_total")


def run_demo(state_dir: str | None = None, subjects: int = 20, keep: bool = False, out=None) -> int:
    out = out or sys.stdout
    temporary = state_dir is None
    root = Path(tempfile.mkdtemp(prefix="lethe-demo-")) if temporary else Path(state_dir)
    try:
        return _run(root, subjects, out)
    finally:
        if temporary and not keep:
            shutil.rmtree(root, ignore_errors=True)
        elif temporary:
            _say(f"state kept in {root}")


def _run(root: Path, subject_count: int, out) -> int:
    from lethe_demo.data import build_digits_demo, build_tiny_lm
    from service.api.client import Client
    from service.api.pb import service_pb2, types_pb2
    from service.api.server import build_server
    from service.audit import verify_audit
    from service.cli import follow
    from service.engine import Engine
    from service.metrics import start_metrics_server
    from service.settings import Settings

    started = time.monotonic()
    settings = Settings(state_dir=root, grpc_host="127.0.0.1", grpc_port=0, metrics_port=_free_port())
    _say(f"[1/6] state directory {settings.state_dir}")
    engine = Engine(settings)
    _say("[2/6] training the digits CNN and registering it in the embedded MLflow ...")
    model_name = build_digits_demo(settings, engine)
    _say(f"      model {model_name!r} registered unlearnable ({time.monotonic() - started:.1f} s)")
    _say("      training a tiny GPT on 8 fictitious people and registering it with its tokenizer ...")
    lm_name = build_tiny_lm(settings, engine)
    _say(f"      model {lm_name!r} registered unlearnable ({time.monotonic() - started:.1f} s)")

    engine.start()
    metrics_server = start_metrics_server(engine.metrics, settings.metrics_port, settings.metrics_host)
    api = build_server(settings, engine)
    api.start()
    ok = True
    try:
        _say(f"[3/6] Lethe serving gRPC on {api.address}, metrics on "
             f"http://{settings.metrics_host}:{settings.metrics_port}/metrics")
        run = uuid.uuid4().hex[:8]
        erasures = [types_pb2.Erasure(request_id=f"demo-{run}-subject-{index:02d}",
                                      subject_ids=[f"subject-{index * 15:04d}"])
                    for index in range(subject_count)]
        erasures.append(types_pb2.Erasure(request_id=f"demo-{run}-class-{DEMO_CLASS}", classes=[DEMO_CLASS],
                                          model_names=[model_name]))
        erasures.append(types_pb2.Erasure(request_id=f"demo-{run}-lm-{LM_PERSON}", subject_ids=[LM_PERSON],
                                          model_names=[lm_name]))
        _say(f"[4/6] streaming {subject_count} subject erasures, 1 whole-class erasure (class {DEMO_CLASS}) "
             f"and 1 person erased from the language model ({LM_PERSON}) "
             "over one Session stream ...")
        with Client(f"127.0.0.1:{api.port}") as client:
            client.wait_ready(10)
            certificates_out = _Collect()
            status = follow(client, erasures, out=certificates_out)
            ok = status == 0
            ok = _update_and_rectify(client, engine, run, model_name, lm_name, certificates_out) and ok
            _say(f"[5/6] {len(certificates_out.documents)} certificates "
                 f"({time.monotonic() - started:.1f} s since start):")
            for document in certificates_out.documents:
                parsed = json.loads(document)
                print(_summary(json.loads(parsed["body_json"])), file=out)
                print(document, file=out)
                check = client.stub.VerifyCertificate(service_pb2.VerifyCertificateRequest(
                    certificate=types_pb2.Certificate(request_id=parsed["request_id"], body_json=parsed["body_json"],
                                                      signature=parsed["signature"])), metadata=client.metadata)
                print(f"certificate of {parsed['request_id']}: {'VALID' if check.valid else 'INVALID'} "
                      f"({check.reason})", file=out)
                ok = ok and check.valid
            if len(certificates_out.documents) != len(erasures) + 2:
                _say(f"expected {len(erasures) + 2} certificates, got {len(certificates_out.documents)}")
                ok = False
        report = verify_audit(settings.state_dir)
        _say(f"[6/6] audit chain: {'VALID' if report.valid else 'INVALID'}, {report.entries} entries, "
             f"{report.certificates} certificates, head {report.last_hash[:16]}...")
        for error in report.errors:
            _say(f"      {error}")
        ok = ok and report.valid
        metrics_text = _scrape(settings.metrics_host, settings.metrics_port)
        print("key metrics:", file=out)
        for line in metrics_text.splitlines():
            if line.startswith(KEY_METRICS):
                print(f"  {line}", file=out)
    finally:
        api.stop(2.0)
        engine.stop(10.0)
        if metrics_server is not None:
            metrics_server.shutdown()
    _say(f"demo {'succeeded' if ok else 'FAILED'} in {time.monotonic() - started:.1f} s")
    return 0 if ok else 1


def _update_and_rectify(client, engine, run: str, model_name: str, lm_name: str, certificates_out) -> bool:
    """Step 5: the update (refused with the erased subject's record, accepted without it) and the LM
    rectification, each followed to its certificate (collected with the erasures')."""
    import grpc

    from lethe_demo.data import (
        LM_RECTIFY_STRATEGY,
        birthplace_record,
        corrected_birthplace,
        shifted_digits,
    )
    from service import store as db
    from service.api.pb import service_pb2, types_pb2
    from service.cli import follow

    def record(values: dict) -> types_pb2.Record:
        message = types_pb2.Record(record_id=values["record_id"], subject_id=values["subject_id"])
        message.columns.update({k: v for k, v in values.items() if k not in ("record_id", "subject_id")})
        return message

    new = [record(r) for r in shifted_digits(30, f"demo-{run}-new", without=(DEMO_CLASS,))]
    erased = record({**shifted_digits(1, f"demo-{run}-late", start=40, without=(DEMO_CLASS,))[0],
                     "subject_id": ERASED_SUBJECT})
    update = types_pb2.Update(request_id=f"demo-{run}-update", model_name=model_name, records=[*new, erased])
    _say(f"[5/6] an update of {model_name!r} with {len(new) + 1} new records, one from {ERASED_SUBJECT} "
         "(erased above) ...")
    try:
        client.stub.SubmitUpdate(service_pb2.SubmitUpdateRequest(update=update), metadata=client.metadata)
        _say("      the update was NOT refused: an erased subject's record was accepted")
        return False
    except grpc.RpcError as refused:
        _say(f"      refused: {refused.code().name} {refused.details()}")
        if refused.code() != grpc.StatusCode.FAILED_PRECONDITION:
            return False
    del update.records[-1]
    _say(f"      resent without it: {len(update.records)} records")
    ok = follow(client, [update], out=certificates_out) == 0

    with engine.store.read() as conn:
        dataset = db.dataset_for_model_version(conn, lm_name, db.get_model(conn, lm_name).serving_version)
    fact = birthplace_record(engine.catalog.frame(dataset.path), LM_RECTIFIED_PERSON)
    answer = corrected_birthplace(str(fact["answer"]), LM_NEW_BIRTHPLACE)
    rectification = types_pb2.Rectification(
        request_id=f"demo-{run}-rectify-{LM_RECTIFIED_PERSON}", subject_id=LM_RECTIFIED_PERSON,
        model_names=[lm_name], strategy=LM_RECTIFY_STRATEGY[0], corrected_records=[record({
            "record_id": str(fact["record_id"]), "subject_id": LM_RECTIFIED_PERSON, "prompt": str(fact["prompt"]),
            "answer": answer})])
    rectification.strategy_params.update(LM_RECTIFY_STRATEGY[1])
    _say(f"      a rectification on {lm_name!r}: {LM_RECTIFIED_PERSON}'s birthplace corrected to "
         f"{LM_NEW_BIRTHPLACE} ...")
    return follow(client, [rectification], out=certificates_out) == 0 and ok


def _summary(body: dict) -> str:
    """One readable line per certificate; the JSON document after it is what an auditor verifies."""
    model = body.get("model") or {}
    records = body.get("records") or {}
    verification = body.get("verification") or {}
    learned = (body.get("update") or {}).get("records_learned")
    return (f"# {body.get('request_id')}: {body.get('label')} on {body.get('model_name')} "
            f"v{model.get('base_version')} -> v{model.get('result_version')}, "
            f"{records.get('matched', 0)} record(s)" + (f", {learned} learned" if learned is not None else "")
            + f", job {body.get('job_id')} "
            f"({body.get('coalesced_requests', 1)} coalesced request(s)), "
            f"verification {'passed' if verification.get('passed') else 'n/a'}")


class _Collect:
    """A file-like sink that keeps each certificate document ``follow`` prints."""

    def __init__(self):
        self.documents: list[str] = []

    def write(self, text: str) -> None:
        if text.strip():
            self.documents.append(text.rstrip("\n"))

    def flush(self) -> None:
        pass


def _scrape(host: str, port: int) -> str:
    with urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=10) as response:
        return response.read().decode()


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)
