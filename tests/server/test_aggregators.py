"""FedAvg aggregation: a running weighted mean that equals the textbook formula."""

from __future__ import annotations

import pytest
import torch

from zenfed.errors import AdapterError
from zenfed.server.aggregation import WeightedMean

NAMES = ("m.layers.0.q_proj.lora_A.weight", "m.layers.0.q_proj.lora_B.weight")


def site_adapter(seed: int):
    gen = torch.Generator().manual_seed(seed)
    return {
        NAMES[0]: torch.randn(4, 16, generator=gen),
        NAMES[1]: torch.randn(16, 4, generator=gen),
    }


def test_result_equals_an_independently_computed_weighted_mean():
    # Prepare
    sites = {
        "a": (site_adapter(1), 120.0),
        "b": (site_adapter(2), 30.0),
        "c": (site_adapter(3), 50.0),
    }
    agg = WeightedMean()

    # Execute
    for name, (state, weight) in sites.items():
        agg.add(name, state, weight=weight)
    mean = agg.result()

    # Assert: sum_k w_k x_k / sum_k w_k, computed here with numpy in float64.
    total = sum(w for _, w in sites.values())
    for name in NAMES:
        expected = sum(s[name].double().numpy() * w for s, w in sites.values()) / total
        assert mean[name].dtype == torch.float32
        assert torch.allclose(mean[name], torch.from_numpy(expected).float(), atol=1e-7, rtol=0)
    assert agg.count == 3 and agg.total_weight == total and agg.contributors == ["a", "b", "c"]


def test_the_order_of_arrival_does_not_matter():
    # Prepare
    forward, backward = WeightedMean(), WeightedMean()
    items = [("a", site_adapter(1), 3.0), ("b", site_adapter(2), 7.0)]

    # Execute
    for site, state, weight in items:
        forward.add(site, state, weight=weight)
    for site, state, weight in reversed(items):
        backward.add(site, state, weight=weight)

    # Assert
    for name in NAMES:
        assert torch.allclose(forward.result()[name], backward.result()[name], atol=1e-7)


def test_equal_weights_give_the_plain_mean():
    # Prepare
    agg = WeightedMean()
    a, b = site_adapter(1), site_adapter(2)

    # Execute
    agg.add("a", a, weight=1.0)
    agg.add("b", b, weight=1.0)

    # Assert
    for name in NAMES:
        assert torch.allclose(agg.result()[name], (a[name] + b[name]) / 2, atol=1e-7)


@pytest.mark.parametrize("damage", ["shape", "name"])
def test_a_mismatched_update_is_refused_and_leaves_the_sum_alone(damage):
    # Prepare
    agg = WeightedMean()
    good = site_adapter(1)
    agg.add("a", good, weight=2.0)
    bad = site_adapter(2)
    if damage == "shape":
        bad[NAMES[0]] = torch.zeros(5, 16)
    else:
        bad["m.layers.9.q_proj.lora_A.weight"] = bad.pop(NAMES[0])

    # Execute
    with pytest.raises(AdapterError):
        agg.add("b", bad, weight=1.0)

    # Assert
    assert agg.count == 1
    assert torch.allclose(agg.result()[NAMES[0]], good[NAMES[0]], atol=1e-7)


@pytest.mark.parametrize("weight", [0.0, -1.0, float("nan")])
def test_a_non_positive_weight_is_refused(weight):
    # Execute / Assert
    with pytest.raises(ValueError, match="weight must be positive"):
        WeightedMean().add("a", site_adapter(1), weight=weight)


def test_no_update_means_no_result():
    # Execute / Assert
    with pytest.raises(ValueError, match="no site update"):
        WeightedMean().result()


