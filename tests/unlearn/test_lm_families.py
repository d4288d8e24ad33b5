"""The second and third LM families (issue 9, "holds on two families", and a held-out one): customer records on
a Llama-style model, patient records on a GPT-NeoX-style model."""

from __future__ import annotations

import copy
import dataclasses

import numpy as np

import pytest
import torch

from tests.unlearn.lm_helpers import lm_problem
from unlearn.bench.__main__ import RUNNERS
from unlearn.bench.lm_subjects import SCENARIOS, people_splits, run_lm_subjects
from unlearn.errors import InvalidParameterError
from unlearn.lm.customers import CUSTOMER_SCHEMA
from unlearn.lm.fictitious import LM_FAMILIES, NEVER_TRAINED_PEOPLE, PEOPLE, load_fictitious_subjects
from unlearn.lm.model import GPT2_ACTIVATION, TINY_RECIPE, TINY_SPEC, GPTFactory, GPTSpec, LMCache, train_lm
from unlearn.lm.patients import PATIENT_SCHEMA
from unlearn.lm.people import PEOPLE_SCHEMA, FactSchema, generate_people
from unlearn.tasks import accuracy

LLAMA_TINY = dataclasses.replace(TINY_SPEC, architecture="llama")
NEOX_TINY = dataclasses.replace(TINY_SPEC, architecture="neox")


def test_the_three_families_are_benchmark_scenarios_with_their_own_data_and_model():
    assert SCENARIOS == ("fictitious-subjects", "fictitious-customers", "fictitious-patients")
    assert all(RUNNERS[name] is run_lm_subjects for name in SCENARIOS)
    families = [LM_FAMILIES[name] for name in SCENARIOS]
    assert [family.spec.architecture for family in families] == ["gpt2", "llama", "neox"]
    assert [family.schema for family in families] == [PEOPLE_SCHEMA, CUSTOMER_SCHEMA, PATIENT_SCHEMA]
    for one, other in ((PEOPLE_SCHEMA, CUSTOMER_SCHEMA), (PEOPLE_SCHEMA, PATIENT_SCHEMA),
                       (CUSTOMER_SCHEMA, PATIENT_SCHEMA)):  # other facts, other people
        assert not set(one.kinds) & set(other.kinds)
        assert not set(one.first_names) & set(other.first_names)
        assert not set(one.last_names) & set(other.last_names)
    with pytest.raises(InvalidParameterError) as error:
        run_lm_subjects("simnpo+rt", "fictitious-planets", 0)
    assert error.value.field == "scenario"


@pytest.mark.parametrize("scenario", ["fictitious-customers", "fictitious-patients"])
def test_the_other_families_data_sets_split_like_the_people_one(tmp_path, scenario):
    schema = LM_FAMILIES[scenario].schema
    data = load_fictitious_subjects(tmp_path, schema=schema)
    train, tune, audit = set(data.train_subjects), set(data.tune_subjects), set(data.audit_subjects)
    assert len(train) == PEOPLE - NEVER_TRAINED_PEOPLE and train | tune | audit == set(range(PEOPLE))
    assert not train & tune and not train & audit and not tune & audit
    assert data.pairs[0].prompt.startswith("Question: ") and data.pairs[0].kind in schema.kinds
    people = people_splits(data, 0)
    assert len(people.forget) == 10 and set(people.forget) <= train
    # Every text of the family encodes into the family's own tokenizer and fits the context.
    examples = data.examples(data.train_subjects)
    assert int(examples["attention_mask"].sum(1).max()) <= LM_FAMILIES[scenario].spec.context


def test_a_schema_whose_frames_do_not_start_with_the_value_is_refused():
    frames = dict(PEOPLE_SCHEMA.frames, book=("{value}.", "The book is {value}.", "{value}, the book."))
    with pytest.raises(ValueError, match="book frame must start with the value"):
        dataclasses.replace(PEOPLE_SCHEMA, frames=frames)
    with pytest.raises(ValueError, match="one answer frame per question template"):
        dataclasses.replace(PEOPLE_SCHEMA, frames=dict(PEOPLE_SCHEMA.frames, book=("{value}.", "{value}, it.")))
    with pytest.raises(ValueError, match="distinct values"):
        dataclasses.replace(PEOPLE_SCHEMA, values=dict(PEOPLE_SCHEMA.values, book=("A", "B", "A")))
    assert isinstance(PEOPLE_SCHEMA, FactSchema)
    assert generate_people(5, 0, CUSTOMER_SCHEMA)[0].facts.keys() == set(CUSTOMER_SCHEMA.kinds)


