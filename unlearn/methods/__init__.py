"""Built-in methods; importing this package registers each one under its stable name."""

from unlearn.methods import assd, finetune, lfssd, retrain, ssd, ssd_auto  # noqa: F401
