"""Language-model unlearning support (issue 5): fictitious people, a tiny GPT, the causal-LM task adapter
and TOFU-style metrics. See :mod:`unlearn.bench.lm_subjects` for the benchmark built from them."""
