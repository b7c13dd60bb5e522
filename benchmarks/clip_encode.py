"""Images/s of the Flax CLIP image tower vs HF PyTorch CLIPVisionModelWithProjection, same CPU.

Both run the same random ViT-B/16 weights (image 224, patch 16, width 768, 12 layers, 12 heads,
projection 512) in float32: the torch model is initialised by transformers and its state dict
is converted with vlm_jax's conversion table, so the benchmark also checks that the two agree.

  python benchmarks/clip_encode.py                 # ViT-B/16, batch 8
  python benchmarks/clip_encode.py --small         # a seconds-long smoke run
  python benchmarks/clip_encode.py --batch=32 --iters=10 --threads=16
"""

import argparse
import functools
import os
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # a CPU-vs-CPU comparison
# Without it torch's OpenMP threads spin-wait and, beside JAX's threads on a shared CPU, slow torch down many
# times over (benchmarks/RESULTS.md, "Thread spinning").
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

from vlm_jax.convert import clip as convert  # noqa: E402
from vlm_jax.convert import loader  # noqa: E402
from vlm_jax.models.clip import CLIP  # noqa: E402

VIT_B16 = dict(image_size=224, patch_size=16, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
               num_attention_heads=12, hidden_act="quick_gelu")
SMALL = dict(image_size=64, patch_size=16, hidden_size=128, intermediate_size=512, num_hidden_layers=2,
             num_attention_heads=4, hidden_act="quick_gelu")
# The text tower is never run; it only has to exist for the CLIP module.
TINY_TEXT = dict(hidden_size=16, intermediate_size=16, num_hidden_layers=1, num_attention_heads=1, vocab_size=8,
                 max_position_embeddings=4, bos_token_id=6, eos_token_id=7, pad_token_id=7)


def build(vision: dict, projection_dim: int):
    """(torch CLIPVisionModelWithProjection, Flax CLIP, Flax params) with identical weights."""
    config = transformers.CLIPConfig(text_config=TINY_TEXT, vision_config=vision, projection_dim=projection_dim)
    vision_config = transformers.CLIPVisionConfig(**vision, projection_dim=projection_dim)
    torch.manual_seed(0)
    torch_model = transformers.CLIPVisionModelWithProjection(vision_config).eval()
    model = CLIP.from_hf_config(config)
    tensors = {k: v.numpy() for k, v in torch_model.state_dict().items()}
    tensors["logit_scale"] = np.asarray(config.logit_scale_init_value, np.float32)
    # Convert only the image side: the table and shape tree restricted to vision + projection.
    keep = ("vision_model", "visual_projection", "logit_scale")
    table = [e for e in convert.table_for(model) if e.flax_path[0] in keep]
    shapes = {k: v for k, v in convert.param_shapes(model).items() if k in keep}
    params = jax.device_put(loader.apply_table(table, tensors, shapes, ignore=convert.IGNORE))
    return torch_model, model, params


def interleaved_throughput(fns: dict, batch: int, warmup: int, iters: int) -> dict:
    """images/s of each fn from the median of per-call times, alternating the fns call by call.

    Alternating (rather than timing one framework, then the other) keeps a shared machine's
    load drift from favouring whichever ran in the quieter minute.
    """
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times = {name: [] for name in fns}
    for _ in range(iters):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: batch / float(np.median(t)) for name, t in times.items()}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch intra-op threads")
    parser.add_argument("--small", action="store_true", help="a tiny ViT for a quick check")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    vision, proj = (SMALL, 64) if args.small else (VIT_B16, 512)
    torch_model, model, params = build(vision, proj)
    size = vision["image_size"]
    pixels = np.random.default_rng(0).standard_normal((args.batch, size, size, 3)).astype(np.float32)
    pixels_jax = jnp.asarray(pixels)
    pixels_torch = torch.from_numpy(np.ascontiguousarray(pixels.transpose(0, 3, 1, 2)))

    encode = jax.jit(functools.partial(model.apply, method=CLIP.encode_image))
    t0 = time.perf_counter()
    jax_out = np.asarray(encode({"params": params}, pixels_jax))
    compile_s = time.perf_counter() - t0
    with torch.inference_mode():
        torch_out = torch_model(pixel_values=pixels_torch).image_embeds.numpy()

    def run_jax():
        encode({"params": params}, pixels_jax).block_until_ready()

    def run_torch():
        with torch.inference_mode():
            torch_model(pixel_values=pixels_torch)

    ips = interleaved_throughput({"jax": run_jax, "torch": run_torch}, args.batch, args.warmup, args.iters)
    jax_ips, torch_ips = ips["jax"], ips["torch"]
    name = "small ViT" if args.small else "ViT-B/16"
    print(f"{name} image tower, float32, batch {args.batch}, {args.iters} timed iters after {args.warmup} warmup, "
          f"median of interleaved calls, cpu_count {os.cpu_count()}, torch threads {torch.get_num_threads()}, "
          f"load avg {os.getloadavg()[0]:.2f}")
    print(f"max |jax - torch| of the embeddings: {np.abs(jax_out - torch_out).max():.2e} "
          f"(scale {np.abs(torch_out).max():.2e}); jax first call (compile + run) {compile_s:.1f}s")
    print(f"jax   (jit):              {jax_ips:8.2f} images/s")
    print(f"torch (inference_mode):   {torch_ips:8.2f} images/s  (attn: {torch_model.config._attn_implementation})")
    print(f"ratio jax/torch:          {jax_ips / torch_ips:8.2f}x")


if __name__ == "__main__":
    main()
