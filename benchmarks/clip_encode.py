"""Images/s of the Flax CLIP image tower vs its PyTorch reference, same CPU.

--model=vit (default): HF PyTorch CLIPVisionModelWithProjection, random ViT-B/16 weights (image 224, patch 16,
width 768, 12 layers, 12 heads, projection 512). --model=rn50: open_clip's RN50 (ModifiedResNet [3, 4, 6, 3],
width 64, attention pool to 1024; the DualAdapter / Tip-Adapter backbone), built by open-clip-torch with random
weights. Both in float32: the torch model's state dict is converted with vlm_jax's conversion table, so the
benchmark also checks that the two agree.

  python benchmarks/clip_encode.py                 # ViT-B/16, batch 8
  python benchmarks/clip_encode.py --model=rn50    # CLIP RN50 (JAX vs open_clip PyTorch)
  python benchmarks/clip_encode.py --small         # a seconds-long smoke run (either model)
  python benchmarks/clip_encode.py --batch=32 --iters=10 --threads=16
"""

import argparse
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


# open_clip model_cfg of a small ModifiedResNet for --small --model=rn50.
SMALL_RN = dict(embed_dim=64, quick_gelu=True, vision_cfg=dict(image_size=64, layers=[1, 1, 1, 1], width=16,
                                                               head_width=16, patch_size=None),
                text_cfg=dict(context_length=4, vocab_size=8, width=16, heads=1, layers=1))


def build_rn50(small: bool):
    """(torch encode_image fn, Flax encode fn, Flax params, image size) of open_clip's RN50 with identical weights."""
    import json
    import tempfile

    from vlm_jax.convert import open_clip as oc_convert
    from vlm_jax.models import open_clip as oc_lib
    from vlm_jax.testing.open_clip_ref import import_open_clip

    open_clip, _ = import_open_clip()
    name = "RN50"
    if small:
        path = os.path.join(tempfile.mkdtemp(), "vlmjax-bench-rn.json")
        with open(path, "w") as f:
            json.dump(SMALL_RN, f)
        open_clip.add_model_config(path)
        name = "vlmjax-bench-rn"
    torch.manual_seed(0)
    torch_model = open_clip.create_model(name, pretrained=None).eval()
    cfg = oc_lib.config_from_dict(open_clip.get_model_config(name))
    model = oc_lib.OpenCLIP(cfg)
    tensors = {k: v.numpy() for k, v in torch_model.state_dict().items()}
    shapes = jax.eval_shape(model.init, jax.random.key(0), *model.init_inputs())["params"]
    params = jax.device_put(loader.apply_table(oc_convert.open_clip_table(cfg), tensors, shapes,
                                               ignore=oc_convert.IGNORE))
    encode = jax.jit(lambda p, x: model.apply({"params": p}, x, method=oc_lib.OpenCLIP.encode_image))
    return torch_model.encode_image, encode, params, cfg.vision.image_size


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
    parser.add_argument("--small", action="store_true", help="a tiny model for a quick check")
    parser.add_argument("--model", default="vit", choices=["vit", "rn50"], help="ViT-B/16 (HF) or RN50 (open_clip)")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    if args.model == "rn50":
        torch_encode, encode, params, size = build_rn50(args.small)
        name, attn = ("small ModifiedResNet" if args.small else "RN50 (open_clip)"), "open_clip"
    else:
        vision, proj = (SMALL, 64) if args.small else (VIT_B16, 512)
        torch_model, model, params = build(vision, proj)
        size, name = vision["image_size"], "small ViT" if args.small else "ViT-B/16"
        attn = torch_model.config._attn_implementation
        encode = jax.jit(lambda p, x: model.apply({"params": p}, x, method=CLIP.encode_image))

        def torch_encode(x):
            return torch_model(pixel_values=x).image_embeds
    pixels = np.random.default_rng(0).standard_normal((args.batch, size, size, 3)).astype(np.float32)
    pixels_jax = jnp.asarray(pixels)
    pixels_torch = torch.from_numpy(np.ascontiguousarray(pixels.transpose(0, 3, 1, 2)))

    t0 = time.perf_counter()
    jax_out = np.asarray(encode(params, pixels_jax))
    compile_s = time.perf_counter() - t0
    with torch.inference_mode():
        torch_out = torch_encode(pixels_torch).numpy()

    def run_jax():
        encode(params, pixels_jax).block_until_ready()

    def run_torch():
        with torch.inference_mode():
            torch_encode(pixels_torch)

    ips = interleaved_throughput({"jax": run_jax, "torch": run_torch}, args.batch, args.warmup, args.iters)
    jax_ips, torch_ips = ips["jax"], ips["torch"]
    print(f"{name} image tower, float32, batch {args.batch}, {args.iters} timed iters after {args.warmup} warmup, "
          f"median of interleaved calls, cpu_count {os.cpu_count()}, torch threads {torch.get_num_threads()}, "
          f"load avg {os.getloadavg()[0]:.2f}")
    print(f"max |jax - torch| of the embeddings: {np.abs(jax_out - torch_out).max():.2e} "
          f"(scale {np.abs(torch_out).max():.2e}); jax first call (compile + run) {compile_s:.1f}s")
    print(f"jax   (jit):              {jax_ips:8.2f} images/s")
    print(f"torch (inference_mode):   {torch_ips:8.2f} images/s  (attn: {attn})")
    print(f"ratio jax/torch:          {jax_ips / torch_ips:8.2f}x")


if __name__ == "__main__":
    main()
