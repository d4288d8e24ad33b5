"""GS-LoRA / GS-LoRA++ (issue 6): loss pieces on hand-computable cases, LoRA merge, continual contract.

Tiny ViTs (hidden 16, 2 blocks) and synthetic data keep the whole file to a few seconds on 2 CPU cores.
"""

from __future__ import annotations

import contextlib
import io
import math
import warnings

import pytest
import torch
from torch import nn

from unlearn import registry
from unlearn.bench.vit_continual import h_mean, task_sequence
from unlearn.data import classification_examples
from unlearn.errors import InvalidDataError, InvalidParameterError, UnsupportedTaskError
from unlearn.methods.gslora_common import (
    attach_ffn_lora,
    bounded_forget_loss,
    class_prototypes,
    few_shot,
    ffn_blocks,
    forget_prototype_loss,
    group_sparse_penalty,
    lora_groups,
    merge_lora,
    prototype_divergence,
    retain_prototype_loss,
    task_data,
)
from unlearn.models import tiny_mlp
from unlearn.tasks import ClassificationTask, accuracy
from unlearn.training import TrainRecipe, train_from_scratch
from unlearn.vit import DigitsViTConfig, digits_vit, trained_digits_vit

TINY = DigitsViTConfig(hidden_size=16, num_layers=2, num_heads=2, mlp_size=32)
FAST = {"steps": 4, "batch_size": 8, "forget_batch_size": 8}


def tiny_vit(seed: int = 0):
    return digits_vit(seed, TINY)


