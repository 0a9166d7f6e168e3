"""The strategy interface: what a federated algorithm decides, at the sites and at the server.

zenfed's server only adds what sites send (in the clear, or as ciphertexts it
cannot read), so an algorithm is written as five small decisions around that
sum. Every hook but the two weights has the FedAvg answer as its default; an
algorithm overrides only what it changes, in one file of its own under
``strategies/``.

- site, once per job: :meth:`Strategy.begin`; what travels and what is frozen:
  :meth:`Strategy.sent_names`, :meth:`Strategy.frozen_names`
- site, before training: :meth:`Strategy.prepare_global`
- site, during training: :meth:`Strategy.loss_term`
- site, what it sends and with which weight: :meth:`Strategy.update_to_send`,
  :meth:`Strategy.site_weight`
- server, how it combines: :meth:`Strategy.server_weight` and :meth:`Strategy.combine`
  (the running sums themselves are ``zenfed.server.aggregation``)
- site, after decrypting the sum: :meth:`Strategy.after_decrypt`
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import ClassVar

from zenfed.spec import JobSpec
from zenfed.types import AdapterState, LossTerm


class Strategy:
    """Base of the federated algorithms: FedAvg's behaviour for every hook but the weights.

    Args:
        spec: The job spec (weighting, encryption).
    """

    name: ClassVar[str] = "base"
    # True where the sites, not the server, turn the mean into the next global (a server optimizer
    # under encryption): the server then holds only the mean, and even a job in the clear
    # releases its final adapter through a site.
    global_at_sites: ClassVar[bool] = False
    # False where the global's parameterisation changes from round to round (FlexLoRA's SVD: a new
    # basis, signs flipped), so the optimizer moments a site kept would point the wrong way.
    keeps_optimizer_moments: ClassVar[bool] = True

    def __init__(self, spec: JobSpec) -> None:
        self.spec = spec

    # -- site -------------------------------------------------------------------------------
    def begin(self, initial_adapter: AdapterState) -> None:
        """Take the job's shared initial adapter (every site builds the same one), once per job."""

    def sent_names(self, names: Iterable[str]) -> set[str]:
        """Return which adapter tensors travel (to the server and back in the sum); all by default."""
        return set(names)

    def wire_template(self, initial_adapter: AdapterState) -> AdapterState:
        """Return the names and shapes of what travels (a strategy may add tensors beside the adapter's)."""
        return {name: initial_adapter[name] for name in sorted(self.sent_names(initial_adapter))}

    def frozen_names(self, names: Iterable[str]) -> set[str]:
        """Return which adapter tensors keep their values in local training; none by default."""
        return set()

    def prepare_global(self, adapter: AdapterState) -> AdapterState:
        """Return the adapter a site trains from, given the global it received."""
        return adapter

    def loss_term(self, *, global_adapter: AdapterState) -> LossTerm | None:
        """Return a term to add to the site's training loss, or None."""
        return None

    def update_to_send(self, *, global_adapter: AdapterState, local_adapter: AdapterState) -> AdapterState:
        """Return the adapter that enters the site's update chain after local training (the sent tensors)."""
        return {name: local_adapter[name] for name in sorted(self.sent_names(local_adapter))}

    def site_weight(self, *, num_examples: int) -> float:
        """Return the weight a site applies before encrypting, in (0, 1]."""
        raise NotImplementedError

    def after_decrypt(self, mean: AdapterState, *, global_round: int) -> AdapterState:
        """Return the global adapter, given the weighted mean a site decrypted (or decoded).

        Args:
            mean: The weighted mean of the sites' adapters.
            global_round: How many rounds were aggregated into it (1 after round 1).
        """
        return mean

    def state_dict(self) -> AdapterState | None:
        """Return what a site must keep between rounds for :meth:`after_decrypt`, or None."""
        return None

    def load_state_dict(self, state: AdapterState) -> None:
        """Resume from :meth:`state_dict` (a restarted site)."""

    # -- server -----------------------------------------------------------------------------
    def server_weight(self, *, num_examples: int) -> float:
        """Return the weight the server gives an update it receives in the clear."""
        raise NotImplementedError

    def combine(self, mean: AdapterState) -> AdapterState:
        """Return the next global from the weighted mean, where the server can read it (jobs in the clear).

        Under encryption the server only adds; a strategy that changes the mean does it in
        :meth:`after_decrypt`, identically at every site.
        """
        return mean
