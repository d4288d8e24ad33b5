"""Built-in strategies; importing this package registers each one under its stable name."""

from continual.strategies import finetune, joint  # noqa: F401  (the lower and upper bounds)
from continual.strategies import replay  # noqa: F401  (ER / DER++)
from continual.strategies import lwf  # noqa: F401
from continual.strategies import ewc  # noqa: F401  (online EWC)
from continual.strategies import hft  # noqa: F401  (half fine-tuning)
from continual.strategies import gere  # noqa: F401  (causal LMs only)
from continual.strategies import wise_ft  # noqa: F401  (wise-ft+<base> wrappers; import last)
