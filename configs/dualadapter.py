"""DualAdapter (arXiv 2403.12964) and its baselines (zero-shot CLIP, Tip-Adapter, Tip-Adapter-F) on few-shot CLIP.

Usage:
  python launch/main.py --config=configs/dualadapter.py:runlocal --workdir=/tmp/da          # offline, ~1 min, CPU
  python launch/main.py --config=configs/dualadapter.py:dataset=eurosat,shots=16 \
      --config.model.checkpoint=/ckpt/clip-vit-base-patch16 --config.data.root=/data/coop --workdir=/runs/eurosat16
  python launch/main.py --config=configs/dualadapter.py:dataset=eurosat,sweep --workdir=/runs/eurosat_sweep

Arguments (after the colon, comma separated):
  dataset   one of the CoOp datasets (imagenet, caltech101, oxford_pets, stanford_cars, oxford_flowers, food101,
            fgvc_aircraft, sun397, dtd, eurosat, ucf101), 'builtin' (offline photos) or 'tfds:<name>'.
  shots     images per class (default 16); seed: few-shot sampling seed (default 1).
  sweep     run shots 1/2/4/8/16 x seeds 1/2/3 and write the table and accuracy-vs-shots plot.
  runlocal  tiny random CLIP + the built-in photos: the whole pipeline in about a minute on a CPU.

The data root defaults to $VLM_JAX_DATA; the checkpoint to openai/clip-vit-base-patch16 from the local HF cache.
Hyperparameter search ranges, epochs and learning rates default to the official per-dataset configs
(`vlm_jax.methods.dualadapter.PRESETS`, `vlm_jax.methods.tip_adapter.PRESETS`).
"""

import os

import ml_collections

from vlm_jax import config_utils

METHODS = ("zeroshot", "tip_adapter", "tip_adapter_f", "dualadapter", "dualadapter_f")


def _grid(start, stop, steps):
    return ml_collections.ConfigDict(dict(start=float(start), stop=float(stop), steps=int(steps)))


def get_config(arg=None):
    arg = config_utils.parse_arg(arg, dataset="eurosat", shots=16, seed=1, sweep=False, runlocal=False)
    from vlm_jax.methods import dualadapter, tip_adapter  # presets only; importing jax here is harmless

    c = ml_collections.ConfigDict()
    c.program = "fewshot_clip"
    c.methods = ",".join(METHODS)  # comma-separated: --config.methods=zeroshot,dualadapter

    c.model = dict(checkpoint="openai/clip-vit-base-patch16", dtype="float32")
    c.data = dict(
        name=arg.dataset,
        root=os.environ.get("VLM_JAX_DATA", ""),
        cupl_path="",                   # CuPL JSON (class -> descriptions); empty: templates only
        tfds_data_dir="",
        shots=arg.shots,
        seed=arg.seed,
        augment_epoch=10,               # cache keys = mean over this many augmented passes
        batch_size=128,                 # feature extraction
        max_eval_examples=0,            # 0: all; >0 caps val/test (quick looks only)
        # Test-only sets evaluated with the adapted model, e.g. with dataset=imagenet:
        # "imagenetv2,imagenet_sketch,imagenet_a,imagenet_r" (domain generalisation).
        extra_test="",
    )
    c.sweep = dict(enabled=arg.sweep, shots=(1, 2, 4, 8, 16), seeds=(1, 2, 3))  # --config.sweep.shots="(1,4)"
    c.feature_cache_dir = os.path.join(os.path.expanduser(os.environ.get("VLM_JAX_CACHE", "~/.cache/vlm_jax")),
                                       "features")
    c.mesh = dict(data=-1, fsdp=1, tensor=1)
    c.train = dict(resume="check")   # 'force': resume a workdir whose config.json differs (train/workdir.py)
    c.rng_seed = 0

    da = dualadapter.PRESETS.get(arg.dataset, dualadapter.PRESETS["default"])
    c.dualadapter = dict(
        search=dict(beta=_grid(da["search_scale"][0], da["search_scale2"][0], da["search_step"][0]),
                    alpha=_grid(da["search_scale"][1], da["search_scale2"][1], da["search_step"][1]),
                    lam=_grid(da["search_scale"][2], da["search_scale2"][2], da["search_step"][2])),
        init=dict(beta=float(da["init_beta"]), alpha=float(da["init_alpha"]), lam=float(da["init_lambda"])),
        # 'reference': what the official code computes (cosine across classes per feature dimension);
        # 'per_class': the paper's reading. See vlm_jax.methods.dualadapter.consistency_loss.
        consistency="reference",
        train=dict(epochs=int(da["train_epoch"]), batch_size=256,
                   optim=dict(name="adamw", lr=float(da["lr"]),
                              eps=float(da.get("eps_few_shots", {}).get(arg.shots, da["eps"])), weight_decay=0.1,
                              decay_type="cosine"),
                   # big_vision-style (regex, lr multiplier or None): the negative adapter trains at 5x.
                   param_groups=[("adapter/(res_neg|res_neg_keys)", 5.0), ("adapter/.*", 1.0)]),
    )
    c.data.augment_epoch = int(da.get("augment_epoch", 10))

    ta = tip_adapter.PRESETS.get(arg.dataset, tip_adapter.PRESETS["default"])
    c.tip_adapter = dict(
        # Tip-Adapter's search starts at 0.1: [i * (scale - 0.1) / steps + 0.1 for i in range(steps)].
        search=dict(beta=_grid(0.1, ta["search_scale"][0], ta["search_step"][0]),
                    alpha=_grid(0.1, ta["search_scale"][1], ta["search_step"][1])),
        init=dict(beta=float(ta["init_beta"]), alpha=float(ta["init_alpha"])),
        train=dict(epochs=int(ta.get("train_epoch", 20)), batch_size=256,
                   optim=dict(name="adamw", lr=float(ta["lr"]), eps=float(ta["eps"]), weight_decay=float(ta["weight_decay"]),
                              decay_type="cosine"),
                   param_groups=[("adapter/.*", 1.0)]),
    )

    if arg.runlocal:
        c.model.checkpoint = "builtin:tiny-clip"
        c.data.name = "builtin"
        c.data.shots = min(arg.shots, 4)
        c.data.augment_epoch = 2
        c.data.batch_size = 32
        c.sweep.shots, c.sweep.seeds = (1, 2, 4), (1, 2)
        for m in ("dualadapter", "tip_adapter"):
            c[m].train.epochs = 3
            c[m].train.batch_size = 32
        c.dualadapter.search.beta.steps, c.dualadapter.search.alpha.steps, c.dualadapter.search.lam.steps = 20, 10, 5
        c.tip_adapter.search.beta.steps, c.tip_adapter.search.alpha.steps = 20, 10
    return c
