"""Multi-node recipes on CPU: two "nodes" of one process each, launched by torchrun or with the
variables srun sets, as docs/multinode.md shows (gloo instead of NCCL, fp32), then the per-domain
metrics of that 2-rank run against one process on the same checkpoint."""

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import TINY_DATA, TINY_NET

from test_cli import ROOT, deft_lightning

CPU = ["--trainer.accelerator=cpu", "--trainer.sync_batchnorm=false",  # SyncBN is CUDA-only
       "--trainer.devices=1", "--trainer.precision=32-true",
       "--trainer.strategy=ddp", "--trainer.max_steps=2", "--trainer.val_check_interval=2",
       "--trainer.num_sanity_val_steps=0", "--trainer.enable_progress_bar=false"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def fit_on_two_nodes_and_compare_with_one_process(tmp_path, launch):
    """Fit the joint config for 2 steps on two one-process "nodes" started by ``launch(fit_args,
    env)`` (a list of Popen), then check the 2-rank per-domain metrics against one process
    validating the checkpoint it wrote."""
    tiny = {"model": {"init_args": TINY_NET},
            "data": {"init_args": {k: list(v) if isinstance(v, tuple) else v for k, v in TINY_DATA.items()}}}
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(tiny))
    summary = tmp_path / "summary.json"
    fit = ["deft-lightning", "fit", "--config", str(ROOT / "configs/joint.yaml"), "--config",
           str(ROOT / "configs/trainer/multinode.yaml"), "--config", "tiny.yaml", "--trainer.num_nodes=2", *CPU,
           f"--trainer.default_root_dir={tmp_path / 'run'}",
           '--trainer.callbacks+={"class_path": "deft_lightning.callbacks.RunSummary", '
           f'"init_args": {{"path": "{summary}"}}}}']
    env = {**os.environ, "OMP_NUM_THREADS": "1",  # the console script of this environment first on PATH
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    nodes = launch(fit, env)
    outputs = [node.communicate(timeout=600)[0] for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], outputs[0][-3000:] + outputs[1][-3000:]
    assert "GLOBAL_RANK: 1" in "".join(outputs) and "MEMBER: 2/2" in "".join(outputs)
    fit_metrics = json.loads(summary.read_text())["fit"]
    (checkpoint,) = (tmp_path / "run").rglob("last.ckpt")
    single = deft_lightning("validate", "--config", str(ROOT / "configs/joint.yaml"), "--config", "tiny.yaml",
                            "--trainer.accelerator=cpu", "--trainer.devices=1", f"--ckpt_path={checkpoint}",
                            f"--trainer.default_root_dir={tmp_path / 'single'}", "--trainer.logger=false",
                            '--trainer.callbacks+={"class_path": "deft_lightning.callbacks.RunSummary", '
                            f'"init_args": {{"path": "{tmp_path / "single.json"}"}}}}', cwd=tmp_path)
    assert single.returncode == 0, single.stderr[-3000:]
    one_process = json.loads((tmp_path / "single.json").read_text())["validate"]["metrics"]
    domains = fit_metrics["domains"]
    assert domains == ["clear", "night", "fog"]
    for key in ["val/mIoU_source", "val/mIoU_mean", *(f"val/{d}/mIoU" for d in domains)]:
        # confusion matrices summed over the ranks before the division: the same as one process
        assert fit_metrics["metrics"][key] == pytest.approx(one_process[key], abs=1e-6), key


def popen(command, cwd, env):
    return subprocess.Popen(command, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


@pytest.mark.slow
def test_two_node_torchrun_fit_reduces_per_domain_metrics_like_one_process(tmp_path):
    torchrun = shutil.which("torchrun") or str(Path(sys.executable).parent / "torchrun")
    port = free_port()

    def launch(fit, env):
        return [popen([torchrun, "--nnodes=2", "--nproc_per_node=1", f"--node_rank={rank}",
                       "--master_addr=127.0.0.1", f"--master_port={port}", "--no-python", *fit], tmp_path, env)
                for rank in (0, 1)]

    fit_on_two_nodes_and_compare_with_one_process(tmp_path, launch)


@pytest.mark.slow
def test_two_node_slurm_fit_reads_the_srun_variables(tmp_path):
    """The SLURM recipe of docs/multinode.md without a cluster: the variables ``srun`` sets for
    ``--nodes=2 --ntasks-per-node=1`` on each task, and the same command on both. Lightning's
    ``SLURMEnvironment`` must take ranks, world size and the master from them (without it each
    process would believe it is node 0 and the run would not form)."""
    port = free_port()
    slurm = {"SLURM_JOB_ID": "4242", "SLURM_JOB_NAME": "deft", "SLURM_NTASKS": "2", "SLURM_NNODES": "2",
             "SLURM_NTASKS_PER_NODE": "1", "SLURM_NODELIST": "127.0.0.1", "MASTER_PORT": str(port)}

    def launch(fit, env):
        return [popen(fit, tmp_path, {**env, **slurm, "SLURM_PROCID": str(rank), "SLURM_LOCALID": "0",
                                      "SLURM_NODEID": str(rank)}) for rank in (0, 1)]

    fit_on_two_nodes_and_compare_with_one_process(tmp_path, launch)
