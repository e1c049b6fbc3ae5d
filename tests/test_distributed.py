"""Rank/world discovery from torchrun, deepspeed-launcher and SLURM variables; DeepSpeed config filling; signals."""

from __future__ import annotations

import os
import signal

import pytest
import torch

from magvit import distributed as dist


def test_torchrun_env_wins_over_slurm():
    env = {"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "MASTER_ADDR": "n7", "MASTER_PORT": "1234",
           "SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_JOB_NODELIST": "x[1-2]"}
    got = dist.read_dist_env(env)
    assert got == dist.DistEnv(rank=3, world_size=8, local_rank=1, master_addr="n7", master_port=1234,
                               source="torchrun")
    assert not got.is_main


def test_slurm_env_compressed_nodelist_and_port_from_job_id():
    env = {"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1", "SLURM_JOB_NODELIST": "node[01-04,07]",
           "SLURM_JOB_ID": "123456"}
    got = dist.read_dist_env(env)
    assert (got.rank, got.world_size, got.local_rank, got.master_addr, got.source) == (5, 8, 1, "node01", "slurm")
    assert got.master_port == 15000 + 123456 % 20000
    # every task of the job derives the same port; an explicit MASTER_PORT wins
    assert dist.read_dist_env({**env, "SLURM_PROCID": "0"}).master_port == got.master_port
    assert dist.read_dist_env({**env, "MASTER_PORT": "4000"}).master_port == 4000


def test_slurm_step_tasks_preferred_over_allocation():
    env = {"SLURM_PROCID": "1", "SLURM_NTASKS": "8", "SLURM_STEP_NUM_TASKS": "2", "SLURM_JOB_NODELIST": "a"}
    assert dist.read_dist_env(env).world_size == 2


def test_single_process_defaults():
    got = dist.read_dist_env({})
    assert (got.rank, got.world_size, got.local_rank, got.source) == (0, 1, 0, "single")


@pytest.mark.parametrize("nodelist, expected", [
    ("node01", ["node01"]),
    ("node[01-04,07]", ["node01", "node02", "node03", "node04", "node07"]),
    ("gpu[9-11],cpu3", ["gpu9", "gpu10", "gpu11", "cpu3"]),
    ("a[1-2]-b[01-02]", ["a1-b01", "a1-b02", "a2-b01", "a2-b02"]),
    ("x[008-010].cluster,y", ["x008.cluster", "x009.cluster", "x010.cluster", "y"]),
])
def test_expand_slurm_nodelist(nodelist, expected):
    assert dist.expand_slurm_nodelist(nodelist) == expected


@pytest.mark.parametrize("bad", ["", "node[01-", "node[3-1]", "node[a-b]"])
def test_expand_slurm_nodelist_rejects_malformed(bad):
    with pytest.raises(ValueError):
        dist.expand_slurm_nodelist(bad)


def test_inconsistent_rank_is_an_error():
    with pytest.raises(ValueError, match="rank 4 of world size 2"):
        dist.read_dist_env({"RANK": "4", "WORLD_SIZE": "2"})
    with pytest.raises(ValueError, match="not an integer"):
        dist.read_dist_env({"SLURM_PROCID": "x"})


def test_make_deepspeed_config_fills_training_values():
    base = {"zero_optimization": {"stage": 2, "overlap_comm": False}}
    cfg = dist.make_deepspeed_config(base, micro_batch_size=3, grad_accum_steps=2, grad_clip=0.5,
                                     precision="bf16", zero_stage=3, world_size=4)
    assert cfg["train_batch_size"] == 24 and cfg["train_micro_batch_size_per_gpu"] == 3
    assert cfg["gradient_accumulation_steps"] == 2 and cfg["gradient_clipping"] == 0.5
    assert cfg["bf16"]["enabled"] is True and cfg["zero_optimization"] == {"stage": 3, "overlap_comm": False}
    assert base["zero_optimization"]["stage"] == 2  # input untouched
    fp32 = dist.make_deepspeed_config(base, micro_batch_size=1, grad_accum_steps=1, grad_clip=1.0,
                                      precision="autocast-bf16")
    assert fp32["bf16"]["enabled"] is False and fp32["zero_optimization"]["stage"] == 2
    with pytest.raises(ValueError, match="must not define 'optimizer'"):
        dist.make_deepspeed_config({"optimizer": {"type": "AdamW"}}, micro_batch_size=1, grad_accum_steps=1,
                                   grad_clip=1.0, precision="fp32")
    with pytest.raises(ValueError, match="ZeRO stage"):
        dist.make_deepspeed_config({}, micro_batch_size=1, grad_accum_steps=1, grad_clip=1.0, precision="fp32",
                                   zero_stage=4)


def test_repo_deepspeed_configs_load():
    root = os.path.join(os.path.dirname(__file__), "..", "configs", "deepspeed")
    stages = {}
    for name in sorted(os.listdir(root)):
        cfg = dist.load_deepspeed_config(os.path.join(root, name))
        stages[name] = cfg["zero_optimization"]["stage"]
    assert stages == {"zero0.json": 0, "zero1.json": 1, "zero2.json": 2, "zero3.json": 3}
    with pytest.raises(ValueError, match="not found"):
        dist.load_deepspeed_config(os.path.join(root, "nope.json"))


