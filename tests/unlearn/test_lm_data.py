"""The fictitious-people generator, the causal-LM adapter's encoding, and bad LM inputs."""

from __future__ import annotations

import pytest
import torch

from tests.unlearn.lm_helpers import lm_problem
from unlearn import registry
from unlearn.data import ExampleSet
from unlearn.errors import InvalidDataError, InvalidParameterError
from unlearn.lm.customers import CUSTOMER_SCHEMA
from unlearn.lm.patients import PATIENT_SCHEMA
from unlearn.lm.people import PEOPLE_SCHEMA, generate_people, question_pairs, split_people
from unlearn.lm.task import CausalLMTask


def test_generator_is_deterministic_and_names_are_unique():
    first, second = generate_people(50, seed=3), generate_people(50, seed=3)
    assert first == second
    assert question_pairs(first, seed=3) == question_pairs(second, seed=3)
    assert generate_people(50, seed=4) != first
    assert len({p.name for p in first}) == 50
    train, holdout = split_people(first, 10, seed=3)
    assert len(holdout) == 10 and not {p.subject_id for p in train} & {p.subject_id for p in holdout}


@pytest.mark.parametrize("schema", [PEOPLE_SCHEMA, CUSTOMER_SCHEMA, PATIENT_SCHEMA], ids=lambda s: s.name)
def test_pairs_have_a_true_paraphrase_and_wrong_perturbations(schema):
    people = generate_people(20, seed=1, schema=schema)
    pairs = question_pairs(people, seed=1, schema=schema)
    assert len(pairs) == 20 * len(schema.kinds)
    assert {pair.kind for pair in pairs} == set(schema.kinds)
    for pair in pairs:
        value = people[pair.subject_id].facts[pair.kind]
        assert pair.answer.startswith(" " + value) and pair.paraphrase.startswith(" " + value)
        assert pair.answer != pair.paraphrase
        assert len(set(pair.perturbed)) == len(pair.perturbed)
        assert all(not p.startswith(" " + value + " ") and p != pair.paraphrase for p in pair.perturbed)


def test_encoding_masks_the_prompt():
    problem = lm_problem()
    task = problem.task
    examples = task.encode(["Question: Who?\nAnswer:"], [" Velmora."], [7], 64)
    ids, attention, answer = examples["input_ids"][0], examples["attention_mask"][0], examples["answer_mask"][0]
    prompt_length = len(task.tokenizer.encode("Question: Who?\nAnswer:", add_special_tokens=False))
    answer_length = len(task.tokenizer.encode(" Velmora.", add_special_tokens=False))
    assert answer[:prompt_length].sum() == 0
    assert answer.sum() == answer_length + 1  # the answer and its end token
    assert ids[prompt_length + answer_length] == task.eos_token_id
    assert attention.sum() == prompt_length + answer_length + 1
    assert examples["subject_id"].tolist() == [7]
    # Summed answer NLL = the per-token NLLs over exactly those positions.
    batch = {k: v for k, v in examples.tensors.items()}
    nll = task.per_example_loss(problem.model, batch)
    assert task.target_lengths(batch).item() == answer_length + 1
    assert task.batch_loss(problem.model, batch).item() == pytest.approx(nll.item() / (answer_length + 1), rel=1e-5)


def test_generation_reproduces_memorised_answers():
    problem = lm_problem()
    answers = problem.task.generate(problem.model, problem.retain, 12)
    references = [p.answer for p in problem.pairs if 2 <= p.subject_id <= 7]
    exact = sum(a.strip() == r.strip() for a, r in zip(answers, references)) / len(references)
    assert exact >= 0.8


@pytest.mark.parametrize("prompts, answers, subjects, field", [
    (["", "Question: b?\nAnswer:"], [" a.", " b."], [0, 1], "examples.prompt"),
    (["Question: a?\nAnswer:"], ["   "], [0], "examples.answer"),
    (["Question: a?\nAnswer:"], [" word" * 80], [0], "examples.answer"),
    (["Question: a?\nAnswer:"], [" a."], None, "examples.subject_id"),
    ([], [], [], "examples"),
])
def test_bad_examples_are_typed_errors(prompts, answers, subjects, field):
    task = lm_problem().task
    with pytest.raises(InvalidDataError) as error:
        task.encode(prompts, answers, subjects, 64)
    assert error.value.field == field


def test_tokenizer_larger_than_the_model_is_rejected_and_nothing_changes():
    problem = lm_problem()
    before = {k: v.clone() for k, v in problem.model.state_dict().items()}

    class BigTokenizer:
        eos_token_id = 0

        def __len__(self):
            return 10_000

    request = problem.request()
    request.task = CausalLMTask(BigTokenizer())
    with pytest.raises(InvalidDataError) as error:
        registry.run("npo", problem.model, request, {})
    assert error.value.field == "tokenizer"
    for key, value in problem.model.state_dict().items():
        assert torch.equal(value, before[key])


def test_examples_without_subject_ids_or_answers_are_rejected():
    problem = lm_problem()
    no_subjects = ExampleSet({k: v for k, v in problem.forget.tensors.items() if k != "subject_id"})
    request = problem.request()
    request.forget = no_subjects
    with pytest.raises(InvalidDataError) as error:
        registry.run("flat", problem.model, request, {})
    assert error.value.field == "forget.subject_id"
    no_answer = ExampleSet({**problem.forget.tensors, "answer_mask": torch.zeros_like(problem.forget["answer_mask"])})
    request.forget = no_answer
    with pytest.raises(InvalidDataError) as error:
        registry.run("simnpo", problem.model, request, {})
    assert error.value.field == "forget.answer"
    too_long = ExampleSet({k: torch.cat([v, v], dim=1) if v.dim() == 2 else v for k, v in problem.forget.tensors.items()}
                          ) if problem.forget["input_ids"].shape[1] * 2 > 64 else None
    if too_long is not None:
        request.forget = too_long
        with pytest.raises(InvalidDataError):
            registry.run("simnpo", problem.model, request, {})


def test_bad_method_parameters():
    with pytest.raises(InvalidParameterError) as error:
        registry.parse_config("flat", {"divergence": "hellinger"})
    assert error.value.field == "divergence"
    with pytest.raises(InvalidParameterError) as error:
        registry.parse_config("simnpo", {"gamma": 1.0})
    assert error.value.field == "gamma"


def test_concatenated_batches_give_each_example_the_same_answer_nll():
    """simnpo+rt forwards its forget and retain batches in one padded pass: padding must change nothing."""
    from unlearn.lm.task import concat_batches

    problem = lm_problem()
    task = problem.task
    short = task.encode(["Question: Who?\nAnswer:"], [" Velmora."], [1], 64)
    first, second = dict(short.tensors), dict(problem.retain.subset([0, 1, 2]).tensors)
    joint = concat_batches([first, second], task.eos_token_id)
    assert joint["input_ids"].shape == (4, max(first["input_ids"].shape[1], second["input_ids"].shape[1]))
    with torch.no_grad():
        separate = torch.cat([task.per_example_loss(problem.model, first), task.per_example_loss(problem.model, second)])
        together = task.per_example_loss(problem.model, joint)
    assert torch.allclose(separate, together, atol=1e-4)
    assert torch.equal(task.target_lengths(joint), torch.cat([task.target_lengths(first), task.target_lengths(second)]))
