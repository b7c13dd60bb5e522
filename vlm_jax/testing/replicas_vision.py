"""Offline replicas of the papers' vision backbones: the real structure, tiny random weights, the real file layout.

  rn50-openclip        open_clip RN50 (DualAdapter / Tip-Adapter's backbone; timm/resnet50_clip.openai layout):
                       224 px, ModifiedResNet stages [3, 4, 6, 3] with the three-conv stem, anti-aliased strided
                       bottlenecks and the attention pool of 32 heads, embed_dim 1024 kept; widths / 8 (stem 4,
                       stages 8..64, pooled 256 wide); text tower 77 tokens, 8 heads, width 64, 2 layers, QuickGELU.
                       open_clip_config.json + open_clip_model.safetensors, plus vocab.json + merges.txt (a CLIP BPE
                       whose words are the offline dataset's, so no download of open_clip's 49408-token vocab).
  vit-b16-in21k        google/vit-base-patch16-224-in21k (VITask's TSM): ViTModel with pooler, 224 px patch 16
                       (196 patches + class token), exact GELU, eps 1e-12, width 32, 2 layers; the hub's legacy
                       ViTFeatureExtractor preprocessor_config.json (size 224, bilinear, mean / std 0.5).
  siglip-base          google/siglip-base-patch16-224: SiglipModel, 224 px patch 16 with the MAP head, text 64
                       tokens, gelu_pytorch_tanh, eps 1e-6, width 32, 2 layers per tower; a SiglipTokenizer
                       (SentencePiece unigram trained on the spot: <pad> 0, </s> 1 = pad and eos, <unk> 2, no dummy
                       prefix, lower-cased) and SiglipImageProcessor (224 x 224 bicubic, mean / std 0.5).

Weights are `common.random_params` (N(0, 0.05) noise; norm scales 1 + noise; BatchNorm variances 1 + |noise|).
Usage: `python -m vlm_jax.testing.replicas rn50-openclip /tmp/rn50` (registered in `replicas.REPLICAS`), or the
few-shot program's `--config.model.checkpoint=replica:rn50-openclip` (`testing.replicas.resolve_offline`).
"""

from __future__ import annotations

import dataclasses
import io
import json
import pathlib
import shutil
import tempfile
from collections.abc import Callable, Sequence

VERSION = "v1"  # in cache folder names: bump when a replica's structure or weights change


def _corpus(corpus: Sequence[str]) -> list[str]:
    """The offline dataset's class names and prompts (so that they are whole tokens) plus the caller's texts."""
    from vlm_jax.data import builtin

    ds = builtin.builtin_dataset()
    return [*ds.classnames, *ds.templates, *ds.negative_templates, *(p for ps in ds.cupl_prompts or [] for p in ps),
            "a photo of a", *corpus]


def _random(model, seed: int):
    import jax
    import numpy as np

    from vlm_jax.testing.common import random_params

    params = random_params(model, seed)
    rng = np.random.default_rng(seed + 1)

    def fix(path, x):
        name = str(getattr(path[-1], "key", ""))
        if name == "var":  # BatchNorm running variances must stay positive
            return (1.0 + np.abs(x)).astype(x.dtype)
        if name == "kernel" and x.ndim == 4:
            # He-scaled convs (the residual branch's last one x0.2, as open_clip zero-inits its BatchNorm): with
            # N(0, 0.05) a 16-block ResNet's output no longer depends on the image (every image embeds alike and
            # the few-shot methods sit at chance).
            gain = 0.2 if str(getattr(path[-2], "key", "")) == "conv3" and len(path) > 3 else 1.0
            return (gain * rng.standard_normal(x.shape) * np.sqrt(2 / np.prod(x.shape[:-1]))).astype(x.dtype)
        return x
    return jax.tree_util.tree_map_with_path(fix, params)


def _rn50(out: pathlib.Path, corpus: Sequence[str], seed: int) -> None:
    from vlm_jax.convert import clip as clip_convert
    from vlm_jax.convert import open_clip as convert
    from vlm_jax.models import open_clip as oc

    files, vocab_size, _, _ = clip_convert.tokenizer_files(_corpus(corpus), 77)
    cfg = oc.config_from_dict(dict(
        embed_dim=1024, quick_gelu=True,
        vision_cfg=dict(image_size=224, layers=[3, 4, 6, 3], width=8, head_width=8, patch_size=None),
        text_cfg=dict(context_length=77, vocab_size=vocab_size, width=64, heads=8, layers=2)))
    model = oc.OpenCLIP(cfg)
    convert.to_open_clip(model, _random(model, seed), out, extra_files={k: files[k] for k in ("vocab.json",
                                                                                             "merges.txt")})


