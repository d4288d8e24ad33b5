"""``lethe``: run the service, register models, submit and watch erasures, verify the audit chain, demo.

    lethe serve                                   # gRPC API + worker + /metrics, until SIGTERM
    lethe worker [--once --job-id ID]             # run jobs from the store (no API); see service.worker
    lethe register --model digits --alias champion --task classification --dataset data.parquet
    lethe submit --subject subject-0007 --subject subject-0042     # progress bars, then certificates
    lethe watch --request-id 3f2a...                                # follow an earlier request
    lethe jobs --state QUEUED --state RUNNING
    lethe pending                                                   # the GDPR clock
    lethe certificate 3f2a... --verify
    lethe audit verify --state-dir .lethe                           # offline, no server needed
    lethe dataset check data.parquet --task classification --num-classes 10   # offline schema check
    lethe health                                                    # exit 0 when SERVING (Kubernetes exec probe)
    lethe token --roles submitter --name governance                 # a new token and its credentials-file line
    lethe demo                                                      # the whole story on the digits model

Client commands talk to ``--target`` (default ``LETHE_GRPC_HOST:LETHE_GRPC_PORT``) with the bearer token
``LETHE_AUTH_TOKEN`` when set. They speak TLS when ``--tls-ca``/``--tls-cert`` (or ``LETHE_TLS_CA``,
``LETHE_TLS_CERT``) are given: the server is verified against ``--tls-ca`` (default ``LETHE_TLS_CA``, else
``LETHE_TLS_CLIENT_CA``, else the system roots) and ``--tls-cert``/``--tls-key`` (default ``LETHE_TLS_CERT``,
``LETHE_TLS_KEY``: the same files the server reads) are presented for mutual TLS. Exit status: 0 success,
1 a request was refused or did not succeed, 2 a usage or connection error.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import uuid
from pathlib import Path
from datetime import datetime, timedelta, timezone

import grpc

EXIT_OK, EXIT_NOT_SUCCEEDED, EXIT_ERROR = 0, 1, 2
ACCEPTED_EVENT, TERMINAL_EVENT = 1, 3  # lethe.v1.EventKind values (kept literal: importing protos is lazy)
TERMINAL_NAMES = {"JOB_STATE_SUCCEEDED": "SUCCEEDED", "JOB_STATE_REJECTED_BY_VERIFICATION": "REJECTED_BY_VERIFICATION",
                  "JOB_STATE_FAILED": "FAILED", "JOB_STATE_CANCELLED": "CANCELLED"}


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    # --log-level sets Lethe's own loggers; other libraries' warnings and progress bars (MLflow, the ONNX
    # exporter, transformers) show only under DEBUG, so the console is Lethe's story (service.console).
    from service.console import configure

    configure(args.log_level or ("INFO" if args.command in ("serve", "worker") else "WARNING"))
    try:
        return args.run(args)
    except grpc.RpcError as error:
        from service.api.client import describe_error

        print(f"lethe: {describe_error(error)}", file=sys.stderr)
        return EXIT_NOT_SUCCEEDED if error.code() not in (grpc.StatusCode.UNAVAILABLE,) else EXIT_ERROR
    except KeyboardInterrupt:
        return 130


# --------------------------------------------------------------------------------------------- commands
def _serve(args) -> int:
    from service.api.server import serve

    return serve(_settings(args), grace_s=args.grace_s)


def _worker(args) -> int:
    from service import worker

    settings = _settings(args)
    if args.once:
        if not args.job_id:
            print("lethe worker: --once needs --job-id", file=sys.stderr)
            return worker.EXIT_USAGE
        return worker.run_once(settings, args.job_id, args.attempt)
    if args.job_id or args.attempt is not None:
        print("lethe worker: --job-id and --attempt go with --once", file=sys.stderr)
        return worker.EXIT_USAGE
    return worker.run_loop(settings, grace_s=args.grace_s)


def _register(args) -> int:
    from service.api.pb import service_pb2, types_pb2

    policy = types_pb2.VerificationPolicy(default_method=args.default_method or "")
    for name in ("max_utility_drop", "class_forget_max_accuracy", "onnx_tolerance", "min_forget_p", "mia_auc_margin",
                 "sealed_retention_days", "reerase_after_update"):
        if getattr(args, name) is not None:
            setattr(policy, name, getattr(args, name))
    if args.method_params:
        policy.method_params.update(_json_object(args.method_params, "--method-params"))
    for step in _json_list(args.method_chain, "--method-chain") if args.method_chain else ():
        if not isinstance(step, dict) or not isinstance(step.get("name"), str):
            raise SystemExit("error: --method-chain must be a JSON list of {\"name\": ..., \"params\": {...}}")
        policy.method_chain.add(name=step["name"]).params.update(step.get("params") or {})
    # A relative local path means "from here": the server accepts absolute paths inside its dataset roots only.
    dataset = args.dataset if "://" in args.dataset else os.path.abspath(args.dataset)
    request = service_pb2.RegisterModelRequest(
        model_name=args.model, task_type=types_pb2.TaskType.Value(f"TASK_TYPE_{args.task.upper()}"),
        dataset_uri=dataset, policy=policy, num_classes=args.num_classes or 0,
        model_factory=args.model_factory or "")
    if args.train_recipe:
        request.train_recipe.update(_json_object(args.train_recipe, "--train-recipe"))
    if args.version:
        request.version = args.version
    else:
        request.alias = args.alias
    with _client(args) as client:
        response = client.stub.RegisterModel(request, metadata=client.metadata)
    _print_message(response.model)
    return EXIT_OK


def _submit(args) -> int:
    from service.api.pb import types_pb2

    erasure = types_pb2.Erasure(request_id=args.request_id or f"cli-{uuid.uuid4()}", subject_ids=args.subject,
                                record_ids=args.record, classes=args.class_, model_names=args.model,
                                method=args.method or "")
    if args.params:
        erasure.method_params.update(_json_object(args.params, "--params"))
    if args.deadline:
        erasure.deadline.FromDatetime(_parse_time(args.deadline))
    for assignment in args.override:
        name, _, value = assignment.partition("=")
        setattr(erasure.policy_overrides, name.strip(), float(value))
    with _client(args) as client:
        if args.no_wait:
            from service.api.pb import service_pb2

            response = client.stub.SubmitErasure(service_pb2.SubmitErasureRequest(erasure=erasure),
                                                 metadata=client.metadata)
            _print_message(response.accepted)
            return EXIT_OK
        return follow(client, [erasure], quiet=args.quiet)


def _update(args) -> int:
    """New records for a model: a Parquet file (sent as its path, read by the server inside its dataset
    roots) or a JSON-lines file sent inline (one object per line: record_id, subject_id and the task's
    columns)."""
    from service.api.pb import types_pb2

    update = types_pb2.Update(request_id=args.request_id or f"cli-{uuid.uuid4()}", model_name=args.model,
                              strategy=args.strategy or "")
    if args.dataset:
        update.dataset_uri = str(Path(args.dataset).resolve()) if "://" not in args.dataset else args.dataset
    for line_number, record in enumerate(_json_lines(args.records) if args.records else (), start=1):
        if not isinstance(record, dict) or "record_id" not in record or "subject_id" not in record:
            raise SystemExit(f"error: {args.records} line {line_number}: an object with record_id, subject_id and "
                             "the task's columns")
        message = update.records.add(record_id=str(record.pop("record_id")), subject_id=str(record.pop("subject_id")))
        message.columns.update(record)
    if args.params:
        update.strategy_params.update(_json_object(args.params, "--params"))
    if args.deadline:
        update.deadline.FromDatetime(_parse_time(args.deadline))
    return _send(args, update, "SubmitUpdate", "update")


def _rectify(args) -> int:
    """Corrected values for existing records of one subject: ``--set RECORD_ID JSON`` per record."""
    from service.api.pb import types_pb2

    rectification = types_pb2.Rectification(request_id=args.request_id or f"cli-{uuid.uuid4()}",
                                             subject_id=args.subject, model_names=args.model,
                                             strategy=args.strategy or "")
    for record_id, columns in args.set:
        rectification.corrected_records.add(record_id=record_id, subject_id=args.subject).columns.update(
            _json_object(columns, "--set"))
    if args.params:
        rectification.strategy_params.update(_json_object(args.params, "--params"))
    if args.deadline:
        rectification.deadline.FromDatetime(_parse_time(args.deadline))
    return _send(args, rectification, "SubmitRectification", "rectification")


def _send(args, message, rpc: str, field: str) -> int:
    """Submit an update or rectification and follow it (progress bars) to its certificates, or only ack."""
    from service.api.pb import service_pb2

    with _client(args) as client:
        if args.no_wait:
            request = getattr(service_pb2, f"{rpc}Request")(**{field: message})
            _print_message(getattr(client.stub, rpc)(request, metadata=client.metadata).accepted)
            return EXIT_OK
        return follow(client, [message], quiet=args.quiet)


def _json_lines(path: str) -> list:
    try:
        return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    except (OSError, json.JSONDecodeError) as error:
        raise SystemExit(f"error: --records {path}: {error}") from error


def _watch(args) -> int:
    from service.api.pb import service_pb2

    with _client(args) as client:
        if args.job:
            board = _board(args.quiet)
            board.add(args.job)
            last = None
            for response in client.stub.WatchJob(service_pb2.WatchJobRequest(job_id=args.job, after_seq=args.after_seq),
                                                 metadata=client.metadata):
                last = response.event
                board.update(args.job, status=_state_name(last.state), stage=last.stage, fraction=last.fraction,
                             done=last.kind == TERMINAL_EVENT)
            board.close()
            if last is not None:
                for certificate in last.certificates:
                    print(certificate_json(certificate))
                if _state_name(last.state) in ("REJECTED_BY_VERIFICATION", "FAILED"):
                    print(f"job {args.job} {_state_name(last.state)}: {last.message}", file=sys.stderr)
                    _print_evidence(client, args.job)
            return EXIT_OK if last is not None and _state_name(last.state) == "SUCCEEDED" else EXIT_NOT_SUCCEEDED
        if not args.request_id:
            print("lethe watch: give --request-id (one or more) or --job", file=sys.stderr)
            return EXIT_ERROR
        return follow(client, [], resume=[(request_id, args.after_seq) for request_id in args.request_id],
                      quiet=args.quiet)


def _jobs(args) -> int:
    from service.api.pb import service_pb2, types_pb2

    request = service_pb2.ListJobsRequest(states=[types_pb2.JobState.Value(f"JOB_STATE_{s}") for s in args.state],
                                          model_name=args.model or "", page_size=args.limit)
    if args.min_age_s:
        request.min_age.FromTimedelta(timedelta(seconds=args.min_age_s))
    with _client(args) as client:
        response = client.stub.ListJobs(request, metadata=client.metadata)
    for job in response.jobs:
        print(f"{job.job_id}  {job.model_name}  {_state_name(job.state):<24} {job.stage:<10} "
              f"{job.progress * 100:5.1f}%  {job.method:<10} requests={len(job.request_ids)} records={job.records} "
              f"v{job.base_version}->{job.result_version or '-'}")
    return EXIT_OK


def _pending(args) -> int:
    from service.api.pb import service_pb2

    with _client(args) as client:
        response = client.stub.ListPendingRequests(service_pb2.ListPendingRequestsRequest(), metadata=client.metadata)
    for pending in response.pending_requests:
        deadline = ""
        if pending.HasField("deadline"):
            deadline = (f"  deadline {pending.deadline.ToDatetime(timezone.utc).isoformat()}"
                        f"{'  OVERDUE' if pending.overdue else ''}")
        print(f"{pending.request_id}  received {pending.receive_time.ToDatetime(timezone.utc).isoformat()}  "
              f"age {pending.age_seconds / 86400:.2f} days{deadline}")
    print(f"{len(response.pending_requests)} pending, {response.overdue_count} past their deadline; oldest "
          f"{response.oldest_age_seconds / 86400:.2f} days (GDPR Art. 12(3): one month)", file=sys.stderr)
    return EXIT_OK


def _certificate(args) -> int:
    from service.api.pb import service_pb2

    with _client(args) as client:
        response = client.stub.GetCertificate(service_pb2.GetCertificateRequest(request_id=args.request_id),
                                              metadata=client.metadata)
        valid = True
        for certificate in response.certificates:
            print(certificate_json(certificate))
            if args.verify:
                check = client.stub.VerifyCertificate(service_pb2.VerifyCertificateRequest(certificate=certificate),
                                                      metadata=client.metadata)
                print(f"{'VALID' if check.valid else 'INVALID'}: {check.reason}", file=sys.stderr)
                valid = valid and check.valid
    return EXIT_OK if valid else EXIT_NOT_SUCCEEDED


def _job(args) -> int:
    """One job: state, stage, method chain attempts with the gate's verdict on each, and the reason."""
    from service.api.pb import service_pb2

    with _client(args) as client:
        job = client.stub.GetJob(service_pb2.GetJobRequest(job_id=args.job_id), metadata=client.metadata).job
    print(f"job {job.job_id} on model {job.model_name}: {_state_name(job.state)} (stage {job.stage}, "
          f"{job.progress * 100:.0f}%), version {job.base_version} -> {job.result_version or '-'}, "
          f"{job.records} record(s), requests {', '.join(job.request_ids) or '-'}")
    if job.message:
        print(f"  reason: {job.message}")
    for line in evidence_summary(job.evidence):
        print(f"  {line}")
    return EXIT_OK


