"""FedPT: federated proxy-tuning of large language models.

One round, five steps (see ``fedpt.federation.strategy`` for where each lives):
broadcast the small LM's adapter, tune it on devices, average the adapters, proxy-tune
the black-box large LM with them, and distill the proxy-tuned large LM back into the small LM.

Importing ``fedpt`` is cheap: torch, transformers and Flower load only when used.
"""

import os

# MKL's fp32 results then do not depend on memory alignment (reruns and resumed runs reproduce
# to the bit), and on AMD CPUs its small-row GEMMs run 2x faster (8 rows x 1536 -> 8960: 8.7 ms
# against 18.2 ms unset on the AVX2-only EPYC). MKL reads it once, when torch loads it: import
# fedpt before torch. The user's own setting wins.
os.environ.setdefault("MKL_CBWR", "AUTO,STRICT")

# Freed tensors go back to the system instead of fragmenting glibc's heap (fedpt.malloc):
# a device's training step peaks at half the memory.
from fedpt import malloc as _malloc  # noqa: E402

_malloc.configure()

__version__ = "0.1.0"
