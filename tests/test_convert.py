"""HF <-> Flax conversion: round trips, loader errors, sharding, random offline checkpoint, tokenizer."""

import functools
import json
import shutil

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import torch
import transformers

from vlm_jax.convert import clip as convert
from vlm_jax.convert import loader
from vlm_jax.convert.loader import CheckpointError
from vlm_jax.data import tokenize as tok_lib

ODD = dict(text=dict(hidden_size=21, num_attention_heads=3, hidden_act="gelu", max_position_embeddings=20),
           vision=dict(hidden_size=30, num_attention_heads=5, image_size=30, patch_size=6))


def assert_trees_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b)):
        assert x.dtype == y.dtype, path
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=str(path))


def one_line_error(fn, *args, match, **kwargs):
    with pytest.raises(CheckpointError, match=match) as e:
        fn(*args, **kwargs)
    assert "\n" not in str(e.value), str(e.value)
    return str(e.value)


@functools.lru_cache(maxsize=None)
def jit_apply(model):
    """One jitted apply per (hashable) module, so tests sharing a model compile it once."""
    return jax.jit(model.apply)


def embeddings(model, params, hf_model, batch=2, seed=0):
    """(flax image, flax text, hf image, hf text) embeddings of random inputs."""
    rng = np.random.default_rng(seed)
    v, t = model.vision, model.text
    pixels = rng.standard_normal((batch, v.image_size, v.image_size, 3)).astype(np.float32)
    ids = rng.integers(0, t.eos_token_id, (batch, t.max_position_embeddings))
    ids[:, -1] = t.eos_token_id
    mask = np.ones_like(ids)
    image, text = jit_apply(model)({"params": params}, pixels, ids.astype(np.int32), mask.astype(np.int32))
    with torch.inference_mode():
        hf_image = hf_model.get_image_features(pixel_values=torch.from_numpy(pixels.transpose(0, 3, 1, 2)))
        hf_text = hf_model.get_text_features(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask))
    return np.asarray(image), np.asarray(text), hf_image.pooler_output.numpy(), hf_text.pooler_output.numpy()


WORDS = ["a photo of a cat", "annual crop land", "forest river"]


@pytest.fixture(scope="module")
def random_ckpt(tmp_path_factory):
    """write_random_checkpoint with odd widths (3 x 7 text heads, 5 x 6 vision heads)."""
    return convert.write_random_checkpoint(tmp_path_factory.mktemp("random") / "clip", seed=3, words=WORDS,
                                           projection_dim=12, **ODD)


@pytest.fixture(scope="module")
def flax_export(random_ckpt, tmp_path_factory):
    """The random checkpoint's Flax params, perturbed, exported again with to_hf."""
    model, params = convert.from_pretrained(random_ckpt)
    # Non-trivial biases and norms (Flax init gives 0 / 1), so a wrong mapping cannot hide.
    rng = np.random.default_rng(1)
    params = jax.tree.map(lambda x: np.asarray(x) + 0.05 * rng.standard_normal(x.shape, np.float32), params)
    out = convert.to_hf(model, params, tmp_path_factory.mktemp("flax_export") / "ckpt")
    return model, params, out


def test_flax_to_hf_matches_hf_and_reloads_exactly(flax_export):
    model, params, out = flax_export
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    hf_model = transformers.CLIPModel.from_pretrained(out).eval()
    image, text, hf_image, hf_text = embeddings(model, params, hf_model)
    np.testing.assert_allclose(image, hf_image, atol=1e-5, rtol=0)
    np.testing.assert_allclose(text, hf_text, atol=1e-5, rtol=0)
    model2, params2 = convert.from_pretrained(out)
    assert model2 == model
    assert_trees_equal(params2, params)


def test_bfloat16_export_and_load(flax_export, tmp_path):
    model, params, _ = flax_export
    out = convert.to_hf(model, params, tmp_path / "bf16", dtype=ml_dtypes.bfloat16)
    header = (out / "model.safetensors").read_bytes()
    n = int.from_bytes(header[:8], "little")
    assert {v["dtype"] for k, v in json.loads(header[8:8 + n]).items() if k != "__metadata__"} == {"BF16"}
    # Both the safetensors numpy backend and the raw fallback parser read bf16 identically.
    via_lib, via_raw = loader.read_safetensors(out / "model.safetensors"), loader._read_raw(out / "model.safetensors")
    assert_trees_equal(via_lib, via_raw)
    _, params_bf16 = convert.from_pretrained(out, dtype=jnp.bfloat16)
    assert_trees_equal(params_bf16, jax.tree.map(lambda x: x.astype(jnp.bfloat16), params))
    hf_model = transformers.CLIPModel.from_pretrained(out, dtype=torch.float32)
    want = np.asarray(params["text_projection"]["kernel"].astype(jnp.bfloat16).astype(np.float32)).T
    np.testing.assert_array_equal(hf_model.text_projection.weight.detach().numpy(), want)