def _request(args) -> int:
    from service.api.pb import service_pb2

    with _client(args) as client:
        response = client.stub.GetRequest(service_pb2.GetRequestRequest(request_id=args.request_id),
                                          metadata=client.metadata)
    _print_request(response.request)
    return EXIT_OK


def _cancel(args) -> int:
    from service.api.pb import service_pb2

    with _client(args) as client:
        response = client.stub.CancelRequest(service_pb2.CancelRequestRequest(request_id=args.request_id,
                                                                              reason=args.reason or ""),
                                             metadata=client.metadata)
    _print_request(response.request)
    return EXIT_OK


def _retry(args) -> int:
    from service.api.pb import service_pb2

    request = service_pb2.RetryRequestRequest(request_id=args.request_id, expected_attempt=args.expected_attempt,
                                              method=args.method or "")
    if args.params:
        request.method_params.update(_json_object(args.params, "--params"))
    for assignment in args.override:
        name, _, value = assignment.partition("=")
        setattr(request.policy_overrides, name.strip(), float(value))
    with _client(args) as client:
        response = client.stub.RetryRequest(request, metadata=client.metadata)
    print(f"attempt {response.attempt} of {args.request_id}: {'new' if response.created else 'already created'} "
          f"job(s) {', '.join(response.job_ids) or '-'}")
    _print_request(response.request)
    return EXIT_OK


