"""Dataset catalog: validated Parquet training data, its versions, purges and tombstones.

A registered model points to the dataset version it was trained on (DESIGN.md, "Concepts": lineage).
Lethe keeps its own copy of each version under ``<state_dir>/datasets/<model>/`` and one in MLflow (next
to the model version), because resolving a subject to records needs the data and an auditor needs to see
what a version was trained on. A purge writes a new version without the erased records; once the new model
version is registered, every older copy of that lineage (they all contain the erased records) is deleted,
locally and in MLflow. Keyed hashes of erased record ids stay behind as tombstones, and registration
refuses any dataset that contains one, so erased records are never re-ingested.

Schema (docs/models.md; :func:`schema_problems` checks it and names every bad row): ``record_id`` (string,
unique), ``subject_id`` (string), ``split`` (``train`` / ``holdout`` / ``test``; train and holdout must be
non-empty), ``features`` (ONE list<float> column, one length), ``label`` (int in [0, num_classes)). Causal
LM: ``prompt`` and ``answer`` (non-empty strings) instead of ``features`` and ``label``, and optionally
``paraphrase`` (the answer's fact in other words) with ``perturbed`` (a list of wrong answers worded like the
paraphrase), which let the gate test whether an erased fact survives in other wordings (its ``knowledge``
check, :mod:`unlearn.gate`); rows may leave both null (records added by updates do).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from service.audit import keyed_hash
from service.domain import (
    FieldViolation,
    InvalidArgument,
    TaskType,
    id_problem,
    preview,
)
from unlearn.data import ExampleSet, classification_examples

log = logging.getLogger(__name__)

SPLITS = ("train", "holdout", "test")
REQUIRED_SPLITS = ("train", "holdout")
BASE_COLUMNS = ("record_id", "subject_id", "split")
TASK_COLUMNS = {TaskType.CLASSIFICATION: ("features", "label"), TaskType.CAUSAL_LM: ("prompt", "answer")}
PROBE_COLUMNS = ("paraphrase", "perturbed")
"""Optional causal-LM columns, together or not at all: a paraphrase of the answer and wrong answers worded
like it (the gate's ``knowledge`` check). A row may leave both null."""
MAX_VIOLATIONS = 20  # enough to point a data engineer at the problem without flooding the status
MAX_ROWS_PER_VIOLATION = 5  # rows named in one violation; `lethe dataset check` lists more


@dataclass(frozen=True)
class LoadedDataset:
    """A dataset version in memory, with keyed subject and record hashes computed once: requests carry only
    those hashes, never the clear ids."""

    path: str
    digest: str
    record_ids: np.ndarray  # str [N]
    subject_hashes: np.ndarray  # str [N], keyed hashes
    splits: np.ndarray  # str [N]
    features: np.ndarray  # float32 [N, D]
    labels: np.ndarray  # int64 [N] (-1 for causal-LM records)
    prompts: np.ndarray | None = None  # str [N], causal LM only
    answers: np.ndarray | None = None  # str [N], causal LM only
    paraphrases: np.ndarray | None = None  # object [N]: str or None, causal LM with PROBE_COLUMNS only
    perturbed: tuple[tuple[str, ...] | None, ...] | None = None  # per record, wrong answers or None
    record_hashes: np.ndarray | None = None  # str [N], keyed hashes (the tombstone hash of each record id)

    def __len__(self) -> int:
        return len(self.record_ids)

    def examples(self, mask: np.ndarray) -> ExampleSet:
        index = np.flatnonzero(mask)
        return classification_examples(torch.from_numpy(self.features[index]), torch.from_numpy(self.labels[index]))

    def split_mask(self, split: str) -> np.ndarray:
        return self.splits == split

    def match(self, subject_hashes: set[str], record_hashes: set[str], classes: set[int]) -> np.ndarray:
        """Boolean mask of the records a request names: its subjects' records (keyed subject hashes), its
        records (keyed record hashes, :func:`record_tombstone`), its classes."""
        mask = np.zeros(len(self), dtype=bool)
        if subject_hashes:
            mask |= np.isin(self.subject_hashes, list(subject_hashes))
        if record_hashes:
            mask |= np.isin(self.record_hashes, list(record_hashes))
        if classes:
            mask |= np.isin(self.labels, list(classes))
        return mask


def safe_name(model_name: str) -> str:
    """A directory name for a model (MLflow names may hold '/', spaces...), unique via a short hash."""
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", model_name)[:64]
    return f"{slug}-{hashlib.sha256(model_name.encode()).hexdigest()[:8]}"


OUTSIDE_ROOTS = ("dataset_uri is not inside a dataset root this server accepts (LETHE_DATASET_ROOTS; "
                 "<state_dir>/incoming is always accepted)")
UNREADABLE = "no readable Parquet dataset at dataset_uri (missing, unreadable or not Parquet)"


def resolve_dataset_uri(uri: str, roots: list[str], import_dir: Path) -> str:
    """The location to read for a client's ``dataset_uri``, or InvalidArgument when it lies outside every
    accepted root (``Settings.dataset_roots`` plus ``import_dir``).

    Local paths (plain or ``file://``) must be absolute; they are resolved (``..`` and symbolic links
    followed) BEFORE the comparison, so no spelling escapes a root. A URI with another scheme must start
    with a configured URI prefix of that scheme and hold no ``..`` segment, query or fragment. The refusal
    is one fixed sentence: it never quotes the URI and says nothing about what exists on the server.
    """
    refused = InvalidArgument("dataset_uri is outside the accepted dataset roots",
                              (FieldViolation("dataset_uri", OUTSIDE_ROOTS),))
    if not isinstance(uri, str) or not uri or not uri.isprintable() or len(uri) > 4096:
        raise refused
    scheme, separator, rest = uri.partition("://")
    if separator and scheme.lower() != "file":
        if ".." in rest.split("/") or "?" in rest or "#" in rest or "\\" in rest:
            raise refused
        for root in roots:
            prefix = root if root.endswith("/") else root + "/"
            if "://" in root and uri.startswith(prefix) and len(uri) > len(prefix):
                return uri
        raise refused
    local = rest if separator else uri
    if not Path(local).is_absolute():
        raise refused
    resolved = Path(os.path.realpath(local))
    for root in [*(r for r in roots if "://" not in r), str(import_dir)]:
        if resolved.is_relative_to(Path(os.path.realpath(root))):
            return str(resolved)
    raise refused


def read_parquet(location: str) -> pd.DataFrame:
    """Read a dataset already checked by :func:`resolve_dataset_uri`. Any failure is one fixed answer:
    pyarrow's own text names paths and file contents ("Parquet magic bytes not found") and stays in the
    debug log."""
    try:
        return pq.read_table(location).to_pandas()
    except (OSError, pa.ArrowException, ValueError) as error:
        log.debug("dataset read failed: %s", type(error).__name__)
        raise InvalidArgument("the dataset cannot be read", (FieldViolation("dataset_uri", UNREADABLE),)) from None


@dataclass(frozen=True)
class SchemaProblem:
    """One problem of a dataset file: a column (or ``columns`` for the file's schema) and the rows it affects.

    ``rows`` holds the first rows found, as (0-based row position in the file, what is wrong with that row);
    ``count`` is how many rows have the problem in all (0 for a problem of a whole column or of the file).
    """

    column: str
    problem: str
    rows: tuple[tuple[int, str], ...] = ()
    count: int = 0

    @property
    def field(self) -> str:
        return f"dataset.{self.column}"

    def describe(self, max_rows: int | None = None) -> str:
        """One line: the problem, how many rows, and the first rows (all of ``rows`` unless ``max_rows``)."""
        if not self.count:
            return self.problem
        shown = self.rows if max_rows is None else self.rows[:max_rows]
        listed = "; ".join(f"row {row}: {detail}" for row, detail in shown)
        more = f"; {self.count - len(shown)} more" if self.count > len(shown) else ""
        return f"{self.problem} ({self.count} row(s)): {listed}{more}"


class _Rows:
    """Collects the rows of one problem: every row is counted, the first ``limit`` are kept."""

    def __init__(self, column: str, problem: str, limit: int):
        self.column, self.problem, self.limit = column, problem, limit
        self.rows: list[tuple[int, str]] = []
        self.count = 0

    def add(self, row: int, detail: str) -> None:
        self.count += 1
        if len(self.rows) < self.limit:
            self.rows.append((row, detail))

    def problems(self) -> list[SchemaProblem]:
        return [SchemaProblem(self.column, self.problem, tuple(self.rows), self.count)] if self.count else []


def schema_problems(frame: pd.DataFrame, task_type: TaskType, num_classes: int | None, max_rows: int = 20,
                    max_id_length: int = 256) -> list[SchemaProblem]:
    """Every schema problem of a dataset (empty list = valid), each with up to ``max_rows`` of its rows.

    Rows are named by their position, never by quoting an id or a value that may be personal data (refusals
    are logged): a row's detail says what is wrong (``NaN at position 3``, ``length 10``).

    The schema (docs/models.md): ``record_id`` and ``subject_id`` ids by the one id rule of requests
    (:func:`service.domain.id_problem`: a record whose id no request could name could never be erased),
    ``record_id`` unique;
    ``split`` one of :data:`SPLITS` with ``train`` and ``holdout`` non-empty; a classifier's ``features``
    ONE list column of finite numbers, one length for every row, and ``label`` an integer column in
    ``[0, num_classes)``; a causal LM's ``prompt`` and ``answer`` non-empty strings, and its optional
    :data:`PROBE_COLUMNS` (:func:`_probe_problems`). Other columns are ignored. Every present column is checked even when another is missing.
    """
    if task_type not in TASK_COLUMNS:
        return [SchemaProblem("task_type", f"datasets of task {task_type.value!r} are not supported yet")]
    problems: list[SchemaProblem] = []
    required = (*BASE_COLUMNS, *TASK_COLUMNS[task_type])
    missing = [c for c in required if c not in frame.columns]
    if missing:
        problems.append(SchemaProblem("columns", _missing_columns(frame, missing, task_type)))
    if len(frame) == 0:
        return problems + [SchemaProblem("columns", "the file holds no records")]
    for column, what in (("record_id", "record id"), ("subject_id", "subject id")):
        if column in frame.columns:
            bad = _Rows(column, f"every record needs a valid {what} (non-empty, printable, at most "
                                f"{max_id_length} characters)", max_rows)
            for row, value in enumerate(frame[column]):
                reason = id_problem(value, max_id_length)
                if reason:
                    bad.add(row, reason)
            problems += bad.problems()
    if "record_id" in frame.columns:
        duplicates = _Rows("record_id", "duplicate record id", max_rows)
        first_row: dict[str, int] = {}
        for row, value in enumerate(frame["record_id"]):
            if isinstance(value, str) and value:
                if value in first_row:
                    duplicates.add(row, f"same record id as row {first_row[value]}")
                else:
                    first_row[value] = row
        problems += duplicates.problems()
    if "split" in frame.columns:
        unknown = _Rows("split", f"split must be one of {', '.join(SPLITS)}", max_rows)
        for row, value in enumerate(frame["split"]):
            if value not in SPLITS:
                unknown.add(row, preview(value, 20))
        problems += unknown.problems()
        present = set(frame["split"])
        problems += [SchemaProblem("split", f"the {split!r} split is empty (no row has split = {split!r})")
                     for split in REQUIRED_SPLITS if split not in present]
    if task_type is TaskType.CAUSAL_LM:
        for column in TASK_COLUMNS[task_type]:
            if column in frame.columns:
                problems += _text_problems(frame, column, max_rows)
        return problems + _probe_problems(frame, max_rows)
    if "features" in frame.columns:
        problems += _feature_problems(frame["features"], max_rows)
    if "label" in frame.columns:
        problems += _label_problems(frame["label"], num_classes, max_rows)
    return problems


def _missing_columns(frame: pd.DataFrame, missing: list[str], task_type: TaskType) -> str:
    text = f"required column(s) missing: {', '.join(missing)}"
    numeric = [c for c in frame.columns
               if c not in (*BASE_COLUMNS, "label") and pd.api.types.is_numeric_dtype(frame[c])]
    if task_type is TaskType.CLASSIFICATION and "features" in missing and len(numeric) > 1:
        named = ", ".join(map(str, numeric[:4])) + (", ..." if len(numeric) > 4 else "")
        text += (f"; the file has {len(numeric)} numeric columns ({named}): Lethe takes a record's features as ONE "
                 "list column, e.g. frame['features'] = frame[columns].to_numpy('float32').tolist()")
    return text


def _text_problems(frame: pd.DataFrame, column: str, max_rows: int) -> list[SchemaProblem]:
    bad = _Rows(column, f"{column} must be a non-empty string", max_rows)
    for row, value in enumerate(frame[column]):
        if not isinstance(value, str):
            bad.add(row, f"not a string ({_kind(value)})")
        elif not value.strip():
            bad.add(row, "empty")
    return bad.problems()


def _probe_problems(frame: pd.DataFrame, max_rows: int) -> list[SchemaProblem]:
    """:data:`PROBE_COLUMNS`: both columns or neither; per row both null, or a non-empty ``paraphrase`` string
    and a non-empty list of non-empty ``perturbed`` strings, every such list of one length."""
    present = [c for c in PROBE_COLUMNS if c in frame.columns]
    if not present:
        return []
    if len(present) == 1:
        return [SchemaProblem("columns", "paraphrase and perturbed go together: the file has only "
                                         f"{present[0]}")]
    half = _Rows("paraphrase", "paraphrase and perturbed must both be set or both be null", max_rows)
    paraphrase = _Rows("paraphrase", "paraphrase must be a non-empty string", max_rows)
    perturbed = _Rows("perturbed", "perturbed must be a non-empty list of non-empty strings", max_rows)
    lengths: dict[int, list[int]] = {}
    for row, (text, wrong) in enumerate(zip(frame["paraphrase"], frame["perturbed"])):
        if is_null(text) and is_null(wrong):
            continue
        if is_null(text) or is_null(wrong):
            half.add(row, "one of the two is null")
            continue
        if not isinstance(text, str) or not text.strip():
            paraphrase.add(row, "empty" if isinstance(text, str) else f"not a string ({_kind(text)})")
        items = list(wrong) if isinstance(wrong, (list, tuple, np.ndarray)) else None
        if not items or not all(isinstance(item, str) and item.strip() for item in items):
            perturbed.add(row, "empty" if items == [] else f"not a list of strings ({_kind(wrong)})")
        else:
            lengths.setdefault(len(items), []).append(row)
    problems = half.problems() + paraphrase.problems() + perturbed.problems()
    if len(lengths) > 1:
        common = max(lengths, key=lambda n: (len(lengths[n]), -n))
        wrong_length = _Rows("perturbed", f"every perturbed list must have one length ({common}, the most common)",
                             max_rows)
        for length, rows in sorted(lengths.items()):
            for row in rows if length != common else ():
                wrong_length.add(row, f"length {length}")
        problems += wrong_length.problems()
    return problems


def is_null(value) -> bool:
    """A missing cell: None, or a float NaN (what pandas reads a Parquet null as)."""
    return value is None or (isinstance(value, float) and np.isnan(value))


def _kind(value) -> str:
    """What a bad value is, without quoting it (it may be personal data)."""
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return "missing"
    return type(value).__name__


def _feature_problems(column: pd.Series, max_rows: int) -> list[SchemaProblem]:
    """Each row a 1-D vector of finite numbers, every vector as long as the most common length."""
    if pd.api.types.is_numeric_dtype(column):
        return [SchemaProblem("features", f"features must be a list column (one vector per record), got scalar "
                                          f"{column.dtype} values; see docs/models.md")]
    not_vectors = _Rows("features", "features must be a non-empty list of numbers", max_rows)
    not_finite = _Rows("features", "features must be finite numbers", max_rows)
    lengths: dict[int, int] = {}
    by_row: list[tuple[int, int]] = []
    for row, value in enumerate(column):
        try:
            array = np.asarray(value, dtype=np.float64)
        except (TypeError, ValueError):
            not_vectors.add(row, f"not numbers ({_kind(value)})")
            continue
        if array.ndim != 1 or array.shape[0] == 0:
            not_vectors.add(row, "empty" if array.ndim == 1 else f"{array.ndim}-dimensional ({_kind(value)})")
            continue
        if not np.isfinite(array).all():
            position = int(np.flatnonzero(~np.isfinite(array))[0])
            not_finite.add(row, f"{array[position]} at position {position}")
        lengths[array.shape[0]] = lengths.get(array.shape[0], 0) + 1
        by_row.append((row, array.shape[0]))
    problems = not_vectors.problems() + not_finite.problems()
    if len(lengths) > 1:
        common = max(lengths, key=lambda n: (lengths[n], -n))
        wrong = _Rows("features", f"feature vectors must all have one length ({common}, the most common)", max_rows)
        for row, length in by_row:
            if length != common:
                wrong.add(row, f"length {length}")
        problems += wrong.problems()
    return problems


def _label_problems(labels: pd.Series, num_classes: int | None, max_rows: int) -> list[SchemaProblem]:
    """An integer column (int64) with every value in [0, num_classes) (or >= 0 without num_classes)."""
    upper = f"{num_classes})" if num_classes is not None else "num_classes)"
    problems = []
    if not pd.api.types.is_integer_dtype(labels):
        problems.append(SchemaProblem("label", f"label must be an integer column (int64), got {labels.dtype}"))
    not_integers = _Rows("label", "label must be an integer", max_rows)
    out_of_range = _Rows("label", f"label must lie in [0, {upper}", max_rows)
    for row, value in enumerate(labels):
        if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)) \
                or not np.isfinite(value) or value != int(value):
            not_integers.add(row, repr(value) if isinstance(value, (float, np.floating)) else _kind(value))
        elif value < 0 or (num_classes is not None and value >= num_classes):
            out_of_range.add(row, str(int(value)))
    return problems + not_integers.problems() + out_of_range.problems()


