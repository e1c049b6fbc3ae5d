"""Everything distributed lives here: rank/world discovery, process-group set-up, collectives, DeepSpeed engines
and their checkpoint loads, ZeRO-3 parameter gathering, preemption signals and rank-0 logging.

Collectives come in two kinds, all no-ops without an initialised process group (one process, tests, inference):
scalars for the training loop's decisions and logs (``all_reduce_max``, ``all_reduce_mean``, ``all_gather_scalar``)
and in-place tensor collectives for model state that every rank must hold identically, such as the vector
quantizer's codebook statistics (``all_reduce_tensor_``, ``broadcast_tensor_``).

Rank, world size, local rank and the rendezvous address come from (first match wins):

1. torchrun / the deepspeed launcher: ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``;
2. SLURM (``srun`` starts one process per task): ``SLURM_PROCID``, ``SLURM_NTASKS``, ``SLURM_LOCALID``, the first
   host of ``SLURM_JOB_NODELIST`` (compressed forms such as ``node[01-04,07]`` are expanded) and a ``MASTER_PORT``
   derived from ``SLURM_JOB_ID`` when none is set, so every task of a job agrees without talking first;
3. nothing: one process (rank 0 of 1) on a free local port.

deepspeed is imported only inside functions: ``import magvit.distributed`` stays cheap, and models may import the
tensor collectives without pulling DeepSpeed in.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import re
import signal
import socket
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import torch

from .precision import RESOLVED_PRECISIONS

EXIT_CODE_PREEMPTED = 3  # a batch script requeues the job on this status
DEFAULT_MASTER_PORT = 29500
_SLURM_PORT_BASE, _SLURM_PORT_SPAN = 15000, 20000

logger = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------------------------
# Environment discovery
# --------------------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class DistEnv:
    """Where this process sits in the job. ``source`` is ``"torchrun"`` (also the deepspeed launcher),
    ``"slurm"`` or ``"single"``."""

    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int
    source: str

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _split_top_level(text: str) -> list[str]:
    """Split on commas that are not inside ``[...]``."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
            if depth < 0:
                raise ValueError(f"unbalanced ']' in SLURM node list {text!r}")
        elif ch == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    if depth != 0:
        raise ValueError(f"unbalanced '[' in SLURM node list {text!r}")
    parts.append(text[start:])
    return [p for p in (s.strip() for s in parts) if p]


def _expand_host(pattern: str) -> list[str]:
    match = re.search(r"\[([^\]]*)\]", pattern)
    if match is None:
        return [pattern]
    head, tail = pattern[: match.start()], pattern[match.end():]
    values: list[str] = []
    for item in match.group(1).split(","):
        item = item.strip()
        if "-" in item:
            lo, hi = item.split("-", 1)
            if not (lo.isdigit() and hi.isdigit()) or int(hi) < int(lo):
                raise ValueError(f"bad range '{item}' in SLURM node list pattern {pattern!r}")
            width = len(lo)  # node[01-04] keeps the zero padding
            values.extend(str(n).zfill(width) for n in range(int(lo), int(hi) + 1))
        elif item.isdigit():
            values.append(item)
        else:
            raise ValueError(f"bad item '{item}' in SLURM node list pattern {pattern!r}")
    return [h for v in values for h in _expand_host(head + v + tail)]


def expand_slurm_nodelist(nodelist: str) -> list[str]:
    """Expand a SLURM host list: ``"node[01-03,07],gpu1"`` -> ``["node01", "node02", "node03", "node07", "gpu1"]``.

    Several bracket groups in one name (``rack[1-2]-n[1-2]``) expand as a product, in SLURM's order.
    """
    if not isinstance(nodelist, str) or not nodelist.strip():
        raise ValueError(f"expected a non-empty SLURM node list, got {nodelist!r}")
    return [host for part in _split_top_level(nodelist.strip()) for host in _expand_host(part)]


def slurm_master_port(job_id: str | int) -> int:
    """A port every task of a job computes alike from the job id (different jobs on a node rarely collide)."""
    digits = re.sub(r"\D", "", str(job_id))  # array jobs: "1234_5"
    if not digits:
        raise ValueError(f"expected a numeric SLURM job id, got {job_id!r}")
    return _SLURM_PORT_BASE + int(digits) % _SLURM_PORT_SPAN


def _int_env(env: Mapping[str, str], key: str) -> int:
    try:
        return int(env[key])
    except ValueError:
        raise ValueError(f"environment variable {key}={env[key]!r} is not an integer") from None