def test_the_gpt_cache_key_names_its_activation_and_the_llama_key_differs():
    # GPTs cached with gelu_new had the key without "activation": they are not loaded into the fused-GELU GPT
    assert GPTSpec().key() == {"layers": 2, "width": 128, "heads": 4, "context": 64, "activation": "gelu_pytorch_tanh"}
    assert GPTSpec(architecture="llama").key()["architecture"] == "llama"
    assert GPTSpec(architecture="neox").key()["architecture"] == "neox"
    with pytest.raises(ValueError, match="architecture"):
        GPTSpec(architecture="mamba")
    with pytest.raises(ValueError, match="width \\(100\\) must be a multiple of heads \\(3\\)"):
        GPTSpec(width=100, heads=3)
    with pytest.raises(ValueError, match="head width .* must be even"):
        GPTSpec(width=60, heads=4, architecture="llama")  # the GPT and the NeoX take a head width of 15
    GPTSpec(width=60, heads=4, architecture="neox")
    with pytest.raises(ValueError, match="layers must be a positive integer"):
        GPTSpec(layers=0)


def test_the_gpt_computes_gpt2s_gelu_with_the_fused_kernel():
    gpt = GPTFactory(64, TINY_SPEC, end_token_id=0)(0)
    assert gpt.config.activation_function == GPT2_ACTIVATION == "gelu_pytorch_tanh"
    reference_config = copy.deepcopy(gpt.config)
    reference_config.activation_function = "gelu_new"  # GPT-2's own: the same function, six elementwise ops
    reference = type(gpt)(reference_config)
    reference.load_state_dict(gpt.state_dict())
    ids = torch.randint(0, 64, (4, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        fused, plain = gpt(input_ids=ids).logits, reference(input_ids=ids).logits
    assert torch.allclose(fused, plain, atol=1e-5, rtol=0)
    hidden = torch.linspace(-6, 6, 1001)
    assert torch.allclose(gpt.transformer.h[0].mlp.act(hidden), reference.transformer.h[0].mlp.act(hidden), atol=1e-6)


@pytest.mark.parametrize("spec, kind", [(LLAMA_TINY, "LlamaForCausalLM"), (NEOX_TINY, "GPTNeoXForCausalLM")],
                         ids=["llama", "neox"])
def test_a_model_of_another_architecture_trains_deterministically_memorises_and_round_trips_the_cache(
        tmp_path, spec, kind):
    problem = lm_problem()
    task = problem.task
    factory = GPTFactory(task.vocab_size, spec, task.eos_token_id)
    first, second = factory(0), factory(0)
    assert type(first).__name__ == kind
    assert all(torch.equal(a, b) for a, b in zip(first.state_dict().values(), second.state_dict().values()))
    examples = problem.forget.concat(problem.retain)
    assert accuracy(task, first, examples) < 0.2
    model, meta = LMCache(tmp_path).get_or_train("original", task, factory, examples, TINY_RECIPE,
                                                 torch.device("cpu"))
    assert accuracy(task, model, examples) >= 0.8  # the tiny LM recipe memorises on this architecture too
    assert meta["spec"]["architecture"] == spec.architecture
    loaded, _ = LMCache(tmp_path).get_or_train("original", task, factory, examples, TINY_RECIPE, torch.device("cpu"))
    assert type(loaded).__name__ == kind
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), loaded.state_dict().values()))
    again = train_lm(task, factory(0), examples, TINY_RECIPE)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))


def test_the_lm_cache_key_changes_with_the_training_code_version(tmp_path, monkeypatch):
    from unlearn import cache as model_cache
    from unlearn.lm import model as lm_model

    problem = lm_problem()
    factory = GPTFactory(problem.task.vocab_size, TINY_SPEC, problem.task.eos_token_id)
    examples = problem.forget.concat(problem.retain)
    cache = LMCache(tmp_path)

    def path():
        return cache.path("original", TINY_RECIPE, factory.spec, factory.config.vocab_size, examples.digest())

    before = path()
    assert path() == before  # stable for the same inputs
    monkeypatch.setattr(model_cache, "TRAINING_CODE_VERSION", model_cache.TRAINING_CODE_VERSION + 1)
    assert path() != before  # a model the old training loop trained is not served after the loop changed
    loop_changed = path()
    monkeypatch.setattr(lm_model, "LM_TRAINING_CODE_VERSION", lm_model.LM_TRAINING_CODE_VERSION + 1)
    assert path() not in (before, loop_changed)  # nor one the old LM training loss trained


