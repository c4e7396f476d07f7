"""Checkpoints that do not match their config, and config values modgen does not implement,
are refused by name: never approximated."""

from __future__ import annotations

import json
import shutil

import pytest
from safetensors.torch import load_file, save_file

from modgen import LLM
from modgen.blocks import BlockError, block
from modgen.weights import WeightLoadError


def copy_of(zoo, kind, tmp_path):
    """A writable copy of ``kind``'s checkpoint."""
    path = tmp_path / kind
    shutil.copytree(zoo.path(kind), path)
    return path


def edit_config(path, **changes):
    config = json.loads((path / "config.json").read_text())
    config.update(changes)
    (path / "config.json").write_text(json.dumps(config))


def edit_tensors(path, edit):
    tensors = load_file(path / "model.safetensors")
    edit(tensors)
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})


def test_missing_extra_and_misshaped_tensors_are_named_with_shapes(zoo, tmp_path):
    path = copy_of(zoo, "mixtral", tmp_path)
    expert = "model.layers.1.block_sparse_moe.experts.5.w3.weight"

    def edit(t):
        del t[expert]
        w1 = t["model.layers.0.block_sparse_moe.experts.0.w1.weight"]
        t["model.layers.0.block_sparse_moe.experts.8.w1.weight"] = w1.clone()
        qkv = "model.layers.0.self_attn.k_proj.weight"
        t[qkv] = t[qkv][:-1].clone()

    edit_tensors(path, edit)
    with pytest.raises(WeightLoadError) as err:
        LLM("mixtral", checkpoint=str(path))
    msg = str(err.value)
    assert f"missing weights: {expert} (128, 64)" in msg  # an expert's up projection
    assert "unexpected weights: model.layers.0.block_sparse_moe.experts.8.w1.weight" in msg
    assert "model.layers.0.self_attn.k_proj.weight: expected (32, 64), found (31, 64)" in msg


def test_a_fused_checkpoint_tensor_of_the_wrong_shape(zoo, tmp_path):
    path = copy_of(zoo, "falcon_new", tmp_path)
    name = "transformer.h.1.self_attention.query_key_value.weight"
    edit_tensors(path, lambda t: t.__setitem__(name, t[name][:-16].clone()))
    with pytest.raises(WeightLoadError, match=rf"{name}: expected \(128, 64\), found \(112, 64\)"):
        LLM("falcon", checkpoint=str(path))


@pytest.mark.parametrize(
    ("kind", "changes", "match"),
    [
        ("qwen2", {"rope_scaling": {"rope_type": "yarn", "factor": 4.0}},
         r"rope_type 'yarn' is not implemented; implemented: \('default'"),
        ("falcon", {"alibi": True}, "alibi=true .ALiBi position bias. is not implemented"),
        ("qwen2", {"layer_types": ["full_attention", "chunked_attention"]},
         r"layer_types \['chunked_attention'\] are not implemented"),
        ("phi", {"hidden_act": "quick_gelu"}, "activation 'quick_gelu' is not implemented"),
        ("gemma", {"use_bidirectional_attention": True}, "use_bidirectional_attention"),
        ("falcon_new", {"parallel_attn": False}, "new_decoder_architecture with parallel_attn"),
    ],
)  # fmt: skip
def test_unimplemented_config_values_are_refused_by_name(zoo, tmp_path, kind, changes, match):
    path = copy_of(zoo, kind, tmp_path)
    edit_config(path, **changes)
    with pytest.raises(ValueError, match=match):
        LLM(zoo.model(kind), checkpoint=str(path))


def test_auto_lists_the_supported_model_types(zoo, tmp_path):
    path = copy_of(zoo, "opt", tmp_path)
    edit_config(path, model_type="gpt2", architectures=["GPT2LMHeadModel"])
    with pytest.raises(ValueError, match=r"model_type 'gpt2' .* supported model types: .*falcon"):
        LLM("auto", checkpoint=str(path))
    with pytest.raises(ValueError, match=r"set model\.checkpoint"):
        LLM("auto")


def test_a_family_refuses_another_familys_checkpoint(zoo):
    with pytest.raises(ValueError, match=r"model 'qwen3' loads model_type \['qwen3'\].*'qwen2'"):
        LLM("qwen3", checkpoint=str(zoo.path("qwen2")))


def test_block_specs_name_what_is_wrong():
    with pytest.raises(BlockError, match="no mlp block named 'swiglu'; registered: gated, plain"):
        block("mlp", "swiglu")
    with pytest.raises(ValueError, match=r"top_k must be in \[1, 4\] experts, got 5"):
        block("moe", "topk", num_experts=4, top_k=5, intermediate=8)
    with pytest.raises(ValueError, match="q/k/v layout 'bloom' is not implemented"):
        block("attention", "qkv", layout="bloom")
