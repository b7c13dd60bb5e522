"""Parity of vlm_jax.models.llama.CausalLM with HF torch Llama/Qwen2 (tiny random configs, float32, CPU),
conversion round trips and errors, and full-size parameter counts from shapes alone."""

import functools
import json
import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers


from vlm_jax.convert import llama as convert
from vlm_jax.convert import loader
from vlm_jax.convert.loader import CheckpointError
from vlm_jax.models import llama as llama_lib
from vlm_jax.models.llama import CausalLM

TINY = dict(vocab_size=101, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=64, bos_token_id=1, eos_token_id=2, pad_token_id=0)
# name -> (model_type, overrides of TINY).
CASES = {
    # Multi-head (no GQA), with Llama's optional attention/MLP biases.
    "llama_mha": ("llama", dict(num_key_value_heads=4, attention_bias=True, mlp_bias=True)),
    # GQA (2 groups), head_dim != hidden / heads, 3 layers, another eps, linear rope scaling.
    "llama_gqa": ("llama", dict(num_key_value_heads=2, head_dim=12, num_hidden_layers=3, rms_norm_eps=1e-5,
                                rope_parameters=dict(rope_type="linear", factor=2.0, rope_theta=500.0))),
    # Qwen2: q/k/v biases, tied embeddings, its large rope_theta, 6 heads over 2 kv heads.
    "qwen2_tied": ("qwen2", dict(hidden_size=48, num_attention_heads=6, num_key_value_heads=2,
                                 tie_word_embeddings=True, rope_parameters=dict(rope_type="default",
                                                                                rope_theta=1e6))),
    # Qwen2 untied, multi-query attention (one kv head).
    "qwen2_untied": ("qwen2", dict(num_key_value_heads=1, tie_word_embeddings=False)),
}


