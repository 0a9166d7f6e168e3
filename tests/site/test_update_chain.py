"""The update chain: which stages a job runs, in which order, and that a new stage is one insertion."""

from __future__ import annotations

import pytest
import torch

from zenfed import protocol as P
from zenfed.audit.sink import AuditSink
from zenfed.errors import PolicyError, ZenfedError
from zenfed.privacy.he import make_secret_context, save_context
from zenfed.site.chain import IncomingGlobal, OutgoingUpdate, RoundInfo, Stage, UpdateChain
from zenfed.site.dp import SiteDP
from zenfed.site.encryption import SiteEncryption
from zenfed.site.stages import ClipStage, EncodeStage, build_update_chain
from zenfed.spec import JobSpec, SitePolicy
from zenfed.strategies import FedAvg, make_strategy
from zenfed.wire import decode_adapter

INFO = RoundInfo(job_id="job-1", round=1, site="site-1")


def adapters(seed: int = 0) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    global_ = {f"layer{i}.lora_A.weight": torch.randn(2, 4, generator=gen) * 0.1 for i in range(2)}
    local = {k: v + torch.randn(v.shape, generator=gen) * 0.05 for k, v in global_.items()}
    return global_, local


def site_dp(spec: JobSpec, *, level: str) -> SiteDP:
    policy = SitePolicy(site="site-1", datasets={})
    dp = SiteDP(spec=spec, policy=policy, ledger_path=None, signing_key_path=None, dataset="builtin",
                job_id="job-1", num_records=100, num_sites=2)
    if level != "none":
        dp.admit()
    return dp


@pytest.mark.parametrize(
    ("privacy", "encrypted", "names"),
    [
        ({"level": "none"}, False, ["encode"]),
        ({"level": "none"}, True, ["weight", "encrypt", "envelope"]),
        ({"level": "record", "noise_multiplier": 1.0}, True, ["dp-spend", "weight", "encrypt", "envelope"]),
        ({"level": "client", "noise_multiplier": 1.0, "client_mode": "local"}, False,
         ["clip", "dp-noise", "dp-spend", "encode"]),
    ],
)
def test_the_chain_follows_the_job_spec(privacy, encrypted, names, tmp_path):
    # Prepare
    spec = JobSpec(name="chain", privacy=privacy, encryption={"enabled": encrypted})
    encryption = None
    if encrypted:
        save_context(make_secret_context(), tmp_path / "site.context")
        encryption = SiteEncryption(spec=spec, context_path=tmp_path / "site.context")

    # Execute
    chain = build_update_chain(dp=site_dp(spec, level=privacy["level"]), encryption=encryption,
                               strategy=make_strategy(spec), audit=AuditSink(None))

    # Assert
    assert chain.names == names


def test_plain_chain_sends_exactly_the_local_adapter_and_reads_it_back():
    # Prepare
    global_, local = adapters()
    chain = UpdateChain([EncodeStage()])
    update = OutgoingUpdate.from_training(global_adapter=global_, local_adapter=local, num_examples=10)

    # Execute
    sent = chain.outgoing(update, INFO)
    back = chain.incoming(IncomingGlobal(payload=sent.payload, header={}, template=global_), INFO)

    # Assert: global + (local - global) in float64 is the local adapter to the bit
    for name in local:
        assert torch.equal(back[name], local[name])


def test_client_dp_stages_clip_then_noise_the_delta_and_withhold_the_training_loss():
    # Prepare
    spec = JobSpec(name="chain", privacy={"level": "client", "noise_multiplier": 1.0, "clip_norm": 0.01,
                                          "client_mode": "local"})
    dp = site_dp(spec, level="client")
    chain = build_update_chain(dp=dp, encryption=None, strategy=make_strategy(spec), audit=AuditSink(None))
    global_, local = adapters()
    update = OutgoingUpdate.from_training(global_adapter=global_, local_adapter=local, num_examples=10)
    update.header[P.H_TRAIN_LOSS] = 1.23
    clipped = ClipStage(dp).outgoing(
        OutgoingUpdate.from_training(global_adapter=global_, local_adapter=local, num_examples=10), INFO).delta

    # Execute
    sent = chain.outgoing(update, INFO)

    # Assert: clipped to C, then noised with std sigma*C on every entry
    assert sum(float(d.pow(2).sum()) for d in clipped.values()) ** 0.5 == pytest.approx(0.01, rel=1e-3)
    noise = torch.cat([(sent.delta[k] - clipped[k]).flatten() for k in clipped])
    assert 0.003 < float(noise.std()) < 0.03
    assert P.H_TRAIN_LOSS not in sent.header and sent.header[P.H_DP_SPENT]["epsilon"] > 0
    assert dp.accountant.get_epsilon(dp.delta) > 0
    received = decode_adapter(sent.payload)
    assert all(torch.allclose(received[k], global_[k] + sent.delta[k].float(), atol=1e-6) for k in received)


