"""VITask's task-specific model (TSM), pure pieces: a ViT (HF `vit`, the paper's ViT-B/16-IN21k) or CLIP vision tower
+ a linear head, trained jointly over
several datasets with one head whose softmax is masked to each sample's own dataset (METHODS.md, VITask: one
joint 70-way model over the 12 MedMNIST datasets). The exemplar fed to VITask's connector is the tower's pooled
class-token feature (`exemplar_features`).

Parameter tree of `TSMClassifier` (plain dicts after `nn.meta.unbox`):

    {'tower': <a CLIPVisionTower's params (the subtree CLIP keeps under 'vision_model'), or a ViT's without its
               pooler / classifier>,
     'head':  {'kernel': f32[D, C] ('embed', 'classes'), 'bias': f32[C] ('classes',)}}

so param groups read e.g. `(r"tower/.*", 0.1), (r"head/.*", 1.0)` (or `PARAM_GROUPS`).

Joint label space. Dataset k owns the contiguous class range [offsets[k], offsets[k] + sizes[k]) of the
C = sum(sizes) logits; `labels` are global indices into that range. `dataset_class_mask` builds the per-sample
mask, `masked_logits` pushes every logit outside it to a large negative, so softmax / CE / argmax over the
masked logits equal those over the sample's own label subset.

Multi-label datasets (ChestMNIST). The paper does not say how its TSM treats ChestMNIST; here a multi-label
sample's loss is the sigmoid binary cross-entropy of each of its dataset's logits against the multi-hot target,
averaged over that dataset's labels (`masked_bce`), and its prediction is every label of its dataset with
logit > 0 (sigmoid > 0.5). Single-label samples of the same batch keep the masked softmax (`make_loss_fn`,
`predict_joint`).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from vlm_jax.data import features as feats
from vlm_jax.models import clip, vit

Dtype = jnp.dtype
NEG = -1e9  # "minus infinity" that stays finite (no inf - inf NaNs), exact enough in bf16 too
PARAM_GROUPS = ((r"tower/.*", 1.0), (r"head/.*", 1.0))  # full fine-tuning, as the paper's TSM


class TSMClassifier(nn.Module):
    """Vision tower + linear head.

    Attributes:
      vision: the tower's config: a `vit.ViTConfig` (HF ViT; the feature is the final-layernormed class token,
        what `ViTForImageClassification`'s classifier reads) or a `clip.VisionConfig` (the feature is CLIP's
        pooled output, post_layernorm of the class token).
      num_classes: C, total classes over all jointly trained datasets.
      dtype, param_dtype, attention_impl: as `clip.CLIPVisionTower`.
    """

    vision: clip.VisionConfig | vit.ViTConfig
    num_classes: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    attention_impl: str | None = None

    @nn.compact
    def __call__(self, pixel_values: jax.Array) -> tuple[jax.Array, jax.Array]:
        """f32[B, H, W, 3] normalised NHWC images -> (logits f32[B, C], feature f32[B, D]).

        feature is the tower's pooled output (post_layernorm of the last layer's class token).
        """
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        if isinstance(self.vision, vit.ViTConfig):
            cfg = dataclasses.replace(self.vision, pooler=False, num_labels=0)
            feature = vit.ViT(cfg, attention_impl=self.attention_impl, name="tower", **kw)(
                pixel_values)["last_hidden_state"][:, 0]
        else:
            feature, _ = clip.CLIPVisionTower(self.vision, attention_impl=self.attention_impl, name="tower",
                                              **kw)(pixel_values)
        part = nn.with_logical_partitioning
        logits = nn.Dense(self.num_classes, kernel_init=part(nn.initializers.lecun_normal(), ("embed", "classes")),
                          bias_init=part(nn.initializers.zeros_init(), ("classes",)), name="head", **kw)(feature)
        return logits.astype(jnp.float32), feature.astype(jnp.float32)

    def init_inputs(self, batch: int = 1):
        v = self.vision
        return (jnp.zeros((batch, v.image_size, v.image_size, v.num_channels), jnp.float32),)


# ----------------------------------------------------------------------------------------------------------
# Masked joint softmax.

def dataset_class_mask(dataset_ids, offsets: Sequence[int], sizes: Sequence[int], num_classes: int) -> jax.Array:
    """i32[B] dataset ids -> bool[B, C]: True on [offsets[id], offsets[id] + sizes[id])."""
    offsets, sizes = jnp.asarray(offsets, jnp.int32), jnp.asarray(sizes, jnp.int32)
    ids = jnp.asarray(dataset_ids, jnp.int32)
    lo = offsets[ids][:, None]
    hi = lo + sizes[ids][:, None]
    c = jnp.arange(num_classes, dtype=jnp.int32)[None]
    return (c >= lo) & (c < hi)


def dataset_offsets(sizes: Sequence[int]) -> np.ndarray:
    """Contiguous class offsets for datasets of the given sizes: [0, s0, s0 + s1, ...]."""
    return np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int32)


def masked_logits(logits: jax.Array, class_mask: jax.Array) -> jax.Array:
    """f32[B, C], bool[B, C] -> f32[B, C] with `NEG` outside the mask (softmax restricted to the mask)."""
    return jnp.where(class_mask, logits, jnp.asarray(NEG, logits.dtype))


# ----------------------------------------------------------------------------------------------------------
# Training, initialisation, inference.

def masked_bce(logits: jax.Array, targets: jax.Array, class_mask: jax.Array) -> jax.Array:
    """Per-sample sigmoid BCE averaged over the sample's own classes.

    Args:
      logits: f32[B, C]; targets: f32[B, C] multi-hot (1 = positive); class_mask: bool[B, C].

    Returns:
      f32[B]: mean over {c : class_mask[b, c]} of -t log sigmoid(z) - (1 - t) log(1 - sigmoid(z)).
    """
    bce = optax.sigmoid_binary_cross_entropy(logits.astype(jnp.float32), targets.astype(jnp.float32))
    n = jnp.maximum(class_mask.sum(-1), 1).astype(jnp.float32)
    return jnp.where(class_mask, bce, 0.0).sum(-1) / n


def make_loss_fn(model: TSMClassifier):
    """loss_fn(params, batch, rng) -> (loss, {'loss', 'accuracy'}) for `vlm_jax.train.trainer`.

    batch: {'pixel_values' f32[B, H, W, 3], 'labels' i32[B] (global class index), 'class_mask' bool[B, C]},
    plus, when any dataset is multi-label, 'targets' f32[B, C] (multi-hot over the joint label space) and
    'multi_label' bool[B]. Loss: mean over samples of the masked-softmax CE (single-label samples) or of
    `masked_bce` (multi-label samples). A multi-label sample's 'labels' entry is ignored but must lie in its
    mask (e.g. its dataset's offset) so the unused CE stays small and finite. 'accuracy': argmax == label, or
    for multi-label samples the exact match of {logit > 0} with the target set. `rng` is unused (no dropout).
    """

    def loss_fn(params, batch, rng):
        del rng
        raw, _ = model.apply({"params": params}, batch["pixel_values"])
        mask = batch["class_mask"]
        logits = masked_logits(raw, mask)
        labels = batch["labels"].astype(jnp.int32)
        per = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
        hit = jnp.argmax(logits, -1) == labels
        if "multi_label" in batch:
            multi = batch["multi_label"].astype(bool)
            per = jnp.where(multi, masked_bce(raw, batch["targets"], mask), per)
            exact = jnp.all(((raw > 0) == (batch["targets"] > 0.5)) | ~mask, axis=-1)
            hit = jnp.where(multi, exact, hit)
        loss = per.mean()
        return loss, {"loss": loss, "accuracy": hit.mean()}

    return loss_fn


def init_params(model: TSMClassifier, rng: jax.Array):
    """Random, unboxed params {'tower', 'head'}."""
    return nn.meta.unbox(jax.jit(model.init)(rng, *model.init_inputs())["params"])


def init_from_tower(model: TSMClassifier, tower_params, rng: jax.Array | None = None):
    """TSM params with the tower copied from a loaded checkpoint and a freshly initialised head.

    Args:
      model: the TSM; its `vision` config must match the checkpoint's vision tower.
      tower_params: a `CLIP` params tree (e.g. from `vlm_jax.convert.clip.from_pretrained`, reads its
        'vision_model' subtree), a `CLIPVisionTower` tree, or a `vit.ViT` tree (from `vlm_jax.convert.vit`; its
        pooler and classifier, which the TSM does not use, are dropped).
      rng: head init key (default key 0).

    Raises:
      ValueError: if the tower structure or a shape/dtype differs.
    """
    rng = jax.random.key(0) if rng is None else rng
    shapes = nn.meta.unbox(jax.eval_shape(model.init, rng, *model.init_inputs())["params"])
    tower = nn.meta.unbox(tower_params)
    tower = tower.get("vision_model", tower)
    if isinstance(model.vision, vit.ViTConfig):
        tower = {k: v for k, v in tower.items() if k not in ("pooler", "classifier")}
    want, got = jax.tree.structure(shapes["tower"]), jax.tree.structure(tower)
    if want != got:
        raise ValueError(f"vision params do not match the TSM tower:\n{got}\nvs\n{want}")
    for (path, s), t in zip(jax.tree_util.tree_leaves_with_path(shapes["tower"]), jax.tree.leaves(tower)):
        if tuple(s.shape) != tuple(t.shape):
            raise ValueError(f"tower{jax.tree_util.keystr(path)}: checkpoint {tuple(t.shape)} vs TSM "
                             f"{tuple(s.shape)}")
    head_rng = jax.random.fold_in(rng, 1)
    head = nn.Dense(model.num_classes, param_dtype=model.param_dtype,
                    kernel_init=nn.initializers.lecun_normal()).init(
        head_rng, jnp.zeros((1, model.vision.hidden_size), model.param_dtype))["params"]
    tower = jax.tree.map(lambda t: jnp.asarray(t, model.param_dtype), tower)
    return {"tower": tower, "head": dict(head)}


@functools.partial(jax.jit, static_argnums=0)
def predict(model: TSMClassifier, params, pixel_values, class_mask) -> jax.Array:
    """-> i32[B]: argmax of the masked logits (always inside each sample's dataset)."""
    logits, _ = model.apply({"params": params}, pixel_values)
    return jnp.argmax(masked_logits(logits, class_mask), axis=-1).astype(jnp.int32)


def _joint_sets(logits, class_mask, multi_label):
    top = jax.nn.one_hot(jnp.argmax(masked_logits(logits, class_mask), -1), logits.shape[-1], dtype=bool)
    return jnp.where(jnp.asarray(multi_label, bool)[:, None], (logits > 0) & class_mask, top)


@functools.partial(jax.jit, static_argnums=0)
def predict_joint(model: TSMClassifier, params, pixel_values, class_mask, multi_label) -> jax.Array:
    """-> bool[B, C] predicted label sets: the one-hot masked argmax for single-label samples, every class of the
    mask with logit > 0 for multi-label ones (`multi_label` bool[B])."""
    logits, _ = model.apply({"params": params}, pixel_values)
    return _joint_sets(logits, class_mask, multi_label)


@functools.partial(jax.jit, static_argnums=0)
def predict_and_features(model: TSMClassifier, params, pixel_values, class_mask, multi_label):
    """-> (`predict_joint`'s bool[B, C], `exemplar_features`' f32[B, D]) from one pass of the tower."""
    logits, feature = model.apply({"params": params}, pixel_values)
    return _joint_sets(logits, class_mask, multi_label), feature


@functools.partial(jax.jit, static_argnums=0)
def exemplar_features(model: TSMClassifier, params, pixel_values) -> jax.Array:
    """-> f32[B, D]: the pooled class-token feature VITask feeds to its `ExemplarConnector`."""
    return model.apply({"params": params}, pixel_values)[1]


def tsm_pass(tsm_model, params, task, split, pixels_of,
             batch: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """(bool[N, C] predictions, f32[N, D] exemplar features) of `split` in one pass of the TSM's tower.

    Args:
      pixels_of: i32[b] rows of `split` -> f32[b, H, W, 3] (the CLIP tower's preprocessing).
    """
    preds, features = [], []
    for idx, n in feats.padded_chunks(range(len(split)), batch):
        ds = split.dataset[idx]
        p, f = predict_and_features(tsm_model, params, pixels_of(idx), task.class_mask(ds),
                                            task.multi_label[ds])
        preds.append(np.asarray(p)[:n])
        features.append(np.asarray(f, np.float32)[:n])
    return np.concatenate(preds), np.concatenate(features)