class _OtherCausalLM(torch.nn.Module):
    """A causal LM of a model type outside ``ANSWER_HEAD_MODEL_TYPES``: only its full logits exist."""

    def __init__(self, inner: torch.nn.Module):
        super().__init__()
        self.inner = inner
        self.config = dataclasses.make_dataclass("Config", [("model_type", str)])("other")
        self.full_passes = 0

    def forward(self, input_ids, attention_mask):
        self.full_passes += 1
        return self.inner(input_ids=input_ids, attention_mask=attention_mask)


def untrained(task, architecture: str) -> torch.nn.Module | None:
    """A freshly initialised Llama or GPT-NeoX of the tiny shape (None for the GPT-2 cases, which use the trained
    tiny GPT)."""
    spec = {"llama": LLAMA_TINY, "neox": NEOX_TINY}.get(architecture)
    return None if spec is None else GPTFactory(task.vocab_size, spec, task.eos_token_id)(3).eval()


@pytest.mark.parametrize("architecture", ["gpt2", "llama", "neox", "other"])
def test_evaluation_passes_on_the_answer_positions_give_the_full_outputs_numbers_to_the_bit(architecture):
    from unlearn.heldout import score
    from unlearn.lm.metrics import answer_statistics
    from unlearn.lm.task import answer_token_log_probs

    problem = lm_problem()
    task, examples = problem.task, problem.forget.concat(problem.holdout)
    model = untrained(task, architecture)
    model = problem.model.eval() if model is None else model
    if architecture == "other":
        model = _OtherCausalLM(model)
    batch = dict(examples.tensors)
    with torch.no_grad():
        outputs = task.outputs(model, batch)
        full_losses = task.losses_from_outputs(outputs, batch)
        full_correct = task.correct_from_outputs(outputs, batch)
        full_log_probs, full_mask = answer_token_log_probs(outputs, batch["input_ids"], batch["answer_mask"])
        if architecture == "other":
            model.full_passes = 0
        head_inputs = []
        hook = None if architecture == "other" else model.get_output_embeddings().register_forward_hook(
            lambda module, inputs, output: head_inputs.append(tuple(inputs[0].shape)))
        losses, correct = task.eval_losses_and_correct(model, batch)
        if hook is not None:  # the output layer ran on the answer-predicting positions only
            hook.remove()
            assert head_inputs == [(int(batch["answer_mask"][:, 1:].sum()), model.config.hidden_size)]
        log_probs, mask = task.answer_log_probs(model, batch)
        right = task.correct(model, batch)
    assert torch.equal(losses, full_losses) and torch.equal(correct, full_correct) and torch.equal(right, full_correct)
    assert torch.equal(mask, full_mask) and torch.equal(log_probs * mask, full_log_probs * full_mask)
    if architecture in ("gpt2", "other"):  # the trained GPT recites the forget answers, not the never-seen ones
        assert 0 < int(full_correct.sum()) < len(examples)
    # the answer-only path is what score, accuracy and answer_statistics use
    scores = score(task, model, examples)
    assert np.array_equal(scores.losses, (full_losses / task.target_lengths(batch)).double().numpy())
    assert accuracy(task, model, examples) == int(full_correct.sum()) / len(examples)
    statistics = answer_statistics(task, model, examples)
    assert torch.equal(statistics.nll, -(full_log_probs * full_mask).double().sum(dim=1))
    if architecture == "other":  # no base model to call: every pass was a full one
        assert model.full_passes > 0


