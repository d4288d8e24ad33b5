"""Protobuf <-> domain conversions, and nothing else.

Servicer methods stay a few lines because every translation lives here. Converters check only what the
protobuf shape makes possible and the domain cannot express (an UNSPECIFIED enum, an out-of-range
Timestamp, a page size); the engine validates the content (ids, methods, parameters, models) and raises
:class:`service.domain.InvalidArgument` with field paths relative to the message that carries the field,
e.g. ``subject_ids[3]`` in an ``Erasure``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from datetime import datetime, timezone
from typing import Any

from google.protobuf import json_format, struct_pb2, timestamp_pb2

from service import domain
from service.api.pb import service_pb2, types_pb2

MAX_PAGE_SIZE = 1000
MAX_AGE_S = 100 * 366 * 86400  # a filter age beyond any request's life (and within datetime's range)
DEFAULT_PAGE_SIZE = 100

_OVERRIDE_FIELDS = ("max_utility_drop", "class_forget_max_accuracy", "onnx_tolerance", "min_forget_p",
                    "mia_auc_margin")
_POLICY_FIELDS = (*_OVERRIDE_FIELDS, "min_update_fit")
_REPLACED_FIELD = ("record_forget_margin", "replaced by min_forget_p and mia_auc_margin: record erasure is gated on "
                                          "the membership test, not on accuracy")


# ------------------------------------------------------------------------------------- proto -> domain
def erasure_from_proto(erasure: types_pb2.Erasure, submitter_hash: str | None = None) -> domain.ErasureRequest:
    """Field paths in errors are relative to the ``Erasure`` message (``deadline``, not ``erasure.deadline``),
    so a refusal names the same path on the unary call and on the stream (see
    :class:`service.domain.FieldViolation`). ``submitter_hash`` is the authenticated caller's, never the
    client's word."""
    return domain.ErasureRequest(
        request_id=erasure.request_id,
        subject_ids=tuple(erasure.subject_ids),
        record_ids=tuple(erasure.record_ids),
        classes=tuple(erasure.classes),
        model_names=tuple(erasure.model_names),
        method=erasure.method or None,
        method_params=struct_to_dict(erasure.method_params, "method_params"),
        deadline=(timestamp_to_datetime(erasure.deadline, "deadline")
                  if erasure.HasField("deadline") else None),
        policy_overrides=_overrides_from_proto(erasure.policy_overrides, "policy_overrides")
        if erasure.HasField("policy_overrides") else {},
        submitter_hash=submitter_hash,
    )


def update_from_proto(update: types_pb2.Update, submitter_hash: str | None = None) -> domain.UpdateSubmission:
    """Paths in errors are relative to the ``Update`` message (``records[2].columns.label``)."""
    return domain.UpdateSubmission(
        request_id=update.request_id, model_name=update.model_name,
        records=tuple(_record_from_proto(record, f"records[{index}]") for index, record in enumerate(update.records)),
        dataset_uri=update.dataset_uri or None, strategy=update.strategy or None,
        strategy_params=struct_to_dict(update.strategy_params, "strategy_params"),
        deadline=timestamp_to_datetime(update.deadline, "deadline") if update.HasField("deadline") else None,
        submitter_hash=submitter_hash)


def rectification_from_proto(rectification: types_pb2.Rectification,
                             submitter_hash: str | None = None) -> domain.RectificationSubmission:
    return domain.RectificationSubmission(
        request_id=rectification.request_id, subject_id=rectification.subject_id,
        corrected=tuple(_record_from_proto(record, f"corrected_records[{index}]")
                        for index, record in enumerate(rectification.corrected_records)),
        model_names=tuple(rectification.model_names), strategy=rectification.strategy or None,
        strategy_params=struct_to_dict(rectification.strategy_params, "strategy_params"),
        deadline=(timestamp_to_datetime(rectification.deadline, "deadline")
                  if rectification.HasField("deadline") else None),
        submitter_hash=submitter_hash)


def _record_from_proto(record: types_pb2.Record, path: str) -> domain.NewRecord:
    return domain.NewRecord(record.record_id, record.subject_id, struct_to_dict(record.columns, f"{path}.columns"))


def registration_from_proto(request: service_pb2.RegisterModelRequest) -> domain.ModelRegistration:
    which = request.WhichOneof("model_version")
    return domain.ModelRegistration(
        model_name=request.model_name,
        version=request.version if which == "version" else None,
        alias=request.alias if which == "alias" else None,
        task_type=task_type_from_proto(request.task_type, "task_type"),
        dataset_uri=request.dataset_uri,
        policy=policy_from_proto(request.policy) if request.HasField("policy") else domain.VerificationPolicy(),
        num_classes=request.num_classes or None,
        model_factory=request.model_factory or None,
        train_recipe=struct_to_dict(request.train_recipe, "train_recipe"),
        chain_from_default_method=request.HasField("policy") and bool(request.policy.default_method),
    )


