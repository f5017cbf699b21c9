"""The only package that imports Flower: thin adapters over fedpt's steps.

- ``records``: adapter tensors <-> ArrayRecord, the run config <-> ConfigRecord; owns key names.
- ``client_app``: the device side (step 2, local tuning).
- ``strategy``: ``FedPTStrategy(FedAvg)``: steps 1, 3, 4, 5 and server evaluation.
- ``server_app``: runs the configured systems one after another on one Grid.
- ``simulation``: ``fedpt run`` on one machine through Flower's simulation runtime.
"""