def _close(args) -> int:
    from service.api.pb import service_pb2

    with _client(args) as client:
        response = client.stub.CloseRequest(service_pb2.CloseRequestRequest(request_id=args.request_id,
                                                                            reason=args.reason),
                                            metadata=client.metadata)
    _print_request(response.request)
    return EXIT_OK


def _print_request(request) -> None:
    from service.api.pb import types_pb2

    state = types_pb2.RequestState.Name(request.state).removeprefix("REQUEST_STATE_")
    print(f"request {request.request_id} ({request.kind}): {state}, attempt {request.attempts}, "
          f"jobs {', '.join(request.job_ids) or '-'}, certified models {', '.join(request.certified_models) or '-'}"
          + (f", reason: {request.state_reason}" if request.state_reason else ""))


def evidence_summary(evidence) -> list[str]:
    """A job's evidence in a few lines: each attempt's method, whether it reached its own target, and the
    gate's failing checks (value against limit)."""
    from google.protobuf.json_format import MessageToDict

    evidence = MessageToDict(evidence) if hasattr(evidence, "fields") else dict(evidence or {})
    lines = []
    for index, attempt in enumerate(evidence.get("attempts") or [], start=1):
        verdict = "passed the gate" if attempt.get("gate_passed") else "rejected"
        line = f"attempt {index}: {attempt.get('method')} (target reached: {attempt.get('target_reached')}) {verdict}"
        if attempt.get("error"):
            line += f": {attempt['error']}"
        lines.append(line)
        checks = (attempt.get("verification") or {}).get("checks") or []
        for check in checks:
            if check.get("passed") is False or check.get("passed") is None:
                status = "FAILED" if check.get("passed") is False else "not checkable"
                value, limit = check.get("value"), check.get("limit")
                shown = f"{value:.4g} vs limit {limit:.4g}" if isinstance(value, float) and isinstance(limit, float) \
                    else f"{value} vs limit {limit}"
                lines.append(f"    {status} {check.get('name')}: {shown} ({check.get('rule')})"
                             + (f"; {check['reason']}" if check.get("reason") else ""))
    return lines