def policy_from_proto(policy: types_pb2.VerificationPolicy) -> domain.VerificationPolicy:
    """Unset fields keep the domain defaults, so a client states only what differs.

    ``method_chain`` is the full form of the escalation chain; an older client's ``default_method`` (with
    ``method_params``) is a chain of that one method. Giving both is refused.
    """
    if policy.HasField(_REPLACED_FIELD[0]):
        raise domain.InvalidArgument("invalid policy", (domain.FieldViolation(f"policy.{_REPLACED_FIELD[0]}",
                                                                              _REPLACED_FIELD[1]),))
    values: dict[str, Any] = {name: getattr(policy, name) for name in _POLICY_FIELDS if policy.HasField(name)}
    chain = [domain.MethodStep(step.name, struct_to_dict(step.params, f"policy.method_chain[{index}].params"))
             for index, step in enumerate(policy.method_chain)]
    if policy.default_method:
        if chain:
            raise domain.InvalidArgument("invalid policy", (domain.FieldViolation(
                "policy.default_method", "give either method_chain or default_method, not both"),))
        chain = [domain.MethodStep(policy.default_method, struct_to_dict(policy.method_params,
                                                                         "policy.method_params"))]
    elif policy.HasField("method_params") and policy.method_params.fields:
        raise domain.InvalidArgument("invalid policy", (domain.FieldViolation(
            "policy.method_params", "method_params belong to default_method; use method_chain[i].params"),))
    values["method_chain"] = tuple(chain)
    if policy.superseded_versions:
        values["superseded_versions"] = policy.superseded_versions
    if policy.HasField("update_strategy"):
        values["update_strategy"] = domain.MethodStep(policy.update_strategy.name,
                                                      struct_to_dict(policy.update_strategy.params))
    if policy.HasField("sealed_retention_days"):  # bounded by the engine (policy.sealed_retention_days)
        values["sealed_retention_days"] = policy.sealed_retention_days
    if policy.HasField("reerase_after_update"):
        values["reerase_after_update"] = policy.reerase_after_update
    return domain.VerificationPolicy(**values)


def job_filter_from_proto(request: service_pb2.ListJobsRequest, max_id_length: int = 256) -> domain.JobFilter:
    if request.model_name and domain.id_problem(request.model_name, max_id_length):
        raise domain.InvalidArgument("invalid model_name", (domain.FieldViolation(
            "model_name", domain.id_problem(request.model_name, max_id_length)),))
    if len(request.states) > len(types_pb2.JobState.values()):
        raise domain.InvalidArgument("too many states", (domain.FieldViolation(
            "states", "name each state at most once"),))
    if not 0 <= request.page_size <= MAX_PAGE_SIZE:
        raise domain.InvalidArgument("page_size out of range", (domain.FieldViolation(
            "page_size", f"must be between 0 (default {DEFAULT_PAGE_SIZE}) and {MAX_PAGE_SIZE}"),))
    min_age_s = None
    if request.HasField("min_age"):
        min_age_s = request.min_age.seconds + request.min_age.nanos / 1e9
        if not 0 <= min_age_s <= MAX_AGE_S:
            raise domain.InvalidArgument("min_age out of range", (domain.FieldViolation(
                "min_age", f"must lie between 0 and {MAX_AGE_S} seconds (100 years)"),))
    return domain.JobFilter(
        states=tuple(job_state_from_proto(state, f"states[{index}]") for index, state in enumerate(request.states)),
        model_name=request.model_name or None,
        min_age_s=min_age_s,
        limit=request.page_size or DEFAULT_PAGE_SIZE,
    )


def certificate_from_proto(certificate: types_pb2.Certificate) -> domain.Certificate:
    return domain.Certificate(certificate.request_id, certificate.body_json, certificate.signature)


def task_type_from_proto(value: int, field: str) -> domain.TaskType:
    if value == types_pb2.TASK_TYPE_UNSPECIFIED or value not in types_pb2.TaskType.values():
        raise domain.InvalidArgument("task_type is required", (domain.FieldViolation(
            field, f"must be one of {', '.join(_enum_names(types_pb2.TaskType))}"),))
    return domain.TaskType(types_pb2.TaskType.Name(value).removeprefix("TASK_TYPE_").lower())