def free_port() -> int:
    """An unused TCP port on this host (for one-process runs)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def read_dist_env(environ: Mapping[str, str] | None = None) -> DistEnv:
    """Rank/world/master of this process from torchrun/deepspeed variables, else SLURM's, else one process."""
    env = os.environ if environ is None else environ
    if "RANK" in env and "WORLD_SIZE" in env:
        rank, world = _int_env(env, "RANK"), _int_env(env, "WORLD_SIZE")
        local_rank = _int_env(env, "LOCAL_RANK") if "LOCAL_RANK" in env else 0
        addr = env.get("MASTER_ADDR", "127.0.0.1")
        port = _int_env(env, "MASTER_PORT") if "MASTER_PORT" in env else DEFAULT_MASTER_PORT
        source = "torchrun"
    elif "SLURM_PROCID" in env:
        rank = _int_env(env, "SLURM_PROCID")
        # SLURM_STEP_NUM_TASKS describes the srun step; SLURM_NTASKS the allocation (contract's variable).
        world_key = "SLURM_STEP_NUM_TASKS" if "SLURM_STEP_NUM_TASKS" in env else "SLURM_NTASKS"
        world = _int_env(env, world_key) if world_key in env else 1
        local_rank = _int_env(env, "SLURM_LOCALID") if "SLURM_LOCALID" in env else 0
        nodelist = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST") or env.get("SLURM_STEP_NODELIST")
        addr = env.get("MASTER_ADDR") or (expand_slurm_nodelist(nodelist)[0] if nodelist else "127.0.0.1")
        if "MASTER_PORT" in env:
            port = _int_env(env, "MASTER_PORT")
        elif "SLURM_JOB_ID" in env:
            port = slurm_master_port(env["SLURM_JOB_ID"])
        else:
            port = DEFAULT_MASTER_PORT
        source = "slurm"
    else:
        rank, world, local_rank = 0, 1, 0
        addr = env.get("MASTER_ADDR", "127.0.0.1")
        port = _int_env(env, "MASTER_PORT") if "MASTER_PORT" in env else 0  # 0: pick a free one at init
        source = "single"
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"inconsistent distributed environment: rank {rank} of world size {world} ({source})")
    return DistEnv(rank=rank, world_size=world, local_rank=local_rank, master_addr=addr, master_port=port,
                   source=source)


def local_world_size(environ: Mapping[str, str] | None = None) -> int:
    """Processes of this job on this machine: ``LOCAL_WORLD_SIZE`` (torchrun), ``LOCAL_SIZE`` (the deepspeed
    launcher), SLURM's tasks on this node (``SLURM_STEP_TASKS_PER_NODE`` / ``SLURM_TASKS_PER_NODE``, e.g.
    ``"2(x3)"``, or ``SLURM_NTASKS_PER_NODE``), else 1."""
    env = os.environ if environ is None else environ
    for key in ("LOCAL_WORLD_SIZE", "LOCAL_SIZE", "SLURM_STEP_TASKS_PER_NODE", "SLURM_TASKS_PER_NODE",
                "SLURM_NTASKS_PER_NODE"):
        match = re.match(r"\s*(\d+)", env.get(key, ""))  # this node's entry: the first of "2(x3),1"
        if match and int(match.group(1)) >= 1:
            return int(match.group(1))
    return 1


