import jax
import jax.numpy as jnp
import pytest
from jax.sharding import PartitionSpec as P

from ahn_jax import sharding


def test_mesh_shapes_and_errors():
    assert len(jax.devices()) == 8  # tests/conftest.py fakes 8 CPU devices
    mesh = sharding.make_mesh(data=-1, fsdp=2, tensor=2)
    assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
    with pytest.raises(ValueError, match="needs 16 devices"):
        sharding.make_mesh(data=4, fsdp=2, tensor=2)


def test_logical_rules_and_param_shardings():
    mesh = sharding.make_mesh(data=2, fsdp=2, tensor=2)
    assert sharding.logical_to_spec(("batch", None), mesh) == P(("data", "fsdp"), None)
    assert sharding.logical_to_spec(("embed", "heads"), mesh) == P("fsdp", "tensor")
    params = {"layers": {"0": {"self_attn": {"q_proj": {"kernel": jnp.zeros((8, 16))},
                                             "k_proj": {"kernel": jnp.zeros((8, 3))}}}},
              "norm": {"scale": jnp.zeros((8,))}}
    sh = sharding.shard_params(params, mesh)
    assert sh["layers"]["0"]["self_attn"]["q_proj"]["kernel"].spec == P("fsdp", "tensor")
    assert sh["layers"]["0"]["self_attn"]["k_proj"]["kernel"].spec == P("fsdp")  # 3 heads don't divide by 2
    assert sh["norm"]["scale"].spec == P()
    x = jax.device_put(jnp.ones((8, 16)), sh["layers"]["0"]["self_attn"]["q_proj"]["kernel"])
    assert len(x.addressable_shards) == 8
