"""Experiment tracking of a training run: scalars, sample images and sample videos to TensorBoard (``RUN_DIR/tb``)
and, optionally, Weights & Biases.

Only the main process (rank 0) writes. Every rank checks the options (:func:`check_backends`, which the
:class:`Tracker` calls too), so a missing ``wandb`` package or missing credentials stop all ranks alike, before the
first step. A W&B server that cannot be reached does not stop the run: it logs to W&B offline (:func:`start_wandb`).

Videos reach TensorBoard as ``SummaryWriter.add_video`` would write them (an image summary holding an animated
GIF), but encoded by :func:`magvit.video_io.write_video`: ``add_video`` needs moviepy and, without it, prints a line
and writes an empty summary.
"""

from __future__ import annotations

import dataclasses
import io
import logging
import math
import netrc
import os
import secrets
import socket
import tempfile
import threading
import urllib.request
from pathlib import Path
from typing import Any, Literal, Mapping
from urllib.parse import urlparse

import numpy as np
import torch

from .cli import UsageError
from .config import Config
from .fileio import write_text_atomic
from .video_io import to_uint8, write_video

WandbMode = Literal["online", "offline", "disabled"]
WANDB_MODES = ("online", "offline", "disabled")
#: the run's Weights & Biases id, so a resumed run (``--resume auto``, a requeued job) logs into the same W&B run
RUN_ID_FILE = "wandb_run_id"
INSTALL_WANDB = "pip install wandb (or pip install 'magvit[wandb]')"
#: Online mode: how long start-up waits for the W&B server to accept a connection, then for ``wandb.init``
#: (wandb's own default waits 90 s and then raises). Either failing logs the run offline instead (:func:`start_wandb`).
WANDB_CONNECT_TIMEOUT_S = 5.0
WANDB_INIT_TIMEOUT_S = 30.0

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class TrackingConfig(Config):
    """Where a run's scalars and samples go. A run's ``LoggingConfig`` extends it (``logging.wandb=true``)."""

    tensorboard: bool = True  # scalars, images and videos to RUN_DIR/tb
    wandb: bool = False  # also to Weights & Biases (needs the wandb package)
    wandb_project: str = "magvit"
    # offline: no server, no API key; the run lands in WANDB_DIR/wandb/offline-run-*, `wandb sync` uploads it later.
    # online: needs `wandb login` or WANDB_API_KEY beforehand (never asked for); a server it cannot reach logs the run
    # offline instead, with one warning (start_wandb). disabled: as wandb: false.
    wandb_mode: WandbMode = "offline"
    wandb_dir: str = ""  # the folder wandb writes its wandb/ folder into; empty: the run dir
    wandb_entity: str = ""  # W&B team or user (online); empty: the API key's default entity
    wandb_name: str = ""  # the run's display name; empty: the run dir's name

    def __post_init__(self):
        if self.wandb_mode not in WANDB_MODES:
            raise ValueError(f"wandb_mode must be one of {list(WANDB_MODES)}, got {self.wandb_mode!r}")
        if self.wandb and not self.wandb_project.strip():
            raise ValueError("wandb: true needs a wandb_project")

    @property
    def uses_wandb(self) -> bool:
        return self.wandb and self.wandb_mode != "disabled"


# --------------------------------------------------------------------------------------------------------------
# Media layouts
# --------------------------------------------------------------------------------------------------------------
def images_to_uint8(images: torch.Tensor) -> np.ndarray:
    """``(N, 3, H, W)`` float in [-1, 1] or uint8 -> uint8 ``(N, H, W, 3)``."""
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"expected images (N, 3, H, W), got shape {tuple(images.shape)}")
    if images.dtype == torch.uint8:
        return images.permute(0, 2, 3, 1).contiguous().cpu().numpy()
    return to_uint8(images.transpose(0, 1)).numpy()  # to_uint8 reads (3, T, H, W): the N images as T frames


