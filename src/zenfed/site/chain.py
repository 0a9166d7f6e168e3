"""A site's update path as a chain of stages, each with one signature.

Outgoing, after local training, each stage takes the update and returns it::

    delta -> clip -> DP noise -> DP spend -> weight -> encrypt -> envelope      (encrypted job)
    delta -> ... -> weight -> mask -> encrypt -> envelope                        (pairwise masks)
    delta -> clip -> DP noise -> DP spend -> encode                             (job in the clear)

Incoming, the global the server sends walks the same chain backwards
(envelope, then decrypt or decode). :func:`build_update_chain` is the one
place that knows which stages a job runs and in which order; the session only
runs the chain. A new mechanism (say, pairwise masks before encryption) is one
more :class:`Stage` inserted there, as ``mask`` is.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from zenfed.errors import ZenfedError
from zenfed.types import AdapterState


@dataclass(frozen=True)
class RoundInfo:
    """Which job, round and site an update belongs to (stages bind their output to it).

    Attributes:
        job_id: The job.
        round: The round of the task.
        site: This site.
        task: The task's header (the round's cohort and keys, for the mask stage).
    """

    job_id: str
    round: int
    site: str
    task: Mapping[str, Any] = field(default_factory=dict)


@dataclass
class OutgoingUpdate:
    """A site's update on its way out.

    Attributes:
        global_adapter: The adapter the site trained from.
        delta: ``local - global`` in float64; DP stages clip and noise it.
        num_examples: Training examples behind the update.
        header: Result header fields stages add (weight, DP spend, training loss).
        weight: The weight the site applies before encrypting (1 in the clear).
        mask: This site's pairwise mask for the round, once the mask stage made it.
        ciphertext: The encrypted, weighted adapter, once a stage encrypted it.
        n_values: How many values the ciphertext holds.
        payload: The bytes that leave the site, once the last stage wrote them.
    """

    global_adapter: AdapterState
    delta: dict[str, torch.Tensor]
    num_examples: int
    header: dict[str, Any] = field(default_factory=dict)
    weight: float = 1.0
    mask: Callable[[int, int], Any] | None = None
    ciphertext: bytes | None = None
    n_values: int = 0
    payload: bytes | None = None

    @classmethod
    def from_training(cls, *, global_adapter: AdapterState, local_adapter: AdapterState,
                      num_examples: int) -> OutgoingUpdate:
        """Start an update from the adapter a site trained from and the one it trained.

        Raises:
            ZenfedError: If the two adapters do not hold the same tensors.
        """
        if set(global_adapter) != set(local_adapter):
            raise ZenfedError("the local and global adapters do not have the same tensors")
        delta = {k: local_adapter[k].double() - global_adapter[k].double() for k in sorted(local_adapter)}
        return cls(global_adapter=global_adapter, delta=delta, num_examples=num_examples)

    def adapter(self) -> AdapterState:
        """Return ``global + delta`` as float32: the adapter this update stands for."""
        return {
            k: (self.global_adapter[k].double() + self.delta[k]).to(torch.float32).contiguous()
            for k in sorted(self.delta)
        }


@dataclass
class IncomingGlobal:
    """The global adapter on its way in: the server's bytes until a stage turns them into an adapter.

    Attributes:
        payload: The bytes the server sent (a safetensors adapter or a ciphertext sum).
        header: The task header (total weight, encryption flag).
        template: The job's initial adapter: the names and shapes to expect.
        adapter: The decoded or decrypted global, once a stage produced it.
    """

    payload: bytes
    header: dict[str, Any]
    template: AdapterState
    adapter: AdapterState | None = None


class Stage:
    """One step of the update path. Both directions default to passing the data through."""

    name = "stage"

    def outgoing(self, update: OutgoingUpdate, info: RoundInfo) -> OutgoingUpdate:
        """Transform an update on its way from training to the server."""
        return update

    def incoming(self, message: IncomingGlobal, info: RoundInfo) -> IncomingGlobal:
        """Transform the global on its way from the server to training."""
        return message


class UpdateChain:
    """Stages run in order on the way out and in reverse order on the way in."""

    def __init__(self, stages: Sequence[Stage]) -> None:
        self.stages = tuple(stages)

    @property
    def names(self) -> list[str]:
        """The stages' names, outgoing order (recorded in the audit log)."""
        return [stage.name for stage in self.stages]

    def outgoing(self, update: OutgoingUpdate, info: RoundInfo) -> OutgoingUpdate:
        """Run every stage on an outgoing update.

        Raises:
            ZenfedError: If no stage wrote the payload.
        """
        for stage in self.stages:
            update = stage.outgoing(update, info)
        if update.payload is None:
            raise ZenfedError(f"the update chain {self.names} wrote no payload; its last stage must encode")
        return update

    def incoming(self, message: IncomingGlobal, info: RoundInfo) -> AdapterState:
        """Run every stage, last first, on the incoming global; return the adapter.

        Raises:
            ZenfedError: If no stage produced an adapter.
        """
        for stage in reversed(self.stages):
            message = stage.incoming(message, info)
        if message.adapter is None:
            raise ZenfedError(f"the update chain {self.names} did not decode the global adapter")
        return message.adapter
