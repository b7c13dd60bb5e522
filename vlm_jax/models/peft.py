"""Parameter-efficient adaptation: LoRA and soft prompts, as pure functions over param pytrees.

Both LVLM methods (discriminative fine-tuning and VITask) train a few new tensors on top of a
frozen backbone. Everything here is *functional and model-agnostic*: a backbone module never
knows it is being adapted, and the new tensors live in their own pytrees next to the frozen
params, so the trainer's (regex, lr-multiplier-or-None) groups pick them by path
(e.g. [('lora/.*', 1.0), ('prompt/.*', 1.0)] over {'base': ..., 'lora': ..., 'prompt': ...}).

LoRA (Hu et al. 2021), as HF PEFT: W' = W + (alpha / rank) * A @ B, A ~ kaiming-uniform,
B = 0, so an untrained adapter is the identity. A target is any kernel (a leaf named 'kernel'
or 'embedding', rank >= 2) picked by a regex over '/'-joined param paths. Its leading `n_in`
axes are the input side (1 by default: nn.Dense f32[in, out] and q/k/v DenseGeneral
f32[D, H, Dh]; pass (regex, 2) for an attention output kernel f32[H, Dh, D]). A is
f32[prod(in axes), r] and B f32[r, prod(out axes)], so a pair maps one-to-one onto HF PEFT's
lora_A.weight.T / lora_B.weight.T of the same Linear. Two ways to apply it, same result:

  * merged (`lora_merge`): the forward runs on W + s * reshape(A @ B). Works for any module that
    reads its kernel from the params tree (Dense, DenseGeneral, Conv, einsum on self.param), and
    is also how adapters are exported: merge, then the family's `to_hf`. Under jit(grad) the
    merged kernels are kept for the backward pass: one extra copy of the *targeted* weights in
    activation memory. No LoRA dropout in this form (dropout acts on the input x, and x @ W'
    has no separate low-rank branch to drop on). With a bfloat16 base, W' is rounded to
    bfloat16, so an update below W's ulp is invisible in the forward pass until it grows (the
    gradient still reaches A and B through the cast).
  * unmerged (`lora_interceptor`): a Flax method interceptor adds s * ((x @ A) @ B) to the
    output of every targeted nn.Dense / nn.DenseGeneral call. No merged copies, and LoRA
    dropout works (HF PEFT applies it to x before A). Only Dense/DenseGeneral kernels, at the
    module path they are called under (not inside nn.scan-stacked layers).

LoRA dropout defaults to 0 everywhere: the discriminative method's rank-16 / alpha-16 setting
does without it, so the merged form is enough there; training with dropout needs the interceptor.

Soft prompts: the discriminative method replaces a handcrafted prompt's token span (e.g.
"<image>\\nSummary above image in one word:") by learned embeddings initialised from those very
tokens (`soft_prompt_init`). Replacing in place (`replace_span`) rather than inserting keeps
every shape static (no re-padding, the attention mask and positions unchanged) and makes the
untrained prompt reproduce the handcrafted one exactly; `find_span` locates the span per row.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import re
from typing import Any, Iterator, Sequence

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

PyTree = Any
LoraTarget = str | tuple[str, int]  # regex, or (regex, number of leading input axes of the kernel)

# Flax DenseGeneral/Dense/attention kernels are stored under this leaf name; the interceptor
# looks the LoRA pair up at (*module.path, KERNEL).
KERNEL = "kernel"
# Leaf names a LoRA target may have: Dense/DenseGeneral/Conv kernels and nn.Embed tables.
LORA_LEAVES = (KERNEL, "embedding")


def _flat(tree: PyTree) -> dict[tuple[str, ...], Any]:
    return traverse_util.flatten_dict(flax.core.unfreeze(nn.meta.unbox(tree)))


def _shape(x) -> tuple[int, ...]:
    # .shape first: jax.ShapeDtypeStruct (eval_shape output) is not array-like for numpy.
    return tuple(x.shape) if hasattr(x, "shape") else np.shape(x)


def _path(path: tuple[str, ...]) -> str:
    return "/".join(str(p) for p in path)


def lora_scale(alpha: float, rank: int) -> float:
    """HF PEFT's scaling alpha / rank (not rsLoRA)."""
    return float(alpha) / int(rank)


