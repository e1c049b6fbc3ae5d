"""magvit.tracking: TensorBoard events hold the scalars, image grids and GIF videos; W&B offline writes a run folder
with the media and no server or key; a missing wandb package or missing online credentials are one UsageError on
every rank; an unreachable W&B server logs the run offline at once; ranks other than 0 write nothing."""

from __future__ import annotations

import dataclasses
import io
import logging
import socket
import sys
import time
import types

import numpy as np
import pytest
import torch
from PIL import Image

from magvit.cli import UsageError
from magvit.config import ConfigError
from magvit.tracking import (RUN_ID_FILE, WANDB_CONNECT_TIMEOUT_S, WANDB_INIT_TIMEOUT_S, Tracker, TrackingConfig,
                             check_backends, has_wandb_credentials, start_wandb, tile_videos, wandb_server_problem)


def constant_videos(values: list[float], frames: int = 4, height: int = 8, width: int = 10) -> torch.Tensor:
    """(B, 3, T, H, W): frame t of video b is one grey level, values[b] darkened by 0.1 * t (in [-1, 1]; the GIF
    writer merges identical frames, so every frame differs)."""
    levels = torch.tensor(values).view(-1, 1) - 0.1 * torch.arange(frames)  # (B, T)
    return levels.view(-1, 1, frames, 1, 1).expand(-1, 3, frames, height, width).clamp(-1, 1).contiguous()


def read_events(log_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(log_dir), size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    return events


def decode(data: bytes) -> list[np.ndarray]:
    """Every frame of a PNG or GIF as RGB uint8 (H, W, 3)."""
    image = Image.open(io.BytesIO(data))
    frames = []
    for index in range(getattr(image, "n_frames", 1)):
        image.seek(index)
        frames.append(np.asarray(image.convert("RGB")))
    return frames


@pytest.fixture
def wandb_env(tmp_path, monkeypatch):
    """wandb's own folders in tmp_path; no key, mode or run id from the environment."""
    for name in ("CONFIG_DIR", "CACHE_DIR", "DATA_DIR", "ARTIFACT_DIR"):
        monkeypatch.setenv(f"WANDB_{name}", str(tmp_path / f"wandb-{name.lower()}"))
    for name in ("API_KEY", "IDENTITY_TOKEN_FILE", "MODE", "DIR", "RUN_ID", "RESUME", "PROJECT", "BASE_URL"):
        monkeypatch.delenv(f"WANDB_{name}", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))


@pytest.fixture
def stub_wandb(monkeypatch):
    """An importable ``wandb`` that fails if anything of it is used."""
    monkeypatch.setitem(sys.modules, "wandb", types.ModuleType("wandb"))


def test_config_is_validated_and_extends_into_a_logging_config():
    with pytest.raises(ValueError, match="wandb_mode"):
        TrackingConfig(wandb_mode="cloud")
    with pytest.raises(ValueError, match="wandb_project"):
        TrackingConfig(wandb=True, wandb_project=" ")
    with pytest.raises(ConfigError, match="wandb_mode"):
        TrackingConfig.from_dict({"wandb_mode": "cloud"})
    with pytest.raises(ConfigError, match="unknown config key 'wandb_projekt'"):
        TrackingConfig.from_dict({"wandb_projekt": "x"})
    assert not TrackingConfig(wandb=True, wandb_mode="disabled").uses_wandb

    @dataclasses.dataclass
    class LoggingConfig(TrackingConfig):  # how a run's logging section takes these fields
        log_every: int = 10

    cfg = LoggingConfig.from_dict({"log_every": 5, "wandb": True}).with_overrides(["wandb_mode=online"])
    assert (cfg.log_every, cfg.wandb, cfg.wandb_mode, cfg.tensorboard) == (5, True, "online", True)


