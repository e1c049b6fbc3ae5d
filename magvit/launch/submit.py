"""Submit a training run to SLURM in one line (installed: ``magvit-submit``; in a checkout also
``python -m launch.submit``).

    magvit-submit tokenizer --config configs/tokenizer/tiny.yaml --nodes 4 --gpus-per-node 8
    magvit-submit transformer --config configs/transformer/tiny.yaml --nodes 2 --time 2-00:00:00 \\
        --partition gpu train.max_steps=200000

Resolves the config (YAML + ``key.path=value`` overrides, validated exactly as the training script does), then
writes into ``RUN_DIR/slurm/``:

- ``config.yaml``: the resolved config, the only config the job reads (every requeue trains the same thing);
- ``job.sbatch``: the packaged ``<kind>.sbatch`` template (``magvit.resources.SLURM_DIR``) with its ``#SBATCH``
  defaults replaced by the requested nodes, GPUs, CPUs, time and partition, logs under ``RUN_DIR/logs/``;
  ``sbatch RUN_DIR/slurm/job.sbatch`` resubmits it;
- ``submissions.jsonl``: one line per submission (time, job id, working directory, command);

and calls ``sbatch``. The job runs ``python -m magvit.launch.train_<kind>`` with the interpreter that ran this
command, in the working directory (``--workdir``, default: where this command runs), against which relative paths
in the config are read; a ``configs/...`` path found there is used, else the packaged config of that name.
``--dry-run`` prints the batch script and does nothing else. Submitting again to the same run directory continues
the run (``--resume auto``) and is refused if the config differs.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
import unicodedata
from pathlib import Path
from typing import Any, Mapping, Sequence

import yaml

from magvit.cli import ArgumentParser, UsageError, command_name, run_main
from magvit.resources import SLURM_DIR, find_config
from magvit.config import ConfigError

PROG = command_name("python -m launch.submit")
_TIME_RE = re.compile(r"^(\d+-\d{1,2}(:\d{1,2}){0,2}|\d+(:\d{1,2}){0,2}|unlimited|infinite)$", re.IGNORECASE)
_SBATCH_LINE_RE = re.compile(r"^#SBATCH\s+--([\w-]+)(?:[= ](.*))?$")


@dataclasses.dataclass(frozen=True)
class Kind:
    """What ``magvit-submit KIND`` trains."""

    train_module: str  # run as ``python -m``: the same from a checkout and from an installed package
    batch_template: str  # file name in magvit.resources.SLURM_DIR
    default_config: str  # through magvit.resources.find_config


KINDS: dict[str, Kind] = {
    "tokenizer": Kind("magvit.launch.train_tokenizer", "tokenizer.sbatch", "configs/tokenizer/tiny.yaml"),
    "transformer": Kind("magvit.launch.train_transformer", "transformer.sbatch", "configs/transformer/tiny.yaml"),
    "autoregressive": Kind("magvit.launch.train_autoregressive", "autoregressive.sbatch",
                           "configs/autoregressive/tiny.yaml"),
}


# --------------------------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------------------------
def resolve_config(kind: str, config_path: str | os.PathLike, overrides: Sequence[str],
                   workdir: Path | None = None) -> dict[str, Any]:
    """The resolved training config of ``kind`` as a plain dict: exactly what ``magvit.launch.train_<kind>`` runs
    with ``--config config_path overrides...`` (its own ``load_config``) in ``workdir`` (default: the current
    directory). ``UsageError`` on any config mistake."""
    if kind not in KINDS:
        raise UsageError(f"unknown kind '{kind}'; expected one of {', '.join(KINDS)}")
    check_one_line("--config", str(config_path))
    for word in overrides:
        check_one_line("override", word)
        if "=" not in word or word.startswith("-"):
            raise UsageError(f"expected key.path=value, got '{word}'")
    module_name = KINDS[kind].train_module
    try:
        load_config = importlib.import_module(module_name).load_config
    except (ImportError, AttributeError) as err:
        raise UsageError(f"cannot read the {kind} config: {module_name}.load_config is unavailable ({err})") from None
    # Relative paths in configs (data, DeepSpeed config) are read from the job's working directory; the config file
    # itself is found from where the command runs.
    config_path = Path(config_path).resolve()
    try:
        with contextlib.chdir(workdir or Path.cwd()):
            return load_config(str(config_path), list(overrides)).to_dict()
    except (ConfigError, UsageError) as err:
        raise UsageError(str(err)) from None


def check_one_line(what: str, text: str) -> None:
    """``UsageError`` when ``text`` holds a control character (a newline, a carriage return, a tab, ...): the config
    snapshot's header comment and the batch script hold each value on one line, so one would make them invalid."""
    bad = next((ch for ch in text if unicodedata.category(ch) == "Cc"), None)
    if bad is not None:
        raise UsageError(f"{what} {text!r} contains the control character {bad!r}: give each value on one line")


