"""RoPE scaling types (vlm_jax.models.rope) against HF: transformers' ROPE_INIT_FUNCTIONS tables, and a
`LlamaForCausalLM` with each rope_scaling (logits on a left-padded batch, and for 'dynamic' NTK, lengths beyond
max_position_embeddings in one forward and across greedy decoding, where HF regrows the table at every step)."""

import jax
import numpy as np
import pytest
import torch
import transformers
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from vlm_jax.convert import llama as convert
from vlm_jax.models import generate, rope
from vlm_jax.models.llama import DecoderConfig

MAX_POS = 16
# head_dim 16 over theta 1e4: wavelengths 6.3 ... 2e4, so llama3's three bands (kept, ramped, divided) all occur
# with original_max_position_embeddings=64 (high band < 16, low band > 64).
TINY = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=2,
            num_key_value_heads=1, max_position_embeddings=MAX_POS, bos_token_id=1, eos_token_id=2, pad_token_id=0)
SCALINGS = {
    "linear": dict(rope_type="linear", factor=2.0, rope_theta=1e4),
    "dynamic": dict(rope_type="dynamic", factor=2.5, rope_theta=1e4),
    "llama3": dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                   original_max_position_embeddings=64, rope_theta=1e4),
}


def hf_config(kind):
    return transformers.LlamaConfig(**TINY, rope_parameters=SCALINGS[kind])


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    cache = {}

    def get(kind):
        if kind not in cache:
            torch.manual_seed(0)
            hf = transformers.LlamaForCausalLM(hf_config(kind)).eval()
            with torch.no_grad():
                for p in hf.parameters():
                    p.add_(0.2 * torch.randn_like(p))
            path = tmp_path_factory.mktemp(kind)
            hf.save_pretrained(path)
            cache[kind] = (hf, *convert.from_pretrained(path))
        return cache[kind]

    return get


@pytest.mark.parametrize("kind", list(SCALINGS))
def test_inv_freq_equals_transformers(kind):
    config = hf_config(kind)
    cfg = DecoderConfig.from_hf(config)
    assert cfg.rope_type == kind and dict(cfg.rope_scaling)["factor"] == SCALINGS[kind]["factor"]
    for seq_len in (MAX_POS - 3, MAX_POS, MAX_POS + 1, 5 * MAX_POS + 2):
        want, _ = ROPE_INIT_FUNCTIONS[kind](config, "cpu", seq_len=torch.tensor(seq_len))
        if kind == "dynamic" and seq_len <= MAX_POS:  # HF keeps its init table (seq_len=None) up to max_pos
            want, _ = ROPE_INIT_FUNCTIONS[kind](config, "cpu")
        got = np.asarray(rope.inv_freq(cfg, np.arange(seq_len)))
        np.testing.assert_allclose(got, want.numpy(), rtol=2e-7, atol=0, err_msg=f"{kind} S={seq_len}")
    assert convert.hf_config(cfg).rope_parameters == {**SCALINGS[kind]}  # export keeps every parameter


def _left_padded(lengths, length, seed=0):
    rng = np.random.default_rng(seed)
    ids = np.zeros((len(lengths), length), np.int32)
    mask = np.zeros_like(ids)
    for b, n in enumerate(lengths):
        ids[b, length - n:] = rng.integers(3, TINY["vocab_size"], n)
        mask[b, length - n:] = 1
    return ids, mask


@pytest.mark.parametrize("kind", list(SCALINGS))
def test_logits_match_hf_beyond_max_positions(models, kind):
    hf, model, params = models(kind)
    ids, mask = _left_padded([2 * MAX_POS - 3, MAX_POS - 5], 2 * MAX_POS - 3)  # longest row past max_pos
    pos = np.maximum(np.cumsum(mask, -1) - 1, 0).astype(np.int32)
    with torch.inference_mode():
        want = hf(input_ids=torch.from_numpy(ids.astype(np.int64)), attention_mask=torch.from_numpy(mask),
                  position_ids=torch.from_numpy(pos.astype(np.int64))).logits.numpy()
    got = np.asarray(jax.jit(model.apply)({"params": params}, ids, mask))
    real = mask.astype(bool)
    assert np.abs(got[real] - want[real]).max() <= 1e-4, kind
    if kind == "dynamic":  # the scaled table really differs from the plain one on these lengths
        plain = transformers.LlamaForCausalLM(transformers.LlamaConfig(**TINY, rope_theta=1e4)).eval()
        plain.load_state_dict(hf.state_dict())
        with torch.inference_mode():
            other = plain(input_ids=torch.from_numpy(ids.astype(np.int64)), attention_mask=torch.from_numpy(mask),
                          position_ids=torch.from_numpy(pos.astype(np.int64))).logits.numpy()
        assert np.abs(other[real] - want[real]).max() > 1e-2


def test_dynamic_greedy_decoding_crosses_max_positions_as_hf(models):
    """Prompts shorter than max_position_embeddings, decoding past it: HF regrows theta at every step from that
    step's position and keeps the cached keys' rotations; greedy_generate must give the same tokens."""
    hf, model, params = models("dynamic")
    ids, mask = _left_padded([MAX_POS - 4, MAX_POS - 9], MAX_POS - 4, seed=1)
    new = 2 * MAX_POS
    with torch.inference_mode():
        want = hf.generate(input_ids=torch.from_numpy(ids.astype(np.int64)), attention_mask=torch.from_numpy(mask),
                           do_sample=False, max_new_tokens=new, eos_token_id=None, pad_token_id=0)
    want = want[:, ids.shape[1]:].numpy()
    got = np.asarray(generate.greedy_generate(model, params, ids, mask, new, eos_token_id=None, pad_token_id=0,
                                              bucket_multiple=8))
    np.testing.assert_array_equal(got, want)


def test_rope_errors():
    with pytest.raises(ValueError, match=r"rope type 'llama3' needs \['high_freq_factor'"):
        DecoderConfig.from_hf(dict(model_type="llama", vocab_size=8, hidden_size=8, intermediate_size=8,
                                   num_hidden_layers=1, num_attention_heads=2, rope_scaling=dict(
                                       rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                                       original_max_position_embeddings=64)))
    with pytest.raises(ValueError, match="unsupported rope type 'yarn'"):
        rope.scaling_from_hf({"factor": 2.0}, "yarn")
    with pytest.raises(ValueError, match="partial_rotary_factor"):
        rope.scaling_from_hf({"factor": 2.0, "partial_rotary_factor": 0.5}, "dynamic")
