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
from service.api.session import CONTINUAL_LEARNING_NOT_BUILT, DEFAULT_POLL_S, SessionStream, watch_job


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

    def SubmitRectification(self, request, context):
        raise domain.Unimplemented(CONTINUAL_LEARNING_NOT_BUILT.format(kind="Rectification"))

    def SubmitUpdate(self, request, context):
        raise domain.Unimplemented(CONTINUAL_LEARNING_NOT_BUILT.format(kind="Update"))
