"""The ``lethe.v1.UnlearningService`` servicer: convert the request, call the engine, convert back.

No method catches exceptions: domain errors and bugs alike propagate to the error interceptor
(:mod:`service.api.server`), which maps them in ONE place (:mod:`service.api.errors`). Who may call a method
is the role table next to that map; what a caller may READ (a submitter: only its own requests) is
:class:`service.api.scope.Scope`.
"""

from __future__ import annotations

from service import domain
from service.api import converters
from service.api.interceptors import identity_of
from service.api.limits import ApiLimits
from service.api.pb import SERVICE_NAME, service_grpc, service_pb2
from service.api.scope import Scope
from service.api.session import DEFAULT_POLL_S, SessionStream, watch_job


class UnlearningServicer(service_grpc.UnlearningServiceServicer):
    def __init__(self, engine: domain.EngineProtocol, poll_s: float = DEFAULT_POLL_S,
                 limits: ApiLimits | None = None):
        self._engine = engine
        self._poll_s = poll_s
        self._limits = limits or ApiLimits()

    def _scope(self, context, method: str) -> Scope:
        return Scope(self._engine, identity_of(context), self._limits, f"/{SERVICE_NAME}/{method}")

    def Session(self, request_iterator, context):
        return SessionStream(self._engine, request_iterator, context, self._poll_s,
                             self._scope(context, "Session")).responses()

    def SubmitErasure(self, request, context):
        submitter = self._scope(context, "SubmitErasure").submitter_hash
        erasure = converters.erasure_from_proto(request.erasure, submitter)
        outcome = self._engine.submit_erasure(erasure)
        return service_pb2.SubmitErasureResponse(accepted=converters.accepted_to_proto(outcome))

    def GetJob(self, request, context):
        job = self._scope(context, "GetJob").job(request.job_id)
        return service_pb2.GetJobResponse(job=converters.job_to_proto(job))

    def WatchJob(self, request, context):
        return watch_job(self._engine, request.job_id, request.after_seq, self._poll_s, context,
                         self._scope(context, "WatchJob"))

    def ListJobs(self, request, context):
        jobs = self._engine.list_jobs(converters.job_filter_from_proto(request, self._limits.max_id_length))
        return service_pb2.ListJobsResponse(jobs=[converters.job_to_proto(job) for job in jobs])

    def ListPendingRequests(self, request, context):
        return converters.pending_to_proto(self._engine.pending_requests())

    def GetCertificate(self, request, context):
        self._scope(context, "GetCertificate").require_request(request.request_id)
        certificates = self._engine.get_certificate(request.request_id)
        return service_pb2.GetCertificateResponse(
            certificates=[converters.certificate_to_proto(certificate) for certificate in certificates])

    def VerifyCertificate(self, request, context):
        certificate = converters.certificate_from_proto(request.certificate)
        return converters.check_to_proto(self._engine.verify_certificate(certificate.body_json, certificate.signature))

    def RegisterModel(self, request, context):
        model = self._engine.register_model(converters.registration_from_proto(request))
        return service_pb2.RegisterModelResponse(model=converters.registered_model_to_proto(model))

    def GetRequest(self, request, context):
        self._scope(context, "GetRequest").require_request(request.request_id)
        return service_pb2.GetRequestResponse(request=converters.request_to_proto(
            self._engine.get_request(request.request_id)))

    def CancelRequest(self, request, context):
        view = self._engine.cancel_request(request.request_id, request.reason)
        return service_pb2.CancelRequestResponse(request=converters.request_to_proto(view))

    def RetryRequest(self, request, context):
        return converters.retry_to_proto(self._engine.retry_request(converters.retry_from_proto(request)))

    def CloseRequest(self, request, context):
        view = self._engine.close_request(request.request_id, request.reason)
        return service_pb2.CloseRequestResponse(request=converters.request_to_proto(view))

    def SubmitRectification(self, request, context):
        submitter = self._scope(context, "SubmitRectification").submitter_hash
        outcome = self._engine.submit_rectification(converters.rectification_from_proto(request.rectification,
                                                                                        submitter))
        return service_pb2.SubmitRectificationResponse(accepted=converters.accepted_to_proto(outcome))

    def SubmitUpdate(self, request, context):
        submitter = self._scope(context, "SubmitUpdate").submitter_hash
        outcome = self._engine.submit_update(converters.update_from_proto(request.update, submitter))
        return service_pb2.SubmitUpdateResponse(accepted=converters.accepted_to_proto(outcome))