def lora_targets(params: PyTree, targets: Sequence[LoraTarget]) -> dict[tuple[str, ...], int]:
    """Resolves target regexes to the kernels they select.

    Args:
      params: the (frozen) base params tree, boxed or not.
      targets: regexes (re.fullmatch) over '/'-joined param paths, or (regex, n_in) pairs whose
        n_in says how many leading kernel axes are the input side (default 1). The first target
        that matches a path wins.

    Returns:
      {param path: n_in} of every selected kernel, in sorted path order.

    Raises:
      ValueError: a regex selects nothing (the message lists available kernel paths), selects a
        leaf that is not a kernel (e.g. a head-shaped bias f32[H, Dh]), or n_in leaves no input or
        no output axis.
    """
    if not targets:
        raise ValueError("LoRA needs at least one target regex")
    compiled = [(re.compile(t), 1) if isinstance(t, str) else (re.compile(t[0]), int(t[1])) for t in targets]
    flat = _flat(params)
    chosen: dict[tuple[str, ...], int] = {}
    hits = [0] * len(compiled)
    for path in sorted(flat):
        name = _path(path)
        matches = [i for i, (rx, _) in enumerate(compiled) if rx.fullmatch(name)]
        for i in matches:  # a regex shadowed by an earlier one still counts as used
            hits[i] += 1
        if not matches:
            continue
        rx, n_in = compiled[matches[0]]
        shape = _shape(flat[path])
        # Named leaves, not just rank >= 2: head-shaped biases f32[H, Dh] are 2-D too.
        if path[-1] not in LORA_LEAVES or len(shape) < 2:
            raise ValueError(f"LoRA target {rx.pattern!r} selects {name} of shape {shape}; only kernels "
                             f"(leaves named {'/'.join(LORA_LEAVES)}, rank >= 2) take a low-rank update")
        if not 1 <= n_in < len(shape):
            raise ValueError(f"LoRA target {rx.pattern!r}: n_in={n_in} is invalid for {name} of shape "
                             f"{shape} (need 1 <= n_in < {len(shape)})")
        chosen[path] = n_in
    unused = [rx.pattern for (rx, _), n in zip(compiled, hits) if not n]
    if unused:
        kernels = [_path(p) for p in sorted(flat) if p[-1] in LORA_LEAVES and len(_shape(flat[p])) >= 2]
        shown = kernels[:12] + (["..."] if len(kernels) > 12 else [])
        raise ValueError(f"LoRA target regex(es) {unused} match no parameter path (re.fullmatch over "
                         f"'/'-joined paths); available kernels include: {shown}")
    return chosen


def lora_init(params: PyTree, rng: jax.Array, *, targets: Sequence[LoraTarget], rank: int,
              dtype=jnp.float32, init: str = "kaiming_uniform") -> PyTree:
    """Creates LoRA pairs for the targeted kernels.

    Args:
      params: the base params tree (only paths and shapes are read; abstract arrays are fine).
      rng: PRNG key; target i (in sorted path order) uses fold_in(rng, i), so the result does
        not depend on dict ordering.
      targets: see `lora_targets`.
      rank: r.
      dtype: dtype of A and B (float32 keeps the trainable tensors in full precision even when
        the base is bfloat16).
      init: 'kaiming_uniform' (HF PEFT's default: A ~ U(-1/sqrt(in), 1/sqrt(in)), which is
        kaiming_uniform(a=sqrt(5)) on torch's f32[r, in]) or 'gaussian' (A ~ N(0, 1/r)).

    Returns:
      A nested dict mirroring the targeted param paths, each leaf replaced by
      {'a': f32[in, r], 'b': f32[r, out]} with b = 0; in/out are the flattened kernel axes.
    """
    if rank < 1:
        raise ValueError(f"LoRA rank must be >= 1, got {rank}")
    if init not in ("kaiming_uniform", "gaussian"):
        raise ValueError(f"unknown LoRA init {init!r}: use 'kaiming_uniform' or 'gaussian'")
    flat = _flat(params)
    shapes = {path: (math.prod(_shape(flat[path])[:n_in]), math.prod(_shape(flat[path])[n_in:]))
              for path, n_in in lora_targets(params, targets).items()}

    def make(rng):
        out = {}
        for i, (path, (d_in, d_out)) in enumerate(shapes.items()):
            key = jax.random.fold_in(rng, i)
            if init == "kaiming_uniform":
                bound = 1.0 / math.sqrt(d_in)
                a = jax.random.uniform(key, (d_in, rank), dtype, -bound, bound)
            else:
                a = jax.random.normal(key, (d_in, rank), dtype) / rank
            out[path] = {"a": a, "b": jnp.zeros((rank, d_out), dtype)}
        return traverse_util.unflatten_dict(out)

    # One compiled program rather than two eager dispatches per target (slow for deep models).
    return jax.jit(make)(rng)