def _audit_verify(args) -> int:
    from service import audit

    if not args.state_dir and not args.store_url:
        from service.settings import Settings

        settings = Settings()
        if os.environ.get("LETHE_JOB_STORE_URL"):  # in a pod: the store the server uses (PostgreSQL when scaled out)
            args.store_url = settings.job_store_url
        else:
            args.state_dir = str(settings.state_dir)
    forwarded = ["verify"]
    for option in ("state_dir", "store_url", "key_file", "certificate"):
        value = getattr(args, option)
        if value:
            forwarded += [f"--{option.replace('_', '-')}", str(value)]
    return audit.main(forwarded)


def _dataset_check(args) -> int:
    """Offline: read a Parquet file and print every schema problem with its rows and column."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from service.datasets import SPLITS, schema_problems
    from service.domain import TaskType

    if not os.path.isfile(args.file):
        print(f"lethe dataset check: {args.file}: no such file", file=sys.stderr)
        return EXIT_ERROR
    try:
        frame = pq.read_table(args.file).to_pandas()
    except (OSError, pa.ArrowException) as error:
        print(f"lethe dataset check: {args.file}: not a readable Parquet file: {error}", file=sys.stderr)
        return EXIT_ERROR
    problems = schema_problems(frame, TaskType(args.task), args.num_classes, max_rows=args.max_rows)
    for problem in problems:
        where = "" if problem.column == "columns" else f"column {problem.column}: "
        print(f"{args.file}: {where}{problem.problem}" + (f" ({problem.count} row(s))" if problem.count else ""))
        for row, detail in problem.rows:
            print(f"  row {row}, column {problem.column}: {detail}")
        if problem.count > len(problem.rows):
            print(f"  ... and {problem.count - len(problem.rows)} more row(s) (--max-rows to list more)")
    if problems:
        print(f"{args.file}: {len(problems)} problem(s); rows are 0-based positions in the file", file=sys.stderr)
        return EXIT_ERROR
    splits = frame["split"].value_counts()
    summary = ", ".join(f"{int(splits[s])} {s}" for s in SPLITS if s in splits)
    if args.task == "classification":
        width = len(frame["features"].iloc[0])
        labels = frame["label"]
        summary += f"; {width} features per record; labels {labels.min()}..{labels.max()}"
        if args.num_classes is None:
            summary += " (give --num-classes to check the range)"
    print(f"{args.file}: OK, {len(frame)} records ({summary}), {frame['subject_id'].nunique()} subjects")
    return EXIT_OK


def _health(args) -> int:
    """A probe: exit 0 when the server answers SERVING, 1 when it answers anything else, 2 when it cannot be
    reached in time. Health checks need no credentials, only the transport (TLS files with mutual TLS)."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with _client(args) as client:
        try:
            response = health_pb2_grpc.HealthStub(client.channel).Check(
                health_pb2.HealthCheckRequest(service=args.service), timeout=args.timeout_s)
        except grpc.RpcError as error:
            print(f"lethe health: {error.code().name}: {error.details()}", file=sys.stderr)
            return EXIT_ERROR if error.code() in (grpc.StatusCode.UNAVAILABLE,
                                                  grpc.StatusCode.DEADLINE_EXCEEDED) else EXIT_NOT_SUCCEEDED
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)
    print(status)
    return EXIT_OK if response.status == health_pb2.HealthCheckResponse.SERVING else EXIT_NOT_SUCCEEDED


def _token(args) -> int:
    """Print a new bearer token and the ``LETHE_AUTH_TOKENS_FILE`` line that grants it (only its digest)."""
    from service.api.auth import credentials_line, new_token
    from service.domain import Role

    try:
        roles = [Role(role) for role in args.roles.split(",")]
    except ValueError:
        print(f"lethe token: --roles is a comma-separated list of {', '.join(r.value for r in Role)}", file=sys.stderr)
        return EXIT_ERROR
    if not args.name or any(c.isspace() for c in args.name) or not args.name.isprintable():
        print("lethe token: --name must be printable, without spaces", file=sys.stderr)
        return EXIT_ERROR
    token = new_token()
    print(json.dumps({"token": token, "line": credentials_line(roles, args.name, token)}, indent=2))
    return EXIT_OK


