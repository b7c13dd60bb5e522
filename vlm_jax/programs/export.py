"""`vlm-jax export --workdir=DIR --out=DIR [--format=peft|merged|arrays]`: what a run trained, out of its orbax
checkpoint into files other tools read.

  peft     the LoRA as a Hugging Face PEFT adapter (adapter_config.json + adapter_model.safetensors), loadable with
           `peft.PeftModel.from_pretrained(<HF base model>, OUT)`; the run's other trained tensors (soft prompts,
           a learned temperature, the VITask connector) go beside it as arrays.safetensors + arrays.json.
  merged   the base with the LoRA folded in, as a full HF checkpoint (config.json + model.safetensors) that
           `transformers` loads alone; the other trained tensors beside it as in 'peft'.
  arrays   every trained tensor (LoRA pairs included, as 'lora/<kernel path>/{a,b}'), e.g. the DualAdapter
           residuals and caches, as arrays.safetensors + arrays.json (names, shapes, dtypes, what each is).

The default is 'peft' for runs that trained LoRA and 'arrays' otherwise. What is exported (`trained_trees`):
VladVA's LoRA + soft prompts; VITask's final LoRA + connector (+ the TSM as arrays); every fine-tuned few-shot
fit; `--fit=NAME` picks one training. The run is read by `vlm_jax.programs.trained.load(workdir)`;
`export(source, out, fmt)` is the workdir-free part.
"""

from __future__ import annotations

import dataclasses
import pathlib
import re
from collections.abc import Mapping, Sequence
from typing import Any

from vlm_jax.convert import adapters
from vlm_jax.errors import UserError
from vlm_jax.programs import argv as argv_lib

FORMATS = ("peft", "merged", "arrays")
# What each trained tree of the methods is, for arrays.json. Names a method adds later are described generically.
WHAT = {
    "lora": "LoRA pairs {a: f32[in, r], b: f32[r, out]} per adapted kernel path; W' = W + (alpha / r) a @ b",
    "image_prompt": "VladVA image-side soft prompt f32[P, D]: replaces the image prompt's token embeddings in place",
    "text_prompt": "VladVA text-side soft prompt f32[P, D]: replaces the text prompt's token embeddings in place",
    "log_temperature": "VladVA learned log temperature of the contrastive loss",
    "connector": "VITask exemplar connector: the task-specific model's CLS feature -> one LLM input embedding",
    "adapter": "few-shot CLIP adapter parameters (DualAdapter residuals on text classifiers and cache keys, "
               "Tip-Adapter-F cache keys)",
    "tsm": "VITask task-specific model (vision tower + classifier) whose CLS feature feeds the connector",
}


@dataclasses.dataclass(frozen=True)
class Source:
    """What export needs from a trained run.

    Attributes:
      method: the run's method name (for arrays.json).
      checkpoint: the base checkpoint (directory or hub id): base_model_name_or_path of the PEFT adapter.
      trained: {name: pytree} of what the run trained ('lora' for LoRA pairs); nothing of the frozen base.
      model: the LVLM module (Llava / InternVL / Qwen2VL) for 'peft' and 'merged'; None for CLIP methods.
      base: the frozen base params of `model` ('merged' only).
      lora_rank, lora_alpha: the run's LoRA settings (when it has LoRA).
      extra_files: files copied into a merged checkpoint (tokenizer, processor configs) {name: bytes}.
    """

    method: str
    checkpoint: str
    trained: Mapping[str, Any]
    model: Any = None
    base: Any = None
    lora_rank: int | None = None
    lora_alpha: float | None = None
    extra_files: Mapping[str, bytes] | None = None


def _describe(source: Source, names) -> dict[str, str]:
    """One line per trained tree; a few-shot fit (named after its method, shots and seed) by what it holds."""
    def what(name):
        if name in WHAT:
            return WHAT[name]
        tree = source.trained[name]
        inner = [WHAT[k] for k in (tree if isinstance(tree, Mapping) else ()) if k in WHAT]
        return f"{name}: {'; '.join(inner)}" if inner else f"trained by {source.method} ({name})"
    return {n: what(n) for n in names}


def _write_rest(source: Source, out: pathlib.Path, names, required: bool = False) -> list[str]:
    """The trained trees `names` as arrays (none: nothing written, unless `required`)."""
    if not names and not required:
        return []
    trees = {n: source.trained[n] for n in names}
    adapters.write_arrays(out, trees, _describe(source, names), source=_facts(source))
    return [adapters.ARRAYS_WEIGHTS, adapters.ARRAYS_INDEX]


def _facts(source: Source) -> dict:
    facts = {"method": source.method, "base_checkpoint": str(source.checkpoint)}
    if source.lora_rank is not None:
        facts.update(lora_rank=source.lora_rank, lora_alpha=source.lora_alpha)
    return facts


def export(source: Source, out, fmt: str | None = None) -> list[str]:
    """Writes `source`'s trained tensors into `out` in format `fmt` (default: 'peft' with LoRA, else 'arrays').

    Returns:
      The names of the files written.

    Raises:
      UserError: an unknown format; 'peft' / 'merged' for a run without LoRA or without an HF LVLM.
    """
    lora = source.trained.get("lora") or None
    fmt = fmt or ("peft" if lora else "arrays")
    if fmt not in FORMATS:
        raise UserError(f"unknown --format={fmt!r}; use one of {', '.join(FORMATS)}")
    out = pathlib.Path(out)
    if fmt == "arrays":
        return _write_rest(source, out, sorted(source.trained), required=True)
    if not lora:
        raise UserError(f"--format={fmt} needs a run that trained LoRA; this {source.method} run did not: "
                        f"use --format=arrays")
    if source.model is None or source.lora_rank is None:
        raise UserError(f"--format={fmt} needs the run's LVLM and LoRA settings; this {source.method} run has none")
    rest = sorted(k for k in source.trained if k != "lora")
    kw = dict(rank=source.lora_rank, alpha=source.lora_alpha)
    if fmt == "peft":
        adapters.write_peft_adapter(out, source.model, lora, base_model=source.checkpoint, **kw)
        files = [adapters.ADAPTER_CONFIG, adapters.ADAPTER_WEIGHTS]
    else:
        adapters.write_merged(out, source.model, source.base, lora, extra_files=dict(source.extra_files or {}), **kw)
        files = ["config.json", "model.safetensors", *sorted(source.extra_files or {})]
    return files + _write_rest(source, out, rest)


