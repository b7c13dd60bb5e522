"""VITask (arXiv 2410.06456): task-specific fine-tuning of an LVLM with a task-specific model (TSM).

Usage:
  python launch/main.py --config=configs/vitask.py:runlocal --workdir=/tmp/vitask   # offline, CPU, toy models
  python launch/main.py --config=configs/vitask.py --config.data.name=dermamnist --config.data.root=/data/medmnist \
      --config.model.checkpoint=/ckpt/llava-1.5-7b-hf --config.tsm.checkpoint=/ckpt/vit-base-patch16-224-in21k \
      --workdir=/runs/vitask
  # joint training (one TSM head, masked softmax per dataset; mixed LVLM batches; metrics per dataset):
  ... --config.data.name=dermamnist,bloodmnist,chestmnist,folder:/data/my_xrays --config.method.eval_mode=generate

The paper publishes neither alpha, beta, the LoRA rank, lr nor the batch size: the defaults here are alpha = beta
= 1, LoRA rank 16 / alpha 16 on the LM's linear layers (as VladVA), lr 1e-4 for both stages
(method.stage2_lr_scale = 1), one epoch per stage (as the paper); the vanilla baseline trains as many steps as both
stages together (method.vanilla_epochs), the TSM's epoch is chosen on the val split (tsm.selection).
"""

import ml_collections

from vlm_jax import config_utils


