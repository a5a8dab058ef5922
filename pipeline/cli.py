"""The `ecvl` command: one subcommand per DVC stage, each `ecvl <stage> --params params.yaml`.

Exit codes: 0 success; 1 a data, model or training problem, an output that may not be
replaced, or a file-system error (one line, no traceback); 2 bad params or usage (one line
naming the key); 130 interrupted.
"""

from __future__ import annotations

import errno
import importlib
import logging
import os
import re
import sys
from collections.abc import Callable
from pathlib import Path

import click

from ecvl.errors import DeviceError, EcvlError
from pipeline.outputs import check_stage_outputs, stage_outputs
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


MAX_LINE = 1000  # no message may flood a terminal or a log


def _fail(message: str, code: int) -> None:
    line = " ".join(message.split())  # one line, whatever a library put in it
    if len(line) > MAX_LINE:
        line = f"{line[: MAX_LINE - 40]}… ({len(line):,} characters)"
    click.echo(f"error: {line}", err=True)
    sys.exit(code)


# File-system errors a user can act on, and what to do. Any other OSError is a bug: it keeps
# its traceback.
_OS_ERRORS = {
    errno.ENOSPC: ("no space left on the device", "free some space or write elsewhere"),
    errno.EDQUOT: ("disk quota exceeded", "free some space or write elsewhere"),
    errno.EFBIG: ("file too large for the file system", "write elsewhere"),
    errno.EROFS: ("read-only file system", "write elsewhere"),
    errno.EACCES: ("permission denied", "fix the permissions or write elsewhere"),
    errno.EPERM: ("operation not permitted", "fix the permissions or write elsewhere"),
    errno.ENOTDIR: ("a file is where a folder belongs", "move the file away or change the path"),
    errno.EEXIST: ("a file is where a folder belongs", "move the file away or change the path"),
    errno.EISDIR: ("a folder is where a file belongs", "move the folder away or change the path"),
    errno.EIO: ("input/output error", "check the disk or network file system"),
    errno.ENAMETOOLONG: ("file name too long", "choose a shorter path"),
    errno.EMFILE: ("too many open files", "raise the limit (ulimit -n) or use fewer workers"),
    errno.ENFILE: ("too many open files", "raise the limit (ulimit -n) or use fewer workers"),
}
# How wrapped errors carry an OS error number: Rust's (safetensors), HDF5's (h5py), and
# Python's own in the text of an error re-raised from a DataLoader worker.
_ERRNO_IN_TEXT = re.compile(r"Os \{ code: (\d+)|errno = (\d+)|\[Errno (\d+)\]")
_TEMP_NAME = re.compile(r"(^|/)\.([^/]+)\.tmp-[^/]*")


def _unhide(match: re.Match) -> str:
    return match.group(1) + match.group(2)


def os_error_line(error: BaseException, output: object = None) -> str | None:
    """One line for a file-system error the user can act on (disk full, read-only, permission
    denied, a file where a folder belongs, ...), found in `error` or what caused it; None for
    any other error, which is then a bug. `output` names what was being written when the
    error itself names no file. Temporary names (`.shards.tmp-x1y2`) are shown as the output
    they were to become: the temporary files are already removed."""
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        number = getattr(error, "errno", None) if isinstance(error, OSError) else None
        if number not in _OS_ERRORS:
            match = _ERRNO_IN_TEXT.search(str(error))
            number = int(next(g for g in match.groups() if g)) if match else None
        if number in _OS_ERRORS:
            what, todo = _OS_ERRORS[number]
            name = getattr(error, "filename", None) or output
            where = f": {_TEMP_NAME.sub(_unhide, str(name))}" if name else ""
            return f"{what}{where}; {todo} (outputs are replaced only when complete)"
        error = error.__cause__ or error.__context__
    return None


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
        check_stage_outputs(stage, params)
        module.run(params)
    except ParamsError as e:
        _fail(str(e), 2)
    except EcvlError as e:
        _fail(f"{stage}: {one_line(e)}", 1)
    except KeyboardInterrupt:
        _fail(f"{stage}: interrupted; outputs were left as they were", 130)
    except Exception as e:
        first_output = stage_outputs(stage, params.paths, params.stage2.modes)[0][1]
        line = os_error_line(e, first_output)
        if line is None:
            raise
        _fail(f"{stage}: {line}", 1)


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
    except Exception as e:
        line = os_error_line(e, out)
        if line is None:
            raise
        _fail(f"seeds: {line}", 1)


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
    "--out",
    default="predictions.csv",
    show_default=True,
    help="Output file, written atomically; it replaces only an earlier predictions file, never "
    "a folder or another file. - writes to standard output; a symbolic link is written through.",
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
        _fail(f"predict: {one_line(e)}", 1)
    except KeyboardInterrupt:
        _fail(f"predict: interrupted; {out} was left as it was", 130)
    except Exception as e:
        line = os_error_line(e, out)
        if line is None:
            raise
        _fail(f"predict: {line}", 1)


if __name__ == "__main__":
    main()
