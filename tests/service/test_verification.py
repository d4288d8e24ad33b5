"""The service gate (service.verification.verify) fails on constructed cases: membership, ONNX parity, and it
does not export a model the library checks already rejected. The library checks themselves are pinned in
tests/unlearn/test_gate.py."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from service.context import ModelInfo
from service.domain import TaskType, VerificationPolicy
from service.task_support import ClassifierSupport
from service.verification import verify
from tests.unlearn.helpers import NUM_CLASSES, class_problem
from unlearn.gate import without_classes
from unlearn.tasks import ClassificationTask

TASK = ClassificationTask(NUM_CLASSES)
SUPPORT = ClassifierSupport(ModelInfo("m", TaskType.CLASSIFICATION, NUM_CLASSES, VerificationPolicy(), {}, "1"))


class ExportDiffers(nn.Module):
    """Eager outputs differ from the exported graph's by 1e-3: what onnxruntime serves is not what was checked."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, inputs):
        out = self.inner(inputs)
        if torch.compiler.is_exporting():
            return out
        return out + 1e-3


def test_onnx_parity_fails_when_the_exported_model_computes_something_else(tmp_path):
    problem = class_problem(0)
    utility = without_classes(problem.holdout, (0,))
    after = copy.deepcopy(problem.model)
    with torch.no_grad():  # a model that forgets class 0 (its logit pushed down) so the library checks pass
        after.layers[-1].bias[0] -= 100.0
    result = verify(SUPPORT, TASK, problem.model, ExportDiffers(after), problem.forget, utility, problem.holdout,
                    VerificationPolicy(), tmp_path / "m.onnx", forget_classes=(0,))
    checks = {c.name: c for c in result.checks}
    assert checks["forgetting"].passed and checks["utility"].passed
    assert checks["onnx_parity"].passed is False and checks["onnx_parity"].value >= 9e-4
    assert result.failures == ("onnx_parity",)
    assert result.evidence["onnx"]["providers"] == ["CPUExecutionProvider"]


def test_an_unchanged_model_fails_class_forgetting_and_is_not_exported(tmp_path):
    problem = class_problem(0)
    utility = without_classes(problem.holdout, (0,))
    result = verify(SUPPORT, TASK, problem.model, problem.model, problem.forget, utility, problem.holdout,
                    VerificationPolicy(), tmp_path / "m.onnx", forget_classes=(0,))
    assert "forgetting" in result.failures
    assert result.evidence["onnx"] == {"skipped": "the library checks failed; the model was not exported"}
    assert not (tmp_path / "m.onnx").exists()


def test_record_erasure_of_memorised_records_fails_membership(tmp_path):
    # Few, noisy, heavily trained records: the MLP memorises them; leaving it unchanged must not pass.
    from tests.unlearn.test_gate import _memorising_problem

    model, forget, audit = _memorising_problem()
    result = verify(SUPPORT, TASK, model, model, forget, audit, audit, VerificationPolicy(), tmp_path / "m.onnx")
    assert {"membership_ks", "membership_auc"} & set(result.failures)
    assert result.evidence["membership_after"]["direction"] == "under"
    assert result.evidence["task_type"] == "classification"



@pytest.mark.parametrize("family_name", ["iris", "moons", "conv1d", "linear"])
def test_the_onnx_checks_take_each_held_out_architecture(family_name, tmp_path):
    """LayerNorm with GELU, dropout, a 1-D convolution with BatchNorm, a single linear layer: what a reviewer's
    model might be. Each exports with the dynamo exporter, runs on onnxruntime's CPU provider and matches PyTorch."""
    from service.verification import classifier_onnx_evidence
    from unlearn.bench.heldout import HELDOUT_FAMILIES
    from unlearn.data import classification_examples

    family = HELDOUT_FAMILIES[family_name]()
    records = family.load_records()
    model = family.model_factory(0).train()  # left in training mode: the export must not depend on the caller
    examples = classification_examples(torch.from_numpy(records.features[:40]), torch.from_numpy(records.labels[:40]))
    evidence = classifier_onnx_evidence(model, examples, examples, tmp_path / "m.onnx")
    assert evidence["exporter"] == "dynamo" and evidence["providers"] == ["CPUExecutionProvider"]
    assert evidence["max_abs_diff"] < 1e-5
    assert model.training  # handed back as it came
    with torch.no_grad():
        expected = (model.eval()(examples["inputs"]).argmax(dim=1) == examples["labels"]).float().mean().item()
    assert evidence["utility_acc"] == pytest.approx(expected)


def test_an_export_that_fixes_the_batch_size_is_refused_with_what_to_change(tmp_path):
    from service.verification import OnnxExportError, export_onnx
    from tests.service.test_registration_contract import FixedBatch

    with pytest.raises(OnnxExportError, match=r"only for batches of 8 rows: use inputs\.shape\[0\]"):
        export_onnx(FixedBatch(), torch.rand(8, 64), tmp_path / "m.onnx")
