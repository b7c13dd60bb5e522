"""The offline replicas of the real LVLM checkpoints, and every prompt the programs build, against HF itself.

Each replica must load and run in transformers (`AutoProcessor` + `LlavaForConditionalGeneration`) with the
Flax port's logits equal to HF's; the ids the programs feed the model (VladVA's image / text / long-caption rows,
VITask's instruction + answer rows and label continuations) must equal what the checkpoint's own processor
produces for the whole prompt, and the pixels what its image processor produces.
"""

import json

import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from vlm_jax.convert import llava as llava_convert
from vlm_jax.convert import loader
from vlm_jax.data import chat, pairs, preprocess, tokenize, vitask_tasks
from vlm_jax.methods import vladva as disc
from vlm_jax.testing import replicas

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

CAPTIONS = ["a photo of a cat.", "A man riding a bike down a street with cars", "two dogs, one ball!", "x",
            "The possible diagnoses are: normal. Summary above sentence"]
LONG = "A man riding a bike down a street with cars and people, next to a cat sitting on the grass. " * 3
INSTRUCTIONS = ["Analyze the given medical image. The possible diagnoses are: normal, benign, malignant.",
                "What is shown in this image?"]
RESPONSES = ["normal.", "benign.", "malignant.", "a cat."]
EXPECTED = {"llava-1.5": dict(tokens=576, tokenizer="LlamaTokenizer", image_processor="CLIPImageProcessor"),
            "llava-interleave-qwen": dict(tokens=729, tokenizer="Qwen2Tokenizer",
                                          image_processor="SiglipImageProcessor")}


@pytest.fixture(scope="module", params=list(EXPECTED))  # the LLaVA replicas (qwen2-vl: test_qwen2_vl.py)
def replica(request, tmp_path_factory):
    path = replicas.write_replica(request.param, tmp_path_factory.mktemp("replica") / request.param,
                                  CAPTIONS + [LONG] + INSTRUCTIONS + RESPONSES)
    proc = transformers.AutoProcessor.from_pretrained(path)
    cfg = llava_convert.llava_config(loader.read_config(path), str(path))
    tok = tokenize.load_tokenizer(path)
    fmt = chat.ChatFormat(tok, chat.load_chat_template(path, "", tok), cfg.tokens_per_image, cfg.image_token_id,
                          chat.image_token(path))
    return request.param, path, proc, cfg, fmt


def _image(seed=0, h=300, w=420):
    return Image.fromarray(np.random.RandomState(seed).randint(0, 256, (h, w, 3), dtype=np.uint8))


def _hf_ids(proc, conv, image=None, generation=True):
    text = proc.apply_chat_template(conv, add_generation_prompt=generation)
    out = proc(text=text, images=image, return_tensors="np") if image is not None else proc(text=text,
                                                                                           return_tensors="np")
    return out["input_ids"][0].tolist(), out


def _user(text, image):
    return [{"role": "user", "content": ([{"type": "image"}] if image else []) + [{"type": "text", "text": text}]}]


def test_replica_structure_and_hf_parity(replica):
    name, path, proc, cfg, _ = replica
    want = EXPECTED[name]
    files = {p.name for p in path.iterdir()}
    assert {"config.json", "model.safetensors", "preprocessor_config.json", "processor_config.json",
            "chat_template.json", "tokenizer.json", "tokenizer_config.json"} <= files  # the hub repos' layout
    assert json.loads((path / "tokenizer_config.json").read_text())["tokenizer_class"] == want["tokenizer"]
    assert json.loads((path / "preprocessor_config.json").read_text())["image_processor_type"] == \
        want["image_processor"]
    assert cfg.tokens_per_image == want["tokens"]
    hf = transformers.LlavaForConditionalGeneration.from_pretrained(path).eval()
    image = _image()
    ids, inputs = _hf_ids(proc, _user("What is shown in this image?", True), image)
    assert ids.count(cfg.image_token_id) == want["tokens"]
    pixels = preprocess.preprocess_image(image, preprocess.image_settings(path))[None]
    np.testing.assert_array_equal(pixels, inputs["pixel_values"].transpose(0, 2, 3, 1))  # bit-equal
    with torch.no_grad():
        ref = hf(input_ids=torch.tensor(inputs["input_ids"]), pixel_values=torch.tensor(inputs["pixel_values"]),
                 attention_mask=torch.tensor(inputs["attention_mask"])).logits.numpy()
    model, params = llava_convert.from_pretrained(path)
    out = model.apply({"params": params}, jnp.asarray(inputs["input_ids"], jnp.int32), None, jnp.asarray(pixels))
    np.testing.assert_allclose(np.asarray(out), ref, atol=1e-4, rtol=0)