def validate_frame(frame: pd.DataFrame, task_type: TaskType, num_classes: int | None,
                   max_id_length: int = 256) -> list[FieldViolation]:
    """Every problem of a dataset as field violations (empty list = valid), each naming its first rows and
    how many rows it affects (:func:`schema_problems`; ``lethe dataset check`` prints them all)."""
    problems = schema_problems(frame, task_type, num_classes, max_id_length=max_id_length)
    return [FieldViolation(problem.field, problem.describe(MAX_ROWS_PER_VIOLATION)) for problem in problems][
        :MAX_VIOLATIONS]


def content_digest(frame: pd.DataFrame) -> str:
    """SHA-256 over the records' content in record-id order: the same data gives the same digest whatever
    the file's row order or Parquet writer version."""
    ordered = frame.sort_values("record_id", kind="stable")
    digest = hashlib.sha256()
    for column in ("record_id", "subject_id", "split"):
        digest.update("\x1f".join(ordered[column].astype(str)).encode())
        digest.update(b"\x1e")
    if "prompt" in ordered.columns:  # causal LM
        for column in ("prompt", "answer"):
            digest.update("\x1f".join(ordered[column].astype(str)).encode())
            digest.update(b"\x1e")
        if "paraphrase" in ordered.columns:
            digest.update("\x1f".join(json.dumps(_probe_value(p, w)) for p, w in
                                       zip(ordered["paraphrase"], ordered["perturbed"])).encode())
        return digest.hexdigest()
    digest.update(np.stack([np.asarray(v, dtype=np.float32) for v in ordered["features"]]).tobytes())
    digest.update(ordered["label"].to_numpy(dtype=np.int64).tobytes())
    return digest.hexdigest()


