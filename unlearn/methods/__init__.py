"""Built-in methods; importing this package registers each one under its stable name."""

from unlearn.methods import assd, finetune, lfssd, retrain, ssd, ssd_auto  # noqa: F401
from unlearn.methods import ga  # noqa: F401
from unlearn.methods import graddiff  # noqa: F401
from unlearn.methods import npo  # noqa: F401
from unlearn.methods import iau  # noqa: F401
from unlearn.methods import gu  # noqa: F401
from unlearn.methods import gslora, gslora_pp  # noqa: F401  (GS-LoRA family, issue 6)
from unlearn.methods import flat  # noqa: F401  (causal LMs, issue 5)
from unlearn.methods import simnpo  # noqa: F401  (issue 5)
from unlearn.methods import simnpo_rt  # noqa: F401  (causal LMs, issue 9)
from unlearn.methods import unseen_kd  # noqa: F401  (causal LMs, issue 9)
from unlearn.methods import boundary_shrink  # noqa: F401  (class erasure, issue 9)
from unlearn.methods import shrink_perturb  # noqa: F401  (memorised records, issue 9)
