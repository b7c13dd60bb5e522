"""`vlm-jax export --workdir=DIR --out=DIR [--format=peft|merged|arrays]`: what a run trained, out of its orbax
checkpoint into files other tools read.

  peft     the LoRA as a Hugging Face PEFT adapter (adapter_config.json + adapter_model.safetensors), loadable with
           `peft.PeftModel.from_pretrained(<HF base model>, OUT)`; the run's other trained tensors (soft prompts,
           a learned temperature, the VITask connector) go beside it as arrays.safetensors + arrays.json.
  merged   the base with the LoRA folded in, as a full HF checkpoint (config.json + model.safetensors) that
           `transformers` loads alone; the other trained tensors beside it as in 'peft'.
  arrays   every trained tensor (LoRA pairs included, as 'lora/<kernel path>/{a,b}'), e.g. the DualAdapter
           residuals and caches, as arrays.safetensors + arrays.json (names, shapes, dtypes, what each is).

The default is 'peft' for runs that trained LoRA and 'arrays' otherwise. The run is read by
`vlm_jax.programs.trained.load(workdir)`; `export(source, out, fmt)` is the workdir-free part.
"""

from __future__ import annotations

import dataclasses
import pathlib
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
    "caches": "few-shot cache built from the support set (keys f32[N, D], values f32[N, C])",
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
    return {n: WHAT.get(n, f"trained by {source.method} (no description registered)") for n in names}


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


def load_source(workdir: str) -> Source:
    """The export `Source` of a trained workdir, through `vlm_jax.programs.trained.load`."""
    try:
        from vlm_jax.programs import trained
    except ImportError:
        raise UserError("export needs vlm_jax.programs.trained (the trained-run loader), which is not in this "
                        "build") from None
    return source_from_run(trained.load(workdir))


def source_from_run(run) -> Source:
    """`Source` from the trained-run loader's result: its `config` (the run's ConfigDict), `checkpoint` (resolved
    base checkpoint), `model` / `base` (the LVLM and its frozen params; None for CLIP methods) and `trained`
    ({name: pytree} restored from the workdir's kept checkpoint)."""
    lora = bool(run.trained.get("lora"))
    mc = run.config.method
    return Source(method=str(run.config.program), checkpoint=str(run.checkpoint), trained=run.trained,
                  model=run.model, base=run.base, lora_rank=int(mc["lora_rank"]) if lora else None,
                  lora_alpha=float(mc["lora_alpha"]) if lora else None)


def _parse(argv: Sequence[str]):
    p = argv_lib.Parser(prog="vlm-jax export", description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", required=True, help="the trained run's workdir")
    p.add_argument("--out", required=True, help="output directory (created; files in it are replaced)")
    p.add_argument("--format", choices=FORMATS, default=None,
                   help="peft (default with LoRA) | merged | arrays (default without LoRA)")
    return p.parse_args(argv)


def _main(argv: Sequence[str]) -> int:
    args = _parse(argv)
    if not pathlib.Path(args.workdir).is_dir():
        raise UserError(f"--workdir={args.workdir} is not a directory")
    source = load_source(args.workdir)
    files = export(source, args.out, args.format)
    print(f"exported {source.method} from {args.workdir} to {args.out}: {', '.join(files)}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """`vlm-jax export` (argv: the arguments after the subcommand); returns the exit status."""
    return argv_lib.run(_main, argv)
