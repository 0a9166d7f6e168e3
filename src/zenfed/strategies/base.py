"""The strategy interface: what a federated algorithm decides, at the sites and at the server.

zenfed's server only adds what sites send (in the clear, or as ciphertexts it
cannot read), so an algorithm is written as five small decisions around that
sum. Every hook but the two weights has the FedAvg answer as its default; an
algorithm overrides only what it changes, in one file of its own under
``strategies/``.

- site, before training: :meth:`Strategy.prepare_global`
- site, during training: :meth:`Strategy.loss_term`
- site, what it sends and with which weight: :meth:`Strategy.update_to_send`,
  :meth:`Strategy.site_weight`
- server, how it combines: :meth:`Strategy.make_aggregation` (with :meth:`Strategy.server_weight`)
- site, after decrypting the sum: :meth:`Strategy.after_decrypt`
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import ClassVar

import torch

from zenfed.server.aggregation import Aggregation, EncryptedAggregation, PlainAggregation
from zenfed.spec import JobSpec
from zenfed.types import AdapterState

# A term added to a site's training loss, from the trainable LoRA tensors (PEFT names).
LossTerm = Callable[[dict[str, torch.Tensor]], torch.Tensor]


class Strategy:
    """Base of the federated algorithms: FedAvg's behaviour for every hook but the weights.

    Args:
        spec: The job spec (weighting, encryption).
    """

    name: ClassVar[str] = "base"

    def __init__(self, spec: JobSpec) -> None:
        self.spec = spec

    # -- site -------------------------------------------------------------------------------
    def prepare_global(self, adapter: AdapterState) -> AdapterState:
        """Return the adapter a site trains from, given the global it received."""
        return adapter

    def loss_term(self, *, global_adapter: AdapterState) -> LossTerm | None:
        """Return a term to add to the site's training loss, or None."""
        return None

    def update_to_send(self, *, global_adapter: AdapterState, local_adapter: AdapterState) -> AdapterState:
        """Return the adapter that enters the site's update chain after local training."""
        return local_adapter

    def site_weight(self, *, num_examples: int) -> float:
        """Return the weight a site applies before encrypting, in (0, 1]."""
        raise NotImplementedError

    def after_decrypt(self, mean: AdapterState) -> AdapterState:
        """Return the global adapter, given the weighted mean a site decrypted (or decoded)."""
        return mean

    # -- server -----------------------------------------------------------------------------
    def server_weight(self, *, num_examples: int) -> float:
        """Return the weight the server gives an update it receives in the clear."""
        raise NotImplementedError

    def make_aggregation(self, *, job_id: str, server_context: Path | None) -> Aggregation:
        """Return the running sum the server folds this job's updates into.

        Args:
            job_id: The job's id (encrypted updates are bound to it).
            server_context: The server's public CKKS context file; None for a job in the clear.
        """
        if self.spec.encryption.enabled:
            if server_context is None:
                raise ValueError("an encrypted job needs the server's public context")
            return EncryptedAggregation(
                method=f"{self.name}-ckks", context_path=server_context, encryption=self.spec.encryption,
                job_id=job_id,
            )
        return PlainAggregation(method=self.name, weight_of=self.server_weight)