def test_plain_fedavg_weights_by_the_sample_count_in_each_header():
    # Prepare
    from zenfed.wire import encode_adapter

    fedavg = plain_fedavg("samples")
    fedavg.begin(round_index=1)
    a, b = site_adapter(1), site_adapter(2)

    # Execute
    wa = fedavg.add(site="a", header={"num_examples": 300}, payload=encode_adapter(a))
    wb = fedavg.add(site="b", header={"num_examples": 100}, payload=encode_adapter(b))
    mean = fedavg.result()

    # Assert
    assert (wa, wb) == (300.0, 100.0) and fedavg.total_weight == 400.0 and fedavg.contributors == ["a", "b"]
    for name in NAMES:
        assert torch.allclose(mean[name], 0.75 * a[name] + 0.25 * b[name], atol=1e-6)


def test_plain_fedavg_uniform_weighting_ignores_sample_counts():
    # Prepare
    from zenfed.wire import encode_adapter

    fedavg = plain_fedavg("uniform")
    fedavg.begin(round_index=1)
    a, b = site_adapter(1), site_adapter(2)

    # Execute
    fedavg.add(site="a", header={"num_examples": 300}, payload=encode_adapter(a))
    fedavg.add(site="b", header={"num_examples": 100}, payload=encode_adapter(b))

    # Assert
    for name in NAMES:
        assert torch.allclose(fedavg.result()[name], (a[name] + b[name]) / 2, atol=1e-6)


def test_plain_fedavg_begin_starts_an_empty_round():
    # Prepare
    from zenfed.wire import encode_adapter

    fedavg = plain_fedavg("samples")
    fedavg.begin(round_index=1)
    fedavg.add(
        site="a",
        header={"num_examples": 3},
        payload=encode_adapter(site_adapter(1)),
    )

    # Execute
    fedavg.begin(round_index=2)

    # Assert
    assert fedavg.count == 0 and fedavg.contributors == []


def test_plain_fedavg_refuses_a_garbage_payload():
    # Prepare

    fedavg = plain_fedavg("samples")
    fedavg.begin(round_index=1)

    # Execute / Assert
    with pytest.raises(AdapterError):
        fedavg.add(site="a", header={"num_examples": 3}, payload=b"not an adapter")
    assert fedavg.count == 0


def plain_fedavg(weighting: str):
    """The server's plaintext FedAvg, as the job's strategy builds it."""
    from zenfed.server.aggregation import make_aggregation
    from zenfed.spec import JobSpec
    from zenfed.strategies import make_strategy

    spec = JobSpec(name="agg-test", federation={"weighting": weighting})
    return make_aggregation(make_strategy(spec), job_id="job-1", server_context=None)


def test_a_second_answer_from_the_same_site_in_a_round_is_rejected(tmp_path):
    # Prepare
    from zenfed import protocol as P
    from zenfed.audit.sink import AuditSink
    from zenfed.protocol import Message
    from zenfed.server.intake import RoundIntake
    from zenfed.spec import JobSpec
    from zenfed.wire import encode_adapter

    spec = JobSpec(name="dup")
    intake = RoundIntake(spec=spec, job_id="job-1", out_dir=tmp_path, audit=AuditSink(None),
                         aggregation=plain_fedavg("samples"))
    intake.begin(task=P.TASK_TRAIN, round_index=1)

    def answer(seed: int) -> Message:
        payload = encode_adapter(site_adapter(seed))
        from zenfed.digest import sha256_hex

        return Message(header={P.H_JOB_ID: "job-1", P.H_ROUND: 1, P.H_EVAL_LOSS: 1.0, P.H_EVAL_ACCURACY: 0.0,
                               P.H_EVAL_EXAMPLES: 1, P.H_NUM_EXAMPLES: 10, P.H_PAYLOAD_SHA256: sha256_hex(payload),
                               P.H_PAYLOAD_BYTES: len(payload)}, payload=payload)

    # Execute
    intake.accept("a", answer(1))
    intake.accept("a", answer(2))

    # Assert: only the first counts
    assert intake.answered == 1 and intake.aggregation.contributors == ["a"]
    assert torch.allclose(intake.aggregation.result()[NAMES[0]], site_adapter(1)[NAMES[0]])
