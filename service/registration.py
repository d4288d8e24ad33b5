"""Registration: make an MLflow model version unlearnable, after checking everything it will need.

Nothing is written until every check passed: the request's fields, the policy, the training recipe
(converted by its field types), that the dataset lies inside an accepted dataset root
(``Settings.dataset_roots``; refusals say nothing about the server's files), that the version was not trained
on data erased since, how the version was logged (flavor and serialization format), the dataset's schema, that
the model loads and accepts the data (a forward pass; for causal LMs the tokenizer, context and vocabulary),
that the model factory builds the same model, that every method of the chain can run on the model (the task
capability: a method's tasks and model check), and that no record of the dataset was erased before
(tombstones): the model contract of docs/models.md, checked by :mod:`service.contract`. Then, in order: Lethe's
own copy of the dataset, the MLflow version's tags, the serving alias, and one store transaction with the audit
entry.
"""

from __future__ import annotations

from dataclasses import asdict, replace
from typing import Any

from service import contract, lm_support
from service import store as db
from service.context import PipelineContext
from service.datasets import read_parquet, record_tombstone, resolve_dataset_uri, validate_frame
from service.domain import (
    FailedPrecondition,
    FieldViolation,
    InvalidArgument,
    MethodStep,
    ModelRegistration,
    NotFound,
    RegisteredModel,
    TaskType,
    VerificationPolicy,
    id_problem,
    preview,
)
from service.verification import policy_violations
from unlearn import registry as methods
from unlearn.chain import default_chain
from unlearn.errors import InvalidParameterError, UnknownMethodError