def test_vladva_rows_are_the_processors(replica):
    name, _, proc, _, fmt = replica
    tokens = pairs.Tokens(fmt, pairs.PromptSpec(image_prompt=disc.IMAGE_PROMPT, text_prompt=disc.TEXT_PROMPT,
                                                text_len=128, long_len=2000))
    ids, start = tokens.image_row()
    assert ids == _hf_ids(proc, _user(disc.IMAGE_PROMPT, True), _image())[0]
    p_img, p_txt = pairs.soft_prompt_lengths(tokens)
    assert "Summary above image in one word:" in fmt.tok.decode(ids[start:start + p_img])
    for caption in CAPTIONS:
        row, start = tokens.text_row(caption)
        ref = _hf_ids(proc, _user(disc.TEXT_PROMPT.replace("<sent>", caption), False))[0]
        assert row == ref, (name, caption)  # every id, the soft prompt's span included, is the processor's
        assert start + p_txt <= len(row) and "above sentence" in fmt.tok.decode(row[start:start + p_txt])
    long_ids, loss_mask = tokens.long_row(LONG)
    conv = _user(disc.IMAGE_PROMPT, True) + [{"role": "assistant", "content": [{"type": "text", "text": LONG}]}]
    ref = _hf_ids(proc, conv, _image(), generation=False)[0]
    # The caption after the template's own answer separator; EOS where the template ends the turn its own way.
    n = len(long_ids) - 1
    assert long_ids[:n] == ref[:n] and long_ids[-1] == fmt.eos_id
    assert sum(loss_mask) == len(long_ids) - len(ids) and not any(loss_mask[:len(ids)])


def test_vladva_text_rows_truncate_at_a_token(replica):
    _, _, proc, _, fmt = replica
    tokens = pairs.Tokens(fmt, pairs.PromptSpec(image_prompt=disc.IMAGE_PROMPT, text_prompt=disc.TEXT_PROMPT,
                                                text_len=40, long_len=2000))
    row, start = tokens.text_row(LONG)
    assert len(row) <= 40
    # The kept part is a whole-prompt tokenization of a shorter caption, so still the processor's ids.
    cut = fmt.tok.decode(row[:start], skip_special_tokens=False)
    assert "A man riding" in cut
    p_txt = pairs.soft_prompt_lengths(tokens)[1]
    assert row[start:start + p_txt] == tokens.text_prompt