def get_config(arg=None):
    arg = config_utils.parse_arg(arg, runlocal=False)
    from vlm_jax.methods import vladva as disc

    c = ml_collections.ConfigDict()
    c.program = "vitask"
    c.rng_seed = 0
    # dtype: compute dtype ('bfloat16' on GPU/TPU); param_dtype: storage of the frozen LLaVA ('' = dtype). LoRA,
    # the connector and the TSM train as float32 master weights whatever these say.
    # chat_template: '' = the checkpoint's own (what its HF processor renders), or a Jinja template / a format with
    # one '{}' for the user turn ('USER: {} ASSISTANT:') for a checkpoint without one.
    # image_size: 0 = the family's static image size (LLaVA: its tower's; InternVL: one 448 px tile; Qwen2-VL: 448);
    # Qwen2-VL takes another multiple of 28 (every image resized to it: one compiled shape per run).
    c.model = dict(checkpoint="llava-hf/llava-1.5-7b-hf", dtype="float32", param_dtype="", chat_template="",
                   image_size=0)
    # name: one dataset or a comma-separated list trained jointly (`data.vitask_tasks`): a MedMNIST 2D name
    # (official npz in `root`; chestmnist is multi-label), 'folder:<path>' (<path>/{train,val,test}/<class>/*.png,
    # val optional; class = folder name, '_' -> ' '), 'builtin' (the 10 toy photos) or 'builtin_a' / 'builtin_b'
    # (their first / last five classes: two disjoint datasets for offline joint training);
    # size: MedMNIST image size (0 = the 28 px default file); train_limit: per dataset, train on the first N of a
    # fixed permutation of its train split (0 = all); test_limit: per dataset, evaluate on the first N of
    # a fixed permutation of its test split (0 = all); val_limit: the same for the val split the TSM's epoch is
    # selected on (MedMNIST's official val, a folder's val/, builtin's val crops);
    # modality: the word in image-folder datasets' instruction ('Analyze the given {modality} image. ...');
    # no_finding: a multi-label sample's answer when it has no positive label ('normal' -> 'normal.');
    # full_instruction=False: the paper's incomplete-instruction variant (no label set in the instruction);
    c.data = dict(name="dermamnist", root="", size=0, test_limit=0, train_limit=0, val_limit=0, eval_batch_size=8,
                  full_instruction=True, modality="medical",
                  no_finding="normal")
    # TSM: a vision tower + linear head, fully fine-tuned (METHODS.md: ViT-Base pre-trained on ImageNet-21K, 30
    # epochs). checkpoint: an HF ViT (the paper's google/vit-base-patch16-224-in21k, the default) or a CLIP
    # checkpoint, whose vision tower is used (e.g. openai/clip-vit-base-patch16); each with its own preprocessing.
    # accum_steps: gradient accumulation (the batch in accum_steps microbatches); checkpoint_every_steps: besides
    # every epoch end and SIGTERM (0: no more); selection: 'val' keeps the epoch of the best mean (over datasets)
    # val accuracy, evaluated after every epoch (the paper: "select the best model based on validation set
    # performance"; every dataset needs a val split), 'last' keeps the last epoch.
    c.tsm = dict(checkpoint="google/vit-base-patch16-224-in21k", epochs=30, batch_size=128,
                 optim=dict(name="adamw", lr=1e-5, weight_decay=0.05, decay_type="cosine"),
                 accum_steps=1, checkpoint_every_steps=0, selection="val")
    c.method = dict(
        alpha=1.0, beta=1.0, rda_direction="student_teacher",
        stage1_epochs=1, stage2_epochs=1,
        # Stage 2's lr = train.optim.lr x this. Stage 2 restarts the optimizer on stage 1's LoRA, and Adam's first
        # steps move every weight by ~lr whatever its gradient: a lower lr keeps them from undoing stage 1.
        stage2_lr_scale=1.0,
        # The vanilla baseline's epochs: 0 = stage1_epochs + stage2_epochs, i.e. as many steps as VITask's two
        # stages together (same batch size, so the same steps per epoch): a fair compute budget.
        vanilla_epochs=0,
        connector_hidden=0,                      # 0: the LM's width
        lora_rank=16, lora_alpha=16.0, lora_targets=list(disc.LORA_TARGETS),
        # 'generate': greedy answers matched to the label set (unmatched = wrong), as the paper evaluates;
        # 'likelihood': the faster ranking of every label's response (single-label datasets only: a UserError with
        # a multi-label one); 'both': two sets of rows (a multi-label dataset's likelihood cells stay empty).
        eval_mode="both",
    )
    c.train = dict(batch_size=32, optim=dict(name="adamw", lr=1e-4, weight_decay=0.0, decay_type="cosine"),
                   accum_steps=1, checkpoint_every_steps=200,
                   resume="check")   # 'force': resume a workdir whose config.json differs (see train/workdir.py)
    c.mesh = dict(data=-1, fsdp=1, tensor=1)
    # (logical axis, mesh axis or None) pairs that replace those entries of runtime/mesh.DEFAULT_RULES, e.g.
    # (("mlp", None),) to keep the MLPs whole on a tensor-parallel mesh.
    c.mesh_rules = ()
    # Evaluators during the LVLM fits (big_vision's config.evals): name -> {type, every_steps[, split]}; type
    # 'ranking' (the label-likelihood accuracy / macro-F1 the results table ranks, on split 'val' (default) or
    # 'test'; vanilla without the exemplar, VITask's stages with it), run every_steps steps and after the last,
    # written as <fit>/<name>/<dataset or mean>/<metric>. Empty: the table's evaluation after training only.
    c.evals = {}
    # wandb: a Weights & Biases project to log to besides metrics.jsonl and TensorBoard ('' = none; needs the
    # [wandb] extra; WANDB_MODE=offline logs without an account).
    c.log = dict(wandb="")

    if arg.runlocal:
        # llava-1.5-7b-hf's structure (576 image tokens) at tiny widths, random weights with selective attention
        # (q/k kernels std 0.5, `testing.replicas`): at the replicas' default 0.05 every position averages the
        # image tokens almost uniformly, and the toy never learnt to name a label (100% unmatched answers).
        c.model.checkpoint = "replica:llava-1.5?qk_std=0.5"
        c.tsm.checkpoint = "builtin:tiny-clip"
        c.data.name = "builtin_a,builtin_b"  # joint training offline: two disjoint 5-class halves of the photos
        c.data.train_limit, c.data.test_limit, c.data.eval_batch_size = 24, 10, 10  # per dataset
        c.data.val_limit = 10
        c.tsm.epochs, c.tsm.batch_size = 3, 16
        c.tsm.optim.lr = 1e-3
        # LoRA on the LM head only, full rank, at a high lr: a random LM has nothing in its layers worth adapting,
        # and the head reads the image features out as label words in a few dozen steps, cheaply (no backward pass
        # through the layers, except stage 1's into the exemplar connector). Batch 8: 6 steps per epoch; vanilla
        # 30 steps, VITask 24 + 6, stage 2 at lr / 10 (`method.stage2_lr_scale`).
        c.method.lora_targets = [r"language_model/lm_head/kernel"]
        c.method.lora_rank, c.method.lora_alpha = 32, 32.0
        c.method.stage1_epochs, c.method.stage2_epochs, c.method.stage2_lr_scale = 4, 1, 0.1
        c.train.batch_size = 8
        c.train.optim.lr = 0.1
    return c
