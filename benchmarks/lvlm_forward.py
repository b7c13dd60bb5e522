"""Tokens/s of a LLaVA forward + backward step, Flax vs HF PyTorch, on the same machine.

A ~100M-parameter LLaVA (CLIP ViT tower 384 wide / 6 layers at 224 px, Llama LM 768 wide / 8 layers, vocab 32k)
with random weights, float32; the loss is next-token cross-entropy over the whole sequence (196 image tokens +
text); gradients w.r.t. every parameter. Both frameworks get the same weights (the torch model is converted with
vlm_jax's table), and the first step's losses are compared.

  python benchmarks/lvlm_forward.py                 # batch 2, 256 tokens
  python benchmarks/lvlm_forward.py --small         # a seconds-long smoke run
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
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--small", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    spec = SMALL if args.small else FULL
    hf, model, params = build(spec)
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
    t = model.cfg.tokens_per_image
    rng = np.random.default_rng(0)
    text = rng.integers(10, spec["text"]["vocab_size"], size=(args.batch, spec["text_tokens"]))
    ids = np.concatenate([np.full((args.batch, t), IMAGE_TOKEN), text], axis=1)
    size = spec["vision"]["image_size"]
    pixels = rng.normal(size=(args.batch, size, size, 3)).astype(np.float32)
    tokens = ids.size

    def loss_fn(p, ids, pixels):
        logits = model.apply({"params": p}, ids, None, pixels)
        return optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], ids[:, 1:]).mean()

    step = jax.jit(jax.value_and_grad(loss_fn))
    jids, jpix = jnp.asarray(ids, jnp.int32), jnp.asarray(pixels)
    tids, tpix = torch.tensor(ids), torch.tensor(pixels.transpose(0, 3, 1, 2))

    def run_jax():
        loss, grads = step(params, jids, jpix)
        jax.block_until_ready(grads)
        return float(loss)

    def run_torch():
        hf.zero_grad(set_to_none=True)
        logits = hf(input_ids=tids, pixel_values=tpix).logits
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), tids[:, 1:].reshape(-1))
        loss.backward()
        return loss.item()

    lj, lt = run_jax(), run_torch()  # warm-up (compile) + agreement check
    times = {"jax": [], "torch": []}
    for _ in range(args.iters):  # alternate, so load drifts on a shared machine hit both alike
        for name, fn in (("jax", run_jax), ("torch", run_torch)):
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    med = {k: float(np.median(v)) for k, v in times.items()}
    print(f"LLaVA {n_params / 1e6:.1f}M params, batch {args.batch} x {ids.shape[1]} tokens "
          f"({t} image tokens/image), float32, forward + backward, {args.threads} threads")
    print(f"first-step loss: jax {lj:.5f}, torch {lt:.5f} (|diff| {abs(lj - lt):.1e})")
    print(f"{'':8s}{'s/step':>10s}{'tokens/s':>12s}")
    for k in ("jax", "torch"):
        print(f"{k:8s}{med[k]:10.3f}{tokens / med[k]:12.1f}")
    print(f"ratio jax/torch (tokens/s): {med['torch'] / med['jax']:.2f}")


if __name__ == "__main__":
    main()