def usable_cores() -> int:
    """Cores this process may run on (its affinity mask: a SLURM or taskset binding, a container's cpuset)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def share_cores(environ: Mapping[str, str] | None = None) -> int:
    """Give this process its share of the machine's cores as torch threads: ``usable_cores() //
    local_world_size()`` (at least 1), so that N processes on one machine never run N x cores threads that wait on
    each other (measured: a step 4x slower with 2 ranks x 2 threads on 2 cores). An explicit ``OMP_NUM_THREADS``
    wins (torch has read it). Returns the thread count in force."""
    env = os.environ if environ is None else environ
    if env.get("OMP_NUM_THREADS", "").strip():
        return torch.get_num_threads()
    threads = max(1, usable_cores() // local_world_size(env))
    if threads != torch.get_num_threads():
        torch.set_num_threads(threads)
    return threads


# --------------------------------------------------------------------------------------------------------------
# Process group
# --------------------------------------------------------------------------------------------------------------
def _disable_jit_ops() -> None:
    """The shm all-reduce op is JIT-compiled (needs g++, ~40 s) at init unless marked incompatible."""
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def init_distributed(env: DistEnv | None = None) -> DistEnv:
    """Export the discovered rank variables, share the cores out (:func:`share_cores`), pick the device and start
    the process group (gloo on CPU, nccl on CUDA) through DeepSpeed. Also for one process, so that engines and
    collectives work the same everywhere."""
    env = env or read_dist_env()
    share_cores()
    port = env.master_port or free_port()
    env = dataclasses.replace(env, master_port=port)
    os.environ.update({"RANK": str(env.rank), "WORLD_SIZE": str(env.world_size), "LOCAL_RANK": str(env.local_rank),
                       "MASTER_ADDR": env.master_addr, "MASTER_PORT": str(port)})
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if torch.cuda.is_available() else "cpu")
    if torch.cuda.is_available():
        torch.cuda.set_device(env.local_rank % torch.cuda.device_count())
    _disable_jit_ops()
    import deepspeed
    from deepspeed.utils import logger as ds_logger

    ds_logger.setLevel(logging.WARNING)  # progress and summaries come from the training script
    if not torch.distributed.is_initialized():
        deepspeed.init_distributed(auto_mpi_discovery=False, verbose=False, rank=env.rank, world_size=env.world_size)
    return env


def device() -> torch.device:
    """The accelerator of this rank (the current CUDA device, else CPU)."""
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def is_initialized() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def get_rank() -> int:
    return torch.distributed.get_rank() if is_initialized() else 0


def get_world_size() -> int:
    return torch.distributed.get_world_size() if is_initialized() else 1


def barrier() -> None:
    if is_initialized() and get_world_size() > 1:
        torch.distributed.barrier()


def _collective_device() -> torch.device:
    return device() if is_initialized() and torch.distributed.get_backend() == "nccl" else torch.device("cpu")


def all_reduce_max(value: float) -> float:
    """Maximum of a scalar over ranks (used so that every rank takes the same skip/stop decision)."""
    if not is_initialized() or get_world_size() == 1:
        return float(value)
    t = torch.tensor([float(value)], dtype=torch.float64, device=_collective_device())
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return float(t.item())


def all_reduce_mean(values: Sequence[float]) -> list[float]:
    """Mean over ranks of a few scalars (for logging)."""
    values = [float(v) for v in values]
    if not is_initialized() or get_world_size() == 1 or not values:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=_collective_device())
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.SUM)
    return (t / get_world_size()).tolist()


def all_gather_scalar(value: float) -> list[float]:
    """``value`` of every rank, in rank order."""
    if not is_initialized() or get_world_size() == 1:
        return [float(value)]
    t = torch.zeros(get_world_size(), dtype=torch.float64, device=_collective_device())
    t[get_rank()] = float(value)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.SUM)
    return t.tolist()


_REDUCE_OPS = ("sum", "max", "mean")


def all_reduce_tensor_(tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """All-reduce ``tensor`` in place over the default group (``"sum"``, ``"max"`` or ``"mean"``) and return it;
    unchanged with one process. Every rank must call it in the same order with tensors of the same shape."""
    if op not in _REDUCE_OPS:
        raise ValueError(f"op must be one of {_REDUCE_OPS}, got {op!r}")
    if get_world_size() > 1:
        reduce_op = torch.distributed.ReduceOp.MAX if op == "max" else torch.distributed.ReduceOp.SUM
        torch.distributed.all_reduce(tensor, op=reduce_op)
        if op == "mean":
            tensor /= get_world_size()
    return tensor


def broadcast_tensor_(tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
    """Overwrite ``tensor`` in place with rank ``src``'s and return it; unchanged with one process."""
    if get_world_size() > 1:
        torch.distributed.broadcast(tensor, src=src)
    return tensor


def peak_memory_mb() -> float:
    """Peak memory of this rank: CUDA allocator peak on GPU, else the process's peak resident set size."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


# --------------------------------------------------------------------------------------------------------------
# DeepSpeed configuration and engines
# --------------------------------------------------------------------------------------------------------------
def load_deepspeed_config(path: str | os.PathLike) -> dict[str, Any]:
    """A DeepSpeed JSON config; ``ValueError`` with the path for a missing or invalid file."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise ValueError(f"DeepSpeed config not found: {path}") from None
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: invalid JSON ({err})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object")
    return data