class Registrar:
    """Implements ``EngineProtocol.register_model``."""

    def __init__(self, ctx: PipelineContext):
        self.ctx = ctx

    def register_model(self, registration: ModelRegistration) -> RegisteredModel:
        """Validate everything, then write the dataset copy, MLflow tags and the store rows."""
        version, frame, policy, training = self._validate_registration(registration)
        policy = _with_default_reerase(_with_default_chain(policy, registration), registration)
        violations = self._tombstone_violations(frame)
        if violations:
            raise InvalidArgument("the model cannot be registered", tuple(violations))

        path, digest = self.ctx.catalog.write_version(registration.model_name, frame, f"registered-v{version}")
        mlflow_version = self.ctx.registry.resolve(registration.model_name, version)
        artifact_uri = self.ctx.registry.attach_dataset(mlflow_version, path, {
            "lethe.unlearnable": "true", "lethe.task_type": registration.task_type.value,
            "lethe.num_classes": str(registration.num_classes or 0), "lethe.policy": _policy_json(policy),
            "lethe.training": training, "lethe.dataset_digest": digest,
            "lethe.code_version": self.ctx.settings.code_version})
        alias = registration.alias or self.ctx.settings.serving_alias  # the alias the platform team serves
        self.ctx.registry.set_serving(registration.model_name, version, alias)
        with self.ctx.store.write() as conn:
            db.upsert_model(conn, registration.model_name, version, registration.task_type.value,
                            registration.num_classes, _policy_json(policy), training, alias)
            db.insert_dataset_version(conn, registration.model_name, digest, str(path), len(frame), version, None,
                                      artifact_uri)
            self.ctx.audit.append(conn, "model_registered", {
                "model_name": registration.model_name, "version": version, "dataset_digest": digest,
                "records": len(frame), "policy": _policy_json(policy), "code_version": self.ctx.settings.code_version})
        return RegisteredModel(registration.model_name, version, alias, registration.task_type, digest, len(frame),
                               policy)

    def _validate_registration(self, registration: ModelRegistration):
        """Every check, cheapest first (docs/models.md, :mod:`service.contract`); returns (version, dataset
        frame, policy, the training to store with its recipe converted)."""
        violations: list[FieldViolation] = []
        limit = self.ctx.settings.max_id_length
        problem = id_problem(registration.model_name, limit)
        if problem:
            violations.append(FieldViolation("model_name", problem))
        if bool(registration.version) == bool(registration.alias):
            violations.append(FieldViolation("version", "give exactly one of version or alias"))
        for name in ("version", "alias"):
            value = getattr(registration, name)
            if value and id_problem(value, limit):
                violations.append(FieldViolation(name, id_problem(value, limit)))
        if registration.task_type is TaskType.CLASSIFICATION and (registration.num_classes is None
                                                                  or registration.num_classes < 2):
            violations.append(FieldViolation("num_classes", "a classifier needs num_classes >= 2"))
        violations += _policy_violations(registration.policy, registration.chain_from_default_method,
                                         _has_training(registration))
        recipe, training_violations = contract.training_violations(registration.model_factory,
                                                                   registration.train_recipe, limit)
        violations += training_violations
        if violations:
            raise InvalidArgument("invalid model registration", tuple(violations))
        # The location is checked before MLflow or the file system is touched: a URI outside the dataset
        # roots gets the same answer whether or not it exists.
        location = resolve_dataset_uri(registration.dataset_uri, self.ctx.settings.dataset_roots,
                                       self.ctx.settings.dataset_import_dir)
        if not self.ctx.registry.model_exists(registration.model_name):
            raise NotFound(f"MLflow has no registered model {preview(registration.model_name)}",
                           (FieldViolation("model_name", "no such registered model in MLflow"),))
        resolved = self.ctx.registry.resolve(registration.model_name, registration.version, registration.alias)
        version = str(resolved.version)
        self._refuse_erased_versions(registration.model_name, version, resolved.tags)
        version_field = "version" if registration.version else "alias"
        refusal = contract.format_refusal(self.ctx.registry.flavor_info(registration.model_name, version),
                                          registration.task_type, version_field)
        if refusal is not None:
            raise refusal
        frame = read_parquet(location)
        violations = validate_frame(frame, registration.task_type, registration.num_classes, limit)
        if violations:
            raise InvalidArgument("the dataset cannot be registered", tuple(violations))
        violations = self._model_violations(registration, version, version_field, frame, recipe)
        if violations:
            raise InvalidArgument("the model does not fit its registration", tuple(violations))
        return version, frame, registration.policy, contract.stored_training(registration.model_factory, recipe)

    def _model_violations(self, registration: ModelRegistration, version: str, version_field: str, frame,
                          recipe) -> list[FieldViolation]:
        """Load the version; it must take the dataset's rows, and the factory must build the same model."""
        try:
            if registration.task_type is TaskType.CAUSAL_LM:
                model, tokenizer = self.ctx.registry.load_lm(registration.model_name, version)
            else:
                model = self.ctx.registry.load_model(registration.model_name, version)
        except Exception as error:  # the client's model and code: a failure to load is theirs to fix
            raise contract.load_refusal(error, version_field) from error
        if registration.task_type is TaskType.CAUSAL_LM:  # tokenizer, context and vocabulary checks
            violations = lm_support.registration_violations(model, tokenizer, frame)
        else:
            violations = (contract.forward_violations(model, frame, registration.num_classes)
                          or contract.onnx_violations(model, frame, registration.policy.onnx_tolerance))
        if registration.model_factory and recipe is not None:
            violations += contract.factory_violations(registration.model_factory, recipe.seed, model)
        chain = _with_default_chain(registration.policy, registration).method_chain
        for index, step in enumerate(chain):  # every method of the chain can run on this model
            reason = methods.unsupported_reason(step.name, registration.task_type.value, model)
            if reason:
                violations.append(FieldViolation("policy.default_method" if registration.chain_from_default_method
                                                 else f"policy.method_chain[{index}].name", reason))
        return violations

    def _refuse_erased_versions(self, name: str, version: str, tags: dict[str, str]) -> None:
        """A version trained on data erased since may never serve again: not after a purge or archive
        (``lethe.superseded_by``), and not while Lethe's lineage shows erasures that started from it or a
        later version (the head of the lineage, which carries none of them, may be registered again)."""
        with self.ctx.store.read() as conn:
            row = db.get_model(conn, name)
            lineage = sorted({r.model_version for r in db.lineage_dataset_versions(conn, name)}, key=int)
            later = [v for v in lineage if int(v) >= int(version)] if version in lineage else []
            jobs, subjects, records = db.erasures_since(conn, name, later) if later else (0, 0, 0)
        head = row.serving_version if row is not None else None
        if not (tags.get("lethe.superseded_by") or (jobs and version != head)):
            return
        holds = (f"{subjects} erased subject(s) and {records} erased record(s) from {jobs} erasure job(s)"
                 if jobs else f"records erased since (superseded by version {tags.get('lethe.superseded_by')})")
        raise FailedPrecondition(
            f"model {name!r} version {version} was trained on data that has been erased since: it holds {holds}; "
            f"register the head of the lineage (version {head}) instead",
            (FieldViolation("version", f"version {version} holds {holds}"),))

    def _tombstone_violations(self, frame) -> list[FieldViolation]:
        hashes = [record_tombstone(self.ctx.settings.subject_hash_key_bytes, r) for r in frame["record_id"].astype(str)]
        with self.ctx.store.read() as conn:
            dead = db.tombstoned(conn, hashes)
        if not dead:
            return []
        # Never quote the ids: they are erased records, and this refusal goes to the caller and the log.
        rows = [row for row, record_hash in enumerate(hashes) if record_hash in dead]
        return [FieldViolation("dataset.record_id", f"{len(rows)} record(s) were erased earlier and may not be "
                                                    f"re-ingested; first at row {rows[0]}")]


