import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import struct

from jaxfit import params as P

TREE = {
    "text_model": {
        "layers": {"mlp": {"fc1": {"kernel": np.zeros((2, 3, 4)), "bias": np.zeros((2, 4))}}},
        "final_layer_norm": {"scale": np.zeros(4), "bias": np.zeros(4)},
    },
    "logit_scale": np.zeros(()),
}


class Holder(struct.PyTreeNode):
    params: dict
    extra: list


def test_path_str_all_key_kinds():
    tree = Holder(params={"a": {"kernel": 1}}, extra=[2, 3])
    names = [P.path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]
    assert names == ["params/a/kernel", "extra/0", "extra/1"]
    assert P.path_str(("a", 1, "b")) == "a/1/b"


def test_flatten_names_and_order():
    flat = P.flatten(TREE)
    assert list(flat) == [
        "logit_scale",
        "text_model/final_layer_norm/bias",
        "text_model/final_layer_norm/scale",
        "text_model/layers/mlp/fc1/bias",
        "text_model/layers/mlp/fc1/kernel",
    ]
    assert flat["text_model/layers/mlp/fc1/kernel"].shape == (2, 3, 4)


def test_flatten_rejects_colliding_names():
    with pytest.raises(ValueError, match="a/b"):
        P.flatten({"a/b": 1, "a": {"b": 2}})


def test_match_regex_search():
    mask = P.match(TREE, [r"(^|/)bias$", r"^logit_scale$"])
    assert P.flatten(mask) == {
        "logit_scale": True,
        "text_model/final_layer_norm/bias": True,
        "text_model/final_layer_norm/scale": False,
        "text_model/layers/mlp/fc1/bias": True,
        "text_model/layers/mlp/fc1/kernel": False,
    }
    assert jax.tree.structure(mask) == jax.tree.structure(TREE)
    assert not any(jax.tree.leaves(P.match(TREE, [])))


def test_match_errors():
    with pytest.raises(ValueError, match=r"\(unclosed"):
        P.match(TREE, ["(unclosed"])
    with pytest.raises(TypeError, match="sequence"):
        P.match(TREE, "bias")


def test_unmatched_reports_typos():
    assert P.unmatched(TREE, ["fc1/kernel", "fc2/kernel", "norm"]) == ["fc2/kernel"]


def test_assign_first_rule_wins():
    out = P.assign(TREE, [("kernel", "k"), ("fc1", "fc1"), ("norm", "n")], default="-")
    assert P.flatten(out) == {
        "logit_scale": "-",
        "text_model/final_layer_norm/bias": "n",
        "text_model/final_layer_norm/scale": "n",
        "text_model/layers/mlp/fc1/bias": "fc1",
        "text_model/layers/mlp/fc1/kernel": "k",
    }


def test_count_arrays_and_abstract():
    assert P.count(TREE) == 24 + 8 + 4 + 4 + 1
    abstract = jax.eval_shape(lambda: jax.tree.map(jnp.asarray, TREE))
    assert P.count(abstract) == 41