def test_sharded_checkpoint_loads(hf_clip):
    _, single = hf_clip("base")
    _, sharded = hf_clip("base_sharded", max_shard_size="20KB")  # same seed -> same weights
    shards = list(sharded.glob("model-*.safetensors"))
    assert (sharded / "model.safetensors.index.json").is_file() and len(shards) > 1
    _, params = convert.from_pretrained(single)
    _, params_sharded = convert.from_pretrained(sharded)
    assert_trees_equal(params_sharded, params)


@pytest.fixture(scope="module")
def base(hf_clip):
    """(model, shape tree, HF tensors) of the conftest's base tiny CLIP."""
    _, path = hf_clip("base")
    model, _ = convert.from_pretrained(path)
    return model, convert.param_shapes(model), loader.load_tensors(path)


def test_table_errors_name_every_tensor(base):
    model, shapes, tensors = base
    table = convert.table_for(model)
    q = "text_model.encoder.layers.1.self_attn.q_proj.weight"
    bad = dict(tensors)
    del bad["text_projection.weight"]
    bad["vision_model.extra.weight"] = np.zeros(3, np.float32)
    bad[q] = np.zeros((32, 30), np.float32)
    bad["text_model.embeddings.position_ids"] = np.arange(12)[None]  # buffer: ignored, not "extra"
    with pytest.raises(CheckpointError) as e:
        loader.apply_table(table, bad, shapes, ignore=convert.IGNORE)
    msg = str(e.value)
    assert "missing tensors: ['text_projection.weight']" in msg
    assert "unexpected tensors: ['vision_model.extra.weight']" in msg
    assert f"wrong shape for {q}: expected (32, 32)" in msg and "got (32, 30)" in msg
    assert "position_ids" not in msg
    # Casting to a requested dtype, and exact inverse of export_table.
    params = loader.apply_table(table, tensors, shapes, dtype=ml_dtypes.bfloat16)
    assert {x.dtype for x in jax.tree.leaves(params)} == {np.dtype(ml_dtypes.bfloat16)}
    params = loader.apply_table(table, tensors, shapes)
    exported = loader.export_table(table, params)
    assert exported.keys() == tensors.keys()
    for k, v in tensors.items():
        np.testing.assert_array_equal(exported[k], v, err_msg=k)


def test_export_table_rejects_uncovered_params(base):
    model, shapes, tensors = base
    params = loader.apply_table(convert.table_for(model), tensors, shapes)
    params["text_model"]["surprise"] = np.zeros(2)
    with pytest.raises(CheckpointError, match="text_model/surprise"):
        loader.export_table(convert.table_for(model), params)


def test_missing_tensor_file_names_it(base, hf_clip, tmp_path):
    _, _, tensors = base
    config = loader.read_config(hf_clip("base")[1])
    bad = {k: v for k, v in tensors.items() if k != "vision_model.post_layernorm.bias"}
    loader.write_checkpoint(tmp_path / "ckpt", bad, config)
    with pytest.raises(CheckpointError, match=r"missing tensors: \['vision_model.post_layernorm.bias'\]"):
        convert.from_pretrained(tmp_path / "ckpt")


def test_resolve_errors_are_one_line(hf_clip, tmp_path):
    _, path = hf_clip("base")
    no_config = tmp_path / "no_config"
    no_config.mkdir()
    shutil.copy(path / "model.safetensors", no_config)
    one_line_error(convert.from_pretrained, no_config, match="no config.json")
    torch_only = tmp_path / "torch_only"
    torch_only.mkdir()
    shutil.copy(path / "config.json", torch_only)
    (torch_only / "pytorch_model.bin").write_bytes(b"\0")
    one_line_error(convert.from_pretrained, torch_only, match="only PyTorch weights.*pytorch_model.bin")
    one_line_error(convert.from_pretrained, tmp_path / "does" / "not" / "exist", match="does not exist")
    msg = one_line_error(convert.from_pretrained, "nonexistent-org/nonexistent-clip", match="not found")
    assert "hf download nonexistent-org/nonexistent-clip" in msg and "local directory" in msg