def check_paths(config: Mapping[str, Any], kind: str, root: Path) -> list[str]:
    """Warnings for data the job will not find (paths in configs are relative to ``root``, the job's working
    directory). A DeepSpeed config the trainer will not find there (nor among the packaged configs, as the trainer
    looks it up with ``find_config``) is an error."""
    def resolve(path: str) -> Path:
        return Path(path) if Path(path).is_absolute() else root / path

    ds_config = config.get("train", {}).get("deepspeed_config")
    if ds_config:
        with contextlib.chdir(root):
            found = find_config(ds_config).resolve()
        if not found.is_file():
            raise UsageError(f"DeepSpeed config not found: {ds_config} (train.deepspeed_config, relative to {root} "
                             "or packaged)")
    data_key = "manifest" if kind == "tokenizer" else "tokens"
    data_path = config.get("data", {}).get(data_key)
    if data_path and not resolve(data_path).exists():
        return [f"warning: data.{data_key} {data_path} does not exist here (relative to {root}); the job will fail "
                "unless the compute nodes see it"]
    return []


def _first_difference(a: Any, b: Any, prefix: str = "") -> str | None:
    """Dotted key of the first difference between two nested dicts (None when equal)."""
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        for key in sorted(set(a) | set(b)):
            if key not in a or key not in b:
                return f"{prefix}{key}"
            found = _first_difference(a[key], b[key], f"{prefix}{key}.")
            if found is not None:
                return found
        return None
    return None if a == b else prefix.rstrip(".") or "<root>"


# --------------------------------------------------------------------------------------------------------------
# Batch script
# --------------------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Resources:
    nodes: int = 1
    gpus_per_node: int = 8
    ntasks_per_node: int | None = None  # default: gpus_per_node (1 without GPUs)
    cpus_per_task: int = 8
    time: str = "24:00:00"
    partition: str | None = None
    job_name: str | None = None
    extra: tuple[str, ...] = ()  # further sbatch options, e.g. "--qos=high"

    def validate(self) -> None:
        if self.nodes < 1:
            raise UsageError(f"--nodes must be >= 1, got {self.nodes}")
        if self.gpus_per_node < 0:
            raise UsageError(f"--gpus-per-node must be >= 0, got {self.gpus_per_node}")
        if self.ntasks_per_node is not None and self.ntasks_per_node < 1:
            raise UsageError(f"--ntasks-per-node must be >= 1, got {self.ntasks_per_node}")
        if self.gpus_per_node and self.ntasks_per_node not in (None, self.gpus_per_node):
            raise UsageError(f"--ntasks-per-node ({self.ntasks_per_node}) must equal --gpus-per-node "
                              f"({self.gpus_per_node}): one training process per GPU")
        if self.cpus_per_task < 1:
            raise UsageError(f"--cpus-per-task must be >= 1, got {self.cpus_per_task}")
        if not _TIME_RE.match(self.time):
            raise UsageError(f"--time '{self.time}' is not a SLURM time (MINUTES, HH:MM:SS, D-HH:MM:SS)")
        for name, value in (("--partition", self.partition), ("--job-name", self.job_name)):
            if value is not None and (not value or re.search(r"\s", value)):
                raise UsageError(f"{name} must be a non-empty word, got {value!r}")
        for option in self.extra:
            if not option.startswith("--") or re.search(r"\s", option):
                raise UsageError(f"--sbatch-option expects one '--name=value' sbatch option, got {option!r}")

    @property
    def tasks_per_node(self) -> int:
        return self.ntasks_per_node or self.gpus_per_node or 1