def job_state_from_proto(value: int, field: str) -> domain.JobState:
    if value == types_pb2.JOB_STATE_UNSPECIFIED or value not in types_pb2.JobState.values():
        raise domain.InvalidArgument("unknown job state", (domain.FieldViolation(
            field, f"must be one of {', '.join(_enum_names(types_pb2.JobState))}"),))
    return domain.JobState(types_pb2.JobState.Name(value).removeprefix("JOB_STATE_"))


def _overrides_from_proto(overrides: types_pb2.PolicyOverrides, field: str) -> dict[str, float]:
    if overrides.HasField(_REPLACED_FIELD[0]):
        raise domain.InvalidArgument("invalid policy override", (domain.FieldViolation(
            f"{field}.{_REPLACED_FIELD[0]}", _REPLACED_FIELD[1]),))
    values = {name: getattr(overrides, name) for name in _OVERRIDE_FIELDS if overrides.HasField(name)}
    for name, value in values.items():
        if not math.isfinite(value):
            raise domain.InvalidArgument("policy override is not finite", (domain.FieldViolation(
                f"{field}.{name}", f"must be a finite number, got {value}"),))
    return values


# ------------------------------------------------------------------------------------- domain -> proto
def accepted_to_proto(outcome: domain.SubmitOutcome) -> types_pb2.SubmissionAccepted:
    return types_pb2.SubmissionAccepted(request_id=outcome.request_id, job_ids=list(outcome.job_ids),
                                        created=outcome.created, first_event_seq=outcome.first_event_seq)


def job_to_proto(job: domain.JobView) -> types_pb2.Job:
    message = types_pb2.Job(
        job_id=job.job_id, model_name=job.model_name, base_version=job.base_version,
        state=job_state_to_proto(job.state), stage=job.stage, progress=job.progress, method=job.method,
        request_ids=list(job.request_ids), records=job.records, result_version=job.result_version or "",
        message=job.message,
    )
    message.create_time.CopyFrom(datetime_to_timestamp(job.created_at))
    message.update_time.CopyFrom(datetime_to_timestamp(job.updated_at))
    message.evidence.CopyFrom(dict_to_struct(job.evidence))
    return message


def event_to_proto(event: domain.JobEvent) -> types_pb2.JobEvent:
    """A TERMINAL event of a succeeded job settles one request and carries that request's certificate."""
    certificates = [event.certificate] if event.certificate is not None else []
    message = types_pb2.JobEvent(
        seq=event.seq, job_id=event.job_id, request_ids=list(event.request_ids),
        kind=types_pb2.EventKind.Value(f"EVENT_KIND_{event.kind.value}"), state=job_state_to_proto(event.state),
        stage=event.stage, fraction=event.fraction, message=event.message,
        certificates=[certificate_to_proto(certificate) for certificate in certificates],
    )
    message.time.CopyFrom(datetime_to_timestamp(event.time))
    return message


def retry_from_proto(request: service_pb2.RetryRequestRequest) -> domain.RetryRequest:
    return domain.RetryRequest(
        request_id=request.request_id, expected_attempt=request.expected_attempt, method=request.method or None,
        method_params=struct_to_dict(request.method_params),
        policy_overrides=_overrides_from_proto(request.policy_overrides, "policy_overrides")
        if request.HasField("policy_overrides") else {})


def request_to_proto(view: domain.RequestView) -> types_pb2.RequestStatus:
    message = types_pb2.RequestStatus(
        request_id=view.request_id, kind=view.kind, state=types_pb2.RequestState.Value(f"REQUEST_STATE_{view.state.value}"),
        receive_time=datetime_to_timestamp(view.received_at), attempts=view.attempts, job_ids=list(view.job_ids),
        certified_models=list(view.certified_models), state_reason=view.state_reason)
    if view.completed_at is not None:
        message.complete_time.CopyFrom(datetime_to_timestamp(view.completed_at))
    if view.deadline is not None:
        message.deadline.CopyFrom(datetime_to_timestamp(view.deadline))
    return message


def retry_to_proto(outcome: domain.RetryOutcome) -> service_pb2.RetryRequestResponse:
    return service_pb2.RetryRequestResponse(request=request_to_proto(outcome.request), job_ids=list(outcome.job_ids),
                                            attempt=outcome.attempt, created=outcome.created)


def certificate_to_proto(certificate: domain.Certificate) -> types_pb2.Certificate:
    return types_pb2.Certificate(request_id=certificate.request_id, body_json=certificate.body_json,
                                 signature=certificate.signature)