def test_a_new_stage_is_one_insertion_and_runs_in_both_directions():
    # Prepare
    class Scale(Stage):
        name = "scale"

        def outgoing(self, update, info):
            update.delta = {k: 2 * v for k, v in update.delta.items()}
            return update

        def incoming(self, message, info):
            message.adapter = {k: v / 2 for k, v in message.adapter.items()}
            return message

    global_ = {"w": torch.zeros(3)}
    local = {"w": torch.tensor([1.0, 2.0, 3.0])}
    chain = UpdateChain([Scale(), EncodeStage()])

    # Execute
    sent = chain.outgoing(OutgoingUpdate.from_training(global_adapter=global_, local_adapter=local,
                                                       num_examples=1), INFO)
    back = chain.incoming(IncomingGlobal(payload=sent.payload, header={}, template=global_), INFO)

    # Assert: out through Scale then EncodeStage; in through EncodeStage then Scale
    assert torch.equal(decode_adapter(sent.payload)["w"], torch.tensor([2.0, 4.0, 6.0]))
    assert torch.equal(back["w"], local["w"])


def test_a_chain_without_an_encoding_stage_is_refused():
    # Prepare
    global_, local = adapters()
    update = OutgoingUpdate.from_training(global_adapter=global_, local_adapter=local, num_examples=1)

    # Execute / Assert
    with pytest.raises(ZenfedError, match="wrote no payload"):
        UpdateChain([]).outgoing(update, INFO)
    with pytest.raises(ZenfedError, match="did not decode"):
        UpdateChain([]).incoming(IncomingGlobal(payload=b"", header={}, template=global_), INFO)


def test_mismatched_adapters_are_refused():
    # Execute / Assert
    with pytest.raises(ZenfedError, match="same tensors"):
        OutgoingUpdate.from_training(global_adapter={"a": torch.zeros(1)}, local_adapter={"b": torch.zeros(1)},
                                     num_examples=1)


def test_fedavg_weights_at_the_site_and_at_the_server():
    # Prepare
    samples = FedAvg(JobSpec(name="w", encryption={"enabled": True, "weight_unit": 100}))
    uniform = FedAvg(JobSpec(name="w", federation={"weighting": "uniform"}))

    # Execute / Assert
    assert samples.site_weight(num_examples=40) == pytest.approx(0.4)
    assert samples.site_weight(num_examples=400) == 1.0  # capped: the packing's headroom is per unit
    assert samples.server_weight(num_examples=40) == 40.0
    assert uniform.site_weight(num_examples=40) == uniform.server_weight(num_examples=40) == 1.0


def test_a_decrypted_global_beyond_the_clip_bound_is_refused(tmp_path):
    # Prepare: one site's encrypted update, as the server would send it back as the "sum"
    spec = JobSpec(name="bound", encryption={"enabled": True})
    save_context(make_secret_context(), tmp_path / "site.context")
    encryption = SiteEncryption(spec=spec, context_path=tmp_path / "site.context")
    adapter = {"w": torch.linspace(-0.4, 0.4, 64)}
    ciphertext, _ = encryption.encrypt(adapter, weight=0.5)

    # Execute: the honest total weight decrypts; an understated one (a deviating server) is refused
    mean = encryption.decrypt_global(ciphertext, template=adapter, total_weight=0.5)
    with pytest.raises(PolicyError, match="beyond the"):
        encryption.decrypt_global(ciphertext, template=adapter, total_weight=0.5 / 100)

    # Assert
    assert torch.allclose(mean["w"], adapter["w"], atol=2 * encryption.packing.step)