def _pairs(lora_params: PyTree) -> dict[tuple[str, ...], tuple[jax.Array, jax.Array]]:
    """{kernel path: (a, b)} of a `lora_init` tree."""
    flat = _flat(lora_params)
    pairs = {}
    for path in flat:
        if path[-1] not in ("a", "b") or (*path[:-1], "b" if path[-1] == "a" else "a") not in flat:
            raise ValueError(f"malformed LoRA tree: {_path(path)} is not half of an {{'a', 'b'}} pair")
        pairs[path[:-1]] = (flat[(*path[:-1], "a")], flat[(*path[:-1], "b")])
    return pairs


def _check_pair(name: str, a, b, rank: int, size: int | None = None):
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != rank or b.shape[0] != rank:
        raise ValueError(f"LoRA pair {name}: a {a.shape} / b {b.shape} do not have rank {rank}")
    if size is not None and a.shape[0] * b.shape[1] != size:
        raise ValueError(f"LoRA pair {name}: a {a.shape} @ b {b.shape} cannot reshape to the kernel's {size} "
                         f"elements; were the adapters made for another model?")


def lora_merge(params: PyTree, lora_params: PyTree, *, alpha: float, rank: int) -> PyTree:
    """Base params with every targeted kernel replaced by W + (alpha / rank) * reshape(A @ B).

    Differentiable in `lora_params` (call it inside the jitted loss so gradients reach A and B
    and none the frozen W), and the way to export: merge, then the family's `to_hf`.

    Args:
      params: the base params tree (unboxed), e.g. from a family's `from_pretrained`.
      lora_params: from `lora_init`.
      alpha: LoRA alpha.
      rank: LoRA rank r (checked against the pairs' shapes).

    Returns:
      A tree with the structure, shapes and dtypes of `params`; the update is computed in the
      wider of the two dtypes and cast back to each kernel's dtype (bfloat16 rounding: see the
      module docstring).

    Raises:
      ValueError: a pair has no kernel in `params` or does not fit it.
    """
    pairs = _pairs(lora_params)
    s = lora_scale(alpha, rank)
    flat = _flat(params)
    missing = sorted(_path(p) for p in pairs if p not in flat)
    if missing:
        raise ValueError(f"LoRA pairs without a kernel in params: {missing[:8]}")
    merged = dict(flat)
    for path, (a, b) in pairs.items():
        w = flat[path]
        _check_pair(_path(path), a, b, rank, math.prod(_shape(w)))
        wide = jnp.promote_types(w.dtype, a.dtype)
        delta = (s * (a.astype(wide) @ b.astype(wide))).reshape(_shape(w))
        merged[path] = (w.astype(wide) + delta).astype(w.dtype)
    return traverse_util.unflatten_dict(merged)


def _input_axes(module: nn.Module, ndim: int) -> int | None:
    """How many trailing input axes a Dense/DenseGeneral contracts, or None if unsupported."""
    if isinstance(module, nn.Dense):
        return 1
    axis = module.axis if isinstance(module.axis, Sequence) else (module.axis,)
    axis = sorted(a % ndim for a in axis)
    if module.batch_dims or axis != list(range(ndim - len(axis), ndim)):
        return None  # contracting non-trailing axes: not a LoRA-able layout
    return len(axis)


@dataclasses.dataclass(frozen=True)
class LoraModel:
    """`model` applied with LoRA unmerged, as training applies it: params are {'base': ..., 'lora': ...}.

    Anything that calls `model.apply({'params': p}, ..., method=...)` (embedding, likelihood ranking, greedy
    decoding) runs the adapted model with this wrapper in place of the model, and the adapters stay traced
    arguments, so evaluating another LoRA reuses the compiled program. Merging instead (`lora_merge`) would round
    W + s A B to a bf16 base's dtype: not the model that was trained. Other attributes (`cfg`, `init_cache`,
    `scan_layers`, ...) are the model's.
    """

    model: Any
    alpha: float
    rank: int

    def apply(self, variables, *args, **kwargs):
        params = variables["params"]
        with lora_interceptor(params["lora"], alpha=self.alpha, rank=self.rank):
            return self.model.apply({"params": params["base"]}, *args, **kwargs)

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return getattr(self.model, name)


