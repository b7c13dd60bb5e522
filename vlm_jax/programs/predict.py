"""`vlm-jax predict --workdir=DIR IMAGE... | --folder=DIR [--out=predictions.json]`: use what a run trained.

What comes out depends on the workdir's program, and each goes through its evaluation's own code:
  few-shot CLIP (configs/dualadapter.py): the top-k classes with scores (the softmax of the method's logits) of
    every method of the run (--methods), under each protocol the run used (--protocol). The program runs again
    with the images as one more, unlabeled, test set (`fewshot_clip.run(predict=...)`): the classifiers are the
    evaluated ones, hyperparameters searched as the run searched them, fine-tuned residuals restored from the
    checkpoints; the training-free methods' classifiers and caches are rebuilt from the config.
  VladVA (configs/vladva.py): the trained LVLM's embeddings (embeddings.npy beside --out, rows in image order),
    and with --texts the cosine-similarity table of images x texts (the retrieval evaluation's embedders).
  VITask (configs/vitask.py): the generated answer, its matched label, and the label ranking (log-likelihood of
    every label's answer), by the fine-tuned LVLM with the TSM's exemplar (the 'VITask w/ EP' row), among the
    labels of --dataset (default: the run's only dataset).

Images are batched (data.eval_batch_size of the run, --batch_size) and sharded over the devices of the run's mesh;
a folder (searched recursively for image files) shows a progress line. The result is printed as a table and,
with --out, written as JSON.

As `vlm-jax eval`: `--config.KEY=VALUE` overrides of the keys that do not change what was trained (data moved since
training, another mesh), the multi-process flags of `vlm-jax train` (process 0 prints and writes), and a damaged
newest checkpoint is one line that says to retrain from the newest good step.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np
from absl import flags

from vlm_jax import errors
from vlm_jax.programs import commands

_WORKDIR = commands.shared_flag(__name__, flags.DEFINE_string, "workdir", None,
                                "The workdir of a run (`vlm-jax train --workdir`).")
_FOLDER = flags.DEFINE_string("folder", None, "Predict every image file under this folder (recursively).")
_OUT = commands.shared_flag(__name__, flags.DEFINE_string, "out", None,
                            "Write the predictions as JSON to this file (VladVA: and the embeddings "
                            "as <out without .json>.embeddings.npy).")
_TOP_K = flags.DEFINE_integer("top_k", 5, "Classes shown per image (few-shot CLIP, VITask's ranking).", lower_bound=1)
_METHODS = flags.DEFINE_list("methods", None, "Few-shot CLIP: the methods to predict with (default: the run's).")
_PROTOCOL = flags.DEFINE_enum("protocol", None, ["paper", "realistic"], "Few-shot CLIP: one protocol only "
                              "(default: the run's, both when it ran both).")
_TEXTS = flags.DEFINE_list("texts", None, "VladVA: texts to compare the images with (comma-separated).")
_DATASET = flags.DEFINE_string("dataset", None, "VITask: the dataset whose labels and instruction to use.")
_BATCH = flags.DEFINE_integer("batch_size", None, "Images per batch (default: the run's data.eval_batch_size).",
                              lower_bound=1)
flags.mark_flags_as_required(["workdir"])
_DISTRIBUTED = commands.distributed_flags()   # the same multi-process flags as vlm-jax train


# ----------------------------------------------------------------------------------------------------------
# Inputs.

def image_paths(images: Sequence[str], folder: str | None) -> list[str]:
    """The images to predict: the given files, or every image file under `folder` (sorted); one line if none."""
    from vlm_jax.data import imagefolder

    if bool(images) == bool(folder):
        raise errors.UserError("give image files or --folder=DIR (one of the two)")
    if folder:
        if not os.path.isdir(folder):
            raise errors.UserError(f"--folder {folder} is not a directory")
        paths = sorted(os.path.join(d, f) for d, _, files in os.walk(folder) for f in files
                       if f.lower().endswith(imagefolder.IMAGE_EXTENSIONS))
        if not paths:
            raise errors.UserError(f"--folder {folder} holds no image file ({', '.join(imagefolder.IMAGE_EXTENSIONS)})")
        return paths
    missing = [p for p in images if not os.path.isfile(p)]
    if missing:
        raise errors.UserError(f"no image file {missing[0]}" + (f" (and {len(missing) - 1} more)" if len(missing) > 1
                                                                else ""))
    return [os.path.abspath(p) for p in images]


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def top_k(scores: np.ndarray, classnames: Sequence[str], k: int) -> list[list[dict[str, Any]]]:
    """Per row of f32[N, C] scores: the k best [{'class', 'score'}], best first."""
    order = np.argsort(-scores, axis=-1, kind="stable")[:, :k]
    return [[{"class": classnames[j], "score": round(float(s[j]), 4)} for j in o] for s, o in zip(scores, order)]


# ----------------------------------------------------------------------------------------------------------
# Few-shot CLIP.

def predict_fewshot(run, paths: list[str], methods: Sequence[str] | None, protocol: str | None, k: int,
                    batch_size: int | None) -> dict[str, Any]:
    """{'classnames', 'columns', 'images': [{'image', 'predictions': {column: top-k}}]}; a column is one method
    under one protocol for one (shots, seed) of the run."""
    from vlm_jax.programs import fewshot_clip, trained
    from vlm_jax.train import trainer

    config = run.config.copy_and_resolve_references()
    if methods:
        config.methods = ",".join(methods)   # which methods run does not change what any of them trained
    if protocol:
        if protocol not in fewshot_clip.PROTOCOLS[config.protocol]:
            raise errors.UserError(f"--protocol={protocol}: the run used protocol {config.protocol!r}")
        config.protocol = protocol
    if batch_size:
        config.data.eval_batch_size = batch_size
    with trained.scratch_workdir(run, config) as tmp, trainer.restore_only(), trained.version_errors(run):
        got = fewshot_clip.run(config, tmp, predict=tuple(paths))
    classnames, columns = got["classnames"], {}
    sweep = len(got["runs"]) > 1
    for r in got["runs"]:
        for key, label in (("methods", "paper"), ("realistic", "realistic")):
            for method, res in r.get(key, {}).items():
                name = f"{method} ({label}" + (f", {r['shots']}-shot seed {r['seed']})" if sweep else ")")
                columns[name] = top_k(_softmax(res["predict_logits"]), classnames, k)
    images = [{"image": p, "predictions": {c: preds[i] for c, preds in columns.items()}} for i, p in enumerate(paths)]
    return {"program": "fewshot_clip", "classnames": classnames, "columns": list(columns), "images": images}


# ----------------------------------------------------------------------------------------------------------
# VladVA.

def predict_vladva(run, paths: list[str], texts: Sequence[str] | None, batch_size: int | None) -> dict[str, Any]:
    """{'embeddings' f32[N, D] (normalised, as the evaluation compares them), 'texts', 'similarity' f32[N, T]}."""
    from vlm_jax.convert import auto
    from vlm_jax.data import lvlm_inputs, tokenize
    from vlm_jax.programs import trained, vladva
    from vlm_jax.programs import runner
    from vlm_jax.runtime.metrics import Progress

    config, mc = run.config, run.config.method
    mesh, _ = runner.make_mesh(config)
    t = trained.load(run, mesh, fits=("vladva",))
    if "vladva" not in t.fits:
        raise errors.UserError(f"{run.workdir} has no 'vladva' checkpoint (there: {', '.join(t.fits) or 'none'})")
    fit, ckpt = t.fits["vladva"].params, t.checkpoints["model"]
    with trained.version_errors(run):
        tok = tokenize.load_tokenizer(ckpt)
        inputs = lvlm_inputs.for_checkpoint(ckpt, auto.lvlm_config(ckpt), tok, config.model.get("image_size", 0))
        tokens = vladva.prompt_tokens(ckpt, config, tok, inputs)
        bs = batch_size or config.data.eval_batch_size
        embed_images, embed_texts = vladva.lvlm_embedders(
            t.model, t.base, tokens, inputs, mesh, bs, fit["lora"],
            dict(alpha=mc.lora_alpha, rank=mc.lora_rank), fit["image_prompt"], fit["text_prompt"])
    progress, chunks = Progress(len(paths), what="predict", every_s=10.0), []
    for i in range(0, len(paths), 8 * bs):   # a few batches at a time, for the progress line
        chunks.append(embed_images(paths[i:i + 8 * bs]))
        progress.update(min(i + 8 * bs, len(paths)))
    emb = _normalize(np.concatenate(chunks))
    out = {"program": "vladva", "images": [{"image": p} for p in paths], "embeddings": emb}
    if texts:
        sim = emb @ _normalize(embed_texts(list(texts))).T
        out["texts"] = list(texts)
        for row, s in zip(out["images"], sim):
            # Unrounded: ranks computed from the JSON are the evaluation's (4 digits would make ties).
            row["similarity"] = {x: float(v) for x, v in zip(texts, s)}
    return out


def _normalize(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


# ----------------------------------------------------------------------------------------------------------
# Output.

def table(result: dict[str, Any]) -> str:
    """A markdown table: one row per image; its top class (score) per column, or its similarity per text."""
    rows = result["images"]
    if result["program"] == "vladva":
        cols = result.get("texts") or []
        cells = [[f"{r['similarity'][c]:.3f}" for c in cols] for r in rows] if cols else [[] for _ in rows]
        if not cols:
            cols = ["embedding"]
            cells = [[f"row {i} of the embeddings (D={result['embeddings'].shape[1]})"] for i in range(len(rows))]
    elif result["program"] == "vitask":
        cols = ["answer", "matched label", "ranking (log-likelihood)"]
        cells = [[r["answer"], r["matched"] or "(none)", ", ".join(f"{c['class']} ({c['score']:.2f})"
                                                                    for c in r["ranking"][:3])] for r in rows]
    else:
        cols = result["columns"]
        cells = [[f"{r['predictions'][c][0]['class']} ({r['predictions'][c][0]['score']:.2f})" for c in cols]
                 for r in rows]
    lines = ["| image | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
    lines += [f"| {os.path.basename(r['image'])} | " + " | ".join(c) + " |" for r, c in zip(rows, cells)]
    return "\n".join(lines)


def write(result: dict[str, Any], out: str) -> list[str]:
    """The JSON at `out` (VladVA: the embeddings as a .npy beside it); returns the paths written."""
    from vlm_jax.eval import report

    written = []
    result = dict(result)
    try:
        if "embeddings" in result:
            npy = os.path.splitext(out)[0] + ".embeddings.npy"
            report.write_atomic(npy, lambda f: np.save(f, result.pop("embeddings")), binary=True)
            result["embeddings_file"] = os.path.basename(npy)
            written.append(npy)
        report.write_json(out, result)
    except OSError as e:
        raise errors.UserError(f"--out {out} cannot be written: {e.strerror or e}") from None
    return [out] + written


def predict(workdir: str, images: Sequence[str] = (), folder: str | None = None, overrides: Sequence[str] = (),
            **options) -> dict[str, Any]:
    """The predictions of `workdir`'s trained run for `images` or the files under `folder` (see the module).

    Args:
      overrides: `--config.KEY=VALUE` arguments (`trained.with_overrides`).
      options: top_k, methods, protocol (few-shot CLIP); texts (VladVA); dataset (VITask); batch_size.
    """
    from vlm_jax.programs import trained

    run = trained.with_overrides(trained.read_run(workdir), overrides)
    paths = image_paths(images, folder)
    bs = options.get("batch_size")
    if run.program == "fewshot_clip":
        return predict_fewshot(run, paths, options.get("methods"), options.get("protocol"),
                               options.get("top_k", 5), bs)
    if run.program == "vladva":
        return predict_vladva(run, paths, options.get("texts"), bs)
    from vlm_jax.programs import predict_vitask
    return predict_vitask.predict(run, paths, options.get("dataset"), options.get("top_k", 5), bs)


def _main(argv: list[str], overrides: list[str]) -> None:
    def body():
        commands.initialize_distributed()
        result = predict(_WORKDIR.value, argv[1:], _FOLDER.value, overrides, top_k=_TOP_K.value,
                         methods=_METHODS.value, protocol=_PROTOCOL.value, texts=_TEXTS.value, dataset=_DATASET.value,
                         batch_size=_BATCH.value)
        if not commands.is_writer():   # every process computed the same predictions; process 0 reports them
            return
        print("\n" + table(result), flush=True)
        if _OUT.value:
            for path in write(result, os.path.abspath(os.path.expanduser(_OUT.value))):
                print(f"wrote {path}")
    commands.run_user_command(body, os.path.dirname(os.path.abspath(_OUT.value)) if _OUT.value else None)


def main(argv: list[str]) -> None:
    """Runs the command line `argv` (argv[0]: the program name)."""
    commands.run_absl(_main, argv, __doc__, config_overrides=True)
