"""The stages of a site's update path, and the one function that puts them in order.

Each stage is small and does one thing; :func:`build_update_chain` decides
from the job spec which stages run. See ``zenfed.site.chain`` for the shapes
they pass along.
"""

from __future__ import annotations

from zenfed import protocol as P
from zenfed.audit import events as E
from zenfed.audit.sink import AuditSink
from zenfed.site.chain import IncomingGlobal, OutgoingUpdate, RoundInfo, Stage, UpdateChain
from zenfed.site.dp import SiteDP
from zenfed.site.encryption import SiteEncryption
from zenfed.site.masking import SiteMasking
from zenfed.strategies import Strategy
from zenfed.update_auth import UpdateSigner, update_statement
from zenfed.wire import decode_adapter, encode_adapter


class ClipStage(Stage):
    """Client-level DP: scale the update (``local - global``) to an L2 norm of at most C."""

    name = "clip"

    def __init__(self, dp: SiteDP) -> None:
        self.dp = dp

    def outgoing(self, update: OutgoingUpdate, info: RoundInfo) -> OutgoingUpdate:
        """Clip the delta."""
        update.delta = self.dp.clip(update.delta)
        return update


class NoiseStage(Stage):
    """Client-level DP: add Gaussian noise to the clipped update and step the accountant."""

    name = "dp-noise"

    def __init__(self, dp: SiteDP) -> None:
        self.dp = dp

    def outgoing(self, update: OutgoingUpdate, info: RoundInfo) -> OutgoingUpdate:
        """Noise the delta."""
        update.delta = self.dp.add_noise(update.delta)
        return update


class DPSpendStage(Stage):
    """Any DP level: write the round's spend to the signed ledger before anything leaves the site."""

    name = "dp-spend"

    def __init__(self, dp: SiteDP, audit: AuditSink) -> None:
        self.dp = dp
        self.audit = audit

    def outgoing(self, update: OutgoingUpdate, info: RoundInfo) -> OutgoingUpdate:
        """Record the spend; withhold the training loss."""
        spent = self.dp.after_round(info.round)
        update.header[P.H_DP_SPENT] = spent
        # The training loss is computed from the training records without noise, so epsilon
        # would not cover it: under DP it stays at the site.
        update.header.pop(P.H_TRAIN_LOSS, None)
        self.audit.record(E.DP_SPENT, round=info.round, level=self.dp.level, epsilon=spent["epsilon"],
                          epsilon_round=spent["epsilon_round"], delta=spent["delta"],
                          noise_multiplier=spent["noise_multiplier"], clip_norm=spent["clip_norm"],
                          ledger_head=self.dp.ledger_head())
        return update


class WeightStage(Stage):
    """Under encryption: the site's weight, which it applies itself (the server cannot read the update).

    Args:
        strategy: Decides the weight.
        in_the_clear: Send the weight in the header (plain CKKS sums); under pairwise masks it
            travels inside the masked sum instead.
    """

    name = "weight"

    def __init__(self, strategy: Strategy, *, in_the_clear: bool = True) -> None:
        self.strategy = strategy
        self.in_the_clear = in_the_clear

    def outgoing(self, update: OutgoingUpdate, info: RoundInfo) -> OutgoingUpdate:
        """Set the weight the next stage multiplies by."""
        update.weight = self.strategy.site_weight(num_examples=update.num_examples)
        if self.in_the_clear:
            update.header[P.H_WEIGHT] = update.weight
        return update


class MaskStage(Stage):
    """Pairwise masks: check the round's cohort and keys, and hand the encrypt stage this site's mask."""

    name = "mask"

    def __init__(self, masking: SiteMasking) -> None:
        self.masking = masking

    def outgoing(self, update: OutgoingUpdate, info: RoundInfo) -> OutgoingUpdate:
        """Make the round's mask; the update's size and weight no longer leave the site in the clear."""
        update.mask = self.masking.masker_for(info.round, info.task).mask
        return update


