"""Simulated devices survive a dead worker: a Ray actor that died is replaced by a fresh one.

Flower 1.42's Ray backend (``RayBackend.process_message``) puts the actor of a failed task back
into its pool whatever the failure. When the failure was the actor's own death (its process
killed for memory by Ray's OOM killer or the kernel, or a device that called ``os._exit``),
every later message routed to that actor fails too: a run of 4 devices went on training 3,
then 1, without a word beyond one log line per message. Here the dead actor is swapped for a
new one in the same slot, so the device round that was running is lost (and recorded as a
failure with its reason by the strategy), and the next rounds train every sampled device again.

This patches one method of Flower's ``BasicActorPool`` (flwr is pinned to 1.42.x in
pyproject.toml; ``tests/test_faults.py`` fails if a Flower update changes the pool's shape).
"""

from __future__ import annotations

from typing import Any

_PATCHED = "_fedpt_replaces_dead_actors"


def replace_dead_actors() -> None:
    """Make Flower's simulation pool swap an actor that died for a new one (idempotent)."""
    import ray
    from flwr.simulation.ray_transport.ray_actor import BasicActorPool

    if getattr(BasicActorPool, _PATCHED, False):
        return
    fetch = BasicActorPool.fetch_result_and_return_actor_to_pool

    def fetch_result_and_return_actor_to_pool(self: Any, future: Any) -> Any:
        try:
            return fetch(self, future)
        except ray.exceptions.RayActorError:
            # Flower's caller puts `_future_to_actor[future]` back into the pool: make that a new actor.
            dead = self._future_to_actor.get(future)
            if dead is not None:
                try:
                    ray.kill(dead, no_restart=True)
                except Exception:  # already gone: nothing to free
                    pass
                self._future_to_actor[future] = self.create_actor_fn()
            raise

    BasicActorPool.fetch_result_and_return_actor_to_pool = fetch_result_and_return_actor_to_pool
    setattr(BasicActorPool, _PATCHED, True)