def hf_model_for(model_type, overrides, seed=0):
    """A HF *ForCausalLM from TINY + overrides, every parameter perturbed (HF initialises norms
    to 1 and biases to 0, which would hide mapping bugs)."""
    cls = {"llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
           "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM)}[model_type]
    torch.manual_seed(seed)
    model = cls[1](cls[0](**{**TINY, **overrides})).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


@pytest.fixture(scope="module")
def hf_lm(tmp_path_factory):
    """name -> (hf_model, checkpoint dir), cached for the module."""
    cache = {}

    def make(name):
        if name not in cache:
            model = hf_model_for(*CASES[name])
            path = tmp_path_factory.mktemp(name)
            model.save_pretrained(path)
            cache[name] = (model, path)
        return cache[name]

    return make


@pytest.fixture(scope="module")
def loaded(hf_lm):
    """name -> (hf_model, flax model, params)."""
    cache = {}

    def get(name):
        if name not in cache:
            hf_model, path = hf_lm(name)
            cache[name] = (hf_model, *convert.from_pretrained(path))
        return cache[name]

    return get


@functools.lru_cache(maxsize=None)
def jit_apply(model, **kwargs):
    return jax.jit(functools.partial(model.apply, **kwargs))


def padded_batch(vocab, length=10, seed=0):
    """ids/mask i32[3, L]: a full row, a left-padded row (3 pads), a right-padded row (4 pads)."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, vocab, (3, length)).astype(np.int32)
    mask = np.ones((3, length), np.int32)
    mask[1, :3] = 0
    mask[2, -4:] = 0
    ids[mask == 0] = 0
    return ids, mask


def positions_of(mask):
    """HF generate's rule, which is also our default: cumsum(mask) - 1, clipped at 0."""
    return np.maximum(np.cumsum(mask, -1) - 1, 0).astype(np.int32)


def hf_forward(hf_model, ids, mask, positions):
    with torch.inference_mode():
        out = hf_model(input_ids=torch.from_numpy(ids.astype(np.int64)), attention_mask=torch.from_numpy(mask),
                       position_ids=torch.from_numpy(positions.astype(np.int64)), output_hidden_states=True)
    return out.logits.numpy(), out.hidden_states[-1].numpy()


@pytest.mark.parametrize("name", list(CASES))
def test_logits_match_hf(loaded, name):
    hf_model, model, params = loaded(name)
    ids, mask = padded_batch(model.cfg.vocab_size)
    pos = positions_of(mask)
    want_logits, want_hidden = hf_forward(hf_model, ids, mask, pos)
    # HF's forward uses arange positions when position_ids is not given; pass the same to both.
    logits, hidden = jit_apply(model, return_hidden=True)({"params": params}, ids, mask, positions=pos)
    real = mask.astype(bool)
    assert logits.shape == (3, 10, model.cfg.vocab_size) and logits.dtype == jnp.float32
    assert np.abs(np.asarray(logits)[real] - want_logits[real]).max() <= 1e-4
    assert np.abs(np.asarray(hidden)[real] - want_hidden[real]).max() <= 1e-4
    # Our default positions are exactly those; the no-padding row also equals HF's arange default.
    np.testing.assert_array_equal(np.asarray(jit_apply(model)({"params": params}, ids, mask)), np.asarray(logits))
    with torch.inference_mode():
        plain = hf_model(input_ids=torch.from_numpy(ids[:1].astype(np.int64))).logits.numpy()
    assert np.abs(np.asarray(logits)[0] - plain[0]).max() <= 1e-4
    # Far positions (as after a long prompt) stress the rotary tables' float32 precision.
    far = pos + 3000
    want_far, _ = hf_forward(hf_model, ids, mask, far)
    got_far = np.asarray(jit_apply(model, return_hidden=True)({"params": params}, ids, mask, positions=far)[0])
    assert np.abs(got_far[real] - want_far[real]).max() <= 1e-4


def test_inputs_embeds_equals_ids(loaded):
    _, model, params = loaded("qwen2_tied")
    ids, mask = padded_batch(model.cfg.vocab_size)
    embeds = model.apply({"params": params}, jnp.asarray(ids), method=CausalLM.embed)
    assert embeds.shape == (3, 10, model.cfg.hidden_size)
    via_ids = jit_apply(model)({"params": params}, ids, mask)
    via_embeds = jit_apply(model)({"params": params}, None, mask, inputs_embeds=embeds)
    np.testing.assert_array_equal(np.asarray(via_embeds), np.asarray(via_ids))
    with pytest.raises(ValueError, match="exactly one"):
        model.apply({"params": params}, ids, mask, inputs_embeds=embeds)


@pytest.mark.parametrize("scan", [False, True])
def test_cache_prefill_then_steps_equals_full_forward(loaded, scan):
    """A left-padded prefill into the cache then one token per step gives the full forward's logits."""
    _, model, params = loaded("llama_gqa")
    if scan:
        model, params = model.clone(scan_layers=True), convert.stack_layers(params, model.cfg.num_layers)
    ids, mask = padded_batch(model.cfg.vocab_size, seed=1)
    ids, mask = ids[:2], mask[:2]  # full row + left-padded row: both end at the last slot
    full = np.asarray(jit_apply(model)({"params": params}, ids, mask))
    prompt = 6
    cache = model.init_cache(2, 12)
    step = jit_apply(model)
    logits, cache = step({"params": params}, ids[:, :prompt], mask[:, :prompt], cache=cache)
    got = [np.asarray(logits)]
    for t in range(prompt, ids.shape[1]):
        logits, cache = step({"params": params}, ids[:, t:t + 1], mask[:, t:t + 1], cache=cache)
        got.append(np.asarray(logits))
    got = np.concatenate(got, axis=1)
    real = mask.astype(bool)
    assert int(cache.index) == ids.shape[1]
    np.testing.assert_array_equal(np.asarray(cache.mask)[:, :10], mask)
    assert np.abs(got[real] - full[real]).max() <= 1e-5


def test_remat_gives_identical_outputs_and_grads(loaded):
    _, model, params = loaded("llama_mha")
    ids, mask = padded_batch(model.cfg.vocab_size)
    policies = ("none", "full", "dots")

    @jax.jit  # one compilation for the three variants
    def losses_and_grads(p):
        def loss(p, m):
            return jnp.mean(m.apply({"params": p}, ids, mask) ** 2)

        return [jax.value_and_grad(loss)(p, model.clone(remat=r)) for r in policies]

    (want_loss, want_grads), *others = losses_and_grads(params)
    for got_loss, got_grads in others:
        np.testing.assert_allclose(got_loss, want_loss, rtol=1e-6)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), got_grads, want_grads)
    with pytest.raises(ValueError, match="remat policy 'some'"):
        model.clone(remat="some").apply({"params": params}, ids, mask)


def test_scan_layers_load_match_and_export(loaded, hf_lm, tmp_path):
    hf_model, model, params = loaded("qwen2_untied")
    _, path = hf_lm("qwen2_untied")
    smodel, sparams = convert.from_pretrained(path, scan_layers=True, remat="full")
    n = model.cfg.num_layers
    assert set(sparams["model"]) == {"embed_tokens", "layers", "norm"}
    assert sparams["model"]["layers"]["self_attn"]["q_proj"]["kernel"].shape == (n, 32, 4, 8)
    boxed = jax.eval_shape(smodel.init, jax.random.key(0), *smodel.init_inputs())["params"]
    assert boxed["model"]["layers"]["self_attn"]["k_proj"]["kernel"].names == ("layers", "embed", "kv_heads", "kv")
    assert convert.param_count(smodel) == convert.param_count(model)
    ids, mask = padded_batch(model.cfg.vocab_size)
    want = np.asarray(jit_apply(model)({"params": params}, ids, mask))
    got = np.asarray(jit_apply(smodel)({"params": sparams}, ids, mask))
    assert np.abs(got - want).max() <= 1e-5
    out = convert.to_hf(smodel, sparams, tmp_path / "scanned")
    for k, v in loader.load_tensors(path).items():
        np.testing.assert_array_equal(loader.load_tensors(out)[k], v, err_msg=k)