def load_source(workdir: str, fit: str | None = None) -> Source:
    """The export `Source` of a trained workdir, through `vlm_jax.programs.trained.load`."""
    try:
        from vlm_jax.programs import trained
    except ImportError:
        raise UserError("export needs vlm_jax.programs.trained (the trained-run loader), which is not in this "
                        "build") from None
    return source_from_run(trained.load(workdir), fit)


def _pick(fits: Mapping[str, Any], name: str, workdir: str):
    if name not in fits:
        raise UserError(f"{workdir} has no fit {name!r} (there: {', '.join(sorted(fits)) or 'none'})")
    return fits[name].params


def trained_trees(program: str, fits: Mapping[str, Any], workdir: str, fit: str | None = None) -> dict[str, Any]:
    """{name: tree} of what a run trained, from its fits (`trained.Fit`, each the trainable subset of one training).

    vladva: the 'vladva' fit ({'lora', 'image_prompt', 'text_prompt'[, 'log_temperature']}). vitask: the final
    model, i.e. stage 2's LoRA (stage 1's when stage 2 did not train) with stage 1's connector, and the 'tsm'
    classifier the exemplars come from. fewshot_clip: every fit that made a table row (one per method, shots, seed
    and protocol), by its name; not the realistic protocol's cross-validation folds.
    `fit` picks one fit by name instead.
    """
    if fit is not None:
        return dict(_pick(fits, fit, workdir))
    if program == "vladva":
        return dict(_pick(fits, "vladva", workdir))
    if program == "vitask":
        stage1 = _pick(fits, "vitask_stage1", workdir)
        final = fits["vitask_stage2"].params if "vitask_stage2" in fits else stage1
        return {"lora": final["lora"], "connector": stage1["connector"], "tsm": _pick(fits, "tsm", workdir)}
    if not fits:
        raise UserError(f"{workdir} keeps no trained tensors: its training-free methods (zero-shot, Tip-Adapter, "
                        f"DualAdapter) are rebuilt from the config; only the fine-tuned ones (-F) are exported")
    # '-cv<k>' fits are the realistic protocol's cross-validation folds: trainings that only chose hyperparameters.
    return {name: f.params for name, f in fits.items() if not re.search(r"-cv\d+$", name)}


def source_from_run(loaded, fit: str | None = None) -> Source:
    """`Source` of a `trained.Trained` (run config, resolved base checkpoints, LVLM model + base, fits)."""
    run = loaded.run
    trees = trained_trees(run.program, loaded.fits, run.workdir, fit)
    lora = bool(trees.get("lora"))
    mc = run.config.method if lora else None
    lvlm = run.program in ("vladva", "vitask")
    resolved = loaded.checkpoints["model"]
    return Source(method=run.program, checkpoint=_base_name(run.config.model.checkpoint, resolved), trained=trees,
                  model=loaded.model if lvlm else None, base=loaded.base if lvlm else None,
                  lora_rank=int(mc.lora_rank) if lora else None, lora_alpha=float(mc.lora_alpha) if lora else None,
                  extra_files=_tokenizer_files(resolved) if lvlm else None)


def _base_name(spec: str, resolved: str) -> str:
    """What base_model_name_or_path says: the config's hub id or directory (portable: `from_pretrained` finds a hub
    id anywhere), the written directory for an offline replica (no hub id to name)."""
    from vlm_jax.testing import replicas

    return resolved if replicas.is_offline_spec(spec) else spec


def _tokenizer_files(ckpt: str) -> dict[str, bytes]:
    """The base checkpoint's non-weight files (tokenizer, processor, chat template, generation config), so that a
    merged export is a complete checkpoint."""
    root = pathlib.Path(ckpt)
    return {f.name: f.read_bytes() for f in sorted(root.iterdir())
            if f.is_file() and f.name != "config.json" and not f.name.endswith((".safetensors", ".index.json"))
            and f.stat().st_size < 64 * 2 ** 20}


def _parse(argv: Sequence[str]):
    p = argv_lib.Parser(prog="vlm-jax export", description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", required=True, help="the trained run's workdir")
    p.add_argument("--out", required=True, help="output directory (created; files in it are replaced)")
    p.add_argument("--format", choices=FORMATS, default=None,
                   help="peft (default with LoRA) | merged | arrays (default without LoRA)")
    p.add_argument("--fit", default=None, help="export this training (a folder under WORKDIR/checkpoints) only")
    return p.parse_args(argv)


def _main(argv: Sequence[str]) -> None:
    args = _parse(argv)
    if not pathlib.Path(args.workdir).is_dir():
        raise UserError(f"--workdir={args.workdir} is not a directory")
    source = load_source(args.workdir, args.fit)
    files = export(source, args.out, args.format)
    print(f"exported {source.method} from {args.workdir} to {args.out}: {', '.join(files)}")


def main(argv: Sequence[str] | None = None) -> None:
    """`vlm-jax export`: argv[0] is the program name ('vlm-jax export'), the flags follow; errors exit 2."""
    argv_lib.run(_main, argv)
