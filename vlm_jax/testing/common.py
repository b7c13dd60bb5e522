"""What every replica family shares: the base tokenizer corpus and random parameters without a compile."""

from __future__ import annotations

# The std of random_params' weights (norm scales: 1 + noise of that std).
INIT_STD = 0.05

# Words every replica's tokenizer keeps whole: the programs' default prompts and instructions.
BASE_CORPUS = (
    "USER: ASSISTANT: What is shown in this image? Describe the image in detail. Summary above image in one word: "
    "Summary above sentence in one word: a photo of a cat sitting on the grass next to a dog. The possible "
    "diagnoses are: normal, benign, malignant. Analyze the given medical image. A man riding a bike down a street "
    "with cars and people. 0123456789 ,.;:!?'\"()[]-_/ \n")


def random_params(model, seed: int, stds: dict[str, float] | None = None) -> dict:
    """Random numpy params of the model's shape tree, without compiling its init (seconds on 2 cores).

    Norm scales are 1 + N(0, 0.05), everything else N(0, 0.05): non-degenerate (HF's init leaves norms at 1 and
    biases at 0, which would hide mapping bugs), so every tensor's mapping matters in a parity check.

    Args:
      model: a Flax model with `init_inputs()`.
      seed: numpy seed; the draws are the same whatever `stds` says (only their scale changes).
      stds: {regex: std} for the params whose '/'-joined path fully matches it (the first match wins) instead
        of INIT_STD.
    """
    import re

    import jax
    import numpy as np
    from flax import linen as nn

    shapes = nn.meta.unbox(jax.eval_shape(model.init, jax.random.key(0), *model.init_inputs())["params"])
    rng = np.random.default_rng(seed)
    rules = [(re.compile(rx), std) for rx, std in (stds or {}).items()]

    def leaf(path, x):
        keys = [str(p.key if hasattr(p, "key") else p) for p in path]
        base = 1.0 if keys[-1] == "scale" else 0.0
        std = next((s for rx, s in rules if rx.fullmatch("/".join(keys))), INIT_STD)
        return (base + std * rng.standard_normal(x.shape)).astype(x.dtype)

    return jax.tree_util.tree_map_with_path(leaf, shapes)


def qwen2_bpe(corpus, vocab_size: int) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """(vocab, merges) of a byte-level BPE trained on `corpus` with exactly the normaliser and pre-tokenizer that
    `Qwen2Tokenizer` builds: the base of every Qwen-family replica tokenizer (each adds its own specials)."""
    import json

    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import Qwen2Tokenizer

    reference = Qwen2Tokenizer()
    bpe = Tokenizer(models.BPE())
    bpe.normalizer = reference.backend_tokenizer.normalizer
    bpe.pre_tokenizer = reference.backend_tokenizer.pre_tokenizer
    bpe.train_from_iterator(list(corpus), trainers.BpeTrainer(
        vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    state = json.loads(bpe.to_str())["model"]
    return state["vocab"], [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in state["merges"]]



def random_lora(params, targets, rank: int, seed: int, std: float = 0.05) -> dict:
    """Random numpy LoRA pairs in `peft.lora_init`'s tree ({kernel path: {'a': f32[in, r], 'b': f32[r, out]}}),
    both halves non-zero (an untrained B = 0 would make any export mapping look right), without a compile."""
    import math

    import numpy as np
    from flax import traverse_util

    from vlm_jax.models import peft

    flat = peft._flat(params)
    rng = np.random.default_rng(seed)
    pairs = {}
    for path, n_in in peft.lora_targets(params, targets).items():
        shape = tuple(flat[path].shape)
        d_in, d_out = math.prod(shape[:n_in]), math.prod(shape[n_in:])
        pairs[path] = {"a": (std * rng.standard_normal((d_in, rank))).astype(np.float32),
                       "b": (std * rng.standard_normal((rank, d_out))).astype(np.float32)}
    return traverse_util.unflatten_dict(pairs)
