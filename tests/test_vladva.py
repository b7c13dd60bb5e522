"""Discriminative LVLM fine-tuning (VladVA): embeddings against HF LLaVA, losses against numpy, global negatives
on a sharded batch, and a few training steps on a tiny LLaVA."""

import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vlm_jax.convert import llava as llava_convert
from vlm_jax.methods import vladva as disc
from vlm_jax.models import peft
from vlm_jax.train import trainer

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IMAGE_TOKEN = 120
TEXT = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, bos_token_id=1, eos_token_id=2, pad_token_id=0)
VISION = dict(hidden_size=24, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4, image_size=16,
              patch_size=8, model_type="clip_vision_model", hidden_act="quick_gelu")
IMG_PROMPT = [30, 31, 32, 33]   # stands in for the tokenized "\nSummary above image in one word:"
TXT_PROMPT = [40, 41, 42]       # "... sentence in one word:"


@pytest.fixture(scope="module")
def llava(tmp_path_factory):
    config = transformers.LlavaConfig(image_token_id=IMAGE_TOKEN, projector_hidden_act="gelu",
                                      vision_config=VISION, text_config=dict(model_type="llama", **TEXT),
                                      vision_feature_layer=-2, vision_feature_select_strategy="default")
    torch.manual_seed(0)
    hf = transformers.LlavaForConditionalGeneration(config).eval()
    with torch.no_grad():  # HF inits norms to 1 and biases to 0, which would hide mapping bugs
        for p in hf.parameters():
            p.add_(0.05 * torch.randn_like(p))
    path = tmp_path_factory.mktemp("llava")
    hf.save_pretrained(path)
    model, params = llava_convert.from_pretrained(path)
    return hf, model, params


# Jitted once per shape: eager op-by-op dispatch is slower than one compile on a loaded CPU.
info_nce = jax.jit(disc.info_nce)
next_token_loss = jax.jit(disc.next_token_loss)


def _pad(rows, left):
    """Rows of ids -> (ids, mask) int32, left- or right-padded (per row, `left` is a list of bools)."""
    length = max(map(len, rows))
    ids = np.zeros((len(rows), length), np.int32)
    mask = np.zeros((len(rows), length), np.int32)
    for i, row in enumerate(rows):
        sl = slice(length - len(row), length) if left[i] else slice(0, len(row))
        ids[i, sl], mask[i, sl] = row, 1
    return ids, mask


def _positions(mask):
    return np.maximum(np.cumsum(mask, -1) - 1, 0)


def test_last_token_embedding_left_and_right_padding():
    hidden = jnp.arange(3 * 5 * 2, dtype=jnp.float32).reshape(3, 5, 2)
    mask = jnp.array([[1, 1, 1, 0, 0],    # right-padded: last real token at 2
                      [0, 0, 1, 1, 1],    # left-padded: at 4
                      [1, 1, 1, 1, 1]])   # full: at 4
    out = disc.last_token_embedding(hidden, mask)
    np.testing.assert_array_equal(out, hidden[jnp.arange(3), jnp.array([2, 4, 4])])
    assert out.dtype == jnp.float32


def test_embeddings_match_hf(llava):
    hf, model, params = llava
    t = model.cfg.tokens_per_image
    rows = [[1, 5] + [IMAGE_TOKEN] * t + IMG_PROMPT, [1] + [IMAGE_TOKEN] * t + IMG_PROMPT[1:]]
    ids, mask = _pad(rows, left=[False, True])
    pixels = np.random.default_rng(0).normal(size=(2, 16, 16, 3)).astype(np.float32)
    out = jax.jit(lambda p, i, m, x: disc.image_embedding(model, p, i, m, x))(params, ids, mask, pixels)
    with torch.no_grad():
        ref = hf.model(input_ids=torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask),
                       pixel_values=torch.tensor(pixels.transpose(0, 3, 1, 2)),
                       position_ids=torch.tensor(_positions(mask)), output_hidden_states=True)
    # transformers 5: hidden_states[-1] is the final-norm output, i.e. last_hidden_state.
    np.testing.assert_array_equal(ref.hidden_states[-1].numpy(), ref.last_hidden_state.numpy())
    last = np.array([len(rows[0]) - 1, ids.shape[1] - 1])
    np.testing.assert_allclose(out, ref.last_hidden_state.numpy()[[0, 1], last], atol=1e-4, rtol=0)

    trows = [[1, 7, 8, 9] + TXT_PROMPT, [1, 11] + TXT_PROMPT]
    tids, tmask = _pad(trows, left=[True, False])
    tout = disc.text_embedding(model, params, tids, tmask)
    with torch.no_grad():
        tref = hf.model.language_model(input_ids=torch.tensor(tids, dtype=torch.long),
                                       attention_mask=torch.tensor(tmask),
                                       position_ids=torch.tensor(_positions(tmask))).last_hidden_state.numpy()
    last = np.array([tids.shape[1] - 1, len(trows[1]) - 1])
    np.testing.assert_allclose(tout, tref[[0, 1], last], atol=1e-4, rtol=0)