def test_tile_videos_grid():
    grid = tile_videos(constant_videos([-1.0, 0.0, 1.0]))  # 3 clips: 2 columns, 2 rows, 2 px white gaps
    assert grid.shape == (4, 18, 22, 3) and grid.dtype == np.uint8
    assert (grid[:, :8, :10] == 0).all() and (grid[0, :8, 12:] == 128).all() and (grid[3, :8, 12:] == 89).all()
    assert (grid[0, 10:, :10] == 255).all() and (grid[3, 10:, :10] == 217).all()
    assert (grid[:, 8:10] == 255).all() and (grid[:, 10:, 12:] == 255).all()  # gap row; the empty fourth cell
    with pytest.raises(ValueError, match="B, 3, T, H, W"):
        tile_videos(torch.zeros(3, 4, 8, 10))


def test_tensorboard_events_hold_scalars_images_and_videos(tmp_path):
    tracker = Tracker(TrackingConfig(), tmp_path, is_main=True)
    tracker.log_scalars(1, {"loss": 0.5, "broken": float("nan")})
    tracker.log_scalars(2, {"loss": 0.25})
    images = torch.randint(0, 256, (9, 3, 4, 5), dtype=torch.uint8)
    tracker.log_images(2, "val/images", images)
    tracker.log_images(2, "val/float_images", torch.zeros(2, 3, 4, 5))
    tracker.log_video(2, "val/video", constant_videos([-1.0, 0.0, 1.0]), fps=4.0)
    with pytest.raises(ValueError, match="N, 3, H, W"):
        tracker.log_images(2, "bad", images.permute(0, 2, 3, 1))
    tracker.close()

    events = read_events(tmp_path / "tb")
    assert [(e.step, e.value) for e in events.Scalars("loss")] == [(1, 0.5), (2, 0.25)]
    assert "broken" not in events.Tags()["scalars"]  # non-finite values are skipped
    assert set(events.Tags()["images"]) == {"val/images", "val/float_images", "val/video"}

    grid = events.Images("val/images")[0]  # 9 images, 8 per row: 2 rows
    assert (grid.step, grid.width, grid.height) == (2, 8 * 5, 2 * 4)
    (pixels,) = decode(grid.encoded_image_string)
    assert np.array_equal(pixels[:4, :5], images[0].permute(1, 2, 0).numpy())
    (grey,) = decode(events.Images("val/float_images")[0].encoded_image_string)
    assert (grey == 128).all()  # 0.0 in [-1, 1] -> 128

    video = events.Images("val/video")[0]
    assert (video.step, video.width, video.height) == (2, 22, 18)
    frames = decode(video.encoded_image_string)
    assert len(frames) == 4 and Image.open(io.BytesIO(video.encoded_image_string)).format == "GIF"
    expected = tile_videos(constant_videos([-1.0, 0.0, 1.0]))  # (T, H', W', 3)
    assert all(np.abs(f.astype(int) - e).max() <= 2 for f, e in zip(frames, expected))


def wandb_runs(run_dir) -> list:
    return sorted((run_dir / "wandb").glob("offline-run-*"))


def test_wandb_offline_writes_the_run_with_its_media_and_resumes_it(tmp_path, wandb_env):
    pytest.importorskip("wandb")
    run_dir = tmp_path / "run"
    config = TrackingConfig(tensorboard=False, wandb=True, wandb_mode="offline")
    tracker = Tracker(config, run_dir, is_main=True, run_config={"model": {"preset": "tiny"}}, job_type="tokenizer")
    tracker.log_scalars(1, {"loss": 0.5})
    tracker.log_images(1, "val/images", torch.linspace(-1, 1, 3).view(3, 1, 1, 1).expand(3, 3, 4, 5))  # 3 distinct
    tracker.log_video(1, "val/video", constant_videos([0.0, 1.0]), fps=8.0)
    tracker.close()

    run_id = (run_dir / RUN_ID_FILE).read_text().strip()
    (run,) = wandb_runs(run_dir)
    assert run.name.endswith(f"-{run_id}") and (run / f"run-{run_id}.wandb").stat().st_size > 0
    media = run / "files" / "media"
    assert len(list((media / "images").rglob("*.png"))) == 3
    (gif,) = (media / "videos").rglob("*.gif")
    assert len(decode(gif.read_bytes())) == 4
    assert not (run_dir / "tb").exists()

    Tracker(config, run_dir, is_main=True).close()  # a resumed run continues the same W&B run
    assert [r.name.endswith(f"-{run_id}") for r in wandb_runs(run_dir)] == [True, True]


