"""No subject or record id a client sent is stored, logged or exported in clear (issue 15, "Privacy of the
store and logs").

One engine with its own state directory, logging EVERYTHING at DEBUG into a file inside that directory,
serves through the real gRPC front: an erasure of two subjects and two records that runs to its
certificate, an erasure of ids the data does not hold, refused requests carrying ids (real and unknown
ones), a request id reused with another payload, and the re-registration of a dataset holding erased
records. Then every file under the state directory (job store and its WAL, MLflow's database and
artifacts, dataset copies, caches, keys, the debug log) and the Prometheus metrics page are searched.

The rule, and why it has one exception: training data legitimately holds the ids of the records it is
made of, so

- an id a client sent may appear ONLY as a ``record_id`` / ``subject_id`` value of a current training-data
  copy (Lethe's catalog copy and its MLflow twin, both Parquet), and only while that record is not erased;
- the ids of erased subjects and records appear NOWHERE: not in any dataset version (older copies are
  deleted by the purge), not in the job store (keyed hashes), logs, metrics, MLflow tags or caches;
- ids that match no record, and every id of a refused request, appear nowhere outside the training data
  (an unknown id therefore appears nowhere at all).

Parquet files are checked by column values (their pages are compressed, so a byte search could miss an id
in them); every other file by a byte search, compressed archives after decompression. The erasure's sealed
verification set (:mod:`service.sealed`: the erased records, kept encrypted for the retention window) is one
of those files, locally and as its MLflow copy: it must be ciphertext, holding no id in clear.
"""

from __future__ import annotations

import gzip
import io
import logging
import zipfile
from pathlib import Path

import grpc
import pyarrow.parquet as pq
import pytest
from prometheus_client import generate_latest

from lethe_demo.data import digits_frame
from service.api.pb import service_pb2, types_pb2
from tests.service.api_fixtures import running_api
from tests.service.conftest import make_engine, wait_for_jobs

pytestmark = [pytest.mark.security, pytest.mark.slow]


@pytest.fixture(scope="module")
def privacy_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("privacy")
    state = root / "state"
    state.mkdir()
    log_file = state / "logs" / "lethe-debug.log"
    log_file.parent.mkdir()
    handler = logging.FileHandler(log_file)
    handler.setLevel(logging.DEBUG)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root_logger = logging.getLogger()
    levels = {name: logging.getLogger(name).level for name in ("", "service", "unlearn")}
    root_logger.addHandler(handler)
    for name in levels:
        logging.getLogger(name).setLevel(logging.DEBUG)
    engine = None
    try:
        engine, model = make_engine(state, dataset_roots=[str(root)])
        frame = digits_frame()
        subjects = sorted(frame["subject_id"].unique())
        erased_subjects = subjects[40:42]
        kept = frame[~frame["subject_id"].isin(erased_subjects)]
        erased_records = list(kept["record_id"][kept["split"] == "train"].iloc[[5, 9]])
        real_but_refused = subjects[60]  # stays in the data: may appear there, nowhere else
        unknown = {"subjects": ["privacy-ghost-subject-7f3a"], "records": ["privacy-ghost-record-91c2"]}
        refused_unknown = ["privacy-refused-subject-c0de", "privacy-refused-record-beef"]

        with running_api(engine.settings, engine) as api:
            erasure = types_pb2.Erasure(request_id="privacy-erase", subject_ids=erased_subjects,
                                        record_ids=erased_records, model_names=[model])
            accepted = api.stub.SubmitErasure(service_pb2.SubmitErasureRequest(erasure=erasure)).accepted
            api.stub.SubmitErasure(service_pb2.SubmitErasureRequest(erasure=types_pb2.Erasure(
                request_id="privacy-nobody", subject_ids=unknown["subjects"], record_ids=unknown["records"])))
            refusals = [  # each carries ids and is refused
                types_pb2.Erasure(request_id="privacy-refused-1", subject_ids=[real_but_refused, real_but_refused]),
                types_pb2.Erasure(request_id="privacy-refused-2", subject_ids=[refused_unknown[0]],
                                  record_ids=[refused_unknown[1]], model_names=["no-such-model"]),
                types_pb2.Erasure(request_id="privacy-nobody", subject_ids=[refused_unknown[0]]),  # reused id
                types_pb2.Erasure(request_id="privacy-refused-3", subject_ids=[real_but_refused], method="nope"),
            ]
            for refused in refusals:
                with pytest.raises(grpc.RpcError):
                    api.stub.SubmitErasure(service_pb2.SubmitErasureRequest(erasure=refused))
            responses = list(api.stub.Session(iter([service_pb2.SessionRequest(erasure=refusals[0])]), timeout=30))
            assert responses[0].WhichOneof("message") == "rejected"
            (job,) = wait_for_jobs(engine, accepted.job_ids, timeout_s=600)
            assert job.state.value == "SUCCEEDED", (job.state, job.message)

            # Re-ingesting the erased records is refused, and the refusal must not quote them.
            reingest = root / "reingest.parquet"
            frame.to_parquet(reingest, index=False)
            with pytest.raises(grpc.RpcError) as refused_registration:
                api.stub.RegisterModel(service_pb2.RegisterModelRequest(
                    # the head of the lineage (version 1 holds the erased subject: refused before any dataset read)
                    model_name=model, alias="serving", task_type=types_pb2.TASK_TYPE_CLASSIFICATION,
                    dataset_uri=str(reingest), num_classes=10), timeout=120)
            reingest.unlink()
        handler.flush()
        yield {
            "engine": engine, "state": state, "metrics": generate_latest(engine.metrics.registry),
            "refusal": refused_registration.value,
            "erased": [*erased_subjects, *erased_records],
            "nowhere_outside_data": [*erased_subjects, *erased_records, *unknown["subjects"], *unknown["records"],
                                     *refused_unknown, real_but_refused],
        }
    finally:
        root_logger.removeHandler(handler)
        handler.close()
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)
        if engine is not None:
            engine.stop(30)
            engine.store.dispose()


