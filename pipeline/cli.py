"""The `ecvl` command: one subcommand per DVC stage, each `ecvl <stage> --params params.yaml`.

Exit codes: 0 success; 1 a data, model or training problem (one line, no traceback);
2 bad params or usage (one line naming the key); 130 interrupted.
"""

from __future__ import annotations

import importlib
import logging
import os
import re
import sys
from collections.abc import Callable
from pathlib import Path

import click

from ecvl.errors import DeviceError, EcvlError
from pipeline.params import Params, load_params
from pipeline.runtime import set_openmp_wait_policy
from pipeline.schema import ParamsError
from pipeline.stages import STAGES

log = logging.getLogger("ecvl")


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )


def _fail(message: str, code: int) -> None:
    click.echo(f"error: {message}", err=True)
    sys.exit(code)


def one_line(error: Exception) -> str:
    """The user's message of `error`. An error raised in a DataLoader worker comes back re-raised
    with the worker's whole traceback as its message; its last line is the original message."""
    text = str(error)
    if "\nOriginal Traceback" in text:
        last = text.strip().splitlines()[-1]
        text = last.split(": ", 1)[1] if last.startswith(type(error).__module__) else last
    return text


def run_stage(stage: str, params_path: str) -> None:
    """Validate the params, then run `pipeline.<stage>.run(params)` with clean error exits."""
    try:
        params = load_params(params_path)
    except ParamsError as e:
        _fail(str(e), 2)
    run_loaded_stage(stage, params)


def run_loaded_stage(stage: str, params: Params) -> None:
    """Run `pipeline.<stage>.run(params)`; errors exit with one line and the codes above."""
    set_openmp_wait_policy(stage, params.base.num_workers)  # before the stage imports torch
    module = importlib.import_module(f"pipeline.{stage}")
    try:
        module.run(params)
    except ParamsError as e:
        _fail(str(e), 2)
    except EcvlError as e:
        _fail(f"{stage}: {one_line(e)}", 1)
    except KeyboardInterrupt:
        _fail(f"{stage}: interrupted; outputs were left as they were", 130)


def _params_option(help_text: str) -> Callable:
    return click.option(
        "--params",
        "params_path",
        default="params.yaml",
        show_default=True,
        type=click.Path(),  # checked by load_params: one line, exit 2, like every params error
        help=help_text,
    )


def _stage_command(stage: str, summary: str) -> Callable:
    @_params_option("Params file (validated before any work starts).")
    @click.option("-v", "--verbose", is_flag=True, help="Debug logging.")
    def command(params_path: str, verbose: bool) -> None:
        _setup_logging(verbose)
        run_stage(stage, params_path)

    command.__doc__ = summary
    return click.command(name=stage)(command)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="ecvl")
def main() -> None:
    """ECVL: long-tailed classification with CLIP-style models, as DVC stages.

    Run the whole pipeline with `dvc repro`, or one stage with `ecvl <stage> --params params.yaml`.
    """


_SUMMARIES = {
    "shard": "Source data -> long-tailed splits -> webdataset shards and meta.json.",
    "stage1": "Fine-tune both open_clip towers on the long-tailed shards (resumable, DDP).",
    "export": "Cache embeddings (zarr) and train images (HDF5) for stage II (resumable).",
    "stage2": "Train the balanced adapter per mode, re-encoding only augmented views.",
    "evaluate": "Tables (Many/Medium/Few/All, macro F1), per-class plots, metrics JSON.",
    "package": "Bundle the stage-I model and one stage-II head into a classifier for predict.",
}

for _stage in STAGES:
    main.add_command(_stage_command(_stage, _SUMMARIES[_stage]))