def test_vitask_rows_are_the_processors(replica):
    _, _, proc, _, fmt = replica
    seqs = vitask_tasks.Seqs(fmt, INSTRUCTIONS, RESPONSES)
    batch = seqs.rows(np.array([0, 1, 0]), ["benign.", "a cat.", "malignant."])
    for i, (d, r) in enumerate([(0, "benign."), (1, "a cat."), (0, "malignant.")]):
        n = int(batch["attention_mask"][i].sum())
        row = batch["input_ids"][i, :n].tolist()
        prompt = _hf_ids(proc, _user(INSTRUCTIONS[d], True), _image())[0]
        assert row[:len(prompt)] == prompt
        conv = _user(INSTRUCTIONS[d], True) + [{"role": "assistant", "content": [{"type": "text", "text": r}]}]
        full = _hf_ids(proc, conv, _image(), generation=False)[0]
        assert row[:n - 1] == full[:n - 1] and row[-1] == fmt.eos_id
        answer = batch["input_ids"][i][batch["answer_mask"][i] > 0].tolist()
        assert fmt.tok.decode(answer, skip_special_tokens=True).strip() == r
    ids, mask = seqs.answer_table([RESPONSES[:3], RESPONSES[3:]])
    assert ids[0, 1][mask[0, 1] > 0].tolist() == seqs.answer(0, "benign.")


def test_piecewise_tokenization_would_differ():
    """Why prompts are tokenized whole: with llava-1.5's Llama tokenizer, a piece tokenized alone gets a '▁'
    prefix that the whole prompt does not have (the bug this module's tests guard against)."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        path = replicas.write_replica("llava-1.5", f"{tmp}/r", [disc.TEXT_PROMPT])
        tok = tokenize.load_tokenizer(path)
    whole = tok("USER: a cat.\nSummary above sentence in one word: ASSISTANT:").input_ids
    piece = tok("\nSummary above sentence in one word:", add_special_tokens=False).input_ids
    assert not any(whole[i:i + len(piece)] == piece for i in range(len(whole)))


def test_chat_template_errors(tmp_path):
    with pytest.raises(ValueError, match="no chat template.*chat_template='USER: {} ASSISTANT:'"):
        chat.load_chat_template(tmp_path)
    with pytest.raises(ValueError, match="one '{}'"):
        chat.load_chat_template(tmp_path, "USER: ASSISTANT:")
    assert chat.load_chat_template(tmp_path, "USER: {} ASSISTANT:") == "USER: {} ASSISTANT:"


def test_qk_std_replica_spec(tmp_path):
    """'replica:llava-1.5?qk_std=0.5' (VITask's :runlocal toy): the plain replica's random draws with the LM's
    q_proj / k_proj kernels, and nothing else, scaled to std 0.5; its own cache folder, the plain spec's unchanged."""
    import hashlib
    import re

    from flax import traverse_util

    from vlm_jax.errors import UserError

    texts = ["Analyze the given photo image. The possible diagnoses are: cat, coin.", "cat.", "coin."]
    path = replicas.resolve_offline("replica:llava-1.5?qk_std=0.5", str(tmp_path), texts)
    model, params = llava_convert.from_pretrained(path)
    plain = traverse_util.flatten_dict(replicas.random_params(model, 0), sep="/")
    got = traverse_util.flatten_dict(params, sep="/")
    qk = [k for k in plain if re.fullmatch(replicas.QK_KERNELS, k)]
    assert len(qk) == 2 * replicas.REPLICAS["llava-1.5"].text["num_hidden_layers"]
    for k, want in plain.items():
        scale = 0.5 / replicas.INIT_STD if k in qk else 1.0
        np.testing.assert_allclose(np.asarray(got[k]), np.asarray(want) * scale, rtol=1e-6, atol=1e-7, err_msg=k)
    assert 0.45 < float(np.std(got[qk[0]])) < 0.55
    # The plain spec keeps the cache key it always had (existing replica folders stay valid); options get theirs.
    old_key = hashlib.sha256("\x00".join(["replica-v1", *texts]).encode()).hexdigest()[:12]
    assert replicas.texts_key(texts) == old_key and not path.endswith(old_key)
    for spec, message in [("replica:llava-1.5?qk=1", "is not known"), ("replica:llava-1.5?qk_std=-1", "> 0"),
                          ("replica:llava-1.5?qk_std=x", "> 0"), ("replica:nope?qk_std=1", "unknown replica")]:
        with pytest.raises(UserError, match=re.escape(message)):
            replicas.parse_replica_spec(spec)