def _demo(args) -> int:
    try:
        from lethe_demo.demo import run_demo
    except ImportError:  # the service image ships the service, not the demo
        print("error: the demo is not installed here (it ships with the source tree: `make demo`)", file=sys.stderr)
        return 2

    return run_demo(state_dir=args.state_dir, subjects=args.subjects, keep=args.keep)


# --------------------------------------------------------------------------------------------- helpers
def follow(client, erasures, resume=(), quiet: bool = False, out=None) -> int:
    """Stream ``erasures`` (and/or resume earlier requests), draw progress, print certificates as JSON.
    Returns EXIT_OK when every request SUCCEEDED."""
    from service.api.client import run_session

    out = out or sys.stdout
    board = _board(quiet)
    not_done: dict[str, list[tuple[str, str, str]]] = {}  # request id -> (job, state, reason) of failed jobs
    for erasure in erasures:
        board.add(erasure.request_id)
    for request_id, _ in resume:
        board.add(request_id)

    def on_response(response, entry):
        if entry is None:
            return
        kind = response.WhichOneof("message")
        if kind == "accepted":
            jobs = ", ".join(response.accepted.job_ids) or "no job: nothing to unlearn"
            board.update(entry.request_id, status=f"accepted (durable) {jobs}")
        elif kind == "rejected":
            board.update(entry.request_id, status=f"refused: {response.rejected.message[:60]}", done=True)
        elif response.event.kind != ACCEPTED_EVENT:  # the ack above already said it
            event = response.event
            board.update(list(event.request_ids), status=_state_name(event.state), stage=event.stage,
                         fraction=event.fraction, done=event.kind == TERMINAL_EVENT)
            if event.kind == TERMINAL_EVENT and _state_name(event.state) in ("REJECTED_BY_VERIFICATION", "FAILED"):
                not_done.setdefault(entry.request_id, []).append((event.job_id, _state_name(event.state),
                                                                  event.message))

    result = run_session(client, erasures, on_response, resume=resume)
    board.close()
    ok = True
    for entry in result.requests.values():
        if entry.rejected is not None:
            print(f"{entry.request_id}: refused {_code_name(entry.rejected.code)} {entry.rejected.message}",
                  file=sys.stderr)
            for violation in entry.rejected.field_violations:
                print(f"  {violation.field}: {violation.description}", file=sys.stderr)
            ok = False
            continue
        states = {_state_name(state) for state in entry.states}
        ok = ok and states == {"SUCCEEDED"}
        for job_id, state, reason in not_done.get(entry.request_id, []):
            print(f"{entry.request_id}: job {job_id} {state}: {reason}", file=sys.stderr)
            _print_evidence(client, job_id)
        for certificate in entry.certificates.values():
            print(certificate_json(certificate), file=out)
    return EXIT_OK if ok else EXIT_NOT_SUCCEEDED


def _print_evidence(client, job_id: str) -> None:
    """The failing checks of a rejected job (stderr), so the submitter sees why without another call."""
    from service.api.pb import service_pb2

    if not job_id:
        return
    try:
        job = client.stub.GetJob(service_pb2.GetJobRequest(job_id=job_id), metadata=client.metadata).job
    except grpc.RpcError:  # e.g. a submitter without read access to a coalesced job: the reason above stands
        return
    for line in evidence_summary(job.evidence):
        print(f"  {line}", file=sys.stderr)
    print(f"  (lethe job {job_id} shows the whole evidence; lethe retry / lethe close act on the request)",
          file=sys.stderr)


def _code_name(code: int) -> str:
    """A gRPC status code by name (ALREADY_EXISTS), never a bare number."""
    from google.rpc import code_pb2

    try:
        return code_pb2.Code.Name(code)
    except ValueError:
        return str(code)


def certificate_json(certificate, indent: int | None = None) -> str:
    """A certificate as one JSON document: the signed canonical body and its signature, exactly what
    ``lethe audit verify --certificate FILE`` checks offline."""
    return json.dumps({"request_id": certificate.request_id, "body_json": certificate.body_json,
                       "signature": certificate.signature}, indent=indent)


def _state_name(state: int) -> str:
    from service.api.pb import types_pb2

    return types_pb2.JobState.Name(state).removeprefix("JOB_STATE_")


def _board(quiet: bool):
    from service.api.progress import ProgressBoard

    return ProgressBoard(interactive=False if quiet else None)


def _settings(args):
    from service.settings import Settings

    overrides = {}
    for option, field in (("state_dir", "state_dir"), ("host", "grpc_host"), ("port", "grpc_port"),
                          ("metrics_port", "metrics_port")):
        value = getattr(args, option, None)
        if value is not None:
            overrides[field] = value
    return Settings(**overrides)