def labelled_digits(per_class: int = 6, seed: int = 0):
    """Synthetic 8x8 'digits' whose first ten pixels say the class (feature[label] = 1), plus noise."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(10).repeat_interleave(per_class)
    inputs = 0.1 * torch.rand(len(labels), 64, generator=generator)
    inputs[torch.arange(len(labels)), labels] = 1.0
    return classification_examples(inputs, labels)


def request_for(examples, task_classes, forget_classes, retain=None, seed=0):
    labels = examples["labels"]
    in_task = torch.isin(labels, torch.tensor(task_classes))
    forget = examples.subset(torch.nonzero(in_task).flatten())
    if retain is None:
        retain = examples.subset(torch.nonzero(~torch.isin(labels, torch.tensor(forget_classes))).flatten())
    return registry.UnlearnRequest(task=ClassificationTask(10), forget=forget, retain=retain,
                                   forget_classes=forget_classes, seed=seed)


# ---------------------------------------------------------------------------------------------- losses

def test_group_sparse_penalty_on_known_weights():
    groups = [[torch.ones(2, 3), torch.zeros(4, 2)], [torch.tensor([[3.0, 4.0]])]]
    assert group_sparse_penalty(groups).item() == pytest.approx(math.sqrt(6) + 5)


def test_group_sparse_penalty_on_lora_weights_one_group_per_block():
    peft_model = attach_ffn_lora(tiny_vit(), rank=2, lora_alpha=2, seed=0)
    groups = lora_groups(peft_model)
    assert len(groups) == TINY.num_layers and all(len(g) == 4 for g in groups.values())  # A, B of fc1 and fc2
    with torch.no_grad():
        for name, parameter in peft_model.named_parameters():
            if "lora_A" in name:
                parameter.fill_(1.0)
            elif "lora_B" in name:
                parameter.fill_(2.0)
    # per block: fc1 A [2,16] + B [32,2]*4 + fc2 A [2,32] + B [16,2]*4 = 32 + 256 + 64 + 128 = 480
    expected = TINY.num_layers * math.sqrt(480)
    assert group_sparse_penalty(list(groups.values())).item() == pytest.approx(expected, rel=1e-6)


def test_group_sparse_penalty_gradient_is_finite_at_a_zero_group():
    zero = torch.zeros(3, 2, requires_grad=True)
    other = torch.tensor([[1.0, 0.0]], requires_grad=True)
    group_sparse_penalty([[zero], [other]]).backward()
    assert torch.isfinite(zero.grad).all() and torch.equal(other.grad, torch.tensor([[1.0, 0.0]]))


def test_bounded_forget_loss_stops_at_the_bound():
    ce = torch.tensor(3.0, requires_grad=True)
    loss = bounded_forget_loss(ce, 10.0)
    loss.backward()
    assert loss.item() == pytest.approx(7.0) and ce.grad.item() == pytest.approx(-1.0)  # ascent below BND
    past = torch.tensor(12.0, requires_grad=True)
    bounded_forget_loss(past, 10.0).backward()
    assert past.grad.item() == 0.0  # no push once CE >= BND


def test_prototype_losses_on_constructed_embeddings():
    prototypes = torch.tensor([[0.0, 0.0], [0.0, 0.0]])
    embeddings = torch.tensor([[math.log(3.0), 0.0], [0.0, 0.0]])
    # KL([.5, .5] || [.75, .25]) = .5 ln(.5/.75) + .5 ln(.5/.25) = .5 ln(4/3); identical rows give 0.
    expected = torch.tensor([0.5 * math.log(4 / 3), 0.0])
    assert torch.allclose(prototype_divergence(prototypes, embeddings), expected, atol=1e-6)
    assert retain_prototype_loss(prototypes, embeddings).item() == pytest.approx(0.25 * math.log(4 / 3), rel=1e-5)
    assert forget_prototype_loss(prototypes, embeddings, 1.0).item() == pytest.approx(1 - 0.25 * math.log(4 / 3),
                                                                                       rel=1e-5)
    # mean KL = 0.25 ln(4/3) = 0.0719: a bound below it gives 0 (the push stops there)
    assert forget_prototype_loss(prototypes, embeddings, 0.05).item() == 0.0
    # softmax is shift-invariant: adding a constant to an embedding changes nothing (no temperature).
    assert torch.allclose(prototype_divergence(prototypes, embeddings + 5.0), expected, atol=1e-6)
    with pytest.raises(InvalidDataError) as error:
        prototype_divergence(prototypes, embeddings[:1])
    assert error.value.field == "embeddings"


def test_class_prototypes_are_class_means():
    examples = classification_examples(torch.tensor([[1.0, 0.0], [3.0, 2.0], [0.0, 5.0]]), torch.tensor([0, 0, 2]))
    prototypes, present = class_prototypes(lambda x: x, examples, num_classes=3, batch_size=2)
    assert torch.allclose(prototypes, torch.tensor([[2.0, 1.0], [0.0, 0.0], [0.0, 5.0]]))
    assert present.tolist() == [True, False, True]


# ------------------------------------------------------------------------------------------------ LoRA

def test_lora_targets_both_ffn_linears_of_every_block_and_nothing_else():
    model = tiny_vit()
    blocks = ffn_blocks(model)
    assert len(blocks) == TINY.num_layers
    assert all(name.endswith((".mlp.fc1", ".mlp.fc2")) for names in blocks.values() for name in names)
    peft_model = attach_ffn_lora(model, rank=2, lora_alpha=2, seed=0)
    trainable = {n for n, p in peft_model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n and ".mlp.fc" in n for n in trainable)


def test_merged_model_equals_base_plus_lora():
    model = tiny_vit()
    next(iter(model.parameters())).requires_grad_(False)  # a frozen parameter stays frozen after the merge
    flags = {name: parameter.requires_grad for name, parameter in model.named_parameters()}
    inputs = torch.rand(5, 64)
    peft_model = attach_ffn_lora(model, rank=2, lora_alpha=4, seed=1)
    with torch.no_grad():
        for name, parameter in peft_model.named_parameters():
            if "lora_B" in name:  # B starts at 0: make the update non-zero
                parameter.normal_(0, 0.5)
        with_lora = peft_model(inputs)
    merged = merge_lora(peft_model, flags)
    assert {name: parameter.requires_grad for name, parameter in merged.named_parameters()} == flags
    with torch.no_grad():
        assert torch.allclose(merged(inputs), with_lora, atol=1e-5)
    assert not any("lora" in name for name, _ in merged.named_modules())
    assert all(type(m) is nn.Linear for n, m in merged.named_modules() if n.endswith(("fc1", "fc2")))
    assert sum(p.numel() for p in merged.parameters()) == sum(p.numel() for p in tiny_vit().parameters())


# ------------------------------------------------------------------------------------- continual contract

def test_task_data_drops_every_erased_class_from_retain():
    examples = labelled_digits()
    request = request_for(examples, (2, 3), (0, 1, 2, 3), retain=examples)  # caller passes ALL records
    _forget, retain, facts = task_data(request, "gslora", shots_per_class=0)
    assert not torch.isin(retain["labels"], torch.tensor([0, 1, 2, 3])).any()
    assert facts["retain_dropped"] == 4 * 6 and facts["task_classes"] == [2, 3]
    assert facts["earlier_classes"] == [0, 1] and facts["forgotten_classes"] == [0, 1, 2, 3]


@pytest.mark.parametrize("method", ["gslora", "gslora++"])
def test_previously_forgotten_classes_never_reenter_training(method):
    examples = labelled_digits()
    first = registry.run(method, tiny_vit(), request_for(examples, (0, 1), (0, 1)), FAST)
    assert first.details["forgotten_classes"] == [0, 1]
    seen: list[torch.Tensor] = []
    model = first.model

    def spy(module, args):
        if torch.is_grad_enabled():  # training forwards only (validation and prototypes run without grad)
            seen.append(args[0].detach().reshape(len(args[0]), -1)[:, :10].argmax(dim=1))

    model.vit.vit.embeddings.patch_embeddings.register_forward_pre_hook(spy)
    # The caller passes the earlier classes' records in retain by mistake; the method must drop them.
    forget_classes = tuple(first.details["forgotten_classes"]) + (2, 3)
    second = registry.run(method, model, request_for(examples, (2, 3), forget_classes, retain=examples), FAST)
    classes_seen = set(torch.cat(seen).tolist())
    assert classes_seen and not classes_seen & {0, 1}
    assert second.details["retain_dropped"] == 4 * 6 and second.details["forgotten_classes"] == [0, 1, 2, 3]
    if method == "gslora++":
        assert second.details["prototype_classes"] == 8  # prototypes of classes 2..9 only


def test_method_returns_a_new_plain_model_and_reports_lora_share():
    examples = labelled_digits()
    original = tiny_vit()
    before = {k: v.clone() for k, v in original.state_dict().items()}
    result = registry.run("gslora++", original, request_for(examples, (4,), (4,)), FAST)
    assert all(torch.equal(before[k], v) for k, v in original.state_dict().items())  # caller's model untouched
    assert result.model is not original and type(result.model) is type(original)
    assert not any("lora" in name for name, _ in result.model.named_modules())
    details = result.details
    # rank 8 on fc1 (16 -> 32) and fc2 (32 -> 16) of 2 blocks: 2 * 2 * 8 * (16 + 32)
    assert details["trainable_parameters"] == 2 * 2 * 8 * 48
    assert details["trainable_fraction"] == pytest.approx(1536 / details["model_parameters"])
    assert 0 <= details["active_blocks"] <= details["blocks"] == 2


def test_few_shot_keeps_k_records_per_class():
    examples = labelled_digits()
    chosen = few_shot(examples, 2, torch.Generator().manual_seed(0))
    assert torch.bincount(chosen["labels"], minlength=10).tolist() == [2] * 10
    result = registry.run("gslora", tiny_vit(), request_for(examples, (5, 6), (5, 6)), {**FAST, "shots_per_class": 3})
    assert result.details["forget_records"] == 6 and result.details["retain_records"] == 8 * 3


# ------------------------------------------------------------------------------------------- bad input

@pytest.mark.parametrize("method", ["gslora", "gslora++"])
@pytest.mark.parametrize("params, field", [({"rank": 0}, "rank"), ({"shots_per_class": -1}, "shots_per_class"),
                                           ({"forget_bound": 0}, "forget_bound"), ({"steps": 1.5}, "steps"),
                                           ({"bogus": 1}, "bogus")])
def test_bad_parameters_name_the_field(method, params, field):
    with pytest.raises(InvalidParameterError) as error:
        registry.parse_config(method, params)
    assert error.value.field == field


def test_bad_requests_name_the_field():
    examples = labelled_digits()
    missing = request_for(examples, (1,), (1,))
    missing.forget_classes = None
    with pytest.raises(InvalidDataError) as error:
        registry.run("gslora++", tiny_vit(), missing, FAST)
    assert error.value.field == "forget_classes"
    stray = request_for(examples, (1, 2), (1,))  # class 2 in the forget set but not declared
    with pytest.raises(InvalidDataError) as error:
        registry.run("gslora", tiny_vit(), stray, FAST)
    assert error.value.field == "forget_classes"
    with pytest.raises(UnsupportedTaskError) as error:  # no transformer FFN to put LoRA on: refused up front
        registry.run("gslora", tiny_mlp(0), request_for(examples, (1,), (1,)), FAST)
    assert error.value.field == "method" and "vision transformer" in str(error.value)
    assert not registry.supports("gslora", "classification", tiny_mlp(0))
    assert registry.supports("gslora++", "classification", tiny_vit())
    assert not registry.supports("gslora++", "causal_lm")


# ------------------------------------------------------------------------------------ ViT and benchmark

def test_vit_forward_is_head_of_embedding_and_cache_roundtrips(tmp_path):
    model = tiny_vit()
    inputs = torch.rand(3, 64)
    with torch.no_grad():
        assert model(inputs).shape == (3, 10)
        assert torch.equal(model(inputs), model.classify(model.embed(inputs)))
    examples, task = labelled_digits(per_class=2), ClassificationTask(10)
    recipe = TrainRecipe(epochs=1, batch_size=8, lr=1e-3, optimizer="adamw")
    trained, seconds = trained_digits_vit("original", task, examples, recipe, torch.device("cpu"), tmp_path, TINY)
    cached, cached_seconds = trained_digits_vit("original", task, examples, recipe, torch.device("cpu"), tmp_path,
                                                TINY)
    assert cached_seconds == seconds
    assert all(torch.equal(a, b) for a, b in zip(trained.state_dict().values(), cached.state_dict().values()))


def test_benchmark_task_sequence_and_h_mean():
    for seed in range(3):
        tasks = task_sequence(seed)
        flat = [c for pair in tasks for c in pair]
        assert len(tasks) == 4 and all(len(pair) == 2 for pair in tasks) and len(set(flat)) == 8
    assert task_sequence(0) == task_sequence(0)
    assert h_mean(0.9, 0.9) == pytest.approx(0.9)
    assert h_mean(1.0, 0.5) == pytest.approx(2 * 0.5 / 1.5)
    assert h_mean(0.9, -0.1) == 0.0


def test_merged_model_exports_to_onnx_with_parity(tmp_path):
    """The service verifies ONNX parity with the dynamo exporter (service/verification.py); no LoRA is left."""
    pytest.importorskip("onnxscript")
    runtime = pytest.importorskip("onnxruntime")
    examples = labelled_digits()
    result = registry.run("gslora++", tiny_vit(), request_for(examples, (7,), (7,)), FAST)
    path = tmp_path / "merged.onnx"
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        program = torch.onnx.export(result.model, (torch.rand(3, 64),), dynamo=True, input_names=["inputs"],
                                    output_names=["logits"], dynamic_shapes=({0: torch.export.Dim("batch")},))
        program.save(str(path))
    inputs = torch.rand(5, 64)  # another batch size: the batch dimension is dynamic
    exported = runtime.InferenceSession(str(path)).run(None, {"inputs": inputs.numpy()})[0]
    with torch.no_grad():
        assert torch.allclose(torch.from_numpy(exported), result.model(inputs), atol=1e-5)


@pytest.mark.parametrize("method", ["gslora", "gslora++"])
def test_forgets_a_class_keeps_the_rest_and_is_deterministic(method):
    """The registry's contract (tests/unlearn/test_contract.py) on a tiny trained ViT, which the MLP there lacks."""
    examples, task = labelled_digits(per_class=8), ClassificationTask(10)
    recipe = TrainRecipe(epochs=15, batch_size=16, lr=3e-3, optimizer="adamw")
    model = train_from_scratch(task, lambda seed: digits_vit(seed, TINY), examples, recipe, torch.device("cpu"))
    request = request_for(examples, (3,), (3,))
    retain_before = accuracy(task, model, request.retain)
    assert accuracy(task, model, request.forget) > 0.9 and retain_before > 0.9  # the problem is meaningful
    params = {"steps": 60, "batch_size": 32, "forget_batch_size": 8}
    first = registry.run(method, model, request, params)
    second = registry.run(method, model, request, params)
    assert accuracy(task, first.model, request.forget) <= 0.05
    assert accuracy(task, first.model, request.retain) >= retain_before - 0.05
    for (key, a), b in zip(first.model.state_dict().items(), second.model.state_dict().values()):
        assert torch.equal(a, b), f"{method}: same seed gave different {key}"
