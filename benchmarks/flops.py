"""FLOP counts and peak FLOP/s for the benchmarks: model FLOP utilisation (MFU) = achieved FLOP/s / peak FLOP/s.

* `compiled_flops(jitted, *args)`: the FLOPs XLA's cost analysis assigns to the compiled program. Caveats: XLA
  counts what it compiled (remat recomputation included, dead code removed); the body of a while loop
  (`nn.scan`, `lax.scan`) is counted once, not once per iteration; custom calls (cuDNN flash attention, Pallas /
  Triton kernels) count as 0 FLOPs. So with `attention_impl='cudnn'` the attention FLOPs are missing from it.
* `transformer_flops(n_params, tokens)`: the usual 6 * N * tokens estimate of a training step (2 N forward,
  4 N backward per token; no attention-score FLOPs). With a frozen base (LoRA) no weight gradient is computed
  for N, so the step really does ~4 N per token: `frozen=True` gives that.
* `peak_flops(device, dtype)`: dense matmul peak of the device. For GPUs/TPUs a table of published dense peaks
  keyed by `device_kind` (`PEAKS`); for a CPU there is no such number, so it is *measured*: the best rate of a
  large matmul in that dtype on the spot (JAX, and torch when given), labelled 'measured' in the returned
  source string. A measured CPU peak is the machine's achievable matmul rate under its current load, not the
  vendor's theoretical peak, so CPU MFU reads as "fraction of what a big matmul reaches here".

  python benchmarks/flops.py            # prints this device's peak (measures it on a CPU)
"""

from __future__ import annotations

import os
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

# Dense (no sparsity) peaks in TFLOP/s, from the vendors' data sheets. 'float32' on NVIDIA Ampere/Hopper is the
# TF32 tensor-core peak: XLA runs float32 dots on TF32 tensor cores unless jax_default_matmul_precision='highest'
# (then the plain-FP32 peak, 'float32_highest', applies). TPUs have no float32 matmul unit (float32 dots run as
# several bf16 passes), so they list bfloat16 only. Matched by substring of device_kind, first match wins.
PEAKS = (
    ("H100 PCIe", {"bfloat16": 756.0, "float16": 756.0, "float32": 378.0, "float32_highest": 51.0}),
    ("H100", {"bfloat16": 989.0, "float16": 989.0, "float32": 494.0, "float32_highest": 67.0}),  # SXM
    ("H200", {"bfloat16": 989.0, "float16": 989.0, "float32": 494.0, "float32_highest": 67.0}),
    ("GH200", {"bfloat16": 989.0, "float16": 989.0, "float32": 494.0, "float32_highest": 67.0}),
    ("A100", {"bfloat16": 312.0, "float16": 312.0, "float32": 156.0, "float32_highest": 19.5}),
    ("L4", {"bfloat16": 121.0, "float16": 121.0, "float32": 60.0, "float32_highest": 30.3}),
    ("TPU v4", {"bfloat16": 275.0}),
    ("TPU v5 lite", {"bfloat16": 197.0}),  # v5e
    ("TPU v5e", {"bfloat16": 197.0}),
    ("TPU v5p", {"bfloat16": 459.0}),
    ("TPU v5", {"bfloat16": 459.0}),  # v5p reports device_kind 'TPU v5'
    ("TPU v6 lite", {"bfloat16": 918.0}),  # v6e (Trillium)
)


def compiled_flops(jitted, *args, **kwargs) -> float | None:
    """FLOPs of `jitted(*args, **kwargs)` from XLA's cost analysis of the compiled program (None if unknown).

    `cost_analysis()` returns a dict in recent JAX and a list with one dict per program in older ones; both
    are handled. Compiling again is cheap after the first call (the executable is cached).
    """
    compiled = jitted.lower(*args, **kwargs).compile()
    return cost_flops(compiled.cost_analysis())


def cost_flops(cost) -> float | None:
    """The 'flops' entry of a cost analysis in either of its forms (dict, or list/tuple of dicts summed)."""
    if cost is None:
        return None
    if isinstance(cost, dict):
        cost = [cost]
    total = [float(c["flops"]) for c in cost if c and "flops" in c]
    return sum(total) if total else None


def transformer_flops(n_params: float, tokens: float, *, frozen: bool = False) -> float:
    """6 * N * tokens (a training step: forward 2N, backward 4N per token); 4 * N * tokens when N is frozen."""
    return (4.0 if frozen else 6.0) * float(n_params) * float(tokens)


def _best_rate(fn, flops: float, seconds: float, min_iters: int = 3) -> float:
    t0 = time.perf_counter()
    fn()  # warm-up (and compile)
    first = time.perf_counter() - t0
    if first > seconds:  # hopeless here (e.g. torch bfloat16 on a CPU without bf16 units): one call is enough
        return flops / first
    best, t_end, n = 0.0, time.perf_counter() + seconds, 0
    while n < min_iters or time.perf_counter() < t_end:
        t0 = time.perf_counter()
        fn()
        best = max(best, flops / (time.perf_counter() - t0))
        n += 1
    return best