@main.command()
@_params_option("Params file; each seed runs a copy with only base.seed and the paths changed.")
@click.option(
    "--seeds",
    default="0,1,2",
    show_default=True,
    help="Comma-separated seeds.",
)
@click.option(
    "--out",
    default="runs/seeds",
    show_default=True,
    type=click.Path(file_okay=False),
    help="One seed-<s>/ directory per seed, plus summary.md and summary.json.",
)
@click.option("-v", "--verbose", is_flag=True, help="Debug logging.")
def seeds(params_path: str, seeds: str, out: str, verbose: bool) -> None:
    """The whole pipeline once per seed, then every row as mean ± std over the seeds."""
    _setup_logging(verbose)
    try:  # one process runs every stage: stage I, the costly one, sets the OpenMP policy
        set_openmp_wait_policy("stage1", load_params(params_path).base.num_workers)
    except ParamsError as e:
        _fail(str(e), 2)
    from pipeline import seeds as seeds_module

    try:
        parsed = [int(s) for s in seeds.split(",") if s.strip()]
    except ValueError:
        _fail(f"--seeds: expected comma-separated integers, got {seeds!r}", 2)
    if not parsed or min(parsed) < 0 or len(set(parsed)) != len(parsed):
        _fail(f"--seeds: give distinct non-negative integers, got {seeds!r}", 2)
    try:
        seeds_module.run(Path(params_path), parsed, Path(out), run_loaded_stage)
    except ParamsError as e:
        _fail(str(e), 2)
    except EcvlError as e:
        _fail(f"seeds: {one_line(e)}", 1)
    except KeyboardInterrupt:
        _fail("seeds: interrupted; finished seeds and stage checkpoints are kept", 130)


@main.command()
@click.argument("inputs", nargs=-1, required=True, metavar="INPUT...")
@click.option(
    "--model",
    "model_dir",
    default="models/classifier",
    show_default=True,
    help="A classifier directory written by `ecvl package`.",
)
@click.option(
    "--out", default="predictions.csv", show_default=True, help="Output file (written atomically)."
)
@click.option("--top-k", default=5, show_default=True, help="Classes per image (at most K).")
@click.option(
    "--batch-size",
    default=None,
    type=int,
    help="Images per forward pass. Default: 256 on CUDA, 32 on CPU (measured fastest there: "
    "larger CPU batches slow RN50 down).",
)
@click.option("--device", default="auto", show_default=True, help="auto | cpu | cuda | cuda:N.")
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["csv", "jsonl"]),
    default=None,
    help="Default: jsonl when --out ends in .jsonl, else csv.",
)
@click.option(
    "--workers",
    default=None,
    type=int,
    help="Processes decoding images while the model runs. Default: the CPU count, at most 4.",
)
@click.option(
    "--precision",
    type=click.Choice(["auto", "fp32", "bf16", "fp16"]),
    default="auto",
    show_default=True,
    help="auto: bf16/fp16 autocast on CUDA, fp32 on CPU.",
)
@click.option("--progress/--no-progress", default=True, show_default=True, help="Progress bar.")
@click.option("-v", "--verbose", is_flag=True, help="Debug logging.")
def predict(
    inputs: tuple[str, ...],
    model_dir: str,
    out: str,
    top_k: int,
    batch_size: int | None,
    device: str,
    fmt: str | None,
    workers: int | None,
    precision: str,
    progress: bool,
    verbose: bool,
) -> None:
    """Classify images with a packaged classifier; top-k classes and probabilities per image.

    INPUT: image files, folders (recursive), text files listing one image path per line
    (relative to the list file), or webdataset shard .tar files.
    """
    _setup_logging(verbose)
    for name, value in (("--top-k", top_k), ("--batch-size", batch_size or 1)):
        if value < 1:
            _fail(f"{name}: must be >= 1, got {value}", 2)
    if workers is None:
        workers = min(4, os.cpu_count() or 1)
    elif workers < 0:
        _fail(f"--workers: must be >= 0, got {workers}", 2)
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?|mps", device):
        _fail(f"--device: must be auto, cpu, cuda, cuda:N or mps, got {device!r}", 2)
    set_openmp_wait_policy("predict", workers)  # before torch loads
    from ecvl.distributed import resolve_device
    from pipeline import predict as predict_module

    try:
        resolved = resolve_device(device)
    except DeviceError as e:
        _fail(f"--device: {e}", 2)
    if fmt is None:
        fmt = "jsonl" if out.lower().endswith(".jsonl") else "csv"
    if batch_size is None:
        batch_size = 256 if resolved.type == "cuda" else 32
    try:
        predict_module.run(
            Path(model_dir),
            list(inputs),
            Path(out),
            device=resolved,
            top_k=top_k,
            batch_size=batch_size,
            fmt=fmt,
            workers=workers,
            precision=precision,
            progress=progress,
        )
    except EcvlError as e:
        _fail(f"predict: {e}", 1)
    except KeyboardInterrupt:
        _fail(f"predict: interrupted; {out} was left as it was", 130)


if __name__ == "__main__":
    main()