def _probe_value(paraphrase, perturbed) -> list | None:
    """One row's :data:`PROBE_COLUMNS` as ``[paraphrase, [wrong, ...]]``, or None when the row has none."""
    if is_null(paraphrase) or is_null(perturbed):
        return None
    return [str(paraphrase), [str(item) for item in perturbed]]


def dataset_columns(frame: pd.DataFrame) -> pd.DataFrame:
    """The frame's dataset columns only, in schema order, with a fresh index."""
    task_columns = TASK_COLUMNS[TaskType.CAUSAL_LM if "prompt" in frame.columns else TaskType.CLASSIFICATION]
    optional = [c for c in PROBE_COLUMNS if c in frame.columns] if "prompt" in frame.columns else []
    return frame[[*BASE_COLUMNS, *task_columns, *optional]].reset_index(drop=True)


def dataset_table(frame: pd.DataFrame) -> pa.Table:
    """A frame of :func:`dataset_columns` as an Arrow table in the dataset's Parquet schema (classification:
    float32 feature lists and int64 labels; causal LM: strings, and the optional paraphrase string and
    perturbed list of strings, null where a row has none)."""
    if "prompt" in frame.columns:  # causal LM
        columns = {c: pa.array(frame[c].astype(str).tolist(), pa.string()) for c in (*BASE_COLUMNS, "prompt", "answer")}
        if "paraphrase" in frame.columns:
            values = [_probe_value(p, w) for p, w in zip(frame["paraphrase"], frame["perturbed"])]
            columns["paraphrase"] = pa.array([v[0] if v else None for v in values], pa.string())
            columns["perturbed"] = pa.array([v[1] if v else None for v in values], pa.list_(pa.string()))
        return pa.table(columns)
    return pa.Table.from_pandas(frame.assign(features=[np.asarray(v, dtype=np.float32).tolist()
                                                       for v in frame["features"]]),
                                schema=pa.schema([("record_id", pa.string()), ("subject_id", pa.string()),
                                                  ("split", pa.string()), ("features", pa.list_(pa.float32())),
                                                  ("label", pa.int64())]), preserve_index=False)