@contextlib.contextmanager
def lora_interceptor(lora_params: PyTree, *, alpha: float, rank: int, dropout_rate: float = 0.0,
                     rng: jax.Array | None = None, strict: bool = False) -> Iterator[set[str]]:
    """Applies LoRA unmerged: y = dense(x) + (alpha / rank) * (dropout(x) @ A) @ B.

    Use inside the traced loss, around the model's `apply`:

        with lora_interceptor(lora, alpha=16, rank=16, dropout_rate=0.05, rng=rng) as applied:
            out = model.apply({'params': base}, ...)

    Args:
      lora_params: from `lora_init` on the params of the module being applied (paths are taken
        from the root of that `apply`).
      alpha: LoRA alpha.
      rank: LoRA rank r.
      dropout_rate: HF PEFT's lora_dropout on the adapter's input; needs `rng` when > 0.
      rng: dropout PRNG key; each targeted call folds in its target index and call count.
      strict: raise on leaving the block if some pair was never applied: its kernel is not
        a Dense/DenseGeneral (a Conv, an einsum on self.param) or this `apply` never ran it.
        Off by default because running one tower of a model legitimately skips the others.

    Yields:
      The set of '/'-joined kernel paths the adapters were applied to (filled in by `apply`), so a
      caller can check that no target was missed (e.g. one that is not a Dense/DenseGeneral).

    Raises:
      ValueError: at trace time, if a pair does not fit the layer it targets (made with another
        n_in) or the layer contracts non-trailing axes; dropout without rng; strict and a pair
        left unused (use `lora_merge` for such kernels).
    """
    if dropout_rate and rng is None:
        raise ValueError("lora_interceptor: dropout_rate > 0 needs an rng")
    pairs = _pairs(lora_params)
    index = {p: i for i, p in enumerate(sorted(pairs))}
    calls: dict[tuple[str, ...], int] = {}
    applied: set[str] = set()
    s = lora_scale(alpha, rank)

    def intercept(next_fun, args, kwargs, context):
        y = next_fun(*args, **kwargs)
        module = context.module
        if context.method_name != "__call__" or not isinstance(module, (nn.Dense, nn.DenseGeneral)):
            return y
        path = (*module.path, KERNEL)
        if path not in pairs:
            return y
        a, b = pairs[path]
        name = _path(path)
        x = args[0] if args else kwargs["inputs"]
        n_in = _input_axes(module, x.ndim)
        if n_in is None:
            raise ValueError(f"LoRA on {name}: the layer contracts non-trailing axes {module.axis}")
        x = x.reshape(*x.shape[:x.ndim - n_in], -1)
        _check_pair(name, a, b, rank)
        if a.shape[0] != x.shape[-1] or b.shape[1] != math.prod(y.shape[x.ndim - 1:]):
            raise ValueError(f"LoRA pair {name}: a {a.shape} / b {b.shape} do not fit the layer (input "
                             f"{x.shape[-1]}, output {y.shape[x.ndim - 1:]}); was it made with another n_in?")
        if dropout_rate:
            calls[path] = calls.get(path, -1) + 1
            key = jax.random.fold_in(jax.random.fold_in(rng, index[path]), calls[path])
            keep = jax.random.bernoulli(key, 1.0 - dropout_rate, x.shape)
            x = jnp.where(keep, x / (1.0 - dropout_rate), 0).astype(x.dtype)
        wide = jnp.promote_types(x.dtype, a.dtype)
        delta = s * ((x.astype(wide) @ a.astype(wide)) @ b.astype(wide))
        applied.add(name)
        return (y.astype(wide) + delta.reshape(y.shape)).astype(y.dtype)

    with nn.intercept_methods(intercept):
        yield applied
    missed = sorted(set(map(_path, pairs)) - applied)
    if strict and missed:
        raise ValueError(f"lora_interceptor(strict=True): LoRA pairs never applied: {missed[:8]}; only "
                         f"nn.Dense/nn.DenseGeneral calls are intercepted, use lora_merge for other kernels")


