"""Personal layers: which tensors stay at a site, what the site trains with, what is released, resuming."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError

from zenfed.errors import PolicyError
from zenfed.site.personal import PersonalLayers
from zenfed.spec import LoraSpec

INITIAL = {f"base_model.model.model.layers.{i}.self_attn.q_proj.lora_{p}.weight": torch.full((2, 2), float(i))
           for i in range(3) for p in "AB"}


def layer(i: int, part: str = "B") -> str:
    return f"base_model.model.model.layers.{i}.self_attn.q_proj.lora_{part}.weight"


def test_the_personal_layers_tensors_stay_and_the_rest_is_shared(tmp_path):
    # Prepare
    personal = PersonalLayers(layers=[2], initial_adapter=INITIAL, folder=tmp_path)
    trained = {k: v + 1 for k, v in INITIAL.items()}
    global_ = {k: v + 5 for k, v in INITIAL.items() if ".layers.2." not in k}

    # Execute
    personal.keep(trained)
    for_training, for_release = personal.for_training(global_), personal.for_release(global_)

    # Assert
    assert personal.names == {layer(2, "A"), layer(2, "B")}
    assert personal.shared(INITIAL) == set(INITIAL) - personal.names
    assert torch.equal(for_training[layer(2)], trained[layer(2)])  # the site's own
    assert torch.equal(for_release[layer(2)], INITIAL[layer(2)])  # the shared initial values
    assert torch.equal(for_training[layer(0)], global_[layer(0)])
    assert torch.equal(for_release[layer(0)], global_[layer(0)])


def test_a_restarted_site_resumes_its_personal_tensors_from_a_private_file(tmp_path):
    # Prepare
    PersonalLayers(layers=[1], initial_adapter=INITIAL, folder=tmp_path).keep({k: v * 3 for k, v in INITIAL.items()})

    # Execute
    resumed = PersonalLayers(layers=[1], initial_adapter=INITIAL, folder=tmp_path)

    # Assert
    assert torch.equal(resumed.kept[layer(1)], INITIAL[layer(1)] * 3)
    assert (tmp_path / "personal_layers.safetensors").stat().st_mode & 0o777 == 0o600


def test_personal_layers_must_match_and_leave_something_shared(tmp_path):
    # Execute / Assert
    with pytest.raises(PolicyError, match="match no adapted tensor"):
        PersonalLayers(layers=[7], initial_adapter=INITIAL, folder=tmp_path)
    with pytest.raises(PolicyError, match="nothing would be federated"):
        PersonalLayers(layers=[0, 1, 2], initial_adapter=INITIAL, folder=tmp_path)
    with pytest.raises(ValidationError, match="not adapted"):
        LoraSpec(layers=(0, 1), personal_layers=(2,))
    with pytest.raises(ValidationError, match="every adapted layer is personal"):
        LoraSpec(layers=(0, 1), personal_layers=(0, 1))
    assert PersonalLayers(layers=[], initial_adapter=INITIAL, folder=tmp_path).names == set()
