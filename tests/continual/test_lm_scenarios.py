"""The two LM continual scenarios (continual.bench.fictitious): ``fictitious-updates`` on the biographies and the
GPT, ``customer-updates`` on the customer records and the Llama-style model, the same design on both. Built with
an untrained model in place of the cached base (training it takes about a minute), since only the wiring is
under test here; docs/results/continual.md has the runs."""

from __future__ import annotations

import pytest
import torch

from continual.bench.fictitious import FAMILIES, fictitious_updates
from continual.bench.scenarios import SCENARIOS
from continual.registry import CAUSAL_LM
from unlearn.lm.customers import CUSTOMER_SCHEMA
from unlearn.lm.fictitious import LM_FAMILIES
from unlearn.lm.model import LMCache


def test_every_lm_scenario_names_its_family():
    lm_scenarios = {name for name, (kind, _, _) in SCENARIOS.items() if kind == CAUSAL_LM}
    assert lm_scenarios == set(FAMILIES) == {"fictitious-updates", "customer-updates"}
    assert set(FAMILIES.values()) <= set(LM_FAMILIES)


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_the_scenario_runs_on_its_familys_data_and_architecture(name, tmp_path, monkeypatch):
    monkeypatch.setattr(LMCache, "get_or_train",
                        lambda self, kind, task, factory, examples, recipe, device: (factory(recipe.seed), {}))
    scenario = fictitious_updates(0, tmp_path, torch.device("cpu"), name)
    family = LM_FAMILIES[FAMILIES[name]]
    assert scenario.name == name and scenario.model_factory.spec == family.spec
    assert scenario.base_model.config.model_type == ("llama" if family.spec.architecture == "llama" else "gpt2")
    prompts = scenario.task.tokenizer.batch_decode(scenario.base_train.examples["input_ids"][:20],
                                                   skip_special_tokens=True)
    customers = any(v in text for text in prompts for v in CUSTOMER_SCHEMA.values["employer"])
    assert customers is (name == "customer-updates")
    # the design is the family's only difference: 3 updates of 10 people, 10 erased before update 2
    assert len(scenario.stages) == 3 and scenario.stages[1].erasures_before
    assert scenario.notes["people"] == {"base": 40, "per_update": 10, "erased": 10, "tune": 10, "chain_tune": 5,
                                        "chain_audit": 5, "report_audit": 10}