@pytest.mark.parametrize("name", ["qwen2_tied", "llama_gqa"])
def test_to_hf_round_trip(loaded, tmp_path, name):
    _, model, params = loaded(name)
    rng = np.random.default_rng(1)
    params = jax.tree.map(lambda x: np.asarray(x) + 0.05 * rng.standard_normal(x.shape, np.float32), params)
    out = convert.to_hf(model, params, tmp_path / "ckpt")
    names = set(loader.load_tensors(out))
    assert ("lm_head.weight" in names) != model.cfg.tie_word_embeddings
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(hf_model).__name__ == convert.ARCHITECTURES[model.cfg.model_type]
    ids, mask = padded_batch(model.cfg.vocab_size)
    want, _ = hf_forward(hf_model, ids, mask, positions_of(mask))
    got = np.asarray(jit_apply(model)({"params": params}, ids, mask))
    real = mask.astype(bool)
    assert np.abs(got[real] - want[real]).max() <= 1e-4
    model2, params2 = convert.from_pretrained(out)
    assert model2 == model
    jax.tree.map(np.testing.assert_array_equal, params2, params)


def test_bfloat16_runs_and_is_close(loaded, hf_lm):
    hf_model, model, params = loaded("llama_gqa")
    bmodel, bparams = convert.from_pretrained(hf_lm("llama_gqa")[1], dtype=jnp.bfloat16)
    assert {x.dtype for x in jax.tree.leaves(bparams)} == {jnp.dtype(jnp.bfloat16)}
    ids, mask = padded_batch(model.cfg.vocab_size)
    want = np.asarray(jit_apply(model)({"params": params}, ids, mask))
    # bf16 compute on float32 master weights too (the training setting).
    for m, p in ((bmodel, bparams), (model.clone(dtype=jnp.bfloat16), params)):
        got = np.asarray(jit_apply(m)({"params": p}, ids, mask))
        assert got.dtype == np.float32 and np.isfinite(got).all()
        real = mask.astype(bool)
        assert np.abs(got[real] - want[real]).max() <= 0.05 * np.abs(want).max()
    assert bmodel.init_cache(3, 12).k[0].dtype == jnp.bfloat16  # the cache follows the compute dtype


def test_tied_checkpoint_with_lm_head_tensor(loaded, hf_lm, tmp_path):
    """An lm_head tensor equal to the embedding is dropped; a different one unties, as transformers 5 does."""
    _, model, params = loaded("qwen2_tied")
    _, path = hf_lm("qwen2_tied")
    tensors = loader.load_tensors(path)
    assert "lm_head.weight" not in tensors  # HF does not save a tied head
    config = loader.read_config(path)
    embed = tensors["model.embed_tokens.weight"]
    loader.write_checkpoint(tmp_path / "same", {**tensors, "lm_head.weight": embed}, config)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        same_model, same = convert.from_pretrained(tmp_path / "same")
    assert same_model == model
    jax.tree.map(np.testing.assert_array_equal, same, params)
    loader.write_checkpoint(tmp_path / "differs", {**tensors, "lm_head.weight": embed + 1}, config)
    with pytest.warns(UserWarning, match="lm_head.weight differs"):
        untied_model, untied = convert.from_pretrained(tmp_path / "differs")
    assert not untied_model.cfg.tie_word_embeddings
    np.testing.assert_array_equal(untied["lm_head"]["kernel"], (embed + 1).T)
    hf_untied = transformers.Qwen2ForCausalLM.from_pretrained(tmp_path / "differs").eval()
    ids, mask = padded_batch(model.cfg.vocab_size)
    want, _ = hf_forward(hf_untied, ids, mask, positions_of(mask))
    got = np.asarray(jit_apply(untied_model)({"params": untied}, ids, mask))
    real = mask.astype(bool)
    assert np.abs(got[real] - want[real]).max() <= 1e-4