def _client(args):
    from service.api.client import Client
    from service.settings import Settings

    settings = Settings()
    target = args.target or f"{settings.grpc_host}:{settings.grpc_port}"
    token = args.token or (settings.auth_token.get_secret_value() if settings.auth_token else None)
    ca = args.tls_ca or settings.tls_ca or settings.tls_client_ca
    cert, key = args.tls_cert or settings.tls_cert, args.tls_key or settings.tls_key
    if bool(cert) != bool(key):
        raise SystemExit("lethe: --tls-cert and --tls-key go together")
    credentials, server_name = None, args.tls_server_name
    if ca or cert:
        from service.api.tls import channel_credentials, first_dns_name

        credentials = channel_credentials(ca, cert, key)
        host = target.rsplit(":", 1)[0].strip("[]")
        if server_name is None and cert and host in LOOPBACK_HOSTS:
            # A probe inside the pod connects to itself with the pod's own certificate, whose names are the
            # service's, not 127.0.0.1: expect the certificate's first DNS name.
            server_name = first_dns_name(cert)
    return Client(target, token, credentials, server_name)


LOOPBACK_HOSTS = ("127.0.0.1", "::1", "localhost")


def _json_list(text: str, option: str) -> list:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise SystemExit(f"error: {option} is not JSON: {error}") from error
    if not isinstance(value, list):
        raise SystemExit(f"error: {option} must be a JSON list")
    return value


