"""Greedy decoding (vlm_jax.models.generate) against HF `generate(do_sample=False)` on tiny random LMs."""

import numpy as np
import pytest
import torch
import transformers


from vlm_jax.convert import llama as convert
from vlm_jax.models import generate as gen
from vlm_jax.models.llama import CausalLM

TINY = dict(vocab_size=61, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64, bos_token_id=1, eos_token_id=2, pad_token_id=0)
CASES = {
    "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM, dict()),
    "qwen2_tied": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM, dict(tie_word_embeddings=True)),
}
PAD = 0
N = 8


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """name -> (hf_model, flax model, params); HF params perturbed (norms/biases not trivial)."""
    cache = {}

    def get(name):
        if name not in cache:
            config_cls, model_cls, overrides = CASES[name]
            torch.manual_seed(0)
            hf = model_cls(config_cls(**{**TINY, **overrides})).eval()
            with torch.no_grad():
                for p in hf.parameters():
                    p.add_(0.2 * torch.randn_like(p))  # large enough that greedy outputs vary
            path = tmp_path_factory.mktemp(name)
            hf.save_pretrained(path)
            cache[name] = (hf, *convert.from_pretrained(path))
        return cache[name]

    return get


def left_padded(lengths, length=None, seed=0):
    """ids/mask i32[B, L]: row b has lengths[b] random tokens at the right end, PAD on the left."""
    rng = np.random.default_rng(seed)
    length = length or max(lengths)
    ids = np.full((len(lengths), length), PAD, np.int32)
    mask = np.zeros_like(ids)
    for b, n in enumerate(lengths):
        ids[b, length - n:] = rng.integers(3, TINY["vocab_size"], n)
        mask[b, length - n:] = 1
    return ids, mask


def hf_generate(hf, ids, mask, eos, max_new_tokens=N, **kwargs):
    """HF greedy new tokens, padded with PAD to max_new_tokens columns (HF stops when all rows end)."""
    with torch.inference_mode():
        if ids is None:
            out = hf.generate(attention_mask=torch.from_numpy(mask.astype(np.int64)), do_sample=False,
                              max_new_tokens=max_new_tokens, eos_token_id=eos, pad_token_id=PAD, **kwargs).numpy()
        else:
            out = hf.generate(torch.from_numpy(ids.astype(np.int64)),
                              attention_mask=torch.from_numpy(mask.astype(np.int64)), do_sample=False, max_new_tokens=max_new_tokens, eos_token_id=eos, pad_token_id=PAD,
                              **kwargs).numpy()[:, ids.shape[1]:]
    return np.pad(out, ((0, 0), (0, max_new_tokens - out.shape[1])), constant_values=PAD)


@pytest.mark.parametrize("name", list(CASES))
def test_matches_hf_generate_left_padded_with_eos(models, name):
    hf, model, params = models(name)
    ids, mask = left_padded([7, 4, 1, 5])
    want = hf_generate(hf, ids, mask, eos=2)
    got = np.asarray(gen.greedy_generate(model, params, ids, mask, N, 2, PAD, bucket_multiple=8))
    assert got.shape == (4, N) and got.dtype == np.int32
    np.testing.assert_array_equal(got, want)
    assert len({tuple(r) for r in want}) == 4  # rows differ: the test is not vacuous
    # EOS stopping: make row 0's third new token the EOS (a list of ids, as Qwen2 configs have).
    eos = int(want[0, 2])
    assert eos not in want[0, :2]
    want = hf_generate(hf, ids, mask, eos=[eos, 2])
    got = np.asarray(gen.greedy_generate(model, params, ids, mask, N, [eos, 2], PAD, bucket_multiple=8))
    np.testing.assert_array_equal(got, want)
    assert got[0, 2] == eos and (got[0, 3:] == PAD).all()


def test_inputs_embeds_prompt_matches_hf(models):
    """Embeddings that are no token's (like LLaVA's image features) decode as HF generate(inputs_embeds=)."""
    hf, model, params = models("llama")
    _, mask = left_padded([6, 3])
    embeds = np.random.default_rng(1).standard_normal((2, 6, TINY["hidden_size"])).astype(np.float32)
    embeds[mask == 0] = 0
    want = hf_generate(hf, None, mask, eos=2, inputs_embeds=torch.from_numpy(embeds))
    got = np.asarray(gen.greedy_generate(model, params, None, mask, N, 2, PAD, inputs_embeds=embeds,
                                         bucket_multiple=8))
    np.testing.assert_array_equal(got, want)
    # And the embeddings of ids give what the ids give.
    ids, mask = left_padded([6, 3], seed=2)
    embeds = model.apply({"params": params}, ids, method=CausalLM.embed)
    np.testing.assert_array_equal(
        np.asarray(gen.greedy_generate(model, params, None, mask, N, 2, PAD, inputs_embeds=embeds, bucket_multiple=8)),
        np.asarray(gen.greedy_generate(model, params, ids, mask, N, 2, PAD, bucket_multiple=8)))


def test_compiles_once_per_shape(models):
    _, model, params = models("qwen2_tied")
    gen.TRACES.clear()

    def run(lengths, max_new_tokens=N, batch_seed=0, eos=2):
        ids, mask = left_padded(lengths, seed=batch_seed)
        return gen.greedy_generate(model, params, ids, mask, max_new_tokens, eos, PAD, bucket_multiple=8)

    run([5, 3])
    run([7, 2], batch_seed=1)  # other prompt length, same bucket (8)
    run([8, 8], batch_seed=2, eos=5)  # other EOS id: traced, no recompilation
    assert gen.TRACES["greedy_generate"] == 1
    run([9, 2])  # bucket 16
    assert gen.TRACES["greedy_generate"] == 2
    run([9, 2], max_new_tokens=3)
    assert run([3, 5], max_new_tokens=1).shape == (2, 1)
    assert gen.TRACES["greedy_generate"] == 4
    assert gen.bucket_length(1, 8) == 8 and gen.bucket_length(8, 8) == 8 and gen.bucket_length(9, 8) == 16


def test_scanned_model_and_no_eos(models):
    hf, model, params = models("llama")
    ids, mask = left_padded([5, 2, 4], seed=3)
    want = hf_generate(hf, ids, mask, eos=None)  # HF then falls back to the config's EOS (2)
    smodel = model.clone(scan_layers=True)
    sparams = convert.stack_layers(params, model.cfg.num_layers)
    got = np.asarray(gen.greedy_generate(smodel, sparams, ids, mask, N, 2, PAD, bucket_multiple=8))
    np.testing.assert_array_equal(got, want)
    # eos None never stops: N tokens in every row, and the stream matches the EOS-free prefix.
    free = np.asarray(gen.greedy_generate(model, params, ids, mask, N, None, PAD, bucket_multiple=8))
    for row_free, row in zip(free, got):
        stop = list(row).index(2) + 1 if 2 in row else N
        np.testing.assert_array_equal(row_free[:stop], row[:stop])


def test_bad_inputs_raise(models):
    _, model, params = models("llama")
    ids, mask = left_padded([3, 2])
    with pytest.raises(ValueError, match="left-padded"):
        gen.greedy_generate(model, params, ids[:, ::-1], mask[:, ::-1], N, 2, PAD)
    with pytest.raises(ValueError, match="exactly one"):
        gen.greedy_generate(model, params, None, mask, N, 2, PAD)
    with pytest.raises(ValueError, match="max_new_tokens"):
        gen.greedy_generate(model, params, ids, mask, 0, 2, PAD)