def _vit(out: pathlib.Path, corpus: Sequence[str], seed: int) -> None:
    del corpus
    from vlm_jax.convert import vit as convert
    from vlm_jax.models.vit import ViT, ViTConfig

    cfg = ViTConfig(hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, hidden_act="gelu",
                    layer_norm_eps=1e-12, image_size=224, patch_size=16, pooler=True, pooler_output_size=32)
    model = ViT(cfg)
    pre = dict(do_normalize=True, do_resize=True, feature_extractor_type="ViTFeatureExtractor", image_mean=[0.5] * 3,
               image_std=[0.5] * 3, resample=2, size=224)
    convert.to_hf(model, _random(model, seed), out, extra_files={"preprocessor_config.json": json.dumps(pre)})


def _siglip_tokenizer(corpus: Sequence[str]) -> tuple[dict[str, bytes], int]:
    """SiglipTokenizer files: a SentencePiece unigram trained on the lower-cased, punctuation-free corpus."""
    import string

    import sentencepiece as spm

    texts = [t.lower().translate(str.maketrans("", "", string.punctuation)) for t in corpus]
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts), model_writer=model, model_type="unigram", vocab_size=200,
        add_dummy_prefix=False, pad_id=0, eos_id=1, unk_id=2, bos_id=-1, hard_vocab_limit=False,
        character_coverage=1.0, minloglevel=2, num_threads=1)
    config = dict(tokenizer_class="SiglipTokenizer", model_max_length=64, do_lower_case=True, eos_token="</s>",
                  pad_token="</s>", unk_token="<unk>")
    size = spm.SentencePieceProcessor(model_proto=model.getvalue()).get_piece_size()
    return {"spiece.model": model.getvalue(), "tokenizer_config.json": json.dumps(config).encode()}, size


def _siglip(out: pathlib.Path, corpus: Sequence[str], seed: int) -> None:
    from transformers import SiglipConfig

    from vlm_jax.convert import siglip as convert
    from vlm_jax.models.siglip import SiglipModel

    files, vocab_size = _siglip_tokenizer(_corpus(corpus))
    tower = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                 hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6)
    config = SiglipConfig(text_config=dict(tower, vocab_size=vocab_size, max_position_embeddings=64,
                                           projection_size=32, pad_token_id=1, eos_token_id=1, bos_token_id=None),
                          vision_config=dict(tower, image_size=224, patch_size=16))
    model = SiglipModel.from_hf_config(config)
    pre = dict(image_processor_type="SiglipImageProcessor", do_resize=True, size={"height": 224, "width": 224},
               resample=3, do_rescale=True, rescale_factor=1 / 255, do_normalize=True, image_mean=[0.5] * 3,
               image_std=[0.5] * 3)
    files["preprocessor_config.json"] = json.dumps(pre).encode()
    convert.siglip_model_to_hf(model, _random(model, seed), out, config=config, extra_files=files)


@dataclasses.dataclass(frozen=True)
class VisionReplica:
    """One replica: the checkpoint it copies and the function that writes it (out_dir, corpus, seed)."""

    hub_id: str
    writer: Callable[[pathlib.Path, Sequence[str], int], None]

    def write(self, out_dir, corpus: Sequence[str] = (), *, seed: int = 0) -> pathlib.Path:
        """Writes the replica into `out_dir` (which must not exist or be empty), atomically."""
        out = pathlib.Path(out_dir)
        out.parent.mkdir(parents=True, exist_ok=True)
        if out.exists() and any(out.iterdir()):
            raise FileExistsError(f"{out} exists and is not empty")
        with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.tmp-") as tmp:
            self.writer(pathlib.Path(tmp) / "ckpt", corpus, seed)
            if out.exists():
                out.rmdir()
            shutil.move(str(pathlib.Path(tmp) / "ckpt"), str(out))
        out.chmod(0o755)
        return out


REPLICAS: dict[str, VisionReplica] = {
    "rn50-openclip": VisionReplica("timm/resnet50_clip.openai", _rn50),
    "vit-b16-in21k": VisionReplica("google/vit-base-patch16-224-in21k", _vit),
    "siglip-base": VisionReplica("google/siglip-base-patch16-224", _siglip),
}


def cached_replica(name: str, cache_root) -> pathlib.Path:
    """The replica `name` under `cache_root`, written on first use (a UserError names the known ones)."""
    from vlm_jax.errors import UserError

    if name not in REPLICAS:
        raise UserError(f"unknown replica {name!r}; the few-shot program takes: "
                        f"{', '.join('replica:' + n for n in REPLICAS if n != 'vit-b16-in21k')}")
    path = pathlib.Path(cache_root) / f"replica-{name}-{VERSION}"
    if not path.exists():
        REPLICAS[name].write(path)
    return path