def test_errors_name_the_problem(hf_lm, tmp_path):
    _, path = hf_lm("llama_mha")
    tensors, config = loader.load_tensors(path), loader.read_config(path)
    loader.write_checkpoint(tmp_path / "mistral", tensors, {**config, "model_type": "mistral"})
    with pytest.raises(CheckpointError, match=r"'mistral' model.*\['llama', 'qwen2'\]"):
        convert.from_pretrained(tmp_path / "mistral")
    bad = {k: v for k, v in tensors.items() if k != "model.layers.1.mlp.up_proj.bias"}
    bad["model.layers.0.rotary_emb.inv_freq"] = np.ones(4, np.float32)  # old buffer: ignored
    loader.write_checkpoint(tmp_path / "missing", bad, config)
    with pytest.raises(CheckpointError, match=r"missing tensors: \['model.layers.1.mlp.up_proj.bias'\]") as e:
        convert.from_pretrained(tmp_path / "missing")
    assert "inv_freq" not in str(e.value)
    untied = {k: v for k, v in tensors.items() if k != "lm_head.weight"}
    loader.write_checkpoint(tmp_path / "no_head", untied, config)
    with pytest.raises(CheckpointError, match=r"missing tensors: \['lm_head.weight'\]"):
        convert.from_pretrained(tmp_path / "no_head")
    rope = {**config, "rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 8.0,
                                         "original_max_position_embeddings": 32}}
    loader.write_checkpoint(tmp_path / "yarn", tensors, rope)
    with pytest.raises(CheckpointError, match="unsupported rope type 'yarn'"):
        convert.from_pretrained(tmp_path / "yarn")
    with pytest.raises(ValueError, match="unsupported rope type 'longrope'"):
        CausalLM.from_hf_config(transformers.LlamaConfig(**TINY, rope_scaling=dict(
            type="longrope", short_factor=[1.0] * 4, long_factor=[2.0] * 4, original_max_position_embeddings=32)))
    with pytest.raises(ValueError, match="sliding-window"):
        CausalLM.from_hf_config(transformers.Qwen2Config(**TINY, use_sliding_window=True, max_window_layers=1))
    # Legacy config.json spelling: rope_theta at the top level, no rope_parameters.
    legacy = {k: v for k, v in config.items() if k != "rope_parameters"}
    legacy["rope_theta"] = 1234.0
    assert convert.decoder_config(legacy).rope_theta == 1234.0


def test_params_carry_logical_axes(loaded):
    _, model, _ = loaded("qwen2_tied")
    boxed = jax.eval_shape(model.init, jax.random.key(0), *model.init_inputs())["params"]
    leaves = jax.tree.leaves(boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))
    known = {"vocab", "embed", "mlp", "heads", "kv_heads", "kv", "norm"}
    assert leaves and all(isinstance(x, nn.Partitioned) for x in leaves)
    for box in leaves:
        assert len(box.names) == box.value.ndim and set(box.names) <= known, box.names
    assert "lm_head" not in boxed  # tied
    att = boxed["model"]["layers_0"]["self_attn"]
    assert att["q_proj"]["bias"].names == ("heads", "kv") and att["v_proj"]["bias"].names == ("kv_heads", "kv")
    assert att["o_proj"]["kernel"].names == ("heads", "kv", "embed") and "bias" not in att["o_proj"]


def hf_param_count(config_cls, model_cls, **kwargs):
    with torch.device("meta"):
        hf = model_cls(config_cls(**kwargs))
    return sum(p.numel() for p in hf.parameters())  # parameters() counts a tied tensor once


@pytest.mark.parametrize("kind", ["vicuna7b", "qwen2_0.5b"])
def test_full_size_param_counts(kind):
    if kind == "vicuna7b":
        kw = dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                  num_attention_heads=32, num_key_value_heads=32, rms_norm_eps=1e-5, max_position_embeddings=4096)
        classes, expected = (transformers.LlamaConfig, transformers.LlamaForCausalLM), 6_738_415_616
    else:
        kw = dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                  num_attention_heads=14, num_key_value_heads=2, rms_norm_eps=1e-6, tie_word_embeddings=True,
                  rope_parameters=dict(rope_type="default", rope_theta=1e6), max_position_embeddings=32768)
        classes, expected = (transformers.Qwen2Config, transformers.Qwen2ForCausalLM), 494_032_768
    model = CausalLM.from_hf_config(classes[0](**kw), scan_layers=True)
    hf_count = hf_param_count(*classes, **kw)
    assert convert.param_count(model) == convert.param_count(model.clone(scan_layers=False)) == hf_count == expected
    shapes = convert.param_shapes(model)  # eval_shape: nothing is allocated
    assert isinstance(jax.tree.leaves(shapes)[0], jax.ShapeDtypeStruct)
    assert ("lm_head" in shapes) == (kind == "vicuna7b")


def test_hf_config_round_trip(loaded):
    for name in CASES:
        _, model, _ = loaded(name)
        assert llama_lib.DecoderConfig.from_hf(convert.hf_config(model)) == model.cfg
    _, model, _ = loaded("qwen2_tied")
    assert json.loads(convert.hf_config(model).to_json_string())["tie_word_embeddings"] is True