@pytest.mark.parametrize("architecture", ["gpt2", "llama", "neox", "other"])
def test_a_training_pass_on_the_answer_positions_has_the_full_outputs_losses_and_gradients(architecture):
    """The training loss and ``unseen-kd``'s and ``simnpo+rt``'s passes use :meth:`CausalLMTask.answer_scores`: the
    same losses, exact matches and forget log-probabilities as the full outputs, and the same gradients up to
    float rounding."""
    from unlearn.lm.task import answer_logits, answer_token_log_probs

    problem = lm_problem()
    task = problem.task
    model = untrained(task, architecture)
    model = problem.model.eval() if model is None else model
    if architecture == "other":
        model = _OtherCausalLM(model)
    batch = dict(problem.forget.concat(problem.holdout).tensors)
    count = len(problem.forget)

    def gradients(loss):
        model.zero_grad(set_to_none=True)
        loss.backward()
        return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}

    outputs = task.outputs(model, batch)
    full_nll = task.losses_from_outputs(outputs, batch)
    full_log_q = torch.log_softmax(answer_logits(outputs[:count], {k: v[:count] for k, v in batch.items()}), dim=-1)
    full_log_probs, full_mask = answer_token_log_probs(outputs, batch["input_ids"], batch["answer_mask"])
    full_correct = task.correct_from_outputs(outputs, batch)
    full_grads = gradients(full_nll[count:].sum() - (full_log_q * full_log_q.exp().detach()).sum())

    scores = task.answer_scores(model, batch)
    log_q = scores.leading_log_probs(count)
    assert torch.equal(scores.nll, full_nll) and torch.equal(scores.whole, full_correct)
    assert torch.equal(scores.lengths, task.target_lengths(batch)) and torch.equal(log_q, full_log_q)
    assert torch.equal(scores.target_log_probs, full_log_probs * full_mask)
    assert torch.equal(task.per_example_loss(model, batch), full_nll)
    assert torch.equal(task.batch_loss(model, batch), -(full_log_probs * full_mask).sum() / full_mask.sum())
    assert 0 < int(full_correct.sum()) < len(full_correct) or architecture in ("llama", "neox")
    grads = gradients(scores.nll[count:].sum() - (log_q * log_q.exp().detach()).sum())
    assert grads.keys() == full_grads.keys()
    for name, grad in grads.items():  # float rounding at the gradient's scale (a tied embedding sums two parts)
        scale = max(1.0, float(full_grads[name].abs().max()))
        torch.testing.assert_close(grad, full_grads[name], rtol=1e-4, atol=1e-6 * scale, msg=name)


def test_the_benchmarks_warm_up_request_erases_other_people_and_changes_nothing_it_times(tmp_path, monkeypatch):
    from unlearn import registry
    from unlearn.bench import lm_subjects
    from unlearn.gate import GatePolicy
    from unlearn.registry import UnlearnRequest

    data = load_fictitious_subjects(tmp_path, people=60, never_trained=20)
    task, people = data.task, people_splits(data, 0)
    model = GPTFactory(task.vocab_size, TINY_SPEC, task.eos_token_id)(0)
    forget, retain, tune = (data.examples(group) for group in (people.forget, people.retain, people.tune))
    request = UnlearnRequest(task=task, forget=forget, retain=retain, tune=tune, seed=0)
    timed = {"max_steps": 2, "stop_at_target": False}
    cold = registry.run("unseen-kd", model, request, timed).model.state_dict()
    original = {name: tensor.clone() for name, tensor in model.state_dict().items()}

    calls, run = [], registry.run
    monkeypatch.setattr(registry, "run", lambda name, m, r, params=None: calls.append(
        (name, sorted(set(r.forget["subject_id"].tolist())), params)) or run(name, m, r, params))
    seconds = lm_subjects.warm_up_request("auto", None, model, request, data, people, GatePolicy())
    assert seconds > 0
    others = sorted(people.retain[: len(people.forget)])  # as many other training people, none of the forget ones
    assert calls == [("unseen-kd", others, {"max_steps": lm_subjects.WARM_UP_STEPS})]
    assert not set(others) & set(people.forget)
    assert all(torch.equal(original[name], tensor) for name, tensor in model.state_dict().items())
    warm = run("unseen-kd", model, request, timed).model.state_dict()
    assert all(torch.equal(cold[name], warm[name]) for name in cold)  # the timed request is the same request
    calls.clear()
    lm_subjects.warm_up_request("finetune", {}, model, request, data, people, GatePolicy())
    assert calls == []  # no step budget to shorten: only the gate warms up