def make_deepspeed_config(base: Mapping[str, Any], *, micro_batch_size: int, grad_accum_steps: int,
                          grad_clip: float, precision: str, zero_stage: int | None = None,
                          world_size: int = 1) -> dict[str, Any]:
    """Fill a DeepSpeed config from the training config, which owns batch sizes, clipping and precision.

    ``precision``: ``"fp32"``; ``"bf16"`` (DeepSpeed bf16: bf16 weights, fp32 master copy in the optimizer);
    ``"autocast-bf16"`` (fp32 weights, bf16 matmuls via ``torch.autocast`` in the training script).
    The base file chooses the ZeRO stage and its options unless ``zero_stage`` is given.
    """
    if precision not in RESOLVED_PRECISIONS:  # "auto" is resolved before (magvit.precision.resolve_precision)
        raise ValueError(f"precision must be 'fp32', 'bf16' or 'autocast-bf16', got {precision!r}")
    if micro_batch_size < 1 or grad_accum_steps < 1:
        raise ValueError(f"batch size and accumulation steps must be >= 1, got {micro_batch_size}, {grad_accum_steps}")
    cfg = json.loads(json.dumps(dict(base)))
    for key in ("optimizer", "scheduler"):
        if key in cfg:
            raise ValueError(f"DeepSpeed config must not define '{key}': the training script builds torch ones "
                             "(no JIT-built fused optimizers, schedule saved with the checkpoint)")
    cfg["train_micro_batch_size_per_gpu"] = micro_batch_size
    cfg["gradient_accumulation_steps"] = grad_accum_steps
    cfg["train_batch_size"] = micro_batch_size * grad_accum_steps * world_size
    cfg["gradient_clipping"] = float(grad_clip)
    cfg["bf16"] = {**cfg.get("bf16", {}), "enabled": precision == "bf16"}
    cfg.setdefault("fp16", {})["enabled"] = False
    zero = cfg.setdefault("zero_optimization", {})
    if not isinstance(zero, dict):
        raise ValueError(f"zero_optimization must be a JSON object, got {zero!r}")
    if zero_stage is not None:
        zero["stage"] = zero_stage
    zero.setdefault("stage", 0)
    stage = zero["stage"]
    if isinstance(stage, bool) or stage not in (0, 1, 2, 3):  # "2" (a string) fails later inside DeepSpeed
        raise ValueError(f"ZeRO stage must be the number 0, 1, 2 or 3, got {stage!r}")
    cfg["zero_allow_untested_optimizer"] = True  # torch optimizers are passed in
    cfg.setdefault("steps_per_print", 10**9)  # progress is the script's job
    cfg.setdefault("wall_clock_breakdown", False)
    return cfg


def check_deepspeed_config(cfg: Mapping[str, Any]) -> None:
    """Parse ``cfg`` with DeepSpeed's own schema now, so that a bad key or value is one ``ValueError`` line before
    a run dir is written, not a traceback inside ``deepspeed.initialize``. Needs the process group
    (:func:`init_distributed`)."""
    _disable_jit_ops()
    from deepspeed.runtime.config import DeepSpeedConfig

    try:
        DeepSpeedConfig(json.loads(json.dumps(dict(cfg))))
    except Exception as err:  # pydantic's ValidationError, or whatever DeepSpeed raises for the value
        errors = getattr(err, "errors", None)
        if callable(errors) and errors():
            first = errors()[0]
            where = ".".join(str(part) for part in first.get("loc", ())) or "?"
            raise ValueError(f"invalid DeepSpeed config: {getattr(err, 'title', '')} {where}: "
                             f"{first.get('msg', err)} (got {first.get('input')!r})") from None
        raise ValueError(f"invalid DeepSpeed config: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
                         ) from None


def build_engine(model: torch.nn.Module, optimizer: torch.optim.Optimizer, ds_config: Mapping[str, Any],
                 lr_scheduler: Any = None):
    """``deepspeed.initialize`` around a torch model/optimizer/scheduler; returns the engine.

    The engine steps ``lr_scheduler`` at each optimizer step and saves/loads it with checkpoints.
    """
    _disable_jit_ops()
    import deepspeed

    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=lr_scheduler,
                                           config=dict(ds_config), dist_init_required=False)
    engine.checkpoint_engine = _safe_checkpoint_engine(engine.checkpoint_engine)
    return engine


