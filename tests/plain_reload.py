"""Run as a script, in a process that never imports moekit: load each checkpoint folder
with plain transformers and write its logits for fixed token ids.

usage: python plain_reload.py IDS.safetensors OUT.safetensors DIR [DIR ...]
"""

import sys

import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

ids = load_file(sys.argv[1])["input_ids"]
logits = {}
for folder in sys.argv[3:]:
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        logits[folder] = model(ids).logits.contiguous()
assert not any(name.startswith("moekit") for name in sys.modules), "moekit was imported"
save_file({str(i): logits[f] for i, f in enumerate(sys.argv[3:])}, sys.argv[2])
