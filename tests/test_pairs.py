"""Token batches for the discriminative method, and its `:runlocal` run end to end."""

import dataclasses
import json
import os
import subprocess
import sys

import ml_collections
import numpy as np
import pytest
from launch_inprocess import assert_one_line_error, launch_main

from vlm_jax.data import chat, pairs, tokenize
from vlm_jax.errors import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IMAGE_PROMPT = "Summary above image in one word:"
TEXT_PROMPT = "<sent>\nSummary above sentence in one word:"


@pytest.fixture(scope="module")
def tokens(tmp_path_factory):
    """Batch layout on a small byte-level tokenizer with a plain '{}' template (the replicas' real tokenizers and
    chat templates are checked against HF in test_replicas.py)."""
    texts = ["USER: hello ASSISTANT:", IMAGE_PROMPT, TEXT_PROMPT, "a photo of a cat.", "a dog on the grass " * 8]
    tok = tokenize.build_offline_tokenizer(texts, tmp_path_factory.mktemp("tok"))
    fmt = chat.ChatFormat(tok, "USER: {} ASSISTANT:", 4, tok.convert_tokens_to_ids("<image>"))
    spec = pairs.PromptSpec(image_prompt=IMAGE_PROMPT, text_prompt=TEXT_PROMPT, short_max_tokens=12, text_len=24,
                            long_len=48)
    return pairs.Tokens(fmt, spec)


def test_prompt_spans_hold_the_handcrafted_prompt(tokens):
    images = np.zeros((2, 8, 8, 3), np.float32)
    batch = pairs.train_batch(tokens, images, ["a photo of a cat.", None], [None, "a dog on the grass " * 8])
    p_img, p_txt = pairs.soft_prompt_lengths(tokens)
    for row in range(2):
        s = batch["image_prompt_start"][row]
        assert list(batch["image_ids"][row, s:s + p_img]) == tokens.image_prompt
        s = batch["text_prompt_start"][row]
        assert list(batch["text_ids"][row, s:s + p_txt]) == tokens.text_prompt
        s = batch["long_prompt_start"][row]
        assert list(batch["long_ids"][row, s:s + p_img]) == tokens.image_prompt
    assert (batch["image_ids"] == tokens.fmt.image_token_id).sum(axis=1).tolist() == [4, 4]
    assert batch["text_ids"].shape == (2, 24) and batch["long_ids"].shape == (2, 48)
    assert batch["has_short"].tolist() == [True, False] and batch["has_long"].tolist() == [False, True]
    # The NTP targets are the long caption's tokens only (and EOS), never the prompt.
    n_prompt = len(tokens.image_row()[0])
    assert batch["long_loss_mask"][1, :n_prompt].sum() == 0 and batch["long_loss_mask"][1].sum() > 0
    assert (batch["long_loss_mask"] <= batch["long_mask"]).all()


def test_split_captions_by_length(tokens):
    assert pairs.split_captions(tokens, ["a photo of a cat.", "a dog on the grass " * 8]) == (
        "a photo of a cat.", "a dog on the grass " * 8)
    assert pairs.split_captions(tokens, [None, "a dog."]) == ("a dog.", None)


def test_bad_specs(tokens):
    with pytest.raises(UserError, match="the chat template places the image"):
        pairs.PromptSpec(image_prompt="<image>\nSummary:", text_prompt=TEXT_PROMPT)
    with pytest.raises(UserError, match="must start with '<sent>'"):
        pairs.PromptSpec(image_prompt=IMAGE_PROMPT, text_prompt="Summary: <sent>")
    with pytest.raises(UserError, match="no room for a caption"):
        pairs.Tokens(tokens.fmt, pairs.PromptSpec(image_prompt=IMAGE_PROMPT, text_prompt=TEXT_PROMPT,
                                                  text_len=8)).text_row("a photo of a cat.")


def test_runlocal_trains_and_evaluates(tmp_path, optimized_env):
    env = dict(optimized_env, VLM_JAX_CACHE=str(tmp_path / "cache"))
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "launch", "main.py"),
                           "--config=configs/vladva.py:runlocal", f"--workdir={tmp_path / 'run'}"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = json.load(open(tmp_path / "run" / "results.json"))
    history = out["history"]
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    assert list(out["results"]) == ["CLIP", "LVLM + handcrafted prompts (E5-V style)", "VladVA (soft prompts + LoRA)"]
    for row in out["results"].values():
        assert 0.0 <= row["t2i_R@1"] <= 100.0 and row["i2t_R@10"] == 100.0  # 10 images: R@10 is always 100
        assert {"sugarcrepe/replace_obj", "winoground/group", "classification/accuracy"} <= set(row)
    md = (tmp_path / "run" / "results.md").read_text()
    assert "VladVA" in md and all(f"{d} R@{k}" in md for d in ("T2I", "I2T") for k in (1, 5, 10))
    _exports_load_in_hf(tmp_path, env)
    _predict_gives_the_evaluated_retrieval(tmp_path, env, out["results"]["VladVA (soft prompts + LoRA)"])


