"""Benchmarks: every method against a model retrained from scratch, on several model/data families.

- :mod:`unlearn.bench.harness`: the classifier harness (``python -m unlearn.bench``), its evidence rule
  and honest costs; :mod:`unlearn.bench.families` (digits CNN, tabular MLP, digits ViT) and
  :mod:`unlearn.bench.scenarios` (class / random / subject forget sets);
- :mod:`unlearn.bench.timing`: warm-up, the forward+backward cost unit, the in-process retrain timer;
- :mod:`unlearn.bench.sweep`: every method on every scenario and seed (``make bench``);
- :mod:`unlearn.bench.calibration`: how often a retrained model passes the gate's membership checks;
- :mod:`unlearn.bench.vit_continual` and :mod:`unlearn.bench.lm_subjects`: scenarios with their own runner.

This package's namespace re-exports the names other packages import from it; the code lives in the
modules above.
"""

from unlearn.bench.compat import ModelCache
from unlearn.bench.families import DIGITS_RECIPE
from unlearn.bench.harness import TRAININGS, run_benchmark
from unlearn.bench.scenarios import SCENARIOS
from unlearn.bench.timing import fwd_bwd_seconds, warm_up
from unlearn.cache import default_cache_dir

__all__ = ["DIGITS_RECIPE", "SCENARIOS", "TRAININGS", "ModelCache", "default_cache_dir", "fwd_bwd_seconds",
           "run_benchmark", "warm_up"]