def _template_options(text: str) -> list[tuple[str, str | None]]:
    """``(name, value)`` of each ``#SBATCH --name[=value]`` line, in order."""
    options = []
    for line in text.splitlines():
        match = _SBATCH_LINE_RE.match(line.strip())
        if match:
            options.append((match.group(1), match.group(2)))
    return options


def render_batch_script(kind: str, run_dir: Path, resources: Resources, workdir: Path,
                        python: str = sys.executable) -> str:
    """The job script: the packaged ``<kind>.sbatch`` with the ``#SBATCH`` defaults replaced by ``resources``,
    the logs in ``run_dir/logs``, the job's working directory, interpreter and templates folder, and the run's
    config and run dir as default arguments."""
    template_path = SLURM_DIR / KINDS[kind].batch_template
    template = template_path.read_text()
    options: dict[str, str | None] = {
        "job-name": resources.job_name or f"{kind}-{run_dir.name}",
        "nodes": str(resources.nodes),
        "ntasks-per-node": str(resources.tasks_per_node),
        "gpus-per-node": str(resources.gpus_per_node),
        "cpus-per-task": str(resources.cpus_per_task),
        "time": resources.time,
        "partition": resources.partition,
    }
    # The template's other options (signal, requeue, open mode, ...) follow; its resource defaults are replaced.
    for name, value in _template_options(template):
        options.setdefault(name, value)
    options["output"] = str(run_dir / "logs" / "%x-%j.out")
    options["error"] = str(run_dir / "logs" / "%x-%j.err")
    if resources.gpus_per_node == 0:
        del options["gpus-per-node"]  # CPU nodes: no GPU request at all
    if not resources.partition:
        del options["partition"]  # the cluster's default partition
    for option in resources.extra:  # "--qos=high": replaces an option of the same name or adds one
        name, _, value = option[2:].partition("=")
        options[name] = value or None
    header = [f"#SBATCH --{name}" + (f"={value}" if value is not None else "") for name, value in options.items()]
    # The template's body: everything after its last #SBATCH line.
    lines = template.splitlines()
    last = max(i for i, line in enumerate(lines) if line.lstrip().startswith(("#SBATCH", "##SBATCH")))
    body = "\n".join(lines[last + 1:]).strip("\n")
    config = run_dir / "slurm" / "config.yaml"
    q = shlex.quote
    return "\n".join([
        "#!/bin/bash",
        f"# {kind} training, written by `{PROG}` from {template_path}.",
        f"# Resubmit (continues the run): sbatch {q(str(run_dir / 'slurm' / 'job.sbatch'))} [key.path=value ...]",
        *header,
        "",
        f"export MAGVIT_WORKDIR={q(str(workdir))}",
        f"export MAGVIT_PYTHON={q(python)}",
        f"export MAGVIT_SLURM_DIR={q(str(SLURM_DIR))}",
        f"set -- --config {q(str(config))} --run-dir {q(str(run_dir))} \"$@\"",
        "",
        body,
        "",
    ])


# --------------------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog=PROG, description=__doc__,
                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("kind", choices=sorted(KINDS), help="what to train")
    parser.add_argument("--config", default=None,
                        help="training YAML; a configs/<kind>/NAME.yaml missing here is the packaged one "
                             "(default: configs/<kind>/tiny.yaml)")
    parser.add_argument("--nodes", type=int, default=1, help="number of nodes (default: 1)")
    parser.add_argument("--gpus-per-node", type=int, default=8, help="GPUs per node; 0: CPU-only nodes (default: 8)")
    parser.add_argument("--ntasks-per-node", type=int, default=None,
                        help="training processes per node (default: --gpus-per-node, or 1 without GPUs)")
    parser.add_argument("--cpus-per-task", type=int, default=8, help="CPU cores per training process (default: 8)")
    parser.add_argument("--time", default="24:00:00",
                        help="time limit of one start of the job; requeued starts get it again (default: 24:00:00)")
    parser.add_argument("--partition", default=None, help="SLURM partition (default: the cluster's default)")
    parser.add_argument("--job-name", default=None, help="job name (default: <kind>-<run dir name>)")
    parser.add_argument("--workdir", default=None,
                        help="the job's working directory, against which relative paths in the config are read "
                             "(default: the current directory)")
    parser.add_argument("--run-dir", default=None,
                        help="run directory (default: runs/<kind>/<config name> in the working directory)")
    parser.add_argument("--sbatch-option", action="append", default=[], metavar="--NAME=VALUE",
                        help="another sbatch option written into the script, e.g. --sbatch-option=--qos=high; "
                             "replaces the script's option of the same name (repeatable)")
    parser.add_argument("--dry-run", action="store_true", help="print the batch script and do nothing else")
    parser.add_argument("overrides", nargs="*", metavar="key.path=value", help="config overrides")
    return parser