def test_soft_prompt_starts_as_handcrafted(llava):
    _, model, params = llava
    t = model.cfg.tokens_per_image
    ids, mask = _pad([[1, 5] + [IMAGE_TOKEN] * t + IMG_PROMPT, [1] + [IMAGE_TOKEN] * t + IMG_PROMPT],
                     left=[False, True])
    pixels = np.random.default_rng(1).normal(size=(2, 16, 16, 3)).astype(np.float32)
    table = params["language_model"]["model"]["embed_tokens"]["embedding"]
    prompt = peft.soft_prompt_init(table, IMG_PROMPT)
    start = peft.find_span(jnp.asarray(ids), IMG_PROMPT)
    np.testing.assert_array_equal(start, [2 + t, ids.shape[1] - len(IMG_PROMPT)])
    embed = jax.jit(lambda p, s: disc.image_embedding(model, params, ids, mask, pixels, prompt=p, prompt_start=s))
    plain = embed(prompt, jnp.full((2,), -1))   # a negative start leaves the handcrafted tokens
    np.testing.assert_array_equal(embed(prompt, start), plain)
    moved = embed(prompt + 0.5, start)
    assert np.all(np.abs(np.asarray(moved) - np.asarray(plain)).max(-1) > 1e-3)
    with pytest.raises(ValueError, match="prompt_start"):
        disc.image_embedding(model, params, ids, mask, pixels, prompt=prompt)


# ----------------------------------------------------------------------------------------------------------
# info_nce

def _np_info_nce(img, txt, t):
    img = img / np.linalg.norm(img, axis=1, keepdims=True)
    txt = txt / np.linalg.norm(txt, axis=1, keepdims=True)
    logits = (img @ txt.T / t).astype(np.float64)

    def ce(lg):
        lse = np.log(np.exp(lg - lg.max(1, keepdims=True)).sum(1)) + lg.max(1)
        return np.mean(lse - np.diag(lg))

    return 0.5 * (ce(logits) + ce(logits.T))


def test_info_nce_matches_numpy():
    rng = np.random.default_rng(0)
    img, txt = rng.normal(size=(6, 8)).astype(np.float32), rng.normal(size=(6, 8)).astype(np.float32)
    loss, metrics = info_nce(img, txt, temperature=0.05)
    np.testing.assert_allclose(loss, _np_info_nce(img, txt, 0.05), rtol=1e-5)
    # Scaling an embedding does not change cosine similarities.
    np.testing.assert_allclose(info_nce(3 * img, txt, temperature=0.05)[0], loss, rtol=1e-5)
    loss_easy, metrics_easy = info_nce(img, img, temperature=0.05)
    assert metrics_easy["i2t_acc"] == 1 and metrics_easy["t2i_acc"] == 1 and loss_easy < loss


def test_info_nce_valid_mask_equals_unpadded_batch():
    rng = np.random.default_rng(1)
    img, txt = rng.normal(size=(7, 8)).astype(np.float32), rng.normal(size=(7, 8)).astype(np.float32)
    valid = np.array([1, 0, 1, 1, 0, 1, 1], bool)
    masked, m = info_nce(img, txt, temperature=0.1, valid=valid)
    unpadded, m_ref = info_nce(img[valid], txt[valid], temperature=0.1)
    np.testing.assert_allclose(masked, unpadded, rtol=1e-6)
    assert m["n_pairs"] == 5 and m["i2t_acc"] == m_ref["i2t_acc"]
    # Padded rows get no gradient; an all-padded batch is 0 with finite gradients.
    g = jax.grad(lambda a: info_nce(a, txt, temperature=0.1, valid=valid)[0])(img)
    np.testing.assert_array_equal(g[~valid], 0)
    loss0, g0 = jax.value_and_grad(lambda a: info_nce(a, txt, valid=np.zeros(7, bool))[0])(img)
    assert loss0 == 0 and np.isfinite(g0).all()