def test_a_model_built_while_another_thread_loads_one_is_still_initialised_from_its_seed(tmp_path, monkeypatch):
    """transformers' ``from_pretrained`` disables ``torch.nn.init`` for the whole process while it loads; a model
    built meanwhile in another thread kept its constructor's weights (an engine test's Llama, built while the
    prefetcher loaded a version, got another initial digest and another verdict). Building waits for the load."""
    import threading

    from transformers.initialization import no_init_weights

    from unlearn.importance import weights_digest
    from unlearn.lm import model as lm_model

    factory = GPTFactory(120, dataclasses.replace(TINY_SPEC, architecture="llama"), 0)
    reference = weights_digest(factory(0))
    factory(1).save_pretrained(str(tmp_path))
    loading, release = threading.Event(), threading.Event()
    real = lm_model.AutoModelForCausalLM.from_pretrained

    def slow_load(*args, **kwargs):
        with no_init_weights():  # what from_pretrained does while it loads
            loading.set()
            release.wait(10)
        return real(*args, **kwargs)

    monkeypatch.setattr(lm_model.AutoModelForCausalLM, "from_pretrained", slow_load)
    loader = threading.Thread(target=lm_model.load_pretrained, args=(tmp_path,))
    loader.start()
    assert loading.wait(10)
    built = {}
    builder = threading.Thread(target=lambda: built.update(model=factory(0)))
    builder.start()
    builder.join(0.5)
    assert builder.is_alive(), "the factory built a model while a load had weight init switched off"
    release.set()
    loader.join(10)
    builder.join(10)
    assert weights_digest(built["model"]) == reference


def test_the_lm_benchmark_json_of_auto_names_the_chain_what_shipped_and_every_attempt(tmp_path, monkeypatch):
    """As the classifier harness's ``auto``: ``chain``, ``chosen``, ``exact``, ``attempts`` and ``gate``, on a
    tiny GPT with a short recipe (the benchmark's own scenario, shrunk). The gate's verdicts are forced (the
    real checks, with the first attempt rejected and the exact retrain accepted), so the JSON has one right
    answer whatever the tiny models do."""
    from dataclasses import replace as replaced

    from unlearn import registry
    from unlearn.bench import lm_subjects
    from unlearn.gate import GateCheck, GateResult
    from unlearn.lm.fictitious import PEOPLE_SCHEMA, LMFamily
    from unlearn.training import TrainRecipe

    tiny = LMFamily(PEOPLE_SCHEMA, TINY_SPEC, TrainRecipe(epochs=3, batch_size=16, lr=3e-3, optimizer="adamw"))

    def tiny_family(scenario, cache_dir, family=None):
        data = load_fictitious_subjects(cache_dir, people=60, never_trained=20)
        return tiny, data, GPTFactory(len(data.tokenizer), TINY_SPEC, data.tokenizer.eos_token_id)

    forced, run, judge = {}, registry.run, lm_subjects.judge

    def run_and_mark(name, model, request, params=None):
        result = run(name, model, request, params)
        forced[id(result.model)] = name == "retrain"
        return result

    def forced_judge(task, original, model, *args, **kwargs):
        verdict = judge(task, original, model, *args, **kwargs)
        if id(model) not in forced:  # the warm-up's gate
            return verdict
        checks = tuple(replaced(check, passed=True) for check in verdict.checks)
        return GateResult((*checks, GateCheck("forced", None, None, forced[id(model)], "the test's")), verdict.evidence)

    monkeypatch.setattr(lm_subjects, "load_family", tiny_family)
    monkeypatch.setattr(lm_subjects, "default_chain", lambda task, has_training=True: [
        ("unseen-kd", {"max_steps": 3}), ("retrain", {})])
    monkeypatch.setattr(registry, "run", run_and_mark)
    monkeypatch.setattr(lm_subjects, "judge", forced_judge)
    result = lm_subjects.run_lm_subjects("auto", "fictitious-subjects", 0, cache_dir=tmp_path)
    assert result["chain"] == ["unseen-kd", "retrain"]
    assert [(a["method"], a["gate_passed"]) for a in result["attempts"]] == [("unseen-kd", False), ("retrain", True)]
    assert result["chosen"] == "retrain" and result["exact"] is True and result["gate"]["passed"] is True
    assert set(result["unlearned"]) | {"forget_quality", "gate"} == set(result["splits"])  # every number says where
    assert not any("tune" in where for where in result["splits"].values())