def test_preemption_handler_sets_flag_on_sigusr1_and_sigterm():
    for sig in (signal.SIGUSR1, signal.SIGTERM):
        handler = dist.PreemptionHandler().install()
        try:
            assert not handler.should_stop()
            os.kill(os.getpid(), sig)
            assert handler.should_stop() and handler.received == sig
        finally:
            handler.uninstall()
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL


def test_exit_code_contract():
    """The SLURM job script requeues on the status the trainers exit with after a preemption signal: its
    ``EXIT_CODE_PREEMPTED`` is the Python constant (the packaged script and the checkout's link alike)."""
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    for script in (root / "magvit" / "launch" / "slurm" / "train_job.sh", root / "launch" / "slurm" / "train_job.sh"):
        values = re.findall(r"^EXIT_CODE_PREEMPTED=(\d+)", script.read_text(), flags=re.M)
        assert values == [str(dist.EXIT_CODE_PREEMPTED)], (script, values)
        assert '"$STATUS" -eq "$EXIT_CODE_PREEMPTED"' in script.read_text()  # ... and the requeue branch reads it


def test_rank_logger_writes_every_rank_to_its_file_and_prints_rank0_only(tmp_path, capsys):
    for rank in (0, 1):
        log = dist.rank_zero_logger(f"magvit.test.r{rank}", rank, tmp_path / "logs" / f"rank{rank}.log")
        log.info("step %d", 5)
        log.warning("careful")
        for handler in log.handlers:
            handler.flush()
    err = capsys.readouterr().err
    assert "[rank 0] INFO step 5" in err and "[rank 1] INFO" not in err and "[rank 1] WARNING careful" in err
    for rank in (0, 1):
        text = (tmp_path / "logs" / f"rank{rank}.log").read_text()
        assert "INFO step 5" in text and "WARNING careful" in text


def test_single_process_collectives_are_identities():
    assert dist.all_reduce_max(2.5) == 2.5
    assert dist.all_reduce_mean([1.0, 3.0]) == [1.0, 3.0]
    assert dist.all_gather_scalar(7.0) == [7.0]
    assert dist.peak_memory_mb() > 10  # this process's peak RSS
    x = torch.tensor([1.0, -2.0])
    for op in ("sum", "max", "mean"):
        assert dist.all_reduce_tensor_(x, op=op) is x and torch.equal(x, torch.tensor([1.0, -2.0]))
    assert dist.broadcast_tensor_(x, src=0) is x and torch.equal(x, torch.tensor([1.0, -2.0]))
    with pytest.raises(ValueError, match="op must be one of"):
        dist.all_reduce_tensor_(x, op="min")


def test_local_world_size_from_each_launcher():
    assert dist.local_world_size({}) == 1
    assert dist.local_world_size({"LOCAL_WORLD_SIZE": "4"}) == 4  # torchrun
    assert dist.local_world_size({"LOCAL_SIZE": "2"}) == 2  # the deepspeed launcher
    assert dist.local_world_size({"SLURM_TASKS_PER_NODE": "2(x3),1"}) == 2  # this node's entry comes first
    assert dist.local_world_size({"SLURM_NTASKS_PER_NODE": "8"}) == 8
    assert dist.local_world_size({"LOCAL_WORLD_SIZE": "junk", "SLURM_NTASKS_PER_NODE": "3"}) == 3


def test_share_cores_gives_each_local_process_its_share(monkeypatch):
    before = torch.get_num_threads()
    monkeypatch.setattr(dist, "usable_cores", lambda: 8)
    try:
        assert dist.share_cores({"LOCAL_WORLD_SIZE": "2"}) == 4 and torch.get_num_threads() == 4
        assert dist.share_cores({"LOCAL_WORLD_SIZE": "16"}) == 1 and torch.get_num_threads() == 1  # at least one
        assert dist.share_cores({}) == 8 and torch.get_num_threads() == 8  # one process: every core
        torch.set_num_threads(3)
        assert dist.share_cores({"OMP_NUM_THREADS": "3", "LOCAL_WORLD_SIZE": "2"}) == 3  # an explicit setting wins
    finally:
        torch.set_num_threads(before)


def test_bad_zero_stage_or_key_in_a_deepspeed_file_is_one_value_error():
    def build(base):
        return dist.make_deepspeed_config(base, micro_batch_size=2, grad_accum_steps=1, grad_clip=1.0,
                                          precision="fp32")

    for stage in ("2", 7, True, None):
        with pytest.raises(ValueError, match="ZeRO stage must be the number 0, 1, 2 or 3"):
            build({"zero_optimization": {"stage": stage}})
    with pytest.raises(ValueError, match="zero_optimization must be a JSON object"):
        build({"zero_optimization": 2})
    dist.check_deepspeed_config(build({"zero_optimization": {"stage": 2, "overlap_comm": False}}))
    with pytest.raises(ValueError) as err:  # DeepSpeed's own schema, checked before anything is written
        dist.check_deepspeed_config(build({"zero_optimization": {"stage": 2, "bogus_key": 1}}))
    assert str(err.value) == ("invalid DeepSpeed config: DeepSpeedZeroConfig bogus_key: Extra inputs are not "
                              "permitted (got 1)")
