"""Tokens/s of an LVLM forward + backward step, Flax vs HF PyTorch, on the same machine.

llava: a ~100M-parameter LLaVA (CLIP ViT tower 384 wide / 6 layers at 224 px, Llama LM 768 wide / 8 layers,
vocab 32k). qwen2_vl: a Qwen2-VL of the same widths (vision transformer 384 wide / 6 layers on a 392 px image:
28 x 28 patches merged 2 x 2 into 196 tokens; Qwen2 LM with M-RoPE 768 wide / 8 layers, vocab 32k). Random
weights, float32; the loss is next-token cross-entropy over the whole sequence (196 image tokens + text);
gradients w.r.t. every parameter. internvl: an InternVL of the same widths (InternViT 384 wide / 6 layers on a 392 px
tile: 28 x 28 patches pixel-shuffled into 196 tokens between <img> and </img>, LN-MLP projector; Llama LM 768 wide /
8 layers). Both frameworks get the same weights (the torch model is converted with
vlm_jax's table), and the first step's losses are compared.

  python benchmarks/lvlm_forward.py                      # LLaVA, batch 2, 256 tokens
  python benchmarks/lvlm_forward.py --family qwen2_vl    # Qwen2-VL, batch 2, 258 tokens
  python benchmarks/lvlm_forward.py --family internvl    # InternVL, batch 2, 258 tokens
  python benchmarks/lvlm_forward.py --small              # a seconds-long smoke run (either family)
"""

import argparse
import os
import tempfile
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # a CPU-vs-CPU comparison
# Without it torch's OpenMP threads spin-wait and, beside JAX's threads on a shared CPU, slow torch down many
# times over (benchmarks/RESULTS.md, "Thread spinning").
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

from vlm_jax.convert import llava as convert  # noqa: E402
from vlm_jax.convert import internvl as internvl_convert  # noqa: E402
from vlm_jax.convert import qwen2_vl as qwen2_vl_convert  # noqa: E402

FULL = dict(
    vision=dict(model_type="clip_vision_model", hidden_size=384, intermediate_size=1536, num_hidden_layers=6,
                num_attention_heads=6, image_size=224, patch_size=16, hidden_act="quick_gelu"),
    text=dict(model_type="llama", vocab_size=32000, hidden_size=768, intermediate_size=2048, num_hidden_layers=8,
              num_attention_heads=12, num_key_value_heads=12, max_position_embeddings=1024),
    text_tokens=60)
SMALL = dict(
    vision=dict(model_type="clip_vision_model", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, image_size=64, patch_size=16, hidden_act="quick_gelu"),
    text=dict(model_type="llama", vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256),
    text_tokens=16)
IMAGE_TOKEN = 3
# Qwen2-VL: the same widths; `image` is the side in pixels (patch 14, 2 x 2 merge: (image / 28)^2 tokens).
QWEN2_VL_FULL = dict(
    vision=dict(depth=6, embed_dim=384, hidden_size=768, num_heads=6, patch_size=14, spatial_merge_size=2,
                temporal_patch_size=2),
    text=dict(vocab_size=32000, hidden_size=768, intermediate_size=2048, num_hidden_layers=8, num_attention_heads=12,
              num_key_value_heads=12, max_position_embeddings=1024,
              rope_parameters={"rope_type": "default", "mrope_section": [8, 12, 12], "rope_theta": 1e6}),
    image=392, text_tokens=60)
QWEN2_VL_SMALL = dict(
    vision=dict(depth=2, embed_dim=64, hidden_size=64, num_heads=4, patch_size=14, spatial_merge_size=2,
                temporal_patch_size=2),
    text=dict(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=4, max_position_embeddings=256,
              rope_parameters={"rope_type": "default", "mrope_section": [4, 2, 2], "rope_theta": 1e6}),
    image=112, text_tokens=16)
VISION_START, VISION_END = 4, 5  # Qwen2-VL's vision markers; InternVL's <img> / </img>
# InternVL: the same widths; InternViT on one tile of `image_size` (patch 14, pixel shuffle 0.5: (image / 28)^2 tokens).
INTERNVL_FULL = dict(
    vision=dict(hidden_size=384, intermediate_size=1536, num_hidden_layers=6, num_attention_heads=6, image_size=392,
                patch_size=14, attention_bias=True),
    text=dict(FULL["text"]), text_tokens=60)
INTERNVL_SMALL = dict(
    vision=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, image_size=112,
                patch_size=14, attention_bias=True),
    text=dict(SMALL["text"]), text_tokens=16)


def build_internvl(spec):
    config = transformers.InternVLConfig(vision_config=spec["vision"], text_config=spec["text"],
                                         image_token_id=IMAGE_TOKEN)
    torch.manual_seed(0)
    hf = transformers.InternVLForConditionalGeneration(config).train()
    with tempfile.TemporaryDirectory() as d:
        hf.save_pretrained(d)
        model, params = internvl_convert.from_pretrained(d)
    return hf, model, params


def internvl_batch(spec, model, batch, rng):
    """(JAX args after params, torch kwargs, ids): one tile per row between <img> and </img>, then text."""
    t = model.cfg.tokens_per_tile
    text = rng.integers(10, spec["text"]["vocab_size"], size=(batch, spec["text_tokens"]))
    ids = np.concatenate([np.full((batch, 1), VISION_START), np.full((batch, t), IMAGE_TOKEN),
                          np.full((batch, 1), VISION_END), text], axis=1)
    size = spec["vision"]["image_size"]
    pixels = rng.normal(size=(batch, size, size, 3)).astype(np.float32)
    jax_args = (jnp.asarray(ids, jnp.int32), None, jnp.asarray(pixels))
    return jax_args, dict(input_ids=torch.tensor(ids), pixel_values=torch.tensor(pixels.transpose(0, 3, 1, 2))), ids