_SLOW: set[tuple[str, str]] = set()  # (framework, dtype) pairs far below the best rate: not measured again


def measure_matmul_peak(dtype: str = "float32", sizes=(1024, 2048), seconds: float = 2.0, torch_module=None,
                        device=None) -> dict[str, float]:
    """Best FLOP/s of square matmuls [n, n] @ [n, n] in `dtype` over `sizes`, by JAX (and torch if given).

    A framework more than 10x slower than the other on the first size (torch's bfloat16 on CPUs without bf16
    units: ~1 GFLOP/s) is not measured further, in this call or later ones.

    Returns:
      {'jax': FLOP/s, 'torch': FLOP/s (if measured)}: each the best single-call rate over sizes and repeats.
    """
    out = {}
    for size in sizes:
        flops = 2.0 * size**3
        x = jax.device_put(jnp.asarray(np.random.default_rng(0).standard_normal((size, size)), dtype), device)
        mm = jax.jit(lambda a: a @ a)
        out["jax"] = max(out.get("jax", 0.0), _best_rate(lambda: mm(x).block_until_ready(), flops, seconds))
        if torch_module is not None and ("torch", dtype) not in _SLOW:
            t = torch_module
            xt = t.from_numpy(np.array(x, np.float32)).to(getattr(t, dtype))

            def run():
                with t.no_grad():
                    t.mm(xt, xt)
            out["torch"] = max(out.get("torch", 0.0), _best_rate(run, flops, seconds))
            if out["torch"] < 0.1 * out["jax"]:
                _SLOW.add(("torch", dtype))
    return out


_CPU_PEAK: dict[str, dict[str, float]] = {}


def peak_flops(device=None, dtype: str = "float32", torch_module=None, sizes=(1024, 2048), seconds: float = 2.0,
               remeasure: bool = False) -> tuple[float | None, str]:
    """(peak FLOP/s, where the number comes from) for `device` (default: JAX's first device) in `dtype`.

    GPUs/TPUs: the `PEAKS` table (None if the device_kind is not in it: pass the number yourself). CPUs: a
    matmul benchmark run now: the best of JAX's and (if given) torch's rate. On a shared machine one
    measurement can catch a busy moment, so `remeasure=True` measures again and keeps the best rate seen so
    far in this process (call it between benchmarks and use the last value).
    """
    device = device or jax.devices()[0]
    dtype = str(jnp.dtype(dtype))
    if device.platform == "cpu":
        if dtype not in _CPU_PEAK or remeasure:
            rates = measure_matmul_peak(dtype, sizes, seconds, torch_module, device)
            best = _CPU_PEAK.setdefault(dtype, {})
            for k, v in rates.items():
                best[k] = max(best.get(k, 0.0), v)
        best = _CPU_PEAK[dtype]
        who = max(best, key=best.get)
        detail = ", ".join(f"{k} {v / 1e9:.1f}" for k, v in best.items())
        return best[who], (f"measured: best {dtype} matmul ({'/'.join(map(str, sizes))} square) seen in this run, "
                           f"GFLOP/s {detail}; {os.cpu_count()} CPUs")
    kind = device.device_kind
    for key, peaks in PEAKS:
        if key.lower() in kind.lower():
            if dtype in peaks:
                return peaks[dtype] * 1e12, f"table: {key} dense {dtype} {peaks[dtype]:g} TFLOP/s"
            if "bfloat16" in peaks:
                return peaks["bfloat16"] * 1e12, (f"table: {key} dense bfloat16 {peaks['bfloat16']:g} TFLOP/s "
                                                  f"(no {dtype} entry)")
    return None, f"unknown device_kind {kind!r}: add it to benchmarks/flops.py PEAKS or pass the peak"


def mfu(flops_per_step: float | None, seconds_per_step: float, peak: float | None) -> float | None:
    """Achieved FLOP/s over peak FLOP/s (None if either count is unknown)."""
    if not flops_per_step or not peak or seconds_per_step <= 0:
        return None
    return flops_per_step / seconds_per_step / peak


def main():
    try:
        import torch
    except ImportError:
        torch = None
    dev = jax.devices()[0]
    for dtype in ("float32", "bfloat16"):
        peak, src = peak_flops(dev, dtype, torch_module=torch if dev.platform == "cpu" else None)
        shown = f"{peak / 1e12:.3f} TFLOP/s" if peak else "unknown"
        print(f"{dev.device_kind} ({dev.platform}) {dtype}: {shown} [{src}]")


if __name__ == "__main__":
    main()