def tile_videos(video: torch.Tensor, pad: int = 2) -> np.ndarray:
    """``(B, 3, T, H, W)`` float in [-1, 1] -> uint8 ``(T, H', W', 3)``: the B videos on a grid of ceil(sqrt(B))
    columns, row by row, ``pad`` white pixels between cells."""
    if video.dim() != 5 or video.shape[1] != 3 or not video.is_floating_point():
        raise ValueError(f"expected a float video batch (B, 3, T, H, W), got {video.dtype} {tuple(video.shape)}")
    frames = to_uint8(video).numpy()  # (B, T, H, W, 3)
    b, t, h, w, _ = frames.shape
    cols = math.ceil(math.sqrt(b))
    rows = math.ceil(b / cols)
    grid = np.full((t, rows * (h + pad) - pad, cols * (w + pad) - pad, 3), 255, np.uint8)
    for i in range(b):
        top, left = (i // cols) * (h + pad), (i % cols) * (w + pad)
        grid[:, top:top + h, left:left + w] = frames[i]
    return grid


def gif_bytes(frames: np.ndarray, fps: float) -> bytes:
    """uint8 ``(T, H, W, 3)`` -> a looping animated GIF, encoded by the project's one video writer."""
    with tempfile.TemporaryDirectory() as tmp:
        return write_video(Path(tmp) / "video.gif", frames, fps=fps).read_bytes()


# --------------------------------------------------------------------------------------------------------------
# Weights & Biases start-up
# --------------------------------------------------------------------------------------------------------------
def import_wandb():
    """The ``wandb`` module, or a one-line ``UsageError`` saying how to install it."""
    try:
        import wandb
    except ImportError:
        raise UsageError(f"logging.wandb is true but the wandb package is not installed: {INSTALL_WANDB}; "
                         "or set logging.wandb=false") from None
    return wandb


def has_wandb_credentials() -> bool:
    """Whether online mode finds credentials without asking: ``WANDB_API_KEY``, an identity token file, or the
    W&B host's entry in the netrc file that ``wandb login`` writes (``NETRC``, else ``~/.netrc``)."""
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL") or "https://api.wandb.ai").hostname
    try:
        return netrc.netrc(os.environ.get("NETRC") or None).authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


def check_backends(config: TrackingConfig):
    """The ``wandb`` module when ``config`` uses W&B, else ``None``; a ``UsageError`` when it cannot start (the
    package is missing, or online mode has no credentials). Cheap and writes nothing: call it on every rank before
    the run dir is written, so a refused run leaves no trace; :class:`Tracker` calls it too."""
    if not config.uses_wandb:
        return None
    wandb = import_wandb()
    if config.wandb_mode == "online" and not has_wandb_credentials():
        raise UsageError("logging.wandb_mode=online needs W&B credentials: run `wandb login` or export "
                         "WANDB_API_KEY; or use logging.wandb_mode=offline and `wandb sync` the run later")
    return wandb


def wandb_server_problem(timeout: float = WANDB_CONNECT_TIMEOUT_S) -> str | None:
    """Why the W&B server (``WANDB_BASE_URL``, default https://api.wandb.ai; its proxy when ``HTTPS_PROXY`` /
    ``HTTP_PROXY`` name one) does not accept a TCP connection within ``timeout`` seconds; None when it does. The
    name lookup and the connect run in a daemon thread: a resolver that hangs holds start-up ``timeout`` s at most."""
    url = urlparse(os.environ.get("WANDB_BASE_URL") or "https://api.wandb.ai")
    proxy = urllib.request.getproxies().get(url.scheme)
    if proxy and not urllib.request.proxy_bypass(url.hostname or ""):
        url = urlparse(proxy if "://" in proxy else f"http://{proxy}")
    host, port = url.hostname or "", url.port or (443 if url.scheme == "https" else 80)
    outcome: list[str | None] = []

    def connect() -> None:
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            outcome.append(None)
        except OSError as err:
            outcome.append(f"{host}:{port}: {type(err).__name__}: {err}")

    thread = threading.Thread(target=connect, name="wandb-probe", daemon=True)
    thread.start()
    thread.join(timeout)
    return outcome[0] if outcome else f"{host}:{port}: no connection within {timeout:g} s"


def start_wandb(wandb, config: TrackingConfig, run_dir: Path, run_config: Mapping[str, Any] | None,
                job_type: str, log: logging.Logger | None = None):
    """``wandb.init`` for this run dir: the id in ``RUN_DIR/wandb_run_id`` is reused (``resume="allow"``) so a
    resumed run continues its W&B run; wandb's console capture is off (the run's logs/ already hold the output).

    Online mode whose server cannot be reached (:func:`wandb_server_problem`) or whose ``wandb.init`` fails within
    ``WANDB_INIT_TIMEOUT_S`` logs the run offline, with one warning: training is not held up or stopped by its
    tracker (wandb alone waits 90 s, then raises), nothing is lost (metrics.jsonl and tb/ as always, the offline
    run in ``WANDB_DIR/wandb/offline-run-*`` under the same run id for ``wandb sync``). The warning goes to ``log``
    (a trainer's: stderr and ``logs/rank0.log``), else this module's logger."""
    directory = Path(config.wandb_dir or run_dir)
    directory.mkdir(parents=True, exist_ok=True)
    id_file = run_dir / RUN_ID_FILE
    run_id = id_file.read_text().strip() if id_file.is_file() else secrets.token_hex(8)

    def init(mode: str):
        return wandb.init(project=config.wandb_project, entity=config.wandb_entity or None,
                          name=config.wandb_name or run_dir.resolve().name, dir=str(directory), mode=mode, id=run_id,
                          resume="allow", job_type=job_type or None, config=dict(run_config or {}),
                          settings=wandb.Settings(silent=True, console="off", init_timeout=WANDB_INIT_TIMEOUT_S))

    mode, problem = config.wandb_mode, None
    if mode == "online":
        problem = wandb_server_problem()
    try:
        run = init("offline" if problem else mode)
    except Exception as err:  # online: wandb's CommError, an auth or a timeout error; any other mode: a real error
        if mode != "online" or problem:
            raise
        problem = f"wandb.init: {type(err).__name__}: {' '.join(str(err).split())[:200]}"
        wandb.teardown()  # the failed online start still holds the run id in wandb's service process
        run = init("offline")
    if problem:
        (log or logger).warning("W&B is unreachable (%s): this run logs to W&B offline in %s (upload it later with "
                                "`wandb sync %s`); metrics.jsonl and tb/ are unaffected", problem, directory / "wandb",
                                directory / "wandb" / f"offline-run-*-{run_id}")
    write_text_atomic(id_file, run_id + "\n")
    return run


# --------------------------------------------------------------------------------------------------------------
# Tracker
# --------------------------------------------------------------------------------------------------------------
class Tracker:
    """Scalars, images and videos of a run to TensorBoard and/or Weights & Biases, as ``config`` enables them.

    ``is_main``: this process writes (rank 0); elsewhere every call is a no-op, after the same start-up checks.
    ``run_config``: the resolved run config, recorded as the W&B run's config. ``job_type``: e.g. ``"tokenizer"``.
    ``log``: where its warnings go (a trainer's logger, so they land in the run's logs too).
    """

    def __init__(self, config: TrackingConfig, run_dir: str | os.PathLike, is_main: bool,
                 run_config: Mapping[str, Any] | None = None, job_type: str = "", log: logging.Logger | None = None):
        wandb = check_backends(config)  # on every rank: all refuse alike
        self.enabled = is_main
        self._tb = None
        self._wandb = None
        self._wandb_run = None
        if not is_main:
            return
        run_dir = Path(run_dir)
        if config.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(run_dir / "tb"))
        if wandb is not None:
            self._wandb = wandb
            self._wandb_run = start_wandb(wandb, config, run_dir, run_config, job_type, log)

    def log_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
        """One value per key; TensorBoard skips NaN / inf (W&B shows them)."""
        if not self.enabled:
            return
        values = {key: float(value) for key, value in scalars.items()}
        if self._tb is not None:
            for key, value in values.items():
                if math.isfinite(value):
                    self._tb.add_scalar(key, value, step)
        if self._wandb_run is not None:
            self._wandb_run.log(values, step=int(step))

    def log_images(self, step: int, tag: str, images: torch.Tensor) -> None:
        """``images``: ``(N, 3, H, W)`` float in [-1, 1] or uint8. TensorBoard: one grid (8 per row); W&B: a
        gallery of N images."""
        if not self.enabled:
            return
        pixels = images_to_uint8(images)  # (N, H, W, 3)
        if self._tb is not None:
            self._tb.add_images(tag, pixels, step, dataformats="NHWC")
            self._tb.flush()
        if self._wandb_run is not None:
            self._wandb_run.log({tag: [self._wandb.Image(image) for image in pixels]}, step=int(step))

    def log_video(self, step: int, tag: str, video: torch.Tensor, fps: float) -> None:
        """``video``: ``(B, 3, T, H, W)`` float in [-1, 1]; the B clips play side by side (:func:`tile_videos`)
        as one looping GIF at ``fps``."""
        if not self.enabled:
            return
        frames = tile_videos(video)  # (T, H', W', 3)
        data = gif_bytes(frames, fps)
        if self._tb is not None:
            from tensorboard.compat.proto.summary_pb2 import Summary

            t, h, w, c = frames.shape
            image = Summary.Image(height=h, width=w, colorspace=c, encoded_image_string=data)
            self._tb.file_writer.add_summary(Summary(value=[Summary.Value(tag=tag, image=image)]), step)
            self._tb.flush()
        if self._wandb_run is not None:
            self._wandb_run.log({tag: self._wandb.Video(io.BytesIO(data), format="gif")}, step=int(step))

    def close(self, exit_code: int = 0) -> None:
        """Flush and close; ``exit_code`` != 0 marks the W&B run failed (3: preempted, to be resumed)."""
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self._wandb_run is not None:
            self._wandb_run.finish(exit_code=exit_code)
            self._wandb_run = None
