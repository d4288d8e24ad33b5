"""Evaluation of an unlearned classifier against a model retrained from scratch on Dr.

Metrics (METHODS.md, "Evaluation (classification)"):

- accuracy on Df (forget), Dr (retain), Dt (test), and on the test records of classes not being forgotten;
- ``mia``: the SSD paper's membership-inference protocol (Foster et al., arXiv 2308.07707, App.): a
  logistic regression (balanced class weights) on the ENTROPY of the softmax output, fit on retain-train
  (member = 1) vs test (0), then applied to Df; the score is the fraction of Df judged "member";
- ``mia_loss_auc``: a loss-threshold attack, ROC AUC of -loss separating Df (positive) from Dt; 0.5 means
  the forget records look like data never seen;
- ``avg_gap``: mean over {forget_acc, retain_acc, test_acc, mia} of |unlearned - retrained|. The target for
  every metric is the retrained model's value, not the extreme.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from torch import nn

from unlearn.data import ExampleSet
from unlearn.errors import InvalidDataError
from unlearn.tasks import TaskAdapter, accuracy, collect

GAP_METRICS = ("forget_acc", "retain_acc", "test_acc", "mia")


@dataclass(frozen=True)
class ClassificationMetrics:
    forget_acc: float
    retain_acc: float
    test_acc: float
    test_retain_acc: float
    mia: float
    mia_loss_auc: float

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


def softmax_entropy(logits: torch.Tensor) -> np.ndarray:
    log_probs = torch.log_softmax(logits.double(), dim=1)
    return (-(log_probs.exp() * log_probs).sum(dim=1)).numpy()


def entropy_mia(task: TaskAdapter, model: nn.Module, retain: ExampleSet, test: ExampleSet,
                forget: ExampleSet) -> float:
    """SSD-protocol MIA: fraction of Df the entropy attack (fit on retain vs test) calls "member"."""
    features = []
    for examples in (retain, test, forget):
        logits, _ = collect(task, model, examples)
        features.append(softmax_entropy(logits).reshape(-1, 1))
    x_fit = np.concatenate(features[:2])
    y_fit = np.concatenate([np.ones(len(retain)), np.zeros(len(test))])
    attack = LogisticRegression(class_weight="balanced", solver="lbfgs")
    attack.fit(x_fit, y_fit)
    return float(attack.predict(features[2]).mean())


def loss_attack_auc(task: TaskAdapter, model: nn.Module, forget: ExampleSet, test: ExampleSet) -> float:
    """ROC AUC of the loss-threshold attack: Df members (1) vs test non-members (0), score = -loss."""
    _, forget_loss = collect(task, model, forget)
    _, test_loss = collect(task, model, test)
    scores = -torch.cat([forget_loss, test_loss]).double().numpy()
    truth = np.concatenate([np.ones(len(forget)), np.zeros(len(test))])
    return float(roc_auc_score(truth, scores))


def evaluate_classifier(
    task: TaskAdapter,
    model: nn.Module,
    forget: ExampleSet,
    retain: ExampleSet,
    test: ExampleSet,
    forget_classes: tuple[int, ...] | None = None,
) -> ClassificationMetrics:
    for name, examples in (("forget", forget), ("retain", retain), ("test", test)):
        if len(examples) == 0:
            raise InvalidDataError(name, "cannot evaluate on an empty set")
    test_retain = test
    if forget_classes:
        keep = ~torch.isin(test["labels"], torch.tensor(forget_classes))
        test_retain = test.subset(torch.nonzero(keep).flatten())
    return ClassificationMetrics(
        forget_acc=accuracy(task, model, forget),
        retain_acc=accuracy(task, model, retain),
        test_acc=accuracy(task, model, test),
        test_retain_acc=accuracy(task, model, test_retain),
        mia=entropy_mia(task, model, retain, test, forget),
        mia_loss_auc=loss_attack_auc(task, model, forget, test),
    )


def avg_gap(unlearned: ClassificationMetrics, retrained: ClassificationMetrics) -> float:
    """Mean absolute difference to the retrained model over forget, retain and test accuracy and MIA."""
    return float(np.mean([abs(getattr(unlearned, m) - getattr(retrained, m)) for m in GAP_METRICS]))
