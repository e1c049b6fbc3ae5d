"""The installed package: the wheel built from a copy of the checkout, installed (not editable) into a fresh virtual
environment outside it, used from another directory: only ``magvit`` is installed, with its configs and SLURM
templates, every console command answers ``--help`` under its own name, and a tiny generation runs.

No network: the new environment sees the test environment's site-packages through a ``.pth`` line (dependencies
only; the checkout is never on its path) and the wheel is installed with ``--no-deps --no-index``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import textwrap
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
COMMANDS = sorted(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"])
# Left out of the copy that is built: the environment, outputs and caches (top level), bytecode (anywhere).
_NOT_COPIED = {".git", ".venv", ".venv-bench", "runs", "data", "build", "dist", ".pytest_cache"}

pytestmark = pytest.mark.slow


def _ignore(directory: str, names: list[str]) -> set[str]:
    top = Path(directory) == ROOT
    return {n for n in names if n == "__pycache__" or n.endswith(".egg-info") or (top and n in _NOT_COPIED)}


def _run(args: list[str | Path], cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP")}
    return subprocess.run([str(a) for a in args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """The ``bin`` folder of a fresh virtual environment holding the built wheel."""
    tmp = tmp_path_factory.mktemp("packaging")
    source = tmp / "checkout"
    shutil.copytree(ROOT, source, symlinks=True, ignore=_ignore)
    proc = _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q",
                 "-w", tmp / "dist", source], cwd=tmp)
    assert proc.returncode == 0, proc.stderr[-3000:]
    wheel, = (tmp / "dist").glob("magvit-*.whl")
    venv = tmp / "venv"
    proc = _run([sys.executable, "-m", "venv", "--without-pip", venv], cwd=tmp)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # This pip installs into the new environment (--python), before the dependencies are visible there: it never
    # sees the test environment's (editable) magvit.
    proc = _run([sys.executable, "-m", "pip", "--python", venv / "bin" / "python", "install", "--no-deps",
                 "--no-index", "-q", wheel], cwd=tmp)
    assert proc.returncode == 0, proc.stderr[-3000:]
    purelib = _run([venv / "bin" / "python", "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                   cwd=tmp).stdout.strip()
    (Path(purelib) / "test_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return venv / "bin"


@pytest.fixture
def elsewhere(tmp_path) -> Path:
    """A working directory outside the checkout."""
    (tmp_path / "work").mkdir()
    return tmp_path / "work"


def test_only_magvit_is_installed_with_configs_and_slurm_templates(installed, elsewhere):
    script = textwrap.dedent("""
        import importlib.metadata, importlib.util, json, sys
        import magvit, magvit.resources as r
        print(json.dumps({
            "magvit": magvit.__file__,
            "shims": [name for name in ("data_prep", "launch") if importlib.util.find_spec(name)],
            "configs": sorted(str(p.relative_to(r.CONFIG_DIR)) for p in r.CONFIG_DIR.rglob("*") if p.is_file()),
            "slurm": sorted(p.name for p in r.SLURM_DIR.iterdir()),
            "found": str(r.find_config("configs/tokenizer/tiny.yaml")),
            "license": "Apache License" in importlib.metadata.distribution("magvit").read_text("licenses/LICENSE"),
            "path": sys.path,
        }))
    """)
    proc = _run([installed / "python", "-c", script], cwd=elsewhere)
    assert proc.returncode == 0, proc.stderr[-3000:]
    info = json.loads(proc.stdout)
    venv = installed.parent
    assert Path(info["magvit"]).is_relative_to(venv), info["magvit"]
    assert info["shims"] == [] and not any(str(ROOT) == p.rstrip("/") for p in info["path"])
    configs = ROOT / "magvit" / "configs"
    checkout = sorted(str(p.relative_to(configs)) for p in configs.rglob("*") if p.suffix in (".yaml", ".json"))
    assert info["configs"] == checkout and len(checkout) >= 10
    assert info["slurm"] == ["autoregressive.sbatch", "tokenizer.sbatch", "train_job.sh", "transformer.sbatch"]
    assert Path(info["found"]).is_relative_to(venv) and Path(info["found"]).is_file()
    assert info["license"]


def test_every_console_command_answers_help_under_its_own_name(installed, elsewhere):
    # every command of the package, the data steps and trainers included, is declared (and so tested below)
    assert {"magvit-generate", "magvit-evaluate", "magvit-submit", "magvit-train-tokenizer",
            "magvit-train-transformer", "magvit-train-autoregressive", "magvit-index", "magvit-sample-data",
            "magvit-moving-mnist", "magvit-sketch", "magvit-extract", "magvit-tokenize"} == set(COMMANDS)
    # One interpreter runs every installed script as its own __main__ (torch and deepspeed are imported once, not
    # twelve times): sys.argv[0] is the script, and magvit is imported afresh for each, so each names itself.
    script = textwrap.dedent("""
        import contextlib, io, json, runpy, sys
        out, *paths = sys.argv[1:]
        answers = {}
        for path in paths:
            for name in [m for m in sys.modules if m == "magvit" or m.startswith("magvit.")]:
                del sys.modules[name]
            sys.argv = [path, "--help"]
            stdout, stderr, status = io.StringIO(), io.StringIO(), None
            with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
                try:
                    runpy.run_path(path, run_name="__main__")
                except SystemExit as exit_:
                    status = exit_.code
            answers[path] = [status, stdout.getvalue(), stderr.getvalue()]
        with open(out, "w") as f:
            json.dump(answers, f)
    """)
    out = elsewhere / "answers.json"
    proc = _run([installed / "python", "-c", script, out, *(installed / c for c in COMMANDS)], cwd=elsewhere)
    assert proc.returncode == 0, proc.stderr[-3000:]
    answers = json.loads(out.read_text())
    for command in COMMANDS:
        status, stdout, stderr = answers[str(installed / command)]
        assert status in (0, None), f"{command}: {stderr[-2000:]}"
        assert stdout.startswith(f"usage: {command} "), f"{command}: {stdout[:200]}"
    # A user error names the installed command too: one line, status 2.
    proc = _run([installed / "magvit-index", str(elsewhere / "missing"), "--out", str(elsewhere / "m.jsonl")],
                cwd=elsewhere)
    assert proc.returncode == 2 and proc.stderr.startswith("magvit-index: ") and proc.stderr.count("\n") == 1, \
        proc.stderr


def test_submit_dry_run_uses_the_installed_templates(installed, elsewhere):
    proc = _run([installed / "magvit-submit", "tokenizer", "--gpus-per-node", "0", "--dry-run"], cwd=elsewhere)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    slurm_dir = Path(next(line for line in lines if line.startswith("export MAGVIT_SLURM_DIR=")).partition("=")[2])
    assert slurm_dir.is_relative_to(installed.parent) and (slurm_dir / "train_job.sh").is_file()
    assert f"export MAGVIT_WORKDIR={elsewhere}" in lines and "TRAIN_MODULE=magvit.launch.train_tokenizer" in lines
    assert f"export MAGVIT_PYTHON={installed / 'python'}" in lines


def test_tiny_generation_from_a_packaged_config(installed, elsewhere):
    """Random tiny models, the tokenizer's preset and clip size from the packaged ``configs/tokenizer/tiny.yaml``,
    saved with ``save_pretrained``; ``magvit-generate`` predicts a clip from an image with them."""
    script = textwrap.dedent("""
        import torch, yaml
        from magvit import MaskedVideoTransformer, TokenizerConfig, TransformerConfig, VideoTokenizer
        from magvit.resources import find_config
        from magvit.video_io import write_image

        torch.manual_seed(0)
        recipe = yaml.safe_load(find_config("configs/tokenizer/tiny.yaml").read_text())
        model = TokenizerConfig.preset(recipe["model"]["preset"], num_frames=recipe["data"]["num_frames"],
                                       image_size=recipe["data"]["image_size"])
        VideoTokenizer(model).save_pretrained("tokenizer")
        MaskedVideoTransformer(TransformerConfig.preset("tiny")).save_pretrained("transformer")
        write_image("frame.png", torch.rand(3, model.image_size, model.image_size) * 2 - 1)
    """)
    proc = _run([installed / "python", "-c", script], cwd=elsewhere)
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = _run([installed / "magvit-generate", "--tokenizer", "tokenizer", "--transformer", "transformer",
                 "--cond", "frame.png", "--steps", "2", "--out", "generated.mp4", "--device", "cpu"], cwd=elsewhere)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "generated 1 video(s)" in proc.stdout and (elsewhere / "generated.mp4").stat().st_size > 0


def test_setup_py_defers_everything_to_pyproject(tmp_path):
    """The top-level ``setup.py`` is a shim: ``setup()`` with no arguments, so the metadata lives in pyproject.toml
    alone (name and version come from there)."""
    import ast

    calls = [node for node in ast.walk(ast.parse((ROOT / "setup.py").read_text())) if isinstance(node, ast.Call)]
    assert [(ast.unparse(c.func), c.args, c.keywords) for c in calls] == [("setup", [], [])]
    name = subprocess.run([sys.executable, "setup.py", "--name"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert name.returncode == 0 and name.stdout.split()[-1] == "magvit", name.stderr
