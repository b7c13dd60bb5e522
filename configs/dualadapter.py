"""DualAdapter (arXiv 2403.12964) and its baselines (zero-shot CLIP, Tip-Adapter, Tip-Adapter-F) on few-shot CLIP.

Also the linear probe (ZS-LP) and CLAP (arXiv 2312.12730), on request: --config.methods=...,linear_probe,clap.

Usage:
  python launch/main.py --config=configs/dualadapter.py:runlocal --workdir=/tmp/da          # offline, ~1 min, CPU
  python launch/main.py --config=configs/dualadapter.py:dataset=eurosat,shots=16 \
      --config.model.checkpoint=/ckpt/clip-vit-base-patch16 --config.data.root=/data/coop --workdir=/runs/eurosat16
  python launch/main.py --config=configs/dualadapter.py:dataset=eurosat,sweep --workdir=/runs/eurosat_sweep

Arguments (after the colon, comma separated):
  dataset   one of the CoOp datasets (imagenet, caltech101, oxford_pets, stanford_cars, oxford_flowers, food101,
            fgvc_aircraft, sun397, dtd, eurosat, ucf101), 'builtin' (offline photos) or 'tfds:<name>'. Aliases and
            case variants (fgvc, flowers102, Food-101, OxfordPets, EuroSAT, ...) resolve here, once, to the
            canonical name: the loader, the presets, the templates and the caches all see that one name. An
            unknown name is an error. (Change the dataset here, not with --config.data.name: the presets are
            chosen here, and the program refuses a data.name whose presets were not.)
  shots     images per class (default 16); seed: few-shot sampling seed (default 1, the references' seed).
  protocol  'both' (default), 'paper' or 'realistic' -- how hyperparameters are chosen:
            paper:     as the papers do: (alpha, beta, lambda) by grid search and the fine-tuning epoch on the
                       full validation split (ImageNet: its val is its test split).
            realistic: with the K shots only (CLAP, arXiv 2312.12730): k-fold cross-validation over the support
                       set, folds = min(realistic.folds, K) splitting the shots of every class; with fewer than
                       realistic.min_shots shots (1-shot) the preset's initial (alpha, beta, lambda) and its last
                       epoch are used. The val split is never read. DualAdapter-F trains on the K cache shots.
                       Cost: each fine-tuned method trains min(realistic.folds, K) + 1 more times.
            Tables show both side by side.
  sweep     run shots 1/2/4/8/16 x seeds 1/2/3 and write the table and accuracy-vs-shots plot.
  runlocal  tiny random CLIP + the built-in photos (whatever dataset= says; their presets are 'default'): the
            whole pipeline in about a minute on a CPU.

The data root defaults to $VLM_JAX_DATA; the checkpoint to openai/clip-vit-base-patch16 from the local HF cache.
Hyperparameter search ranges, epochs and learning rates default to the official per-dataset configs
(`vlm_jax.methods.dualadapter.PRESETS`, `vlm_jax.methods.tip_adapter.PRESETS`) of the canonical dataset name;
datasets without one (builtin, tfds:) use PRESETS['default'].

Protocol choices of the paper protocol (each a config key, the official code's choice by default):
  templates.*                    each method's positive templates: zero-shot CLIP and Tip-Adapter(-F) use
                                 Tip-Adapter's ('tip_adapter', also what its code scores zero-shot CLIP with: one
                                 hand-crafted prompt per dataset, CLIP's 7 for ImageNet), DualAdapter its own.
  dualadapter.train.data         'second_draw' (default): the cache holds the K shots drawn with the sampling seed
                                 (extract_features.py: random.seed(1)) and DualAdapter-F trains on a second K-shot
                                 draw made with draw_seed (main.py: random.seed(3407)), up to 2K distinct images
                                 per class; sweep seed s draws with draw_seed + s - sampling_seed. 'cache': train on
                                 the cache's own shots.
  dualadapter.train.eps_few_shots  AdamW eps per shot count where the yaml says so (food101.yaml: "0.01 for
                                 1/2-shot, 0.001 for others"), applied to each run's own shots, sweeps included.
  tip_adapter.train.selection    'val' (default): the fine-tuning epoch is the best on val. 'test': the official
                                 code's protocol (best *test* epoch, and the reported accuracy is the max of that
                                 epoch's and the searched one), optimistic; the table marks such rows.
  data.cupl_path                 CuPL json of the dataset or DualAdapter's gpt3_prompts/ folder; without it the
                                 DualAdapter rows are not the paper's setting and results.md says so.
"""

