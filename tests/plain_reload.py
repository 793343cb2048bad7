"""Run as a script, in a process that never imports moekit: load each checkpoint folder
with plain transformers and write its logits for fixed token ids. A folder whose loading
or first forward logs a warning (transformers' logging, the standard ``logging`` of
libraries such as compressed-tensors, loguru) or emits a Python warning fails the run
(exit 3, the warnings on stderr): a loader that warns is often a loader that loads wrong.

usage: python plain_reload.py [--dtype auto|float32|bfloat16] IDS.safetensors OUT.safetensors DIR [DIR ...]
"""

import logging
import sys
import warnings

import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM
from transformers.utils import logging as hf_logging

try:  # before any sink is added: some versions reset loguru's handlers when imported
    import compressed_tensors  # noqa: F401
except ImportError:
    pass

# Warnings that say nothing about the checkpoint, each with why it is harmless; add
# (substring, reason) only for a warning that cannot be avoided.
ALLOWED: list[tuple[str, str]] = [
    ("is falling back to its reference PyTorch implementation",
     "Qwen3-Next's linear attention on a CPU without flash-linear-attention / causal-conv1d: transformers runs "
     "its reference kernels, 'correct but much slower' in its own words; about the machine, not the checkpoint"),
]


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(level=logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(f"{record.name}: {record.getMessage()}")


def _reload(folder: str, ids: torch.Tensor, dtype) -> tuple[torch.Tensor, list[str]]:
    """(logits, the warnings loading and running ``folder`` gave)."""
    collect = _Collect()
    hf_logging.set_verbosity_warning()  # whatever TRANSFORMERS_VERBOSITY says (the suite's conftest sets error)
    loggers = [logging.getLogger(), hf_logging.get_logger("transformers")]  # transformers' does not propagate
    for logger in loggers:
        logger.addHandler(collect)
    sink = None
    try:
        from loguru import logger as loguru  # compressed-tensors logs some warnings through it

        sink = loguru.add(lambda message: collect.messages.append(f"loguru: {message.record['message']}"),
                          level="WARNING")
    except ImportError:
        pass
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).eval()
            with torch.no_grad():
                logits = model(ids).logits.contiguous()
    finally:
        for logger in loggers:
            logger.removeHandler(collect)
        if sink is not None:
            loguru.remove(sink)
    found = collect.messages + [f"{w.category.__name__}: {w.message} ({w.filename}:{w.lineno})" for w in caught]
    return logits, [m for m in found if not any(allowed in m for allowed, _ in ALLOWED)]


def main(argv: list[str]) -> int:
    dtype = torch.float32
    if argv[0] == "--dtype":
        dtype = "auto" if argv[1] == "auto" else getattr(torch, argv[1])
        argv = argv[2:]
    ids = load_file(argv[0])["input_ids"]
    logits, failed = {}, False
    for folder in argv[2:]:
        logits[folder], found = _reload(folder, ids, dtype)
        for message in found:
            print(f"loader warning for {folder}: {message}", file=sys.stderr)
            failed = True
    assert not any(name.startswith("moekit") for name in sys.modules), "moekit was imported"
    if failed:
        return 3
    save_file({str(i): logits[f] for i, f in enumerate(argv[2:])}, argv[1])
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