def test_missing_wandb_is_one_usage_error_on_every_rank(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` raises ImportError
    with pytest.raises(UsageError, match=r"^logging.wandb is true but the wandb package is not installed: pip"):
        check_backends(TrackingConfig(wandb=True))
    for is_main in (True, False):
        with pytest.raises(UsageError, match="pip install wandb"):
            Tracker(TrackingConfig(wandb=True), tmp_path / "run", is_main=is_main)
    assert not (tmp_path / "run").exists()
    Tracker(TrackingConfig(tensorboard=False, wandb=True, wandb_mode="disabled"), tmp_path, is_main=True).close()


def test_online_mode_refuses_without_credentials_instead_of_prompting(tmp_path, monkeypatch, wandb_env, stub_wandb):
    with pytest.raises(UsageError, match="wandb login"):
        Tracker(TrackingConfig(wandb=True, wandb_mode="online"), tmp_path / "run", is_main=False)
    (tmp_path / "netrc").write_text("machine api.wandb.ai\n  login user\n  password 0123456789abcdef\n")
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    assert has_wandb_credentials()
    monkeypatch.setenv("WANDB_BASE_URL", "https://wandb.example.org")
    assert not has_wandb_credentials()  # the key is for another host
    monkeypatch.setenv("WANDB_API_KEY", "0123456789abcdef")
    assert has_wandb_credentials()


def test_other_ranks_write_nothing(tmp_path, wandb_env, stub_wandb):
    run_dir = tmp_path / "run"
    tracker = Tracker(TrackingConfig(wandb=True), run_dir, is_main=False)
    tracker.log_scalars(1, {"loss": 0.5})
    tracker.log_images(1, "val/images", torch.zeros(2, 3, 4, 5))
    tracker.log_video(1, "val/video", constant_videos([0.0]), fps=8.0)
    tracker.close()
    assert not run_dir.exists()


# --- online mode without a reachable server: the run logs offline at once, with one warning -----------------------
def test_unreachable_server_logs_the_run_offline_at_once(tmp_path, monkeypatch, wandb_env, caplog):
    """Online mode with a key whose server refuses connections (no network needed: a closed local port) starts in
    seconds, not after wandb's 90 s timeout and a traceback: the run is written offline under its run id."""
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_API_KEY", "0123456789abcdef0123456789abcdef01234567")
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:1")  # nothing listens on port 1
    run_dir = tmp_path / "run"
    start = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="magvit.tracking"):
        tracker = Tracker(TrackingConfig(tensorboard=False, wandb=True, wandb_mode="online"), run_dir, is_main=True)
    elapsed = time.monotonic() - start
    tracker.log_scalars(1, {"loss": 0.5})
    tracker.close()
    run_id = (run_dir / RUN_ID_FILE).read_text().strip()
    (run,) = wandb_runs(run_dir)
    assert run.name.endswith(f"-{run_id}") and elapsed < WANDB_CONNECT_TIMEOUT_S + 20, elapsed
    (warning,) = [r.getMessage() for r in caplog.records if r.name == "magvit.tracking"]
    assert "W&B is unreachable (127.0.0.1:1: ConnectionRefusedError" in warning and "wandb sync" in warning


def test_server_probe_is_bounded_and_goes_through_the_proxy(monkeypatch):
    """A name lookup or connect that hangs costs the probe's timeout, not more; with HTTPS_PROXY the proxy is what
    must answer."""
    calls = []

    def hanging(address, timeout=None):
        calls.append(address)
        time.sleep(30)
        raise TimeoutError("timed out")  # as a connect gives up; the probe has long returned by then

    monkeypatch.setattr(socket, "create_connection", hanging)
    for name in ("HTTPS_PROXY", "https_proxy", "NO_PROXY", "no_proxy", "WANDB_BASE_URL"):
        monkeypatch.delenv(name, raising=False)
    start = time.monotonic()
    assert wandb_server_problem(timeout=0.5) == "api.wandb.ai:443: no connection within 0.5 s"
    assert time.monotonic() - start < 2 and calls == [("api.wandb.ai", 443)]

    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.example:3128")
    monkeypatch.setattr(socket, "create_connection",
                        lambda address, timeout=None: calls.append(address) or io.BytesIO())
    assert wandb_server_problem(timeout=0.5) is None and calls[-1] == ("proxy.example", 3128)


def test_failed_online_start_falls_back_to_offline(tmp_path, monkeypatch, caplog):
    """The server answers a connect but wandb.init fails (a timeout, an error response): the same run id is started
    offline after wandb's service is torn down; any other mode's failure is raised as it is."""
    calls = []

    class FakeWandb(types.ModuleType):
        Settings = dict

        def init(self, mode, **kwargs):
            calls.append((mode, kwargs["id"], kwargs["settings"]["init_timeout"]))
            if mode == "online":
                raise TimeoutError("context deadline exceeded")
            return types.SimpleNamespace(finish=lambda exit_code=0: None)

        def teardown(self):
            calls.append(("teardown",))

    monkeypatch.setattr("magvit.tracking.wandb_server_problem", lambda: None)
    run_dir = tmp_path / "run"
    with caplog.at_level(logging.WARNING, logger="magvit.tracking"):
        start_wandb(FakeWandb("wandb"), TrackingConfig(wandb=True, wandb_mode="online"), run_dir, None, "")
    run_id = (run_dir / RUN_ID_FILE).read_text().strip()
    assert calls == [("online", run_id, WANDB_INIT_TIMEOUT_S), ("teardown",), ("offline", run_id, WANDB_INIT_TIMEOUT_S)]
    assert "wandb.init: TimeoutError: context deadline exceeded" in caplog.text

    class BrokenOffline(FakeWandb):
        def init(self, mode, **kwargs):
            raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        start_wandb(BrokenOffline("wandb"), TrackingConfig(wandb=True, wandb_mode="offline"), run_dir, None, "")


def test_the_offline_fallback_warning_lands_in_the_run_log(tmp_path, monkeypatch):
    """A trainer hands its logger to the tracker: the W&B offline fallback's warning is in logs/rank0.log, not only
    on stderr (a fake wandb: no network, no wandb run)."""
    from magvit import tracking
    from magvit.distributed import rank_zero_logger

    modes = []
    fake = types.SimpleNamespace(init=lambda **kw: modes.append(kw["mode"]) or types.SimpleNamespace(),
                                 Settings=lambda **kw: kw, teardown=lambda: None)
    monkeypatch.setattr(tracking, "check_backends", lambda config: fake)
    monkeypatch.setattr(tracking, "wandb_server_problem", lambda: "api.example:443: ConnectionRefusedError")
    run_dir = tmp_path / "run"
    log = rank_zero_logger("magvit.test_tracking_log", 0, run_dir / "logs" / "rank0.log")
    Tracker(TrackingConfig(tensorboard=False, wandb=True, wandb_mode="online"), run_dir, is_main=True, log=log)
    for handler in log.handlers:
        handler.flush()
    assert modes == ["offline"]
    text = (run_dir / "logs" / "rank0.log").read_text()
    assert "W&B is unreachable (api.example:443: ConnectionRefusedError)" in text and "wandb sync" in text
