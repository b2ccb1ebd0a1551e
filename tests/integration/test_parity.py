"""Edge cases answered as Triton answers them (its behaviour read from its source), or documented where not."""

from __future__ import annotations

import numpy as np
import pytest
import tritonclient.grpc as tc
from tritonclient.utils import InferenceServerException


def _inputs() -> list[tc.InferInput]:
    inputs = [tc.InferInput("INPUT0", [1, 16], "FP32"), tc.InferInput("INPUT1", [1, 16], "FP32")]
    for tensor in inputs:
        tensor.set_data_from_numpy(np.ones((1, 16), np.float32))
    return inputs


# Triton parses the version with std::stol and refuses what fails or is negative INVALID_ARGUMENT, before it
# looks the model up; " 2" and "2a" it would take as 2 (stol reads a prefix): tidal refuses them as well.
@pytest.mark.parametrize("version", ["abc", "-1", " 2", "2a", "+1"])
@pytest.mark.parametrize("model", ["simple", "no_such_model"])
def test_a_version_that_is_not_a_number_is_invalid_argument(client: tc.InferenceServerClient, version, model) -> None:
    with pytest.raises(InferenceServerException) as err:
        client.infer(model, _inputs(), model_version=version)
    assert err.value.status() == "StatusCode.INVALID_ARGUMENT" and "is not an integer" in err.value.message()
    with pytest.raises(InferenceServerException) as err:
        client.get_model_metadata(model, model_version=version)
    assert err.value.status() == "StatusCode.INVALID_ARGUMENT"


def test_a_numeric_version_that_is_not_served_is_not_found(client: tc.InferenceServerClient) -> None:
    with pytest.raises(InferenceServerException) as err:
        client.infer("simple", _inputs(), model_version="9")
    assert err.value.status() == "StatusCode.NOT_FOUND"