def test_learnable_temperature_gradient_and_clipping():
    rng = np.random.default_rng(2)
    img, txt = rng.normal(size=(5, 8)).astype(np.float32), rng.normal(size=(5, 8)).astype(np.float32)

    def f(log_t):
        return info_nce(img, txt, temperature=disc.temperature_from_log(log_t))[0]

    log_t = disc.init_log_temperature(0.07)
    np.testing.assert_allclose(disc.temperature_from_log(log_t), 0.07, rtol=1e-6)
    g = jax.grad(f)(log_t)
    eps = 1e-2
    fd = (_np_info_nce(img, txt, np.exp(float(log_t) + eps)) - _np_info_nce(img, txt, np.exp(float(log_t) - eps)))
    np.testing.assert_allclose(g, fd / (2 * eps), rtol=2e-3)
    assert g != 0
    # Below CLIP's bound (T < 0.01, logit scale > 100) T is clipped and the gradient stops.
    low = jnp.log(0.001)
    np.testing.assert_allclose(disc.temperature_from_log(low), disc.MIN_TEMPERATURE, rtol=1e-6)
    assert jax.grad(f)(low) == 0


SHARDED = textwrap.dedent("""
    import jax, numpy as np
    jax.config.update("jax_default_matmul_precision", "highest")
    from vlm_jax.methods import vladva as disc
    from vlm_jax.runtime import mesh as mesh_lib
    assert jax.device_count() == 8
    mesh = mesh_lib.make_mesh({"data": 8})
    rng = np.random.default_rng(0)
    img, txt = rng.normal(size=(16, 8)).astype(np.float32), rng.normal(size=(16, 8)).astype(np.float32)
    valid = np.ones(16, bool); valid[[3, 10]] = False
    single = float(disc.info_nce(img, txt, temperature=0.05, valid=valid)[0])
    s = mesh_lib.batch_sharding(mesh)
    gi, gt, gv = (jax.device_put(x, s) for x in (img, txt, valid))
    assert len(gi.addressable_shards) == 8 and gi.addressable_shards[0].data.shape == (2, 8)
    f = jax.jit(lambda a, b, v: disc.info_nce(a, b, temperature=0.05, valid=v)[0])
    sharded = float(f(gi, gt, gv))
    np.testing.assert_allclose(sharded, single, rtol=1e-5)
    g = jax.jit(lambda a, b, v: disc.info_nce(a, b, temperature=0.05, valid=v)[0])
    local = np.mean([float(g(img[i:i + 2], txt[i:i + 2], valid[i:i + 2])) for i in range(0, 16, 2)])
    assert abs(local - single) > 0.1, (local, single)   # negatives span every shard, not just the local two
    print("OK", single, local)
""")