def _json_object(text: str, option: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise SystemExit(f"lethe: {option} is not JSON: {error}") from None
    if not isinstance(value, dict):
        raise SystemExit(f"lethe: {option} must be a JSON object")
    return value


def _parse_time(text: str) -> datetime:
    value = datetime.fromisoformat(text)
    return value if value.tzinfo else value.replace(tzinfo=timezone.utc)


def _print_message(message) -> None:
    from google.protobuf import json_format

    print(json.dumps(json_format.MessageToDict(message, preserving_proto_field_name=True), indent=2))


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lethe", description="Lethe machine-unlearning service",
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--log-level", default=None, choices=["DEBUG", "INFO", "WARNING", "ERROR"],
                        help="Lethe's log level (default INFO for serve and worker, WARNING otherwise); DEBUG also "
                             "shows other libraries' warnings and progress bars")
    commands = parser.add_subparsers(dest="command", required=True)

    def client_command(name: str, help_text: str) -> argparse.ArgumentParser:
        command = commands.add_parser(name, help=help_text)
        command.add_argument("--target", help="host:port of the Lethe API (default LETHE_GRPC_HOST:LETHE_GRPC_PORT)")
        command.add_argument("--token", help="bearer token (default LETHE_AUTH_TOKEN)")
        command.add_argument("--tls-ca", help="PEM CA bundle to verify the server (default LETHE_TLS_CA, else "
                             "LETHE_TLS_CLIENT_CA, else the system roots); implies TLS")
        command.add_argument("--tls-cert", help="PEM client certificate for mutual TLS (default LETHE_TLS_CERT)")
        command.add_argument("--tls-key", help="PEM key of --tls-cert (default LETHE_TLS_KEY)")
        command.add_argument("--tls-server-name", help="name the server's certificate must carry (default: the "
                             "target's host; for a loopback target, the first DNS name of --tls-cert)")
        return command

    serve = commands.add_parser("serve", help="run the gRPC API, the job worker and the metrics exporter")
    serve.add_argument("--state-dir", help="state directory (default LETHE_STATE_DIR or .lethe)")
    serve.add_argument("--host", help="bind address (default LETHE_GRPC_HOST)")
    serve.add_argument("--port", type=int, help="gRPC port (default LETHE_GRPC_PORT)")
    serve.add_argument("--metrics-port", type=int, help="/metrics port, 0 = off (default LETHE_METRICS_PORT)")
    serve.add_argument("--grace-s", type=float, default=10.0, help="shutdown grace period for in-flight calls")
    serve.set_defaults(run=_serve)

    worker = commands.add_parser(
        "worker", help="run unlearning jobs from the job store (no API): a loop, or one job with --once",
        description="Run unlearning jobs from the job store, talking only to the store and MLflow. Exit "
                    "status of --once: 0 done (or nothing left to do), 3 the job FAILED (not retryable), "
                    "2 usage, 75 retry later (could not claim, lease lost, store or MLflow unreachable).")
    worker.add_argument("--once", action="store_true", help="run the job --job-id names, then exit")
    worker.add_argument("--job-id", help="the job to run (with --once)")
    worker.add_argument("--attempt", type=int, help="the attempt an executor started this worker for (with --once)")
    worker.add_argument("--state-dir", help="local scratch and caches (default LETHE_STATE_DIR or .lethe)")
    worker.add_argument("--grace-s", type=float, default=30.0, help="on SIGTERM, how long running jobs may finish")
    worker.set_defaults(run=_worker)

    register = client_command("register", "make an MLflow model version unlearnable")
    register.add_argument("--model", required=True, help="registered model name in MLflow")
    which = register.add_mutually_exclusive_group(required=True)
    which.add_argument("--version", help="model version")
    which.add_argument("--alias", help="model alias, e.g. champion")
    register.add_argument("--task", required=True, choices=["classification", "causal_lm"])
    register.add_argument("--dataset", required=True,
                          help="training data URI (Parquet: record_id, subject_id, split, task columns)")
    register.add_argument("--num-classes", type=int)
    register.add_argument("--max-utility-drop", type=float)
    register.add_argument("--class-forget-max-accuracy", type=float)
    register.add_argument("--onnx-tolerance", type=float)
    register.add_argument("--min-forget-p", type=float,
                          help="record erasure: KS p-value floor of erased vs never-seen losses (default 0.005)")
    register.add_argument("--mia-auc-margin", type=float,
                          help="record erasure: loss-attack AUC within 0.5 +- this (default 0.1)")
    register.add_argument("--sealed-retention-days", type=float,
                          help="days each erasure's sealed verification set is kept for later updates' re-checks, "
                               "then crypto-shredded (default 30; 0 keeps nothing)")
    register.add_argument("--reerase-after-update", action=argparse.BooleanOptionalAction, default=None,
                          help="after every update, erase each earlier erasure again (its sealed set, the chain's "
                               "approximate methods), not only one whose re-check fails (default: on for causal "
                               "LMs, off for classifiers)")
    register.add_argument("--method-chain",
                          help='escalation chain as JSON, e.g. \'[{"name": "ssd-auto"}, {"name": "retrain"}]\'; '
                               "default: the task's chain (ssd-auto, shrink-perturb, gu+graddiff, retrain; "
                               "without a factory and recipe: ssd-auto, gu+graddiff)")
    register.add_argument("--default-method", help="a chain of one method (older form of --method-chain)")
    register.add_argument("--method-params", help="JSON object of --default-method's parameters")
    register.add_argument("--model-factory", help="'module:function' building the untrained model (for retrain)")
    register.add_argument("--train-recipe", help="JSON object of the training recipe (for retrain)")
    register.set_defaults(run=_register)

    submit = client_command("submit", "submit an erasure and follow it to its certificates")
    submit.add_argument("--request-id", help="idempotency key (default: a new UUID)")
    submit.add_argument("--subject", action="append", default=[], help="subject id to erase (repeatable)")
    submit.add_argument("--record", action="append", default=[], help="record id to erase (repeatable)")
    submit.add_argument("--class", dest="class_", metavar="CLASS", type=int, action="append", default=[],
                        help="whole class to erase (repeatable)")
    submit.add_argument("--model", action="append", default=[],
                        help="model name (default: every model holding the data)")
    submit.add_argument("--method", help="unlearning method (default: the model policy's)")
    submit.add_argument("--params", help="JSON object of method parameters")
    submit.add_argument("--deadline", help="ISO 8601 time by which the erasure should be complete (refused if "
                        "already passed; a late erasure still completes and its certificate says so)")
    submit.add_argument("--override", action="append", default=[], metavar="NAME=VALUE",
                        help="policy override, e.g. max_utility_drop=0.05 (repeatable)")
    submit.add_argument("--no-wait", action="store_true", help="print the acknowledgement and return")
    submit.add_argument("--quiet", action="store_true", help="log lines instead of redrawn bars")
    submit.set_defaults(run=_submit)

    update = client_command("update", "new records for a model to learn; follow it to its certificate")
    update.add_argument("--model", required=True, help="registered model name")
    records = update.add_mutually_exclusive_group(required=True)
    records.add_argument("--records", help="JSON lines, one record per line: record_id, subject_id and the task's "
                         "columns (features and label; or prompt and answer), sent inline")
    records.add_argument("--dataset", help="Parquet file with the registered dataset's columns (read by the server, "
                         "inside LETHE_DATASET_ROOTS)")
    update.add_argument("--strategy", help="continual-learning strategy (default: the model policy's)")
    update.add_argument("--params", help="JSON object of the strategy's parameters")
    update.add_argument("--request-id", help="idempotency key (default: a new UUID)")
    update.add_argument("--deadline", help="ISO 8601 time by which the update should be complete")
    update.add_argument("--no-wait", action="store_true", help="print the acknowledgement and return")
    update.add_argument("--quiet", action="store_true", help="log lines instead of redrawn bars")
    update.set_defaults(run=_update)

    rectify = client_command("rectify", "correct existing records of a subject (GDPR Art. 16): the old values "
                             "are erased and the corrected ones learned, under one certificate")
    rectify.add_argument("--subject", required=True, help="the data subject whose records are corrected")
    rectify.add_argument("--set", nargs=2, action="append", required=True, metavar=("RECORD_ID", "JSON"),
                         help='corrected columns of one record, e.g. --set person-3-q2 \'{"prompt": "...", '
                              '"answer": "..."}\' (repeatable)')
    rectify.add_argument("--model", action="append", default=[], help="model name (default: every model holding it)")
    rectify.add_argument("--strategy", help="continual-learning strategy (default: the model policy's)")
    rectify.add_argument("--params", help="JSON object of the strategy's parameters")
    rectify.add_argument("--request-id", help="idempotency key (default: a new UUID)")
    rectify.add_argument("--deadline", help="ISO 8601 time by which the rectification should be complete")
    rectify.add_argument("--no-wait", action="store_true", help="print the acknowledgement and return")
    rectify.add_argument("--quiet", action="store_true", help="log lines instead of redrawn bars")
    rectify.set_defaults(run=_rectify)

    watch = client_command("watch", "follow earlier requests (or one job) to their end")
    watch.add_argument("--request-id", action="append", default=[], help="request to follow (repeatable)")
    watch.add_argument("--job", help="follow one job instead")
    watch.add_argument("--after-seq", type=int, default=0, help="resume after this event seq")
    watch.add_argument("--quiet", action="store_true", help="log lines instead of redrawn bars")
    watch.set_defaults(run=_watch)

    jobs = client_command("jobs", "list jobs by state, model and age")
    jobs.add_argument("--state", action="append", default=[],
                      choices=["QUEUED", "RUNNING", "SUCCEEDED", "REJECTED_BY_VERIFICATION", "FAILED", "CANCELLED"])
    jobs.add_argument("--model")
    jobs.add_argument("--min-age-s", type=float)
    jobs.add_argument("--limit", type=int, default=100)
    jobs.set_defaults(run=_jobs)

    pending = client_command("pending", "requests without a final certificate, with their age")
    pending.set_defaults(run=_pending)

    certificate = client_command("certificate", "print a request's certificates")
    certificate.add_argument("request_id")
    certificate.add_argument("--verify", action="store_true", help="also verify each with the server")
    certificate.set_defaults(run=_certificate)

    job = client_command("job", "one job: state, stage, each attempt's method and gate verdict, the reason")
    job.add_argument("job_id")
    job.set_defaults(run=_job)

    request = client_command("request", "one request: state, attempts, jobs, certified models")
    request.add_argument("request_id")
    request.set_defaults(run=_request)

    cancel = client_command("cancel", "cancel a request none of whose jobs has run (operator)")
    cancel.add_argument("request_id")
    cancel.add_argument("--reason", help="why (recorded in the request and the audit chain)")
    cancel.set_defaults(run=_cancel)

    retry = client_command("retry", "a new attempt for a rejected or failed request, same request id (operator)")
    retry.add_argument("request_id")
    retry.add_argument("--method", help="another unlearning method (default: the request's, or the policy chain)")
    retry.add_argument("--params", help="JSON object of the method's parameters")
    retry.add_argument("--override", action="append", default=[], metavar="NAME=VALUE",
                       help="a STRICTER policy value, e.g. min_forget_p=0.01 (repeatable)")
    retry.add_argument("--expected-attempt", type=int, default=0,
                       help="the attempt this creates (idempotent: repeating the call returns it); 0 = the next")
    retry.set_defaults(run=_retry)

    close = client_command("close", "end a request with a written reason, e.g. handled by a manual retrain (operator)")
    close.add_argument("request_id")
    close.add_argument("--reason", required=True, help="why the request is closed (recorded and audited)")
    close.set_defaults(run=_close)

    health = client_command("health", "probe the server's health (exit 0 when SERVING); no credentials needed")
    health.add_argument("--service", default="", help="service name to check (default: the whole server)")
    health.add_argument("--timeout-s", type=float, default=5.0, help="give up after this many seconds")
    health.set_defaults(run=_health)

    token = commands.add_parser("token", help="print a new bearer token and its LETHE_AUTH_TOKENS_FILE line")
    token.add_argument("--roles", required=True, help="comma-separated: submitter, auditor, operator")
    token.add_argument("--name", required=True, help="identity name (owns the requests it submits)")
    token.set_defaults(run=_token)

    audit = commands.add_parser("audit", help="offline audit tools")
    audit_commands = audit.add_subparsers(dest="audit_command", required=True)
    verify = audit_commands.add_parser("verify", help="check the hash chain and every certificate offline")
    verify.add_argument("--state-dir", default=None,
                        help="embedded state directory (default LETHE_STATE_DIR or .lethe)")
    verify.add_argument("--store-url", help="SQLAlchemy URL of the job store (default LETHE_JOB_STORE_URL when set, "
                        "instead of --state-dir)")
    verify.add_argument("--key-file", help="hex audit key (default LETHE_AUDIT_KEY, else <state-dir>/keys/audit.key)")
    verify.add_argument("--certificate", help="also check one certificate (JSON with body_json and signature)")
    verify.set_defaults(run=_audit_verify)

    _dataset_parser(commands)

    demo = commands.add_parser("demo", help="train, register, serve and erase on the digits model, end to end")
    demo.add_argument("--state-dir", help="state directory (default: a fresh temporary one)")
    demo.add_argument("--subjects", type=int, default=20, help="subject erasures to stream (default 20)")
    demo.add_argument("--keep", action="store_true", help="keep the temporary state directory")
    demo.set_defaults(run=_demo)
    return parser


def _dataset_parser(commands) -> None:
    dataset = commands.add_parser("dataset", help="offline dataset tools (no server needed)")
    dataset_commands = dataset.add_subparsers(dest="dataset_command", required=True)
    check = dataset_commands.add_parser(
        "check", help="report every schema problem of a Parquet dataset, with row and column",
        description="Check a Parquet file against Lethe's dataset schema (docs/models.md) without a server: "
                    "every problem is printed with its column and rows (0-based positions in the file). "
                    "Exit status 0 when the file is clean, 2 otherwise.")
    check.add_argument("file", help="the Parquet file")
    check.add_argument("--task", required=True, choices=["classification", "causal_lm"])
    check.add_argument("--num-classes", type=int, help="classification: labels must lie in [0, N)")
    check.add_argument("--max-rows", type=int, default=20, help="rows listed per problem (default 20); all are "
                                                                "counted")
    check.set_defaults(run=_dataset_check)


if __name__ == "__main__":
    sys.exit(main())