# ----------------------------------------------------------------------------- soft prompts


def soft_prompt_init(embedding_table: jax.Array, prompt_token_ids, dtype=jnp.float32) -> jax.Array:
    """Learned prompt initialised from the token embeddings of a handcrafted prompt.

    Args:
      embedding_table: f32[V, D] the (frozen) LM token-embedding table.
      prompt_token_ids: i32[P] the prompt's token ids (as tokenized in context, e.g. without BOS).
      dtype: dtype of the trainable prompt.

    Returns:
      f32[P, D] embedding_table[prompt_token_ids], a copy in `dtype`.
    """
    ids = jnp.asarray(prompt_token_ids, jnp.int32)
    if ids.ndim != 1 or ids.shape[0] == 0:
        raise ValueError(f"prompt_token_ids must be a non-empty i32[P], got shape {ids.shape}")
    return jnp.asarray(embedding_table)[ids].astype(dtype)


def find_span(input_ids: jax.Array, pattern) -> jax.Array:
    """Start of the first occurrence of `pattern` in each row, or -1 where there is none.

    Args:
      input_ids: i32[B, L].
      pattern: i32[P] a static token sequence (e.g. the handcrafted prompt's ids), P <= L.

    Returns:
      i32[B] start positions (-1: not found; `replace_span` leaves such rows unchanged).
    """
    pattern = np.asarray(pattern)
    b, length = input_ids.shape
    p = pattern.shape[0]
    if p > length:
        return jnp.full((b,), -1, jnp.int32)
    windows = length - p + 1
    # P shifted comparisons rather than a [B, L, P] gather: P is small and static.
    match = jnp.ones((b, windows), bool)
    for j, tok in enumerate(pattern.tolist()):
        match &= input_ids[:, j:j + windows] == tok
    return jnp.where(match.any(-1), jnp.argmax(match, -1), -1).astype(jnp.int32)


def replace_span(inputs_embeds: jax.Array, start: jax.Array, prompt: jax.Array) -> jax.Array:
    """Overwrites P positions per row, from `start`, with the learned prompt.

    Args:
      inputs_embeds: f32[B, L, D] token embeddings of the batch.
      start: i32[B] first position of the span per row (e.g. from `find_span`); a negative
        start leaves the row unchanged. The caller keeps start + P <= L: positions past L are
        simply not written.
      prompt: f32[P, D] one prompt for every row, or f32[B, P, D] one per row.

    Returns:
      f32[B, L, D] with the span replaced (cast to inputs_embeds.dtype). The gradient reaches
      `prompt` from the replaced positions only and `inputs_embeds` from the others only.
    """
    b, length, _ = inputs_embeds.shape
    p = prompt.shape[-2]
    start = jnp.asarray(start, jnp.int32)
    offset = jnp.arange(length)[None, :] - start[:, None]  # [B, L] position within the span
    inside = (offset >= 0) & (offset < p) & (start[:, None] >= 0)
    idx = jnp.clip(offset, 0, p - 1)
    if prompt.ndim == 2:
        values = prompt[idx]  # [B, L, D]
    else:
        values = jnp.take_along_axis(prompt, idx[..., None], axis=1)
    # A select, not an add of (prompt - original): the untrained prompt reproduces the inputs
    # bit for bit, and no gradient leaks into the replaced embeddings.
    return jnp.where(inside[..., None], values.astype(inputs_embeds.dtype), inputs_embeds)


@contextlib.contextmanager
def lora_context(lora: PyTree | None, impl: str, *, alpha: float, rank: int):
    """Yields base params -> the weights to apply the model with, LoRA included one way or the other.

    'merged': the weights are W + s A B. 'unmerged': the weights are the base as it is and, inside the block,
    `lora_interceptor` adds s (x A) B to each adapted Dense call (paths from the model's root).
    """
    if not lora:
        yield lambda base: base
    elif impl == "merged":
        yield lambda base: lora_merge(base, lora, alpha=alpha, rank=rank)
    elif impl == "unmerged":
        with lora_interceptor(lora, alpha=alpha, rank=rank):
            yield lambda base: base
    else:
        raise ValueError(f"lora_impl must be 'merged' or 'unmerged', got {impl!r}")