def test_info_nce_sharded_batch_uses_global_negatives():
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8")
    proc = subprocess.run([sys.executable, "-c", SHARDED], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0 and "OK" in proc.stdout, proc.stderr[-3000:]


# ----------------------------------------------------------------------------------------------------------
# next-token loss and the total

def test_next_token_loss_only_masked_tokens():
    rng = np.random.default_rng(3)
    logits = rng.normal(size=(2, 6, 11)).astype(np.float32)
    ids = rng.integers(0, 11, size=(2, 6)).astype(np.int32)
    mask = np.array([[0, 0, 1, 1, 0, 0], [0, 1, 1, 1, 1, 1]], np.int32)
    loss, n = next_token_loss(logits, ids, mask)
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    terms = [-logp[b, t - 1, ids[b, t]] for b in range(2) for t in range(1, 6) if mask[b, t]]
    assert n == len(terms) == 7
    np.testing.assert_allclose(loss, np.mean(terms), rtol=1e-5)
    # Logits at positions that predict no target (t where mask[t + 1] == 0, and the last) do not matter.
    other = logits.copy()
    predicts_target = np.zeros((2, 6), bool)
    predicts_target[:, :-1] = mask[:, 1:] > 0
    other[~predicts_target] = rng.normal(size=other[~predicts_target].shape) * 10
    np.testing.assert_allclose(next_token_loss(other, ids, mask)[0], loss, rtol=1e-6)
    assert next_token_loss(logits, ids, np.zeros_like(mask)) == (0, 0)


def test_total_loss_gates_terms_per_sample():
    rng = np.random.default_rng(4)
    img, txt = rng.normal(size=(4, 8)).astype(np.float32), rng.normal(size=(4, 8)).astype(np.float32)
    logits = rng.normal(size=(4, 6, 11)).astype(np.float32)
    ids = rng.integers(0, 11, size=(4, 6)).astype(np.int32)
    lmask = np.tile(np.array([0, 0, 1, 1, 1, 1], np.int32), (4, 1))
    has_short, has_long = np.array([1, 1, 0, 1], bool), np.array([0, 1, 1, 0], bool)
    total = jax.jit(disc.total_loss)
    loss, m = total(img, txt, logits, ids, lmask, has_short, has_long, temperature=0.05, ntp_weight=0.5)
    con = info_nce(img[has_short], txt[has_short], temperature=0.05)[0]
    ntp = next_token_loss(logits[has_long], ids[has_long], lmask[has_long])[0]
    np.testing.assert_allclose(loss, con + 0.5 * ntp, rtol=1e-5)
    assert m["ntp_tokens"] == 8 and m["n_pairs"] == 3
    only, m2 = total(img, txt, None, None, None, has_short, None)
    np.testing.assert_allclose(only, info_nce(img[has_short], txt[has_short])[0], rtol=1e-5)
    assert "ntp" not in m2


# ----------------------------------------------------------------------------------------------------------
# training

def _train_batch(t, rng):
    """4 samples: image prompts, short captions (+ text prompt), long captions after [image + prompt]."""
    image_rows = [[1] + [IMAGE_TOKEN] * t + IMG_PROMPT] * 4
    text_rows = [[1] + list(rng.integers(50, 110, size=n)) + TXT_PROMPT for n in (2, 4, 3, 5)]
    captions = [list(rng.integers(50, 110, size=n)) for n in (6, 8, 5, 7)]
    long_rows = [[1] + [IMAGE_TOKEN] * t + IMG_PROMPT + c for c in captions]
    image_ids, image_mask = _pad(image_rows, [False] * 4)
    text_ids, text_mask = _pad(text_rows, [True, False, True, False])
    long_ids, long_mask = _pad(long_rows, [False] * 4)
    long_loss = np.zeros_like(long_mask)
    for i, c in enumerate(captions):
        long_loss[i, len(long_rows[i]) - len(c):len(long_rows[i])] = 1
    batch = dict(image_ids=image_ids, image_mask=image_mask,
                 pixel_values=rng.normal(size=(4, 16, 16, 3)).astype(np.float32),
                 text_ids=text_ids, text_mask=text_mask, long_ids=long_ids, long_mask=long_mask,
                 long_loss_mask=long_loss, has_short=np.array([1, 1, 1, 1], bool),
                 has_long=np.array([1, 0, 1, 1], bool))
    batch["image_prompt_start"] = np.asarray(peft.find_span(jnp.asarray(image_ids), IMG_PROMPT))
    batch["long_prompt_start"] = np.asarray(peft.find_span(jnp.asarray(long_ids), IMG_PROMPT))
    batch["text_prompt_start"] = np.asarray(peft.find_span(jnp.asarray(text_ids), TXT_PROMPT))
    assert (batch["text_prompt_start"] >= 0).all() and (batch["image_prompt_start"] >= 0).all()
    return batch


def test_training_steps_reduce_loss(llava):
    _, model, base = llava
    table = base["language_model"]["model"]["embed_tokens"]["embedding"]
    params = {"base": base,
              "lora": peft.lora_init(base, jax.random.key(0), targets=disc.LORA_TARGETS, rank=4),
              "image_prompt": peft.soft_prompt_init(table, IMG_PROMPT),
              "text_prompt": peft.soft_prompt_init(table, TXT_PROMPT),
              "log_temperature": disc.init_log_temperature(0.05)}
    assert len(jax.tree.leaves(params["lora"])) == 2 * 7 * 2  # 7 linear layers x 2 layers, (a, b) each
    loss_fn = disc.make_loss_fn(model, lora_alpha=8, lora_rank=4, temperature=0.05, ntp_weight=1.0)
    batch = _train_batch(model.cfg.tokens_per_image, np.random.default_rng(5))
    labels = trainer.param_labels(params, [("lora/.*", 1.0), ("(image|text)_prompt", 1.0), ("log_temperature", 1.0)])
    assert not any(labels[k] for k in labels if k.startswith("base/"))
    trainable, frozen = trainer.partition(params, labels)
    tx = trainer.make_optimizer({"name": "adam", "lr": 3e-3, "decay_type": "constant"}, labels, 10)
    step = trainer.make_train_step(loss_fn, tx, jax.random.key(1))
    state = trainer.TrainState(step=jnp.zeros((), jnp.int32), params=trainable, opt_state=tx.init(trainable))
    # Untrained adapters and prompts reproduce the base model's loss (LoRA b = 0, prompts = handcrafted tokens).
    plain = {"base": base}
    loss_plain, _ = jax.jit(loss_fn)(plain, batch, jax.random.key(0))
    losses = []
    for _ in range(8):
        state, metrics = step(state, frozen, batch)   # metrics: the loss before the step's update
        losses.append(float(metrics["loss"]))
        assert np.isfinite(losses[-1]) and metrics["ntp_tokens"] == 6 + 5 + 7
    np.testing.assert_allclose(losses[0], loss_plain, rtol=1e-5)
    assert losses[-1] < 0.9 * losses[0], losses
    assert float(state.params["log_temperature"]) != float(np.log(0.05))   # the learnable temperature moved


def _one_layer_llava():
    """A randomly initialised LLaVA of the fixture's widths with 1 LM and 1 vision layer: for comparisons of one
    model with itself, where depth would only add compile time (each layer is traced and compiled unrolled)."""
    import flax.linen as nn

    from vlm_jax.models.llava import Llava

    config = transformers.LlavaConfig(image_token_id=IMAGE_TOKEN, vision_config={**VISION, "num_hidden_layers": 1},
                                      text_config=dict(model_type="llama", **{**TEXT, "num_hidden_layers": 1}))
    model = Llava.from_hf_config(config)
    # Random weights from the parameter shapes (norm scales near 1): no compile of `init`, which took 2 s here.
    shapes = nn.meta.unbox(jax.eval_shape(model.init, jax.random.key(5), *model.init_inputs())["params"])
    rng = np.random.default_rng(5)
    return model, jax.tree_util.tree_map_with_path(
        lambda path, s: (float(path[-1].key == "scale") + 0.05 * rng.normal(size=s.shape)).astype(s.dtype), shapes)


def test_microbatched_loss_and_gradients_equal_the_full_batch(k=2):
    """GradCache-style microbatches: exact InfoNCE over the whole batch, not a mean of smaller ones (the reference:
    the same loss over the full batch at once)."""
    model, base = _one_layer_llava()
    table = base["language_model"]["model"]["embed_tokens"]["embedding"]
    params = {"lora": peft.lora_init(base, jax.random.key(0), targets=disc.LORA_TARGETS, rank=4),
              "image_prompt": peft.soft_prompt_init(table, IMG_PROMPT),
              "text_prompt": peft.soft_prompt_init(table, TXT_PROMPT)}
    # Non-zero LoRA b, so the adapters matter for the gradients compared below.
    params["lora"] = jax.tree.map(lambda x: x + 0.01, params["lora"])
    batch = _train_batch(model.cfg.tokens_per_image, np.random.default_rng(3))
    outs = []
    for m in (1, k):
        loss_fn = disc.make_loss_fn(model, lora_alpha=8, lora_rank=4, grad_cache_chunks=m)
        f = jax.jit(jax.value_and_grad(lambda p: loss_fn({"base": base, **p}, batch, None), has_aux=True))
        outs.append(f(params))
    ((l1, m1), g1), ((lk, mk), gk) = outs
    np.testing.assert_allclose(lk, l1, rtol=1e-5)
    np.testing.assert_allclose(mk["ntp"], m1["ntp"], rtol=1e-5)
    assert int(mk["ntp_tokens"]) == int(m1["ntp_tokens"])
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-4, atol=1e-6), gk, g1)
    # ... and differs from averaging k per-microbatch contrastive losses (what plain accumulation computes).
    contrastive = jax.jit(lambda b: disc.make_loss_fn(model, lora_alpha=8, lora_rank=4, ntp_weight=0.0)(
        {"base": base, **params}, b, None)[0])
    parts = [float(contrastive(jax.tree.map(lambda x: x[i::k], batch))) for i in range(k)]
    assert abs(np.mean(parts) - float(m1["contrastive"])) > 1e-3


