"""FedPT: federated proxy-tuning of large language models.

One round, five steps (see ``fedpt.federation.strategy`` for where each lives):
broadcast the small LM's adapter, tune it on devices, average the adapters, proxy-tune
the black-box large LM with them, and distill the proxy-tuned large LM back into the small LM.

Importing ``fedpt`` is cheap: torch, transformers and Flower load only when used.
"""

__version__ = "0.1.0"
