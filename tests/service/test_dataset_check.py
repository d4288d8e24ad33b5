"""The dataset schema, checked offline: every problem with its column, its rows (capped) and a count
(:func:`service.datasets.schema_problems`), in registration's field violations and in ``lethe dataset check``."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from lethe_demo.data import digits_frame
from service.cli import main
from service.datasets import schema_problems, validate_frame
from service.domain import TaskType

CLASSIFICATION = TaskType.CLASSIFICATION


def _broken() -> pd.DataFrame:
    frame = digits_frame()
    frame.at[3, "features"] = [float("nan")] * 64
    frame.at[5, "features"] = [0.0] * 10
    frame.at[8, "record_id"] = frame.at[7, "record_id"]
    frame.at[9, "split"] = "valid"
    frame.at[10, "subject_id"] = ""
    frame["label"] = frame["label"].astype(object)
    frame.at[11, "label"] = 12
    frame.at[12, "label"] = "seven"
    return frame


def test_a_clean_dataset_has_no_problem():
    assert schema_problems(digits_frame(), CLASSIFICATION, 10) == []
    assert validate_frame(digits_frame(), CLASSIFICATION, 10) == []


def test_every_problem_is_reported_with_its_column_and_rows():
    problems = {(p.column, p.problem.split(" (")[0]): p for p in schema_problems(_broken(), CLASSIFICATION, 10)}
    rows = {key: [row for row, _ in problem.rows] for key, problem in problems.items()}
    assert rows == {
        ("subject_id", "every record needs a valid subject id"): [10],
        ("record_id", "duplicate record id"): [8],
        ("split", "split must be one of train, holdout, test"): [9],
        ("features", "features must be finite numbers"): [3],
        ("features", "feature vectors must all have one length"): [5],
        ("label", "label must be an integer column"): [],
        ("label", "label must be an integer"): [12],
        ("label", "label must lie in [0, 10)"): [11],
    }
    assert "length 10" in problems[("features", "feature vectors must all have one length")].rows[0][1]
    # Registration carries the same problems as field violations naming the rows.
    violations = validate_frame(_broken(), CLASSIFICATION, 10)
    assert {v.field for v in violations} == {f"dataset.{column}" for column, _ in problems}
    assert any(v.field == "dataset.features" and "row 3" in v.description for v in violations)
    # ... without quoting an id (refusals are logged): rows are named by position.
    assert not any("digits-0" in v.description for v in violations), violations


def test_rows_are_capped_and_counted():
    frame = digits_frame().assign(label=lambda f: f["label"] + 5)
    (problem,) = schema_problems(frame, CLASSIFICATION, 10, max_rows=3)
    expected = int((digits_frame()["label"] + 5 >= 10).sum())
    assert problem.count == expected and len(problem.rows) == 3
    (violation,) = validate_frame(frame, CLASSIFICATION, 10)
    assert f"({expected} row(s))" in violation.description and f"{expected - 5} more" in violation.description


def test_many_numeric_columns_are_explained_and_present_columns_still_checked():
    frame = digits_frame()
    wide = pd.DataFrame(np.stack(frame["features"]), columns=[f"px{i}" for i in range(64)])
    wide = wide.assign(record_id=frame["record_id"], subject_id=frame["subject_id"], split="train",
                       label=frame["label"])
    problems = schema_problems(wide, CLASSIFICATION, 10)
    (missing,) = [p for p in problems if p.column == "columns"]
    assert "missing: features" in missing.problem and "64 numeric columns" in missing.problem
    assert "ONE list column" in missing.problem
    assert any(p.column == "split" and "'holdout' split is empty" in p.problem for p in problems)


def test_causal_lm_prompts_and_answers_must_be_non_empty_strings():
    frame = pd.DataFrame({"record_id": ["a", "b", "c"], "subject_id": ["s", "s", "t"],
                          "split": ["train", "train", "holdout"], "prompt": ["Q?", "  ", "Q?"],
                          "answer": ["A", "A", None]})
    problems = {p.column: p for p in schema_problems(frame, TaskType.CAUSAL_LM, None)}
    assert [row for row, _ in problems["prompt"].rows] == [1]
    assert [row for row, _ in problems["answer"].rows] == [2]


def _lm_frame(**probe) -> pd.DataFrame:
    frame = pd.DataFrame({"record_id": ["a", "b", "c", "d"], "subject_id": ["s", "s", "t", "u"],
                          "split": ["train", "train", "holdout", "holdout"], "prompt": ["Q?"] * 4,
                          "answer": ["A."] * 4})
    return frame.assign(**probe)


def test_causal_lm_paraphrase_columns_go_together_row_by_row_with_one_perturbed_length():
    good = _lm_frame(paraphrase=["A, so.", None, "A, so.", "A, so."],
                     perturbed=[["B, so.", "C, so."], None, ["B, so.", "C, so."], ["D, so.", "E, so."]])
    assert schema_problems(good, TaskType.CAUSAL_LM, None) == []  # a row may leave both null (added by an update)
    alone = schema_problems(_lm_frame(paraphrase=["A, so."] * 4), TaskType.CAUSAL_LM, None)
    assert [p.problem for p in alone] == ["paraphrase and perturbed go together: the file has only paraphrase"]
    bad = _lm_frame(paraphrase=["A, so.", "A, so.", " ", 7],
                    perturbed=[None, ["B."], ["B."], ["B.", "C."]])
    problems = {(p.column, p.problem): [row for row, _ in p.rows] for p in schema_problems(bad, TaskType.CAUSAL_LM,
                                                                                          None)}
    assert problems[("paraphrase", "paraphrase and perturbed must both be set or both be null")] == [0]
    assert problems[("paraphrase", "paraphrase must be a non-empty string")] == [2, 3]
    assert problems[("perturbed", "every perturbed list must have one length (1, the most common)")] == [3]
    empty = _lm_frame(paraphrase=["A."] * 4, perturbed=[["B."], [], ["", "C."], ["B."]])
    rows = {p.problem: [row for row, _ in p.rows] for p in schema_problems(empty, TaskType.CAUSAL_LM, None)}
    assert rows["perturbed must be a non-empty list of non-empty strings"] == [1, 2]


def test_paraphrase_columns_survive_a_dataset_version_and_count_in_its_digest(tmp_path):
    from service.datasets import DatasetCatalog, content_digest

    frame = _lm_frame(paraphrase=["A, so.", None, "A, so.", "A, so."],
                      perturbed=[["B, so.", "C, so."], None, ["B, so.", "C, so."], ["D, so.", "E, so."]])
    catalog = DatasetCatalog(tmp_path, b"k" * 32)
    path, digest = catalog.write_version("m", frame, "v1")
    loaded = catalog.load(path, digest)
    assert list(loaded.paraphrases) == ["A, so.", None, "A, so.", "A, so."]
    assert loaded.perturbed == (("B, so.", "C, so."), None, ("B, so.", "C, so."), ("D, so.", "E, so."))
    assert content_digest(catalog.frame(path)) == digest
    assert digest != content_digest(frame.drop(columns=["paraphrase", "perturbed"]))
    changed = frame.copy()
    changed.at[3, "perturbed"] = ["D, so.", "F, so."]
    assert content_digest(changed) != digest
    plain = catalog.load(*catalog.write_version("m", frame.drop(columns=["paraphrase", "perturbed"]), "v2"))
    assert plain.paraphrases is None and plain.perturbed is None


def test_cli_dataset_check(tmp_path, capsys):
    good, bad = tmp_path / "good.parquet", tmp_path / "bad.parquet"
    digits_frame().to_parquet(good, index=False)
    _broken().astype({"label": str}).to_parquet(bad, index=False)
    assert main(["dataset", "check", str(good), "--task", "classification", "--num-classes", "10"]) == 0
    assert "OK, 1797 records" in capsys.readouterr().out
    assert main(["dataset", "check", str(bad), "--task", "classification", "--num-classes", "10"]) == 2
    out = capsys.readouterr().out
    for line in ("row 3, column features: nan at position 0",
                 "row 9, column split: 'valid'",
                 "row 10, column subject_id: must be a non-empty string",
                 "row 8, column record_id: same record id as row 7",
                 "column label: label must be an integer column (int64), got "):
        assert line in out, out
    assert main(["dataset", "check", str(tmp_path / "missing.parquet"), "--task", "classification"]) == 2
    assert "no such file" in capsys.readouterr().err
    with pytest.raises(SystemExit) as shown:
        main(["dataset", "check", "--help"])
    assert shown.value.code == 0 and "--num-classes" in capsys.readouterr().out
