"""Triton's JSON model config read as ours (router/model_config.py): what maps, and
a clear INVALID_ARGUMENT naming the field for what does not."""

from __future__ import annotations

import json

import pytest

from meshserve.errors import InvalidArgument
from router.model_config import parse_triton_config


def test_the_fields_that_map_onto_config_yaml() -> None:
    config = parse_triton_config(
        json.dumps(
            {
                "name": "m",
                "platform": "onnxruntime_onnx",
                "max_batch_size": "16",  # Triton's JSON writes int64 as a string
                "dynamic_batching": {
                    "max_queue_delay_microseconds": 1500,
                    "preferred_batch_size": [4, 8],
                    "default_queue_policy": {"max_queue_size": "100"},
                },
                "version_policy": {"specific": {"versions": [1, "3"]}},
                "instance_group": [{"count": 2, "kind": "KIND_CPU"}, {"count": 1, "kind": "KIND_CPU"}],
            }
        ),
        "m",
    )
    assert config.yaml == {
        "max_batch_size": 16,
        "dynamic_batching": {"max_queue_delay_ms": 1.5, "preferred_batch_sizes": [4, 8], "max_queue_size": 100},
        "versions": [1, 3],
        "instances": 3,
        "placement": {"device": "cpu"},
    }
    latest = parse_triton_config('{"version_policy": {"latest": {"num_versions": 2}}}', "m")
    assert latest.latest_versions == 2
    assert "versions" not in latest.yaml
    mixed = parse_triton_config('{"instance_group": [{"kind": "KIND_GPU"}, {"kind": "KIND_CPU"}]}', "m")
    assert mixed.yaml == {"instances": 2, "placement": {"device": "any"}}


@pytest.mark.parametrize(
    ("config", "field"),
    [
        ({"optimization": {}}, "'optimization'"),
        ({"dynamic_batching": {"priority_levels": 2}}, "'dynamic_batching.priority_levels'"),
        ({"name": "other"}, "'name'"),
        ({"backend": "tensorrt"}, "'platform'/'backend'"),
        ({"version_policy": {"latest": {}, "all": {}}}, "'version_policy'"),
        ({"instance_group": [{"count": 1, "gpus": [0]}]}, "'instance_group[].gpus'"),
        ({"instance_group": [{"kind": "KIND_MODEL"}]}, "'instance_group[].kind'"),
        ({"input": [{"dims": [3]}]}, "'input[0].name'"),
        ({"output": [{"name": "y", "data_type": "FP32"}]}, "'output[0].data_type'"),
        ({"max_batch_size": True}, "'max_batch_size'"),
        ([1, 2], "expected a JSON object"),
    ],
)
def test_what_does_not_map_is_refused_naming_the_field(config: object, field: str) -> None:
    with pytest.raises(InvalidArgument) as refused:
        parse_triton_config(json.dumps(config), "m")
    assert field in refused.value.message