def record_tombstone(key: bytes, record_id: str) -> str:
    return keyed_hash(key, "record", record_id)


class DatasetCatalog:
    """Reads, writes and deletes dataset versions; loaded versions are cached in memory by path.

    Paths in the job store are the writing process's. A process on another host (a worker pod) finds the
    same file under its own ``datasets_dir`` (same ``<model>/<name>.parquet`` layout), fetched on first use
    from the version's MLflow copy through ``fetch_missing(recorded_path, local_path)``, which the engine
    wires to the registry; deleting a version removes both.
    """

    def __init__(self, datasets_dir: Path, subject_key: bytes, cache_size: int = 8,
                 fetch_missing: Callable[[str, Path], None] | None = None):
        self.datasets_dir = datasets_dir
        self.subject_key = subject_key
        self.fetch_missing = fetch_missing
        self._cache: OrderedDict[str, LoadedDataset] = OrderedDict()
        self._cache_size = cache_size
        self._lock = threading.Lock()

    def _mirror(self, path: str | Path) -> Path:
        """Where this process keeps its own copy of a version recorded at ``path`` by another process."""
        recorded = Path(path)
        return self.datasets_dir / recorded.parent.name / recorded.name

    def local_path(self, path: str | Path) -> Path:
        """A readable local file of the version recorded at ``path`` (fetched when this host lacks it)."""
        recorded = Path(path)
        if recorded.exists():
            return recorded
        mirror = self._mirror(path)
        if not mirror.exists() and self.fetch_missing is not None:
            self.fetch_missing(str(path), mirror)
        return mirror

    def subject_hash(self, subject_id: str) -> str:
        return keyed_hash(self.subject_key, "subject", subject_id)

    def tombstone(self, record_id: str) -> str:
        return record_tombstone(self.subject_key, record_id)

    def write_version(self, model_name: str, frame: pd.DataFrame, name: str) -> tuple[Path, str]:
        """Write ``frame`` as ``<datasets_dir>/<model>/<name>.parquet`` atomically; returns (path, digest).

        Idempotent: a resumed job rewrites the same file name with the same content.
        """
        directory = self.datasets_dir / safe_name(model_name)
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / f"{name}.parquet"
        frame = dataset_columns(frame)
        partial = path.with_suffix(".partial")
        pq.write_table(dataset_table(frame), partial)
        partial.replace(path)
        return path, content_digest(frame)

    def frame(self, path: str | Path) -> pd.DataFrame:
        return pq.read_table(str(self.local_path(path))).to_pandas()

    def load(self, path: str | Path, digest: str) -> LoadedDataset:
        key = str(path)
        with self._lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                return self._cache[key]
        loaded = self.from_frame(self.frame(path), key, digest)
        with self._lock:
            self._cache[key] = loaded
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return loaded

    def from_frame(self, frame: pd.DataFrame, path: str = "", digest: str = "") -> LoadedDataset:
        """A dataset frame in memory, with keyed subject and record hashes computed once (never kept in clear
        anywhere else). Also builds the combined data of an update (base version plus staged records)."""
        lm = "prompt" in frame.columns
        return LoadedDataset(
            path=str(path), digest=digest,
            record_ids=frame["record_id"].astype(str).to_numpy(),
            subject_hashes=np.array([self.subject_hash(s) for s in frame["subject_id"].astype(str)]),
            splits=frame["split"].astype(str).to_numpy(),
            features=(np.zeros((len(frame), 0), dtype=np.float32) if lm
                      else np.stack([np.asarray(v, dtype=np.float32) for v in frame["features"]])),
            labels=np.full(len(frame), -1, dtype=np.int64) if lm else frame["label"].to_numpy(dtype=np.int64),
            prompts=frame["prompt"].astype(str).to_numpy() if lm else None,
            answers=frame["answer"].astype(str).to_numpy() if lm else None,
            **(_probe_fields(frame) if lm and "paraphrase" in frame.columns else {}),
            record_hashes=np.array([self.tombstone(r) for r in frame["record_id"].astype(str)]))

    def forget_cached(self, path: str | Path) -> None:
        with self._lock:
            self._cache.pop(str(path), None)

    def delete_local(self, path: str | Path) -> None:
        """Remove a dataset version's local copy (missing is fine: a resumed purge repeats this)."""
        self.forget_cached(path)
        Path(path).unlink(missing_ok=True)
        self._mirror(path).unlink(missing_ok=True)


def _probe_fields(frame: pd.DataFrame) -> dict:
    values = [_probe_value(p, w) for p, w in zip(frame["paraphrase"], frame["perturbed"])]
    return {"paraphrases": np.array([v[0] if v else None for v in values], dtype=object),
            "perturbed": tuple(tuple(v[1]) if v else None for v in values)}


def remove_tree(path: Path) -> None:
    """Delete a derived-state directory (caches computed from data that was erased)."""
    shutil.rmtree(path, ignore_errors=True)