def _contents(path: Path) -> list[bytes]:
    """A file's bytes, plus the members of a zip or gzip archive (MLflow may store artifacts compressed)."""
    data = path.read_bytes()
    found = [data]
    if data[:2] == b"\x1f\x8b":
        found.append(gzip.decompress(data))
    elif data[:4] == b"PK\x03\x04":
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            found += [archive.read(name) for name in archive.namelist()]
    return found


def test_no_sent_id_appears_in_clear_outside_the_training_data(privacy_run):
    state, hits, data_files, control = privacy_run["state"], [], 0, set()
    for path in sorted(p for p in state.rglob("*") if p.is_file()):
        if path.suffix == ".parquet":
            data_files += 1
            continue  # checked by column below
        for content in _contents(path):
            hits += [(str(path.relative_to(state)), value) for value in privacy_run["nowhere_outside_data"]
                     if value.encode() in content]
            # Positive control: request ids are not personal data and are stored in clear (job store, log);
            # the same search must find them, or it is searching the wrong way.
            control |= {path.parent.name if path.parent != state else path.name
                        for request_id in ("privacy-erase", "privacy-nobody") if request_id.encode() in content}
    assert data_files >= 1, "the test found no training-data copy to tell apart"
    sealed = [p for p in state.rglob("*.bin") if "sealed" in str(p.relative_to(state))]
    assert len(sealed) >= 2, f"the erasure's sealed set and its MLflow copy were not searched: {sealed}"
    assert {"logs", "lethe.db"} & control and "logs" in control, control
    assert not hits, f"ids in clear outside the training data: {hits}"


def test_erased_ids_appear_in_no_dataset_copy(privacy_run):
    erased = set(privacy_run["erased"])
    for path in privacy_run["state"].rglob("*.parquet"):
        table = pq.read_table(path)
        values = set()
        for column in ("record_id", "subject_id"):
            if column in table.column_names:
                values |= set(table.column(column).to_pylist())
        assert not values & erased, f"{path.relative_to(privacy_run['state'])} still holds erased ids"
        other = {column: table.column(column) for column in table.column_names if column not in (
            "record_id", "subject_id")}
        for name, column in other.items():  # an id smuggled into another column counts as well
            if str(column.type) == "string":
                assert not set(column.to_pylist()) & erased, (path, name)


def test_metrics_page_holds_no_sent_id(privacy_run):
    page = privacy_run["metrics"]
    assert b"lethe_requests_total" in page
    assert not [value for value in privacy_run["nowhere_outside_data"] if value.encode() in page]


def test_the_reingest_refusal_quotes_no_erased_record(privacy_run):
    refusal = privacy_run["refusal"]
    from service.api.client import field_violations

    assert refusal.code() == grpc.StatusCode.INVALID_ARGUMENT
    text = refusal.details() + "".join(f + d for f, d in field_violations(refusal))
    assert "erased earlier" in text
    assert not [value for value in privacy_run["erased"] if value in text]


def test_the_debug_log_was_written_and_checked(privacy_run):
    log_text = (privacy_run["state"] / "logs" / "lethe-debug.log").read_text()
    assert "DEBUG" in log_text and "INVALID_ARGUMENT" in log_text  # the refusals were logged, at DEBUG too