def _predict_gives_the_evaluated_retrieval(tmp_path, env, row):
    """`vlm-jax predict` on the retrieval images with their captions as --texts: R@1 and R@5 both ways, computed from
    the similarity table here (the ground truth of caption i is image i; a tie counts against the query, as in
    eval/retrieval.py), are results.json's for the VladVA row; embeddings.npy has one row per image."""
    from PIL import Image

    from vlm_jax.data import builtin
    from vlm_jax.eval import suite

    images, captions, caption_to_image = suite.toy_suite(builtin.builtin_dataset()).retrieval
    assert list(caption_to_image) == list(range(len(images)))
    os.makedirs(tmp_path / "images")
    for i, ex in enumerate(images):
        Image.fromarray(ex.array).save(tmp_path / "images" / f"{i:03d}.png")   # lossless: the evaluated pixels
    proc = subprocess.run([sys.executable, "-m", "vlm_jax.cli", "predict", f"--workdir={tmp_path / 'run'}",
                           f"--folder={tmp_path / 'images'}", f"--texts={','.join(captions)}",
                           f"--out={tmp_path / 'predictions.json'}"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.load(open(tmp_path / "predictions.json"))
    sim = np.array([[im["similarity"][c] for c in captions] for im in got["images"]])   # f32[images, texts]
    own = np.diag(sim)
    i2t_rank = np.sum(sim >= own[:, None], axis=1) - 1   # the other captions scoring >= the image's own
    t2i_rank = np.sum(sim >= own[None, :], axis=0) - 1
    # R@5 as well: on this toy R@1 is 10 for every row, R@5 tells the trained model from the untrained one.
    got_recalls = [100.0 * np.mean(rank < k) for rank in (i2t_rank, t2i_rank) for k in (1, 5)]
    want = [row[f"{d}_R@{k}"] for d in ("i2t", "t2i") for k in (1, 5)]
    np.testing.assert_allclose(got_recalls, want, atol=1e-6)
    emb = np.load(tmp_path / got["embeddings_file"])
    assert emb.shape[0] == len(images) and np.allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)


def _exports_load_in_hf(tmp_path, env):
    """`vlm-jax export` of the trained workdir: the PEFT adapter, applied to the HF base by the peft library, gives
    the logits of the merged checkpoint transformers loads alone; the trained soft prompts come out as arrays."""
    import torch
    import transformers
    from peft import PeftModel
    from safetensors.numpy import load_file

    for fmt in ("peft", "merged"):
        proc = subprocess.run([sys.executable, "-m", "vlm_jax.cli", "export", f"--workdir={tmp_path / 'run'}",
                               f"--out={tmp_path / fmt}", f"--format={fmt}"], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
    base_dir = json.load(open(tmp_path / "peft" / "adapter_config.json"))["base_model_name_or_path"]
    ids = torch.tensor([[1, 5, 9, 22, 7, 3]])
    with torch.no_grad():
        base = transformers.LlavaForConditionalGeneration.from_pretrained(base_dir).eval()
        plain = base(input_ids=ids).logits
        adapted = PeftModel.from_pretrained(base, str(tmp_path / "peft")).eval()(input_ids=ids).logits
        merged = transformers.LlavaForConditionalGeneration.from_pretrained(tmp_path / "merged").eval()(
            input_ids=ids).logits
    torch.testing.assert_close(adapted, merged, rtol=1e-4, atol=1e-4)
    assert (adapted - plain).abs().max() > 1e-3          # the trained LoRA moved the logits
    arrays = load_file(str(tmp_path / "peft" / "arrays.safetensors"))
    assert {k.split("/")[0] for k in arrays} >= {"image_prompt", "text_prompt"}


def test_long_captions_capped_at_long_caption_max_tokens(tokens):
    """data.long_caption_max_tokens (the paper: long captions of 30-500 tokens) bounds the long row; a longer
    caption is cut to it, a shorter one sets the length itself."""
    from vlm_jax.programs import vladva as vladva_program

    long, short = "a dog on the grass " * 8, "a photo of a cat."
    n_image = len(tokens.image_row()[0])
    full = len(tokens.fmt.answer_ids(IMAGE_PROMPT, True, long))
    dc = lambda cap: ml_collections.ConfigDict(dict(long_caption_max_tokens=cap, long_len=0))
    assert full > 10
    assert vladva_program.check_lengths(tokens, dc(10), [long, short]) == n_image + 10
    assert vladva_program.check_lengths(tokens, dc(500), [long, short]) == n_image + full
    capped = pairs.Tokens(tokens.fmt, dataclasses.replace(tokens.spec, long_len=n_image + 10))
    ids, mask = capped.long_row(long)
    assert len(ids) == n_image + 10 and sum(mask) == 10
    assert ids[n_image:] == tokens.fmt.answer_ids(IMAGE_PROMPT, True, long)[:10]


@pytest.fixture(scope="module")
def shared_cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("cache"))


@pytest.mark.parametrize("overrides, message", [
    (["--config.data.long_len=100"], "data.long_len=100 cannot hold the 590 tokens of the image prompt (576 image "
                                     "tokens) and a caption: use data.long_len="),
    (["--config.train.epochs=0"], "--config.train.epochs=0 is out of range"),
    (["--config.model.chat_template=USER: ASSISTANT:"], "neither a Jinja template nor a format with one '{}'"),
])
def test_bad_values_are_one_line_before_any_work(tmp_path, shared_cache, capsys, monkeypatch, overrides, message):
    # One cache for the three cases: the replica (same texts, so the same folder) is written once, not per case.
    # In this process (tests/launch_inprocess.py): a child per case spent ~8 s importing before the refusal.
    code, lines = launch_main(["--config=configs/vladva.py:runlocal", f"--workdir={tmp_path / 'run'}", *overrides],
                              capsys, monkeypatch, env={"VLM_JAX_CACHE": shared_cache})
    assert_one_line_error(code, lines, message)
    assert not (tmp_path / "run").exists()