class EncryptStage(Stage):
    """Weight, pack and encrypt the update under the site's secret key; decrypt the global sum."""

    name = "encrypt"

    def __init__(self, encryption: SiteEncryption) -> None:
        self.encryption = encryption

    def outgoing(self, update: OutgoingUpdate, info: RoundInfo) -> OutgoingUpdate:
        """Encrypt ``weight * adapter`` (masked, where the mask stage ran)."""
        update.ciphertext, update.n_values = self.encryption.encrypt(update.adapter(), weight=update.weight,
                                                                     mask=update.mask)
        return update

    def incoming(self, message: IncomingGlobal, info: RoundInfo) -> IncomingGlobal:
        """Decrypt the sum and divide by its total weight (a masked sum carries its own): the mean adapter."""
        header = message.header
        total = header.get(P.H_TOTAL_WEIGHT)
        count = header.get(P.H_CONTRIBUTORS)
        message.adapter = self.encryption.decrypt_global(
            message.payload, template=message.template, total_weight=None if total is None else float(total),
            contributors=None if count is None else int(count))
        return message


class EnvelopeStage(Stage):
    """Bind the ciphertext to job, round, site and HE parameters, in the bytes that leave the site."""

    name = "envelope"

    def __init__(self, encryption: SiteEncryption) -> None:
        self.encryption = encryption

    def outgoing(self, update: OutgoingUpdate, info: RoundInfo) -> OutgoingUpdate:
        """Seal the envelope."""
        if update.ciphertext is None:
            raise ValueError("the envelope stage needs the encrypt stage before it")
        update.payload = self.encryption.envelope(update.ciphertext, n_values=update.n_values, job_id=info.job_id,
                                                  round_index=info.round, site=info.site)
        return update


class SignStage(Stage):
    """Sign what leaves the site with its provisioned key: the server checks it against the site's certificate."""

    name = "sign"

    def __init__(self, signer: UpdateSigner) -> None:
        self.signer = signer

    def outgoing(self, update: OutgoingUpdate, info: RoundInfo) -> OutgoingUpdate:
        """Sign the statement over the payload, its weight and the round."""
        if update.payload is None:
            raise ValueError("the sign stage needs the payload written before it")
        if update.mask is None:  # under pairwise masks the size of a site's data stays at the site
            update.header[P.H_NUM_EXAMPLES] = update.num_examples
        statement = update_statement(job_id=info.job_id, round_index=info.round, site=info.site,
                                     payload=update.payload, header=update.header)
        update.header.update(self.signer.sign(statement))
        return update


class EncodeStage(Stage):
    """A job in the clear: the adapter as safetensors bytes, both ways."""

    name = "encode"

    def outgoing(self, update: OutgoingUpdate, info: RoundInfo) -> OutgoingUpdate:
        """Encode the adapter."""
        update.payload = encode_adapter(update.adapter())
        return update

    def incoming(self, message: IncomingGlobal, info: RoundInfo) -> IncomingGlobal:
        """Decode the global adapter."""
        message.adapter = decode_adapter(message.payload)
        return message


def build_update_chain(*, dp: SiteDP, encryption: SiteEncryption | None, strategy: Strategy,
                       audit: AuditSink, signer: UpdateSigner | None = None,
                       masking: SiteMasking | None = None) -> UpdateChain:
    """Return the stages a job runs at a site, in outgoing order.

    Args:
        dp: The site's DP for the job (its level decides the DP stages).
        encryption: The site's HE state, or None for a job in the clear.
        strategy: The job's algorithm (it decides the site's weight).
        audit: Where the DP spend is recorded.
        signer: The site's provisioned key; None where the kit has none (the simulator).
        masking: The site's pairwise masks, where the job sums under them.
    """
    stages: list[Stage] = []
    if dp.level == "client":
        stages += [ClipStage(dp), NoiseStage(dp)]
    if dp.level != "none":
        stages.append(DPSpendStage(dp, audit))
    if encryption is not None:
        stages.append(WeightStage(strategy, in_the_clear=masking is None))
        if masking is not None:
            stages.append(MaskStage(masking))
        stages += [EncryptStage(encryption), EnvelopeStage(encryption)]
    else:
        stages.append(EncodeStage())
    if signer is not None:
        stages.append(SignStage(signer))
    return UpdateChain(stages)