def _sbatch(script: Path, workdir: Path) -> int:
    exe = shutil.which("sbatch")
    if exe is None:
        raise UsageError("sbatch not found on PATH: run this on a SLURM login node (--dry-run shows the script)")
    proc = subprocess.run([exe, "--parsable", str(script)], cwd=workdir, capture_output=True, text=True)
    if proc.returncode != 0:
        lines = (proc.stderr or proc.stdout).strip().splitlines() or [f"status {proc.returncode}"]
        raise UsageError(f"sbatch rejected {script}: {lines[-1]}")
    try:
        return int(proc.stdout.strip().split(";")[0])
    except ValueError:
        raise UsageError(f"unexpected sbatch output: {proc.stdout.strip()!r}") from None


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_intermixed_args(argv)
    kind = KINDS[args.kind]
    config_path = find_config(args.config or kind.default_config)
    workdir = Path(args.workdir or Path.cwd()).resolve()
    check_one_line("--workdir", str(workdir))  # exported by the batch script, recorded in submissions.jsonl
    if not workdir.is_dir():
        raise UsageError(f"--workdir {workdir} is not a directory")
    resources = Resources(nodes=args.nodes, gpus_per_node=args.gpus_per_node, ntasks_per_node=args.ntasks_per_node,
                          cpus_per_task=args.cpus_per_task, time=args.time, partition=args.partition,
                          job_name=args.job_name, extra=tuple(args.sbatch_option))
    resources.validate()
    config = resolve_config(args.kind, config_path, args.overrides, workdir)
    warnings = check_paths(config, args.kind, workdir)
    run_dir = Path(args.run_dir).resolve() if args.run_dir else workdir / "runs" / args.kind / config_path.stem
    if re.search(r"[\s%]", str(run_dir)):
        raise UsageError(f"run dir {run_dir} contains whitespace or '%', which SLURM log paths cannot hold")
    script = render_batch_script(args.kind, run_dir, resources, workdir)
    if args.dry_run:
        print(script, end="")
        return 0
    for line in warnings:
        print(line, file=sys.stderr)

    slurm_dir = run_dir / "slurm"
    snapshot = slurm_dir / "config.yaml"
    if snapshot.exists():
        previous = yaml.safe_load(snapshot.read_text())
        key = _first_difference(previous, config)
        if key is not None:
            raise UsageError(f"{run_dir} already holds a run with a different config (first difference: {key}); "
                              "choose another --run-dir or submit the same config to continue it")
    slurm_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "logs").mkdir(parents=True, exist_ok=True)
    overrides = " ".join(args.overrides) or "none"
    snapshot.write_text(f"# resolved from {config_path} with overrides: {overrides}\n"
                        + yaml.safe_dump(config, sort_keys=False))
    job_script = slurm_dir / "job.sbatch"
    job_script.write_text(script)
    job_script.chmod(0o755)
    job_id = _sbatch(job_script, workdir)
    words = sys.argv[1:] if argv is None else argv
    record = {"time": time.strftime("%Y-%m-%dT%H:%M:%S"), "job_id": job_id, "kind": args.kind,
              "workdir": str(workdir), "command": shlex.join([sys.executable, "-m", "magvit.launch.submit", *words])}
    with open(slurm_dir / "submissions.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")
    tasks = resources.nodes * resources.tasks_per_node
    print(f"submitted job {job_id}: {args.kind}, {resources.nodes} node(s) x {resources.tasks_per_node} task(s) "
          f"= {tasks} process(es)\n  run dir: {run_dir}\n  logs:    {run_dir / 'logs'}\n"
          f"  status:  squeue -j {job_id}    stop: scancel {job_id}    preempt now: scancel --signal=USR1 {job_id}")
    return 0


def cli(argv: Sequence[str] | None = None) -> int:
    """Console entry point (``magvit-submit``)."""
    return run_main(PROG, main, argv)


if __name__ == "__main__":
    sys.exit(cli())
