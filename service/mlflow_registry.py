"""MLflow glue: resolve, load and register model versions; lineage lives in version tags and artifacts.

Embedded mode uses a SQLite tracking/registry backend and a local artifact directory (DESIGN.md,
"Embedded default"); a tracking server is a configuration change. Lethe only uses aliases, never the
deprecated stages: the serving alias (settings.serving_alias) moves when a job's result is verified.

Models are logged with ``serialization_format="pickle"`` and explicit ``pip_requirements``: the pt2
format runs ``torch.export`` (slow, and some models do not export), and inferring requirements imports
every loaded module.

Causal language models (issue 5) use the ``transformers`` flavor, logged with their tokenizer
(:meth:`MlflowRegistry.load_lm` loads both back as native objects, offline, from the local artifacts).

Exactly once: a job's model version is created by ``create_model_version`` WITH its ``lethe.job_id`` tag
in one call, and before creating one :meth:`MlflowRegistry.version_for_job` looks for a version already
tagged with the job. A process killed between MLflow's write and the job store's commit therefore finds
its version on resume instead of registering a second one.

MLflow's fluent API (``log_model``, ``load_model``) reads a process-global tracking URI, so fluent calls
run under one lock that sets this registry's URIs first; the client API takes its URIs explicitly.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import mlflow
import mlflow.pytorch
from mlflow import MlflowClient
from mlflow.entities import ViewType
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository
from torch import nn

from service.domain import FieldViolation, NotFound, preview
from service.faults import fault_point

TAG_PREFIX = "lethe."
# Every class erased so far on a model lineage, as a JSON list of ints: each version a job registers carries
# its parent's list plus the job's own classes (issue 6: consecutive class erasures are consecutive tasks).
ERASED_CLASSES_TAG = "lethe.erased_classes"
MAX_TAG_VALUE = 5000  # MLflow's limit on model-version tag values
_FLUENT_LOCK = threading.RLock()
log = logging.getLogger(__name__)


def pip_requirements() -> list[str]:
    import torch

    return [f"torch=={torch.__version__.split('+')[0]}", "numpy"]


def lm_pip_requirements() -> list[str]:
    import transformers

    return [*pip_requirements(), f"transformers=={transformers.__version__}"]


def tag_value(value: Any) -> str:
    """Tag values are strings; structured values are compact JSON, truncated honestly when too long."""
    text = value if isinstance(value, str) else json.dumps(value, sort_keys=True, separators=(",", ":"))
    if len(text) > MAX_TAG_VALUE:
        text = text[:MAX_TAG_VALUE - 40] + f"...[truncated, {len(text)} chars]"
    return text


def _is_missing(error: MlflowException) -> bool:
    return error.error_code in ("RESOURCE_DOES_NOT_EXIST", "NOT_FOUND", "INVALID_PARAMETER_VALUE")


class MlflowRegistry:
    def __init__(self, tracking_uri: str, artifact_root: str | None, experiment_name: str, serving_alias: str):
        self.tracking_uri = tracking_uri
        self.serving_alias = serving_alias
        self.client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
        experiment = self.client.get_experiment_by_name(experiment_name)
        if experiment is None:
            location = artifact_root  # None: the tracking server's default (proxied artifacts)
            if location is not None and "://" not in location:
                Path(location).mkdir(parents=True, exist_ok=True)
                location = Path(location).absolute().as_uri()
            try:
                self.experiment_id = self.client.create_experiment(experiment_name, artifact_location=location)
            except MlflowException:  # created meanwhile by another process
                self.experiment_id = self.client.get_experiment_by_name(experiment_name).experiment_id
        else:
            self.experiment_id = experiment.experiment_id

    @contextmanager
    def _fluent(self) -> Iterator[None]:
        with _FLUENT_LOCK:
            mlflow.set_tracking_uri(self.tracking_uri)
            mlflow.set_registry_uri(self.tracking_uri)
            yield

    # ------------------------------------------------------------------------------------------ lookups
    def model_exists(self, name: str) -> bool:
        try:
            self.client.get_registered_model(name)
            return True
        except MlflowException as error:
            if _is_missing(error):
                return False
            raise

    def resolve(self, name: str, version: str | None = None, alias: str | None = None) -> ModelVersion:
        """The model version named by ``version`` or ``alias`` (NotFound when either does not exist)."""
        try:
            if alias:
                return self.client.get_model_version_by_alias(name, alias)
            return self.client.get_model_version(name, str(version))
        except MlflowException as error:
            if _is_missing(error):
                what = f"alias {preview(alias)}" if alias else f"version {preview(str(version))}"
                violation = FieldViolation("alias" if alias else "version", "no such version or alias")
                raise NotFound(f"MLflow has no model {preview(name)} with {what}", (violation,)) from error
            raise

    def erased_classes(self, name: str, version: str) -> tuple[int, ...]:
        """The classes erased on the lineage up to ``version`` (its ``lethe.erased_classes`` tag; none when a
        version has no tag, e.g. a freshly registered one)."""
        text = self.resolve(name, version).tags.get(ERASED_CLASSES_TAG)
        if not text:
            return ()
        try:
            values = json.loads(text)
        except ValueError as error:
            raise RuntimeError(f"model {name!r} version {version} has an unreadable {ERASED_CLASSES_TAG} tag: "
                               f"{text!r}") from error
        if not isinstance(values, list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
            raise RuntimeError(f"model {name!r} version {version}: {ERASED_CLASSES_TAG} must be a JSON list of "
                               f"class ids, got {text!r}")
        return tuple(sorted(set(values)))

    def flavor_info(self, name: str, version: str) -> dict[str, Any]:
        """How a version was logged, read from its MLmodel file and artifact listing WITHOUT loading it.

        ``flavors``: the MLmodel's flavor configurations by name; ``serialization_format``: ``pickle`` or
        ``pt2`` for a pytorch-flavor model (MLflow 3 writes no format key: the model data file tells,
        ``model.pth`` or ``model.pt2``), else None; ``code_paths``: whether code was logged with the model.
        """
        from mlflow.models import get_model_info

        uri = f"models:/{name}/{version}"
        with self._fluent():
            flavors = dict(get_model_info(uri).flavors)
            serialization_format = None
            pytorch = flavors.get("pytorch")
            if pytorch is not None:
                data = pytorch.get("model_data", "data")
                repository = get_artifact_repository(uri, tracking_uri=self.tracking_uri,
                                                     registry_uri=self.tracking_uri)
                files = {Path(item.path).name for item in repository.list_artifacts(data)}
                serialization_format = ("pt2" if "model.pt2" in files else "pickle" if "model.pth" in files
                                        else "unknown")
        code = any(conf.get("code") for conf in flavors.values() if isinstance(conf, dict))
        return {"flavors": flavors, "serialization_format": serialization_format, "code_paths": code}

    def load_model(self, name: str, version: str) -> nn.Module:
        with self._fluent():
            model = mlflow.pytorch.load_model(f"models:/{name}/{version}")
        return model.eval()

    def load_lm(self, name: str, version: str) -> tuple[nn.Module, Any]:
        """A causal LM logged with the transformers flavor: (model in eval mode, its tokenizer)."""
        from mlflow import transformers as mlflow_transformers

        from unlearn.lm.model import HF_MODELS

        with self._fluent(), HF_MODELS:  # transformers disables weight init process-wide while it loads
            components = mlflow_transformers.load_model(f"models:/{name}/{version}", return_type="components")
        if "tokenizer" not in components:
            raise RuntimeError(f"model {name!r} version {version} was logged without its tokenizer")
        return components["model"].eval(), components["tokenizer"]

    def _log(self, model: nn.Module, tokenizer: Any = None, carried: Mapping[str, Any] | None = None):
        """Log ``model`` (inside a run): the transformers flavor with its tokenizer for an LM, else pytorch.

        ``carried`` (from :meth:`carried_from`) are the parent version's ``code_paths``, pip requirements,
        signature and input example, so a new version loads and serves wherever the original did.
        """
        carried = dict(carried or {})
        if tokenizer is None:
            carried.setdefault("pip_requirements", pip_requirements())
            return mlflow.pytorch.log_model(model, name="model", serialization_format="pickle", **carried)
        from mlflow import transformers as mlflow_transformers

        carried.pop("code_paths", None)
        carried.pop("input_example", None)
        carried.setdefault("pip_requirements", lm_pip_requirements())
        return mlflow_transformers.log_model(transformers_model={"model": model, "tokenizer": tokenizer},
                                             name="model", task="text-generation", **carried)

    def carried_from(self, name: str, version: str, directory: Path) -> dict[str, Any]:
        """What a new version must inherit from ``version``: its ``code_paths`` (the modules its pickle imports),
        pip requirements, signature and input example, downloaded into ``directory``.

        Without them a version Lethe registers would not load in a fresh process (``No module named ...``)
        wherever the original needed its own code.
        """
        from mlflow.models import Model

        base = f"models:/{name}/{version}"
        with self._fluent():
            mlmodel = Path(mlflow.artifacts.download_artifacts(artifact_uri=f"{base}/MLmodel", dst_path=str(directory)))
        described = Model.load(str(mlmodel))
        carried: dict[str, Any] = {}
        flavor = described.flavors.get("pytorch") or described.flavors.get("transformers") or {}
        files = {"requirements.txt"}
        if flavor.get("code"):
            files.add(flavor["code"])
        example = (described.saved_input_example_info or {}).get("artifact_path")
        if example:
            files.add(example)
        for relative in sorted(files):
            try:
                with self._fluent():
                    mlflow.artifacts.download_artifacts(artifact_uri=f"{base}/{relative}", dst_path=str(directory))
            except (MlflowException, OSError) as error:  # optional parts of a model: absent is fine
                log.debug("model %s version %s has no %s: %s", name, version, relative, error)
        if (directory / "requirements.txt").exists():
            carried["pip_requirements"] = str(directory / "requirements.txt")
        if flavor.get("code") and (directory / flavor["code"]).is_dir():
            carried["code_paths"] = sorted(str(path) for path in (directory / flavor["code"]).iterdir())
        if described.signature is not None:
            carried["signature"] = described.signature
        if example and (directory / example).exists():
            carried["input_example"] = described.load_input_example(str(directory))
        return carried

    def version_for_job(self, name: str, job_id: str) -> ModelVersion | None:
        """The version a job already registered, if any (the exactly-once check)."""
        found = self.client.search_model_versions(f"name='{_quote(name)}' and tags.`lethe.job_id`='{_quote(job_id)}'")
        return min(found, key=lambda v: int(v.version)) if found else None

    # ---------------------------------------------------------------------------------------- writes
    def log_initial_model(self, model: nn.Module, name: str, run_name: str, tokenizer: Any = None) -> str:
        """Log and register a freshly trained model (the demo's; an LM with its tokenizer); returns the new
        version."""
        with self._fluent(), mlflow.start_run(experiment_id=self.experiment_id, run_name=run_name):
            info = self._log(model, tokenizer)
            run_id = mlflow.active_run().info.run_id
        registered_name = name if self.model_exists(name) else self._create(name)
        with self._fluent():  # MLflow's registry store looks the logged model up through the GLOBAL tracking URI
            version = self.client.create_model_version(registered_name, source=info.model_uri, run_id=run_id,
                                                       model_id=info.model_id)
        return str(version.version)

    def _create(self, name: str) -> str:
        try:
            self.client.create_registered_model(name)
        except MlflowException as error:
            if error.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
        return name

    def stage_artifact(self, path: Path) -> str:
        """Log a staged training-data file (an update's records) to Lethe's staging run, where a worker on
        another host fetches it; returns its artifact URI (deleted with :meth:`delete_artifact`)."""
        run_id = self._staging_run_id()
        self.client.log_artifact(run_id, str(path), "lethe-staged")
        return f"{self.client.get_run(run_id).info.artifact_uri}/lethe-staged/{path.name}"

    def _staging_run_id(self) -> str:
        found = self.client.search_runs([self.experiment_id], "tags.`lethe.staging` = 'true'", max_results=1)
        if found:
            return found[0].info.run_id
        return self.client.create_run(self.experiment_id, run_name="lethe-staging",
                                      tags={"lethe.staging": "true"}).info.run_id

    def attach_dataset(self, version: ModelVersion, dataset_path: Path, tags: Mapping[str, Any]) -> str:
        """Registration: log the dataset copy next to the version and tag the version; returns the
        dataset artifact URI. The version's own run receives the artifact when it has one."""
        run_id = version.run_id
        if not run_id:
            run_id = self.client.create_run(self.experiment_id, run_name=f"lethe-register-{version.name}").info.run_id
        self.client.log_artifact(run_id, str(dataset_path), "lethe-dataset")
        artifact_uri = f"{self.client.get_run(run_id).info.artifact_uri}/lethe-dataset/{dataset_path.name}"
        for key, value in {**tags, "lethe.dataset_uri": artifact_uri}.items():
            self.client.set_model_version_tag(version.name, version.version, key, tag_value(value))
        return artifact_uri

    def register_job_version(self, name: str, job_id: str, model: nn.Module, tags: Mapping[str, Any],
                             metrics: Mapping[str, float], dataset_path: Path, onnx_path: Path | None,
                             tokenizer: Any = None, parent_version: str | None = None) -> tuple[str, str]:
        """Register a job's result exactly once; returns (version, dataset artifact URI). An LM is logged
        with the transformers flavor and ``tokenizer``; the parent version's code paths, requirements,
        signature and input example are carried over (:meth:`carried_from`)."""
        existing = self.version_for_job(name, job_id)
        if existing is not None:
            log.info("job %s already registered %s version %s; reusing it", job_id, name, existing.version)
            return str(existing.version), existing.tags.get("lethe.dataset_uri", "")
        self.discard_unregistered_runs(job_id)
        with tempfile.TemporaryDirectory(prefix="lethe-carried-") as directory:
            carried = self.carried_from(name, parent_version, Path(directory)) if parent_version else {}
            with self._fluent(), mlflow.start_run(experiment_id=self.experiment_id, run_name=f"lethe-{job_id}",
                                                  tags={"lethe.job_id": job_id}) as run:
                mlflow.log_metrics({k: float(v) for k, v in metrics.items()})
                info = self._log(model, tokenizer, carried)
                mlflow.log_artifact(str(dataset_path), "lethe-dataset")
                if onnx_path is not None and onnx_path.exists():
                    mlflow.log_artifact(str(onnx_path), "onnx")
                artifact_uri = f"{run.info.artifact_uri}/lethe-dataset/{dataset_path.name}"
        fault_point("mlflow.run_logged")  # crash tests only: the run holds the artifacts, no version exists yet
        all_tags = {key: tag_value(value) for key, value in {**tags, "lethe.job_id": job_id,
                                                              "lethe.dataset_uri": artifact_uri}.items()}
        with self._fluent():  # as in log_initial_model: another registry's thread may have moved the global URI
            version = self.client.create_model_version(name, source=info.model_uri, run_id=run.info.run_id,
                                                       tags=all_tags, model_id=info.model_id)
        return str(version.version), artifact_uri

    def discard_unregistered_runs(self, job_id: str) -> list[str]:
        """Runs an earlier attempt of this job logged without creating its version (a process killed between
        the run and ``create_model_version``): their artifacts (the dataset copy, the ONNX export) and their
        logged models' artifacts are deleted, the logged models and the runs marked deleted. Called only while no version carries the job's id, so every
        run tagged with it is such an orphan. Without this, a later erasure's purge (which follows dataset
        versions, not runs) would never reach the orphan's dataset copy. Returns the discarded run ids."""
        discarded = []
        for run in self.client.search_runs([self.experiment_id], f"tags.`lethe.job_id` = '{_quote(job_id)}'",
                                           run_view_type=ViewType.ALL):
            repository = get_artifact_repository(run.info.artifact_uri, tracking_uri=self.tracking_uri)
            try:
                repository.delete_artifacts()
            except (OSError, MlflowException) as error:
                if not _gone(run.info.artifact_uri):
                    raise
                log.debug("artifacts of run %s already gone: %s", run.info.run_id, error)
            for logged in self.client.search_logged_models([self.experiment_id],
                                                           filter_string=f"source_run_id = '{run.info.run_id}'"):
                get_artifact_repository(logged.artifact_location, tracking_uri=self.tracking_uri).delete_artifacts()
                self.client.delete_logged_model(logged.model_id)
            if run.info.lifecycle_stage != "deleted":
                self.client.delete_run(run.info.run_id)
            log.info("job %s: discarded run %s, logged by an earlier attempt that registered no version", job_id,
                     run.info.run_id)
            discarded.append(run.info.run_id)
        return discarded

    def set_serving(self, name: str, version: str, alias: str | None = None) -> None:
        """Move ``alias`` (default: the settings' serving alias) to ``version``."""
        self.client.set_registered_model_alias(name, alias or self.serving_alias, version)

    def serving_version(self, name: str, alias: str | None = None) -> str | None:
        try:
            return str(self.client.get_model_version_by_alias(name, alias or self.serving_alias).version)
        except MlflowException as error:
            if _is_missing(error):
                return None
            raise

    def supersede(self, name: str, version: str, by_version: str, action: str, reason: str) -> dict[str, Any]:
        """Take ``version`` (trained on data erased since) out of the serving path; idempotent.

        Tags it ``lethe.superseded_by`` / ``lethe.superseded_reason`` / ``lethe.superseded_action`` and moves
        every alias off it. ``purge`` also deletes its weights (and its ONNX export): the registry entry, its
        tags, ``MLmodel``, code and requirements stay, so the lineage stays readable and later versions keep
        inheriting its code; ``archive`` keeps the weights outside the serving path.
        """
        current = self.resolve(name, version)
        if current.tags.get("lethe.superseded_by"):
            return {"version": version, "action": current.tags.get("lethe.superseded_action", action),
                    "superseded_by": current.tags["lethe.superseded_by"]}
        for alias in list(current.aliases or ()):
            self.client.delete_registered_model_alias(name, alias)
        if action == "purge":
            self._delete_weights(current)
        for key, value in (("lethe.superseded_action", action), ("lethe.superseded_reason", reason),
                           ("lethe.superseded_by", by_version)):  # superseded_by last: it marks the step done
            self.client.set_model_version_tag(name, version, key, tag_value(value))
        return {"version": version, "action": action, "superseded_by": by_version}

    def _delete_weights(self, version: ModelVersion) -> None:
        """Delete the weights of a model version's logged model (``data`` for pytorch, ``model`` for
        transformers) and the ONNX export of its run; missing ones are fine (a resumed purge)."""
        from mlflow.models import Model

        model_id = getattr(version, "model_id", None)
        if not model_id and (version.source or "").startswith("models:/m-"):  # MLflow 3: the logged model's id
            model_id = version.source.removeprefix("models:/")
        if model_id:
            location = self.client.get_logged_model(model_id).artifact_location
            repository = get_artifact_repository(location, tracking_uri=self.tracking_uri)
            with tempfile.TemporaryDirectory(prefix="lethe-mlmodel-") as directory:
                described = Model.load(repository.download_artifacts("MLmodel", directory))
            flavor = described.flavors.get("pytorch") or described.flavors.get("transformers") or {}
            for weights in {flavor.get("model_data"), flavor.get("model_binary")} - {None}:
                self._delete_quietly(repository, weights, f"{location}/{weights}")
        if version.run_id:
            run_artifacts = self.client.get_run(version.run_id).info.artifact_uri
            self._delete_quietly(get_artifact_repository(run_artifacts, tracking_uri=self.tracking_uri), "onnx",
                                 f"{run_artifacts}/onnx")

    @staticmethod
    def _delete_quietly(repository, path: str, uri: str) -> None:
        try:
            repository.delete_artifacts(path)
        except (OSError, MlflowException) as error:
            if not _gone(uri):
                raise
            log.debug("artifact %s already gone: %s", uri, error)

    def log_sealed(self, name: str, job_id: str, path: Path) -> str:
        """Copy a sealed verification set (ciphertext, :mod:`service.sealed`) into the job's own sealed-sets
        run, so processes on other hosts can read it; returns its artifact URI. Idempotent: a resumed job
        finds its run by tag and overwrites the same artifact."""
        found = self.client.search_runs([self.experiment_id], f"tags.`lethe.sealed_job` = '{_quote(job_id)}'",
                                        max_results=1)
        run = found[0] if found else self.client.create_run(
            self.experiment_id, run_name=f"lethe-sealed-{job_id}",
            tags={"lethe.sealed_job": job_id, "lethe.model_name": name})
        self.client.log_artifact(run.info.run_id, str(path), "lethe-sealed")
        self.client.set_terminated(run.info.run_id)
        return f"{run.info.artifact_uri}/lethe-sealed/{path.name}"

    def download_artifact(self, artifact_uri: str, target: Path) -> None:
        """Copy one artifact file (a dataset version) to ``target``, through the tracking server when there
        is one; written atomically (a partial download never looks like the file)."""
        if not artifact_uri:
            raise FileNotFoundError(f"no MLflow copy recorded for {target.name}")
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=target.parent) as scratch:
            downloaded = mlflow.artifacts.download_artifacts(artifact_uri=artifact_uri, dst_path=scratch,
                                                             tracking_uri=self.tracking_uri)
            Path(downloaded).replace(target)

    def delete_artifact(self, artifact_uri: str) -> None:
        """Delete one artifact file (a purged dataset copy); a missing one is fine on resume."""
        if not artifact_uri:
            return
        parent, _, leaf = artifact_uri.rstrip("/").rpartition("/")
        directory, _, folder = parent.rpartition("/")
        repository = get_artifact_repository(directory, tracking_uri=self.tracking_uri)
        try:
            repository.delete_artifacts(f"{folder}/{leaf}")
        except (OSError, MlflowException) as error:
            if not _gone(artifact_uri):
                raise
            log.debug("artifact %s already gone: %s", artifact_uri, error)


def _gone(artifact_uri: str) -> bool:
    if artifact_uri.startswith("file://"):
        return not os.path.exists(artifact_uri[len("file://"):])
    return False


def _quote(value: str) -> str:
    return value.replace("'", "\\'")