def test_unmerged_lora_equals_merged(llava):
    """The default unmerged LoRA (adapters beside the frozen layers) computes the merged form's loss and grads."""
    _, model, base = llava
    lora = jax.tree.map(lambda x: x + 0.02, peft.lora_init(base, jax.random.key(0), targets=disc.LORA_TARGETS,
                                                           rank=4))
    batch = _train_batch(model.cfg.tokens_per_image, np.random.default_rng(4))
    outs = {}
    for impl in ("merged", "unmerged"):
        loss_fn = disc.make_loss_fn(model, lora_alpha=8, lora_rank=4, lora_impl=impl)
        outs[impl] = jax.jit(jax.value_and_grad(lambda l: loss_fn({"base": base, "lora": l}, batch, None)[0]))(lora)
    np.testing.assert_allclose(outs["unmerged"][0], outs["merged"][0], rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-6), outs["unmerged"][1],
                 outs["merged"][1])
    assert np.abs(np.asarray(jax.tree.leaves(outs["merged"][1])[0])).max() > 0
    with pytest.raises(ValueError, match="lora_impl"):
        disc.make_loss_fn(model, lora_alpha=8, lora_rank=4, lora_impl="fused")({"base": base, "lora": lora},
                                                                              batch, None)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_evaluation_embeds_with_the_trained_model(llava, dtype):
    """The evaluation's embeddings (`vladva_program.embedding_fns`) give the training forward's contrastive loss: LoRA
    applied as in training, also over a bf16 base, where merging W + s A B into bf16 would not."""
    from vlm_jax.models.llava import Llava
    from vlm_jax.programs import vladva as vladva_program

    _, model, base = llava
    dt = jnp.dtype(dtype)
    model = Llava(model.cfg, dtype=dt, param_dtype=dt)
    base = jax.tree.map(lambda x: x.astype(dt), base)
    table = base["language_model"]["model"]["embed_tokens"]["embedding"]
    rng = np.random.default_rng(6)
    lora = jax.tree.map(lambda x: jnp.asarray(0.05 * rng.normal(size=x.shape), jnp.float32),
                        peft.lora_init(base, jax.random.key(0), targets=disc.LORA_TARGETS, rank=4))
    prompts = {"image_prompt": peft.soft_prompt_init(table, IMG_PROMPT).astype(jnp.float32) + 0.01,
               "text_prompt": peft.soft_prompt_init(table, TXT_PROMPT).astype(jnp.float32) - 0.01}
    batch = _train_batch(model.cfg.tokens_per_image, np.random.default_rng(7))
    loss_fn = disc.make_loss_fn(model, lora_alpha=8, lora_rank=4, ntp_weight=0.0)
    train_loss = float(jax.jit(loss_fn)({"base": base, "lora": lora, **prompts}, batch, None)[0])

    def eval_loss(weights, lora_):
        img_fn, txt_fn = vladva_program.embedding_fns(model, weights, lora_, dict(alpha=8, rank=4), **prompts)
        img = img_fn({"input_ids": batch["image_ids"], "attention_mask": batch["image_mask"],
                      "pixel_values": batch["pixel_values"], "prompt_start": batch["image_prompt_start"]})
        txt = txt_fn({"input_ids": batch["text_ids"], "attention_mask": batch["text_mask"],
                      "prompt_start": batch["text_prompt_start"]})
        return float(info_nce(img, txt, temperature=disc.DEFAULT_TEMPERATURE)[0])

    assert abs(eval_loss(base, lora) - train_loss) <= 1e-5 * abs(train_loss)  # the same computation, any dtype
    if dtype == "bfloat16":  # the old evaluation (LoRA merged into the bf16 base) is measurably another model
        merged = peft.lora_merge(base, lora, alpha=8, rank=4)
        assert abs(eval_loss(merged, None) - train_loss) > 1e-3 * abs(train_loss)