import os

import ml_collections

from vlm_jax.runtime import cache

from vlm_jax import config_utils

METHODS = ("zeroshot", "tip_adapter", "tip_adapter_f", "dualadapter", "dualadapter_f")


def _grid(start, stop, steps):
    return ml_collections.ConfigDict(dict(start=float(start), stop=float(stop), steps=int(steps)))


PROTOCOLS = ("paper", "realistic", "both")


def get_config(arg=None):
    arg = config_utils.parse_arg(arg, dataset="eurosat", shots=16, seed=1, sweep=False, runlocal=False,
                                 protocol="both")
    from vlm_jax.data import datasets_meta as meta
    from vlm_jax.methods import dualadapter, tip_adapter  # presets only; importing jax here is harmless

    if arg.protocol not in PROTOCOLS:
        raise ValueError(f"protocol must be one of {', '.join(PROTOCOLS)}, got {arg.protocol!r}")
    # The one place a dataset name is resolved: runlocal always uses the built-in photos.
    name = meta.canonical_name("builtin" if arg.runlocal else arg.dataset)

    c = ml_collections.ConfigDict()
    c.program = "fewshot_clip"
    c.methods = ",".join(METHODS)  # comma-separated: --config.methods=zeroshot,dualadapter
    c.protocol = arg.protocol
    # Realistic protocol: folds over the shots of each class; below min_shots, the presets' initial values.
    c.realistic = dict(folds=4, min_shots=2)
    # Positive templates per method: a set of vlm_jax.data.datasets_meta.TEMPLATE_SETS.
    c.templates = dict(zeroshot="tip_adapter", tip_adapter="tip_adapter", dualadapter="dualadapter")

    c.model = dict(checkpoint="openai/clip-vit-base-patch16", dtype="float32")
    c.data = dict(
        name=name,
        preset=name,                    # the dataset the presets below were taken from (checked by the program)
        root=os.environ.get("VLM_JAX_DATA", ""),
        cupl_path="",                   # CuPL json (class -> descriptions) or gpt3_prompts/ folder; empty: none
        tfds_data_dir="",
        shots=arg.shots,
        seed=arg.seed,
        augment_epoch=10,               # cache keys = mean over this many augmented passes
        eval_batch_size=128,            # feature extraction (the frozen encoders)
        max_eval_examples=0,            # 0: all; >0 caps val/test (quick looks only)
        # Test-only sets evaluated with the adapted model, e.g. with dataset=imagenet:
        # "imagenetv2,imagenet_sketch,imagenet_a,imagenet_r" (domain generalisation).
        extra_test="",
    )
    c.sweep = dict(enabled=arg.sweep, shots=(1, 2, 4, 8, 16), seeds=(1, 2, 3))  # --config.sweep.shots="(1,4)"
    c.feature_cache_dir = os.path.join(cache.cache_root(), "features")  # $VLM_JAX_CACHE/features
    c.mesh = dict(data=-1, fsdp=1, tensor=1)
    # (logical axis, mesh axis or None) pairs that replace those entries of runtime/mesh.DEFAULT_RULES.
    c.mesh_rules = ()
    # Evaluators of the fine-tuned methods (big_vision's config.evals): name -> {type, every_steps}, type
    # 'selection' (the accuracy the epoch is chosen on, today's per-epoch val) or 'test'; run every_steps steps
    # and after the last, written as <fit>/<name>/accuracy. Empty: the per-epoch selection only.
    c.evals = {}
    # wandb: a Weights & Biases project to log to besides metrics.jsonl and TensorBoard ('' = none; needs the
    # [wandb] extra; WANDB_MODE=offline logs without an account).
    c.log = dict(wandb="")
    c.train = dict(resume="check")   # 'force': resume a workdir whose config.json differs (runtime/workdir.py)
    c.rng_seed = 0

    da = dualadapter.PRESETS.get(name, dualadapter.PRESETS["default"])
    c.dualadapter = dict(
        search=dict(beta=_grid(da["search_scale"][0], da["search_scale2"][0], da["search_step"][0]),
                    alpha=_grid(da["search_scale"][1], da["search_scale2"][1], da["search_step"][1]),
                    lam=_grid(da["search_scale"][2], da["search_scale2"][2], da["search_step"][2])),
        init=dict(beta=float(da["init_beta"]), alpha=float(da["init_alpha"]), lam=float(da["init_lambda"])),
        # 'reference': what the official code computes (cosine across classes per feature dimension);
        # 'per_class': the paper's reading. See vlm_jax.methods.dualadapter.consistency_loss.
        consistency="reference",
        train=dict(epochs=int(da["train_epoch"]), batch_size=256,
                   optim=dict(name="adamw", lr=float(da["lr"]), eps=float(da["eps"]), weight_decay=0.1,
                              decay_type="cosine"),
                   # (shots, eps) pairs that replace optim.eps for those shot counts (food101.yaml).
                   eps_few_shots=tuple((int(k), float(v)) for k, v in sorted(da.get("eps_few_shots", {}).items())),
                   data="second_draw",                       # or 'cache' (see the module docstring)
                   draw_seed=int(da["seed"]), sampling_seed=int(da["sampling_seed"]),
                   # big_vision-style (regex, lr multiplier or None): the negative adapter trains at 5x.
                   param_groups=[("adapter/(res_neg|res_neg_keys)", 5.0), ("adapter/.*", 1.0)]),
    )
    c.data.augment_epoch = int(da.get("augment_epoch", 10))

    ta = tip_adapter.PRESETS.get(name, tip_adapter.PRESETS["default"])
    c.tip_adapter = dict(
        # Tip-Adapter's search starts at 0.1: [i * (scale - 0.1) / steps + 0.1 for i in range(steps)].
        search=dict(beta=_grid(0.1, ta["search_scale"][0], ta["search_step"][0]),
                    alpha=_grid(0.1, ta["search_scale"][1], ta["search_step"][1])),
        init=dict(beta=float(ta["init_beta"]), alpha=float(ta["init_alpha"])),
        train=dict(epochs=int(ta.get("train_epoch", 20)), batch_size=256,
                   optim=dict(name="adamw", lr=float(ta["lr"]), eps=float(ta["eps"]), weight_decay=float(ta["weight_decay"]),
                              decay_type="cosine"),
                   selection="val",                          # or 'test': the official, optimistic protocol
                   param_groups=[("adapter/.*", 1.0)]),
    )

    # The linear probe from the zero-shot prototypes (ZS-LP) and CLAP, its class-adaptive constrained variant
    # (arXiv 2312.12730; vlm_jax/methods/fewshot/linear_probe.py), with the official code's settings: trained on
    # `views` augmented views of the K shots only, nothing chosen on val. Not in the default methods:
    # --config.methods=zeroshot,linear_probe,clap,... runs them.
    probe = dict(views=20, epochs=300, batch_size=256, lr=0.1, momentum=0.9, warmup_epochs=1, warmup_lr=1e-5,
                 prototype_norm=1.0)   # the zero-shot prototypes' norm (see the module: lr / n^2, n^2 lambda)
    c.linear_probe = dict(probe)
    c.clap = dict(probe)

    if arg.runlocal:
        c.model.checkpoint = "builtin:tiny-clip"
        c.data.shots = min(arg.shots, 4)
        c.data.augment_epoch = 2
        c.data.eval_batch_size = 32
        c.sweep.shots, c.sweep.seeds = (1, 2, 4), (1, 2)
        c.realistic.folds = 2
        # A random text tower: its logits (100 x cosine) swamp a cache weighted by the presets' alpha < 3, so the
        # toy widens Tip-Adapter's ranges (eurosat's, which runlocal took before names were resolved).
        c.tip_adapter.search.beta.stop, c.tip_adapter.search.alpha.stop = 12.0, 10.0
        for m in ("dualadapter", "tip_adapter"):
            c[m].train.epochs = 3
            # One batch of all 40 shots (20 in a realistic fold): one shape, one compile per fit, and the same
            # batches on 1 and on 8 devices.
            c[m].train.batch_size = 40
        c.dualadapter.search.beta.steps, c.dualadapter.search.alpha.steps, c.dualadapter.search.lam.steps = 20, 10, 5
        c.tip_adapter.search.beta.steps, c.tip_adapter.search.alpha.steps = 20, 10
    return c
