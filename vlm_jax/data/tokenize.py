"""Tokenisation with the checkpoint's own HF tokenizer, offline, into fixed-shape numpy arrays.

CLIP semantics: `<|startoftext|> tokens... <|endoftext|>`, padded to a fixed length (the text
tower's max_position_embeddings, 77 for OpenAI CLIP) so every batch has one jit shape; longer
texts are truncated with EOS kept as the last token, as HF does.
"""

from __future__ import annotations

import os
from typing import Sequence

import numpy as np

from vlm_jax.errors import CheckpointError
from vlm_jax.runtime.hub import resolve_checkpoint

# Any one of these means the directory carries a tokenizer AutoTokenizer can build.
_TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "tokenizer.model", "spiece.model")


def load_tokenizer(checkpoint_dir: str | os.PathLike):
    """The checkpoint's tokenizer (transformers AutoTokenizer, local files only).

    Args:
      checkpoint_dir: checkpoint directory, or a hub id present in the local HF cache.

    Raises:
      CheckpointError: the checkpoint cannot be found or carries no tokenizer files.
    """
    from transformers import AutoTokenizer  # lazy: heavy import

    path = resolve_checkpoint(checkpoint_dir, weights=False)
    if not any((path / f).is_file() for f in _TOKENIZER_FILES):
        raise CheckpointError(f"{path} has no tokenizer (none of {', '.join(_TOKENIZER_FILES)}); pass the "
                              f"original checkpoint directory, or copy its tokenizer files into this one")
    return AutoTokenizer.from_pretrained(path, local_files_only=True)


def tokenize(tokenizer, texts: Sequence[str], max_length: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Tokenises a batch of texts to fixed-length arrays.

    Args:
      tokenizer: an HF tokenizer (e.g. from `load_tokenizer`).
      texts: N strings.
      max_length: L; defaults to `tokenizer.model_max_length` (written from the text config's
        max_position_embeddings).

    Returns:
      (input_ids np.int32[N, L], attention_mask np.int32[N, L]); padding is on the right.
    """
    if isinstance(texts, str):
        raise TypeError("tokenize expects a sequence of strings, got one string")
    if max_length is None:
        max_length = tokenizer.model_max_length
        if not max_length or max_length > 100_000:  # HF's "unset" sentinel is ~1e30
            raise ValueError("the tokenizer has no model_max_length; pass max_length "
                             "(the text config's max_position_embeddings)")
    enc = tokenizer(list(texts), padding="max_length", truncation=True, max_length=int(max_length),
                    return_tensors="np")
    return enc["input_ids"].astype(np.int32), enc["attention_mask"].astype(np.int32)


def build_offline_tokenizer(texts: Sequence[str], out_dir: str | os.PathLike, vocab_size: int = 512,
                            image_token: str = "<image>"):
    """Trains a tiny byte-level BPE tokenizer on `texts` and saves it (tokenizer.json etc.) into `out_dir`.

    For offline toy checkpoints (`:runlocal`, tests): Llama-style special tokens <unk> <s> </s> <pad> and the
    LLaVA image placeholder, which stays one token. Deterministic for the same texts.

    Returns:
      The `PreTrainedTokenizerFast`.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    special = ["<unk>", "<s>", "</s>", "<pad>", image_token]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(list(texts), trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=special, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>", additional_special_tokens=[image_token])
    fast.save_pretrained(str(out_dir))
    return fast