def test_corrupt_safetensors_is_one_line(hf_clip, tmp_path):
    _, path = hf_clip("base")
    for name, mangle in [("garbage", lambda b: b"\x07" * 64), ("truncated", lambda b: b[: len(b) // 2])]:
        d = tmp_path / name
        shutil.copytree(path, d)
        f = d / "model.safetensors"
        f.write_bytes(mangle(f.read_bytes()))
        one_line_error(convert.from_pretrained, d, match="corrupt or truncated safetensors")


def test_hub_id_resolves_from_local_cache_only(hf_clip, tmp_path):
    _, path = hf_clip("base")
    snap = tmp_path / "hub" / "models--someorg--tiny-clip" / "snapshots" / ("a" * 40)
    shutil.copytree(path, snap)
    (snap.parents[1] / "refs").mkdir()
    (snap.parents[1] / "refs" / "main").write_text("a" * 40)
    assert loader.resolve_checkpoint("someorg/tiny-clip", cache_dir=tmp_path / "hub") == snap
    one_line_error(loader.resolve_checkpoint, "someorg/other", cache_dir=tmp_path / "hub", match="hf download")


def test_write_checkpoint_is_atomic(tmp_path):
    tensors = {"a": np.ones((2, 2), np.float32)}
    with pytest.raises(TypeError):
        loader.write_checkpoint(tmp_path / "out", tensors, {}, extra_files={"bad": object()})
    assert list(tmp_path.iterdir()) == []  # neither out/ nor a temp dir is left
    # Into an existing directory: stale shards that would shadow the new file are removed.
    out = tmp_path / "out"
    out.mkdir()
    (out / "model-00001-of-00002.safetensors").write_bytes(b"old")
    (out / "model.safetensors.index.json").write_text("{}")
    loader.write_checkpoint(out, tensors, {"x": 1}, extra_files={"note.txt": "hi"})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors", "note.txt"]
    np.testing.assert_array_equal(loader.load_tensors(out)["a"], tensors["a"])


def test_random_checkpoint_loads_everywhere(random_ckpt):
    names = {p.name for p in random_ckpt.iterdir()}
    assert {"config.json", "model.safetensors", "vocab.json", "merges.txt", "preprocessor_config.json"} <= names
    model, params = convert.from_pretrained(random_ckpt)
    hf_model = transformers.CLIPModel.from_pretrained(random_ckpt).eval()
    tokenizer = tok_lib.load_tokenizer(random_ckpt)
    ids, mask = tok_lib.tokenize(tokenizer, ["a photo of a cat", "forest"])
    pixels = np.random.default_rng(0).standard_normal((2, 30, 30, 3)).astype(np.float32)
    image, text = jit_apply(model)({"params": params}, pixels, ids, mask)
    with torch.inference_mode():
        hf_image = hf_model.get_image_features(pixel_values=torch.from_numpy(pixels.transpose(0, 3, 1, 2)))
        hf_text = hf_model.get_text_features(input_ids=torch.from_numpy(ids.astype(np.int64)),
                                             attention_mask=torch.from_numpy(mask.astype(np.int64)))
    np.testing.assert_allclose(image, hf_image.pooler_output.numpy(), atol=1e-5, rtol=0)
    np.testing.assert_allclose(text, hf_text.pooler_output.numpy(), atol=1e-5, rtol=0)
    assert np.abs(np.asarray(text[0] - text[1])).max() > 1e-3  # a random but non-degenerate model
    processor = transformers.CLIPImageProcessor.from_pretrained(random_ckpt)
    image_in = (np.random.default_rng(0).random((48, 40, 3)) * 255).astype(np.uint8)
    assert processor(images=image_in, return_tensors="np")["pixel_values"].shape == (1, 3, 30, 30)


def test_random_checkpoint_tokenizer(random_ckpt):
    tokenizer = tok_lib.load_tokenizer(random_ckpt)
    assert isinstance(tokenizer, transformers.CLIPTokenizer)
    assert isinstance(transformers.AutoTokenizer.from_pretrained(random_ckpt, local_files_only=True),
                      transformers.CLIPTokenizer)
    config = json.loads((random_ckpt / "config.json").read_text())["text_config"]
    assert tokenizer.eos_token_id == config["eos_token_id"] == tokenizer.pad_token_id == len(tokenizer) - 1
    assert tokenizer.bos_token_id == config["bos_token_id"] and config["vocab_size"] == len(tokenizer)
    # CLIP's pre-tokeniser splits punctuation (and digits) into separate words.
    for text in ["a photo of a cat", "zebra and the river, ok", "héllo wörld"]:
        ids = tokenizer(text)["input_ids"]
        assert ids[0] == tokenizer.bos_token_id and ids[-1] == tokenizer.eos_token_id
        assert tokenizer.decode(ids, skip_special_tokens=True) == text.replace(",", " ,")
    for word in " ".join(WORDS).split():  # requested words are single tokens
        assert len(tokenizer(word, add_special_tokens=False)["input_ids"]) == 1, word
    ids, mask = tok_lib.tokenize(tokenizer, ["annual crop land", "x" * 200])
    assert ids.shape == mask.shape == (2, 20) and ids.dtype == mask.dtype == np.int32
    assert mask[0].sum() == 5 and (ids[0, 5:] == tokenizer.pad_token_id).all()  # bos annual crop land eos
    ids, mask = tok_lib.tokenize(tokenizer, ["x" * 200], max_length=8)
    assert ids[0, 0] == tokenizer.bos_token_id and ids[0, -1] == tokenizer.eos_token_id and mask.all()


def test_tokenizer_errors(hf_clip, random_ckpt):
    one_line_error(tok_lib.load_tokenizer, hf_clip("base")[1], match="has no tokenizer")
    with pytest.raises(ValueError, match="vocab_size"):
        convert.write_random_checkpoint(random_ckpt.parent / "small", text=dict(vocab_size=10))
    assert not (random_ckpt.parent / "small").exists()