def _policy_json(policy: VerificationPolicy) -> dict[str, Any]:
    return asdict(policy)


def _has_training(registration: ModelRegistration) -> bool:
    """The registration gives the original model factory and recipe (``retrain`` and ``shrink-perturb`` need
    both; :func:`service.contract.training_violations` refuses one without the other)."""
    return bool(registration.model_factory and registration.train_recipe)


def _with_default_chain(policy: VerificationPolicy, registration: ModelRegistration) -> VerificationPolicy:
    """An empty chain becomes the task's default chain (``shrink-perturb`` and ``retrain`` only when the
    factory and recipe are registered)."""
    if policy.method_chain:
        return policy
    chain = default_chain(registration.task_type.value, _has_training(registration))
    return replace(policy, method_chain=tuple(MethodStep(name, dict(params)) for name, params in chain))


def _with_default_reerase(policy: VerificationPolicy, registration: ModelRegistration) -> VerificationPolicy:
    """An unset ``reerase_after_update`` becomes the task's default (:meth:`VerificationPolicy.reerases_after_update`),
    so the stored policy, the MLflow tag and the audit entry say what updates will do."""
    return replace(policy, reerase_after_update=policy.reerases_after_update(registration.task_type))


def _policy_violations(policy: VerificationPolicy, from_default_method: bool,
                       has_training: bool) -> list[FieldViolation]:
    """Bounded values (the gate cannot be configured away) and a chain of known methods with valid parameters,
    none of which retrains from the original recipe (``retrain``, ``shrink-perturb``) unless the registration
    gives it (``has_training``): refused up front, not failed job by job.

    Paths name the fields the client used: ``policy.method_chain[i].name`` / ``.params.<key>``, or
    ``policy.default_method`` / ``policy.method_params.<key>`` for the older one-method form.
    """
    violations = policy_violations(policy)
    if policy.superseded_versions not in ("purge", "archive"):
        violations.append(FieldViolation("policy.superseded_versions",
                                         f"must be 'purge' or 'archive', got {policy.superseded_versions!r}"))
    for index, step in enumerate(policy.method_chain):
        name_path, params_path = (("policy.default_method", "policy.method_params") if from_default_method
                                  else (f"policy.method_chain[{index}].name", f"policy.method_chain[{index}].params"))
        try:
            methods.parse_config(step.name, step.params)
        except UnknownMethodError as error:
            violations.append(FieldViolation(name_path, str(error)))
        except InvalidParameterError as error:
            violations.append(FieldViolation(f"{params_path}.{error.field}", error.reason))
        else:
            if methods.get(step.name).needs_training and not has_training:
                violations.append(FieldViolation(name_path, f"method {step.name!r} retrains from the original "
                                                            "recipe: register model_factory and train_recipe "
                                                            "with the model, or leave it out of the chain"))
    return violations
