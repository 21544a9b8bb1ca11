"""The transformer family (``vit``) and the training recipe chosen per kind of model."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from edgecore.errors import ConfigError, ModelError
from toolchain.config import ModelConfig, load_config
from toolchain.models import ViT, build_model, count_macs, recipe_kind
from toolchain.recipes import RECIPES, apply_recipe, resolve


def vit_cfg(**kw) -> ModelConfig:
    return dataclasses.replace(ModelConfig(family="vit", width=16, depth=1, heads=2), **kw)


@pytest.mark.parametrize("shape, tokens", [((1, 8, 8), 16), ((1, 1, 40), 20), ((3, 32, 32), 64), ((1, 5, 7), 35)])
@pytest.mark.parametrize("pool", ["mean", "cls"])
def test_vit_on_images_and_signals(shape, tokens, pool):
    m = build_model(vit_cfg(pool=pool), input_shape=shape, num_classes=7).eval()
    assert m.pos_embed.shape[1] == tokens + (pool == "cls")
    with torch.no_grad():
        assert m(torch.zeros(3, *shape)).shape == (3, 7)


def test_vit_patch_heads_and_depth_shape_it():
    small = build_model(vit_cfg(), input_shape=(1, 8, 8), num_classes=10)
    deep = build_model(vit_cfg(depth=3), input_shape=(1, 8, 8), num_classes=10)
    fine = build_model(vit_cfg(patch=1), input_shape=(1, 8, 8), num_classes=10)
    assert len(deep.blocks) == 3 and deep.blocks[0].attn.num_heads == 2 and deep.blocks[0].attn.head_dim == 8
    assert fine.pos_embed.shape[1] == 64 + 1  # 64 patches and the class token
    assert count_macs(deep, (1, 8, 8)) > 2 * count_macs(small, (1, 8, 8)) > 0


def test_vit_errors():
    with pytest.raises(ModelError, match="needs image or signal inputs"):
        build_model(vit_cfg(), input_shape=(12,), num_classes=3)
    with pytest.raises(ModelError, match="larger than the input"):
        build_model(vit_cfg(patch=9), input_shape=(1, 8, 8), num_classes=3)


def test_vit_config_is_checked(tmp_path):
    p = tmp_path / "t.toml"
    p.write_text('[teacher]\nfamily = "vit"\nwidth = 30\nheads = 4\n')
    with pytest.raises(ConfigError, match=r"teacher\.width: must be a multiple of heads \(4\)"):
        load_config(p)
    p.write_text('[teacher]\nfamily = "vit"\npool = "max"\n')
    with pytest.raises(ConfigError, match="teacher.pool: must be 'mean' or 'cls'"):
        load_config(p)


def test_recipe_kind_sees_attention_in_any_model():
    assert recipe_kind(build_model(vit_cfg(), input_shape=(1, 8, 8), num_classes=3)) == "transformer"
    assert recipe_kind(build_model(ModelConfig(width=4, depth=1), input_shape=(1, 8, 8), num_classes=3)) == "convnet"
    user = torch.nn.Sequential(torch.nn.TransformerEncoder(
        torch.nn.TransformerEncoderLayer(8, 2, 16, batch_first=True), 1, enable_nested_tensor=False))
    assert recipe_kind(user) == "transformer"


def test_transformer_recipe_fills_unset_keys_and_the_config_wins(tmp_path):
    vit = ViT((1, 8, 8), 3, width=8, depth=1, heads=2, patch=0, mlp_ratio=1, pool="mean", dropout=0.0)
    cfg, record = resolve(load_config(None), vit)
    want = RECIPES["transformer"]
    assert record["name"] == "transformer" and record["from_config"] == []
    assert cfg.train.lr == want["train.lr"] and cfg.train.weight_decay == want["train.weight_decay"]
    assert cfg.data.batch_size == want["data.batch_size"] and cfg.distill.lr == want["distill.lr"]
    # a key the user set keeps the user's value, and the record says so
    user, record = resolve(load_config(None, overrides=["train.lr=0.0005", "train.epochs=7"]), vit)
    assert user.train.lr == 0.0005 and user.train.epochs == 7 and user.train.weight_decay == want["train.weight_decay"]
    assert set(record["from_config"]) == {"train.lr", "train.epochs"}
    # a file that lists every default (the repository's toolchain.toml) makes no choice
    p = tmp_path / "t.toml"
    p.write_text("[train]\nlr = 0.003\nepochs = 30\n")
    assert resolve(load_config(p), vit)[0].train.lr == want["train.lr"]
    # train.recipe names one outright; a convnet keeps the section defaults
    forced, record = resolve(load_config(None, overrides=['train.recipe="convnet"']), vit)
    assert forced.train == dataclasses.replace(load_config(None).train, recipe="convnet")
    assert record["chosen_by"] == "train.recipe"
    conv = build_model(ModelConfig(width=4, depth=1), input_shape=(1, 8, 8), num_classes=3)
    assert resolve(load_config(None), conv)[0] == load_config(None)


def test_a_value_set_in_code_is_kept():
    base = load_config(None)
    cfg = dataclasses.replace(base, train=dataclasses.replace(base.train, lr=0.0123))
    out, record = apply_recipe(cfg, "transformer")
    assert out.train.lr == 0.0123 and "train.lr" in record["from_config"]


def test_switching_recipes_resets_what_the_other_set():
    cfg, _ = apply_recipe(load_config(None), "transformer")
    back, _ = apply_recipe(cfg, "convnet")
    assert back.train == load_config(None).train and back.data == load_config(None).data
    with pytest.raises(KeyError, match="unknown training recipe"):
        apply_recipe(cfg, "rnn")


def test_train_records_the_recipe_it_used(tmp_path):
    from toolchain import pipeline

    cfg = load_config(None, overrides=['teacher.family="vit"', "teacher.width=8", "teacher.depth=1", "teacher.heads=2",
                                       "train.epochs=1", "train.progress=false", "train.weight_decay=0.01"])
    report = pipeline.train(cfg, tmp_path / "run")
    rec = report["recipe"]
    assert rec["name"] == "transformer" and set(rec["from_config"]) == {"train.weight_decay", "train.epochs"}
    assert rec["values"]["train.lr"] == RECIPES["transformer"]["train.lr"] and rec["values"]["train.epochs"] == 1
    written = load_config(tmp_path / "run" / "config.toml")
    assert written.train.lr == RECIPES["transformer"]["train.lr"] and written.train.weight_decay == 0.01


def test_patch_stem_is_the_plain_patchify():
    plain = build_model(vit_cfg(stem="patch", patch=4), input_shape=(3, 32, 32), num_classes=5)
    conv = build_model(vit_cfg(patch=4), input_shape=(3, 32, 32), num_classes=5)
    assert isinstance(plain.patch_embed, torch.nn.Conv2d) and plain.patch_embed.kernel_size == (4, 4)
    assert plain.pos_embed.shape[1] == conv.pos_embed.shape[1] == 64 + 1
    assert count_macs(plain, (3, 32, 32)) < count_macs(conv, (3, 32, 32))
    with pytest.raises(ConfigError, match="teacher.stem: must be 'conv' or 'patch'"):
        load_config(None, overrides=['teacher.stem="hybrid"'])