def build_qwen2_vl(spec):
    config = transformers.Qwen2VLConfig(vision_config=spec["vision"], text_config=spec["text"],
                                        image_token_id=IMAGE_TOKEN, video_token_id=6,
                                        vision_start_token_id=VISION_START, vision_end_token_id=VISION_END)
    torch.manual_seed(0)
    hf = transformers.Qwen2VLForConditionalGeneration(config).train()
    with tempfile.TemporaryDirectory() as d:
        hf.save_pretrained(d)
        model, params = qwen2_vl_convert.from_pretrained(d)
    return hf, model, params


def qwen2_vl_batch(spec, model, batch, rng):
    """(JAX args after params, torch kwargs, ids): one image per row between its vision markers, then text."""
    side = spec["image"] // spec["vision"]["patch_size"]
    grid = np.tile([[1, side, side]], (batch, 1))
    t = model.cfg.tokens_per_image(grid[0])
    text = rng.integers(10, spec["text"]["vocab_size"], size=(batch, spec["text_tokens"]))
    ids = np.concatenate([np.full((batch, 1), VISION_START), np.full((batch, t), IMAGE_TOKEN),
                          np.full((batch, 1), VISION_END), text], axis=1)
    pixels = rng.normal(size=(batch * side * side, model.cfg.vision.patch_dim)).astype(np.float32)
    jax_args = (jnp.asarray(ids, jnp.int32), None, jnp.asarray(pixels), jnp.asarray(grid, jnp.int32))
    torch_kwargs = dict(input_ids=torch.tensor(ids), pixel_values=torch.tensor(pixels),
                        image_grid_thw=torch.tensor(grid), mm_token_type_ids=torch.tensor((ids == IMAGE_TOKEN) * 1))
    return jax_args, torch_kwargs, ids


def llava_batch(spec, model, batch, rng):
    """(JAX args after params, torch kwargs, ids): the image tokens first, then text."""
    t = model.cfg.tokens_per_image
    text = rng.integers(10, spec["text"]["vocab_size"], size=(batch, spec["text_tokens"]))
    ids = np.concatenate([np.full((batch, t), IMAGE_TOKEN), text], axis=1)
    size = spec["vision"]["image_size"]
    pixels = rng.normal(size=(batch, size, size, 3)).astype(np.float32)
    jax_args = (jnp.asarray(ids, jnp.int32), None, jnp.asarray(pixels))
    return jax_args, dict(input_ids=torch.tensor(ids), pixel_values=torch.tensor(pixels.transpose(0, 3, 1, 2))), ids


def build(spec):
    config = transformers.LlavaConfig(vision_config=spec["vision"], text_config=spec["text"],
                                      image_token_id=IMAGE_TOKEN, vision_feature_layer=-2,
                                      vision_feature_select_strategy="default")
    torch.manual_seed(0)
    hf = transformers.LlavaForConditionalGeneration(config).train()
    with tempfile.TemporaryDirectory() as d:
        hf.save_pretrained(d)
        model, params = convert.from_pretrained(d)
    return hf, model, params


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", default="llava", choices=["llava", "internvl", "qwen2_vl"])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--small", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.family == "llava":
        spec = SMALL if args.small else FULL
        hf, model, params = build(spec)
        make_batch, name = llava_batch, "LLaVA"
    elif args.family == "internvl":
        spec = INTERNVL_SMALL if args.small else INTERNVL_FULL
        hf, model, params = build_internvl(spec)
        make_batch, name = internvl_batch, "InternVL"
    else:
        spec = QWEN2_VL_SMALL if args.small else QWEN2_VL_FULL
        hf, model, params = build_qwen2_vl(spec)
        make_batch, name = qwen2_vl_batch, "Qwen2-VL"
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
    jax_args, torch_kwargs, ids = make_batch(spec, model, args.batch, np.random.default_rng(0))
    t = int((ids[0] == IMAGE_TOKEN).sum())
    tokens = ids.size

    def loss_fn(p, *inputs):
        logits = model.apply({"params": p}, *inputs)
        return optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], inputs[0][:, 1:]).mean()

    step = jax.jit(jax.value_and_grad(loss_fn))
    tids = torch_kwargs["input_ids"]

    def run_jax():
        loss, grads = step(params, *jax_args)
        jax.block_until_ready(grads)
        return float(loss)

    def run_torch():
        hf.zero_grad(set_to_none=True)
        logits = hf(**torch_kwargs).logits
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), tids[:, 1:].reshape(-1))
        loss.backward()
        return loss.item()

    lj, lt = run_jax(), run_torch()  # warm-up (compile) + agreement check
    times = {"jax": [], "torch": []}
    for _ in range(args.iters):  # alternate, so load drifts on a shared machine hit both alike
        for key, fn in (("jax", run_jax), ("torch", run_torch)):
            t0 = time.perf_counter()
            fn()
            times[key].append(time.perf_counter() - t0)
    med = {k: float(np.median(v)) for k, v in times.items()}
    print(f"{name} {n_params / 1e6:.1f}M params, batch {args.batch} x {ids.shape[1]} tokens "
          f"({t} image tokens/image), float32, forward + backward, {args.threads} threads")
    print(f"first-step loss: jax {lj:.5f}, torch {lt:.5f} (|diff| {abs(lj - lt):.1e})")
    print(f"{'':8s}{'s/step':>10s}{'tokens/s':>12s}")
    for k in ("jax", "torch"):
        print(f"{k:8s}{med[k]:10.3f}{tokens / med[k]:12.1f}")
    print(f"ratio jax/torch (tokens/s): {med['torch'] / med['jax']:.2f}")


if __name__ == "__main__":
    main()
