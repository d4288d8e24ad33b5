"""The pieces of ``lethe demo`` that made other libraries talk, run under :func:`service.console.configure`.

Run as ``python -m tests.service.console_pieces LEVEL STATE_DIR`` by ``test_console.py`` (a fresh process:
the libraries read their switches at import time). Prints one ``piece:`` line per piece on stdout, as Lethe's
own story would.
"""

from __future__ import annotations

import sys
from pathlib import Path


def main(level: str, state_dir: str) -> None:
    from service.console import configure

    configure(level)
    import torch

    from service.mlflow_registry import MlflowRegistry
    from service.verification import export_onnx
    from unlearn.lm.model import TINY_SPEC, GPTFactory, train_tokenizer
    from unlearn.models import tiny_mlp

    root = Path(state_dir)
    registry = MlflowRegistry(f"sqlite:///{root / 'mlflow.db'}", str(root / "mlartifacts"), "lethe", "serving")
    print("piece: MLflow database created", flush=True)
    registry.log_initial_model(tiny_mlp(0), "console-mlp", run_name="console")
    print("piece: a classifier logged with pickle", flush=True)
    export_onnx(tiny_mlp(0), torch.zeros(4, 64), root / "mlp.onnx")
    print("piece: exported to ONNX", flush=True)
    tokenizer = train_tokenizer(["Ada was born in Paris.", "Bo lives in Oslo."], vocab_size=64)
    model = GPTFactory(len(tokenizer), TINY_SPEC, tokenizer.eos_token_id)(0)
    version = registry.log_initial_model(model.eval(), "console-gpt", run_name="console-gpt", tokenizer=tokenizer)
    print("piece: a causal LM logged with its tokenizer", flush=True)
    registry.load_lm("console-gpt", version)
    print("piece: the causal LM loaded back", flush=True)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