# --------------------------------------------------------------------------------------------------------------
# Loading DeepSpeed checkpoints without executing code
# --------------------------------------------------------------------------------------------------------------
# DeepSpeed 0.19.8's TorchCheckpointEngine reads `*_model_states.pt` / `*_optim_states.pt` with
# a full unpickler (weights_only off): a pickle planted in a run dir would run as the training user on `--resume auto`.
# Every load of an engine goes through `engine.checkpoint_engine.load`, so replacing that one method closes it.
# The allow-list holds exactly the classes beyond torch's defaults that DeepSpeed's own state pickles, found by
# saving real ZeRO-0..3 checkpoints in fp32 and bf16 and listing `get_unsafe_globals_in_checkpoint` of every file
# (tests/test_checkpoint.py repeats that survey): model states need none; ZeRO-1/2 optimizer states hold the loss
# scaler, the stage enum and the bf16 fragment addresses; ZeRO-3 the first two.
def checkpoint_safe_globals() -> list[Any]:
    """The non-torch classes a DeepSpeed checkpoint of this project may contain (see above)."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, ZeroStageEnum, fragment_address]


def safe_torch_load(path: str | os.PathLike, map_location: Any = None) -> Any:
    """``torch.load(weights_only=True)`` with DeepSpeed's allow-listed classes: tensors, containers and those
    classes come back, anything else (a pickled callable) raises ``pickle.UnpicklingError`` before it runs."""
    with torch.serialization.safe_globals(checkpoint_safe_globals()):
        return torch.load(path, map_location=map_location, weights_only=True)


def unsafe_globals_in(path: str | os.PathLike) -> list[str]:
    """Globals a ``torch.save`` file references beyond the allow-list (a static read of its pickle: no tensor
    data, nothing executed). Raises ``ValueError`` for a file that is not a ``torch.save`` zip archive."""
    with torch.serialization.safe_globals(checkpoint_safe_globals()):
        return torch.serialization.get_unsafe_globals_in_checkpoint(str(path))


def _safe_checkpoint_engine(current: Any) -> Any:
    """A TorchCheckpointEngine whose ``load`` is :func:`safe_torch_load` (saving is unchanged)."""
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    if type(current) is not TorchCheckpointEngine:  # another engine reads files its own way: do not guess
        raise ValueError(f"unsupported DeepSpeed checkpoint engine {type(current).__name__}: remove the "
                         "'checkpoint' writer / datastates options from the DeepSpeed config")

    def load(path: str, map_location: Any = None) -> Any:
        return safe_torch_load(path, map_location=map_location)

    current.load = load
    current.loads_safely = True  # checked by CheckpointManager.load
    return current


def zero_stage(engine) -> int:
    return int(engine.zero_optimization_stage()) if hasattr(engine, "zero_optimization_stage") else 0


@contextlib.contextmanager
def gathered_parameters(module: torch.nn.Module, stage: int, modifier_rank: int | None = None) -> Iterator[None]:
    """Full parameters inside the block. Under ZeRO-3 they are partitioned and must be gathered on every rank
    (a collective); ``modifier_rank`` writes that rank's in-place changes back to the partitions."""
    if stage == 3:
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=modifier_rank):
            yield
    else:
        yield


def shutdown(*engines: Any) -> None:
    """Clean exit: barrier, free engines, destroy the process group (ZeRO-3 otherwise may abort at exit)."""
    if not is_initialized():
        return
    barrier()
    for engine in engines:
        if engine is not None and hasattr(engine, "destroy"):
            engine.destroy()
    import deepspeed.comm

    deepspeed.comm.destroy_process_group()


# --------------------------------------------------------------------------------------------------------------
# Preemption
# --------------------------------------------------------------------------------------------------------------
class PreemptionHandler:
    """Turns SIGTERM / SIGUSR1 (what SLURM sends before preemption) into a flag the training loop polls between
    steps; the loop then saves a checkpoint and exits with ``EXIT_CODE_PREEMPTED``.

    ``should_stop()`` is a collective (max over ranks) so that every rank stops after the same step, even when
    only one of them received the signal.
    """

    def __init__(self, signals: Sequence[int] = (signal.SIGTERM, signal.SIGUSR1)):
        self.signals = tuple(signals)
        self.received: int | None = None
        self._previous: dict[int, Any] = {}

    def install(self) -> "PreemptionHandler":
        for sig in self.signals:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame: Any) -> None:
        self.received = signum

    def should_stop(self) -> bool:
        return all_reduce_max(1.0 if self.received is not None else 0.0) > 0.0


def rank_zero_logger(name: str, rank: int, log_file: str | os.PathLike | None = None,
                     level: int = logging.INFO) -> logging.Logger:
    """A logger that prints on rank 0 (other ranks print warnings only) and, with ``log_file``, writes every
    message of this rank to that file (``RUN_DIR/logs/rank<r>.log``)."""
    log = logging.getLogger(name)
    for handler in list(log.handlers):
        log.removeHandler(handler)
        handler.close()
    log.propagate = False
    log.setLevel(level)
    fmt = logging.Formatter(f"%(asctime)s [rank {rank}] %(levelname)s %(message)s", "%H:%M:%S")
    stream = logging.StreamHandler()
    stream.setFormatter(fmt)
    stream.setLevel(level if rank == 0 else logging.WARNING)
    log.addHandler(stream)
    if log_file is not None:
        Path(log_file).parent.mkdir(parents=True, exist_ok=True)
        file_handler = logging.FileHandler(log_file)
        file_handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        file_handler.setLevel(level)
        log.addHandler(file_handler)
    return log