def registered_model_to_proto(model: domain.RegisteredModel) -> types_pb2.RegisteredModel:
    policy = model.policy
    message = types_pb2.RegisteredModel(
        model_name=model.model_name, version=model.version, serving_alias=model.serving_alias,
        task_type=types_pb2.TaskType.Value(f"TASK_TYPE_{model.task_type.value.upper()}"),
        dataset_digest=model.dataset_digest, records=model.records,
        policy=types_pb2.VerificationPolicy(superseded_versions=policy.superseded_versions,
                                            sealed_retention_days=policy.sealed_retention_days,
                                            **{name: getattr(policy, name) for name in _POLICY_FIELDS}),
    )
    if policy.reerase_after_update is not None:  # set at registration (unset: the task's default)
        message.policy.reerase_after_update = policy.reerase_after_update
    for step in policy.method_chain:
        message.policy.method_chain.add(name=step.name).params.CopyFrom(dict_to_struct(step.params))
    if policy.update_strategy is not None:
        message.policy.update_strategy.name = policy.update_strategy.name
        message.policy.update_strategy.params.CopyFrom(dict_to_struct(policy.update_strategy.params))
    return message


def check_to_proto(check: domain.CertificateCheck) -> service_pb2.VerifyCertificateResponse:
    return service_pb2.VerifyCertificateResponse(valid=check.valid, reason=check.reason)


def pending_to_proto(pending: Iterable[domain.PendingRequest],
                     now: datetime | None = None) -> service_pb2.ListPendingRequestsResponse:
    """Oldest first. ``overdue`` is the engine's (it read the store and the clock together); ages are taken
    from ``now`` here, at the moment of the answer."""
    now = now or datetime.now(timezone.utc)
    response = service_pb2.ListPendingRequestsResponse()
    for request in sorted(pending, key=lambda item: _aware(item.received_at)):
        age_s = max((now - _aware(request.received_at)).total_seconds(), 0.0)
        entry = response.pending_requests.add(request_id=request.request_id, age_seconds=age_s,
                                              overdue=request.overdue)
        entry.receive_time.CopyFrom(datetime_to_timestamp(request.received_at))
        if request.deadline is not None:
            entry.deadline.CopyFrom(datetime_to_timestamp(request.deadline))
        response.oldest_age_seconds = max(response.oldest_age_seconds, age_s)
        response.overdue_count += int(request.overdue)
    return response


def job_state_to_proto(state: domain.JobState) -> int:
    return types_pb2.JobState.Value(f"JOB_STATE_{state.value}")


# ------------------------------------------------------------------------------------- scalars
def struct_to_dict(struct: struct_pb2.Struct, field: str = "") -> dict[str, Any]:
    """A Struct as JSON-like values; NaN and infinities (which JSON cannot hold) are INVALID_ARGUMENT."""
    try:
        return json_format.MessageToDict(struct)
    except ValueError:
        raise domain.InvalidArgument("a parameter is not a finite number", (domain.FieldViolation(
            field or "struct", "numbers must be finite (no NaN or infinity)"),)) from None


def dict_to_struct(values: Mapping[str, Any] | None) -> struct_pb2.Struct:
    """Any JSON-like mapping; numpy scalars and other odd values go through ``str`` rather than failing."""
    struct = struct_pb2.Struct()
    if values:
        struct.update(json.loads(json.dumps(dict(values), default=_jsonable)))
    return struct


def datetime_to_timestamp(value: datetime) -> timestamp_pb2.Timestamp:
    timestamp = timestamp_pb2.Timestamp()
    timestamp.FromDatetime(_aware(value))
    return timestamp


def timestamp_to_datetime(timestamp: timestamp_pb2.Timestamp, field: str) -> datetime:
    try:
        return timestamp.ToDatetime(tzinfo=timezone.utc)
    except (ValueError, OverflowError) as error:
        raise domain.InvalidArgument("invalid timestamp", (domain.FieldViolation(field, str(error)),)) from None


def _aware(value: datetime) -> datetime:
    """The domain uses UTC; a naive datetime from the store is taken as UTC, not local time."""
    return value if value.tzinfo is not None else value.replace(tzinfo=timezone.utc)


def _jsonable(value: Any) -> Any:
    if hasattr(value, "tolist"):  # numpy / torch scalars and arrays
        return value.tolist()
    if isinstance(value, (set, frozenset, tuple)):
        return sorted(value, key=str)
    return str(value)


def _enum_names(enum_type) -> list[str]:
    return [name for name in enum_type.keys() if not name.endswith("_UNSPECIFIED")]
