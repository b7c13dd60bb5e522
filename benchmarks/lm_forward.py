"""Tokens/s of the Flax decoder LM vs HF PyTorch LlamaForCausalLM, same CPU: a prompt forward
(logits of every position) and greedy decoding with a KV cache.

Both run the same random weights in float32: the torch model is initialised by transformers,
saved, and loaded with vlm_jax's converter, so the benchmark also checks that the two agree.
Default size is a ~110M-parameter Llama (width 768, 12 layers, 12 heads, 4 kv heads, vocab 32000).

  python benchmarks/lm_forward.py                  # batch 4 x 128 tokens, 32 new tokens
  python benchmarks/lm_forward.py --small          # a seconds-long smoke run
  python benchmarks/lm_forward.py --batch=8 --length=256 --threads=16
"""

import argparse
import functools
import os
import tempfile
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # a CPU-vs-CPU comparison
# Without it torch's OpenMP threads spin-wait and, beside JAX's threads on a shared CPU, slow torch down many
# times over (benchmarks/RESULTS.md, "Thread spinning").
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import jax  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

from vlm_jax.convert import llama as convert  # noqa: E402
from vlm_jax.models import generate as gen  # noqa: E402

BASE = dict(vocab_size=32000, hidden_size=768, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=12,
            num_key_value_heads=4, max_position_embeddings=2048, bos_token_id=1, eos_token_id=2, pad_token_id=0)
SMALL = dict(BASE, vocab_size=1000, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2)


def median_seconds(fn, warmup: int, iters: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--length", type=int, default=128, help="prompt length")
    parser.add_argument("--new", type=int, default=32, help="greedy tokens per row")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch intra-op threads")
    parser.add_argument("--small", action="store_true")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    cfg = SMALL if args.small else BASE
    torch.manual_seed(0)
    torch_model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**cfg)).eval()
    with tempfile.TemporaryDirectory() as d:
        torch_model.save_pretrained(d)
        model, params = convert.from_pretrained(d)

    rng = np.random.default_rng(0)
    ids = rng.integers(3, cfg["vocab_size"], (args.batch, args.length)).astype(np.int32)
    mask = np.ones_like(ids)
    ids_t, mask_t = torch.from_numpy(ids.astype(np.int64)), torch.from_numpy(mask.astype(np.int64))

    forward = jax.jit(functools.partial(model.apply, {"params": params}))
    t0 = time.perf_counter()
    jax_logits = np.asarray(forward(ids, mask))
    compile_s = time.perf_counter() - t0
    with torch.inference_mode():
        torch_logits = torch_model(input_ids=ids_t, attention_mask=mask_t).logits.numpy()

    def torch_forward():
        with torch.inference_mode():
            torch_model(input_ids=ids_t, attention_mask=mask_t)

    # No EOS on either side, so both decode exactly --new tokens.
    torch_model.generation_config.eos_token_id = None
    def jax_generate():
        return np.asarray(gen.greedy_generate(model, params, ids, mask, args.new, None, 0, bucket_multiple=64))

    def torch_generate():
        with torch.inference_mode():
            return torch_model.generate(ids_t, attention_mask=mask_t, do_sample=False, max_new_tokens=args.new,
                                        pad_token_id=0)[:, args.length:].numpy()

    t0 = time.perf_counter()
    same = (jax_generate() == torch_generate()).mean()
    gen_compile_s = time.perf_counter() - t0

    fwd = {"jax": median_seconds(lambda: forward(ids, mask).block_until_ready(), args.warmup, args.iters),
           "torch": median_seconds(torch_forward, args.warmup, args.iters)}
    dec = {"jax": median_seconds(jax_generate, args.warmup, args.iters),
           "torch": median_seconds(torch_generate, args.warmup, args.iters)}
    n_params = convert.param_count(model) / 1e6
    print(f"Llama {n_params:.0f}M params, float32, batch {args.batch}, prompt {args.length}, {args.new} new tokens, "
          f"median of {args.iters} after {args.warmup} warmup, cpu_count {os.cpu_count()}, "
          f"torch threads {torch.get_num_threads()}, load avg {os.getloadavg()[0]:.2f}")
    print(f"max |jax - torch| logits {np.abs(jax_logits - torch_logits).max():.2e} "
          f"(scale {np.abs(torch_logits).max():.2e}); greedy tokens equal: {same:.1%}; "
          f"jax compile+run: forward {compile_s:.1f}s, generate {gen_compile_s:.1f}s (with torch's)")
    tokens = args.batch * args.length
    for name in ("jax", "torch"):
        print(f"{name:5s} forward {tokens / fwd[name]:9.0f} prompt tokens/s   "
              f"greedy {args.batch * args.new / dec[name]:7.1f} new tokens/s")
    print(f"ratio jax/torch: forward {fwd['torch'] / fwd['jax']:.2f}x, greedy {dec['torch'] / dec['jax']:.2f}x")


if __name__ == "__main__":
    main()
