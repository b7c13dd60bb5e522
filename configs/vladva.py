"""Discriminative fine-tuning of an LVLM ("VladVA", arXiv 2412.04378): soft prompts + LoRA, InfoNCE + NTP.

Usage:
  python launch/main.py --config=configs/vladva.py:runlocal --workdir=/tmp/vladva   # offline, CPU
  python launch/main.py --config=configs/vladva.py \
      --config.model.checkpoint=/ckpt/llava-1.5-7b-hf --config.data.manifest=/data/pairs.jsonl \
      --config.data.retrieval_json=/data/dataset_flickr30k.json --config.data.image_root=/data/flickr30k-images \
      --workdir=/runs/vladva

TFDS caption datasets prepared as array_record (`tfds build coco_captions --file_format=array_record`; read
without TensorFlow): --config.data.name=tfds:coco_captions trains on the 'train' split (first caption of each
image, 'captions/text'), --config.data.retrieval_json=tfds:coco_captions evaluates retrieval on split
data.retrieval_split with every caption; --config.data.tfds_data_dir sets the TFDS data dir ('' = TFDS's default).

The paper publishes neither its prompts, temperature nor loss weight: the defaults are E5-V's prompts, a fixed
temperature of 0.05 and NTP weight 1; LoRA rank 16 / alpha 16 on the LM's linear layers (as the paper).
"""

import ml_collections

from vlm_jax import config_utils


def get_config(arg=None):
    arg = config_utils.parse_arg(arg, runlocal=False)
    from vlm_jax.methods import vladva as disc

    c = ml_collections.ConfigDict()
    c.program = "vladva"
    c.rng_seed = 0
    # dtype: compute dtype ('bfloat16' on GPU/TPU); param_dtype: storage of the frozen base ('' = dtype). The
    # trainable LoRA / prompts are float32 master weights whatever these say.
    # chat_template: '' = the checkpoint's own (what its HF processor renders); or a Jinja template, or a format
    # with one '{}' for the user turn ('USER: {} ASSISTANT:'), for a checkpoint that has none.
    # image_size: 0 = the family's static image size (LLaVA: its tower's; InternVL: one 448 px tile; Qwen2-VL: 448);
    # Qwen2-VL takes another multiple of 28 (every image resized to it: one compiled shape per run).
    c.model = dict(checkpoint="llava-hf/llava-1.5-7b-hf", dtype="float32", param_dtype="", chat_template="",
                   image_size=0)
    # train_limit: train on the first N pairs of a fixed permutation (0 = all).
    c.data = dict(name="manifest", manifest="", image_root="", train_limit=0,
                  # Evaluation (any subset): Karpathy-split retrieval JSON, SugarCrepe folder, Winoground JSONL,
                  # a few-shot-layout classification dataset (zero-shot through the same embeddings).
                  retrieval_json="", retrieval_split="test", sugarcrepe="", sugarcrepe_images="",
                  winoground="", winoground_images="", classification="", classification_root="",
                  # text_len: padded length of a caption's row; long_len: of an image + long-caption row (0: the
                  # image prompt, e.g. LLaVA-1.5's 576 image tokens, + the longest long caption, capped at
                  # long_caption_max_tokens: the paper's long captions are 30-500 tokens). Checked against the
                  # checkpoint before any work.
                  tfds_data_dir="", text_len=64, long_len=0, long_caption_max_tokens=500, eval_batch_size=32)
    # CLIP baseline on the same evaluation suite ('' to skip), e.g. openai/clip-vit-large-patch14-336.
    c.clip_checkpoint = ""
    c.method = dict(
        # image_prompt: the text after the image (the template places the image); text_prompt: '<sent>' = caption.
        image_prompt=disc.IMAGE_PROMPT, text_prompt=disc.TEXT_PROMPT,
        short_max_tokens=disc.SHORT_CAPTION_MAX_TOKENS,
        temperature=disc.DEFAULT_TEMPERATURE, learn_temperature=False, ntp_weight=1.0,
        lora_rank=16, lora_alpha=16.0,
        # (regex or (regex, input axes)) over '/'-joined param paths: the LM's linear layers.
        lora_targets=list(disc.LORA_TARGETS),
    )
    # grad_cache_chunks = k > 1: the LVLM passes run over k chunks of the batch with rematerialisation (GradCache);
    # the loss and gradients stay the full batch's (all batch_size - 1 negatives) at the activation memory of
    # batch_size / k samples. (Not gradient accumulation, which would shrink the contrastive batch.)
    c.train = dict(epochs=1, batch_size=1024, grad_cache_chunks=1,
                   optim=dict(name="adamw", lr=1e-4, weight_decay=0.0, decay_type="cosine"),
                   param_groups=[("lora/.*", 1.0), ("(image|text)_prompt", 1.0), ("log_temperature", 1.0)],
                   checkpoint_every_steps=200,   # plus every epoch end and on SIGTERM
                   resume="check")   # 'force': resume a workdir whose config.json differs (see train/workdir.py)
    c.mesh = dict(data=-1, fsdp=1, tensor=1)
    # (logical axis, mesh axis or None) pairs that replace those entries of runtime/mesh.DEFAULT_RULES, e.g.
    # (("mlp", None),) to keep the MLPs whole on a tensor-parallel mesh.
    c.mesh_rules = ()
    # Evaluators during training (big_vision's config.evals): name -> {type, every_steps}; type 'suite' (the
    # zero-shot suite of the results table, on the model being trained), run every_steps steps and after the
    # last, written as vladva/<name>/<metric>. Empty: the suite runs once, after training (the table).
    c.evals = {}
    # wandb: a Weights & Biases project to log to besides metrics.jsonl and TensorBoard ('' = none; needs the
    # [wandb] extra; WANDB_MODE=offline logs without an account).
    c.log = dict(wandb="")

    if arg.runlocal:
        c.model.checkpoint = "replica:llava-1.5"  # llava-1.5-7b-hf's structure (576 image tokens), tiny widths
        c.clip_checkpoint = "builtin:tiny-clip"
        c.data.name = "builtin"
        c.data.eval_batch_size, c.data.train_limit = 16, 64
        c.method.lora_rank, c.method.lora_alpha = 4, 4.0
        c.train.epochs, c.train.batch_size = 2, 16
        c.train.optim.lr = 3e-3
    return c
