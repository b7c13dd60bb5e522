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


# ----------------------------------------------------------------------------------------------------------
# open_clip's SimpleTokenizer (CLIP's BPE), as HF CLIPTokenizer + open_clip's text cleaning.

OPEN_CLIP_VOCAB = "bpe_simple_vocab_16e6.txt.gz"  # ships inside the open-clip-torch package


def open_clip_vocab_path():
    """The CLIP BPE merges file inside the installed open-clip-torch package, found without importing it (no torch)."""
    import importlib.util
    import pathlib

    spec = importlib.util.find_spec("open_clip")
    path = pathlib.Path(spec.origin).parent / OPEN_CLIP_VOCAB if spec and spec.origin else None
    if path is None or not path.is_file():
        raise CheckpointError(f"no CLIP BPE vocabulary: the checkpoint has no vocab.json + merges.txt and the "
                              f"open-clip-torch package (which ships {OPEN_CLIP_VOCAB}) is not installed: "
                              f"`pip install --no-deps open-clip-torch`, or copy vocab.json and merges.txt of "
                              f"openai/clip-vit-base-patch32 into the checkpoint directory")
    return path


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte -> printable unicode char map (as in transformers).

    Copied rather than imported: transformers moves it between modules across releases.
    """
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def _bpe_from_open_clip(path) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """(vocab, merges) exactly as open_clip's SimpleTokenizer builds them from its merges file."""
    import gzip

    lines = gzip.open(path).read().decode("utf-8").split("\n")
    merges = [tuple(m.split()) for m in lines[1:49152 - 256 - 2 + 1]]
    base = list(bytes_to_unicode().values())
    tokens = base + [b + "</w>" for b in base] + ["".join(m) for m in merges] + ["<|startoftext|>", "<|endoftext|>"]
    return {t: i for i, t in enumerate(tokens)}, merges


class OpenCLIPTokenizer:
    """open_clip's `SimpleTokenizer()(texts, context_length)`: the same ids, 0-padded, EOT kept when truncating.

    The BPE itself is HF's `CLIPTokenizer` (Rust); before it, each text gets open_clip's cleaning (ftfy.fix_text,
    html.unescape twice, whitespace collapsed, stripped), which CLIPTokenizer lacks: without it, text with HTML
    entities, curly quotes or mojibake tokenises differently.

    Args:
      checkpoint_dir: where to look for vocab.json + merges.txt first (None: only the packaged vocabulary).
      context_length: L, open_clip's text_cfg.context_length (77).
    """

    def __init__(self, checkpoint_dir=None, context_length: int = 77):
        import pathlib

        from transformers import CLIPTokenizer

        root = pathlib.Path(checkpoint_dir) if checkpoint_dir is not None else None
        if root is not None and (root / "vocab.json").is_file() and (root / "merges.txt").is_file():
            import json
            vocab = json.loads((root / "vocab.json").read_text())
            merges = [tuple(m.split()) for m in (root / "merges.txt").read_text().splitlines()[1:] if m.strip()]
            self.source = f"{root}/vocab.json + merges.txt"
        else:
            path = open_clip_vocab_path()
            vocab, merges = _bpe_from_open_clip(path)
            self.source = str(path)
        self.hf = CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=context_length)
        # open_clip's word regex has no '<|startoftext|>' / '<|endoftext|>' alternatives: such literal text is split
        # like any other (and the call passes split_special_tokens), so it is never read as the special tokens.
        from tokenizers import Regex, pre_tokenizers
        self.hf.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""),
                                 behavior="removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False)])
        self.context_length = context_length
        self.eot_id = vocab["<|endoftext|>"]
        if self.eot_id != max(vocab.values()):
            raise CheckpointError(f"{self.source}: <|endoftext|> must have the largest id (open_clip pools the text "
                                  f"at the largest id), it has {self.eot_id} of {max(vocab.values())}")

    @staticmethod
    def clean(text: str) -> str:
        """open_clip's `_clean_lower` before lowercasing (CLIPTokenizer lowercases itself)."""
        import html
        import re

        try:
            import ftfy
        except ImportError:
            raise CheckpointError("open_clip's tokenizer needs ftfy: pip install ftfy") from None
        text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
        return re.sub(r"\s+", " ", text).strip()

    def __call__(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """N strings -> (input_ids i32[N, L] 0-padded, attention_mask i32[N, L])."""
        if isinstance(texts, str):
            raise TypeError("OpenCLIPTokenizer expects a sequence of strings, got one string")
        enc = self.hf([self.clean(t) for t in texts], padding="max_length", truncation=True,
                      max_length=self.context_length, return_tensors="np", split_special_tokens=True)
        mask = enc["attention_mask"].astype(np.int32)
        return np.where(mask > 0, enc["input_ids"], 0).astype(np.int32), mask
