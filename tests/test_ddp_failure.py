"""A DDP run in which one rank raises ends every rank within a bounded time, non-zero, with the
rank's error (the other rank would otherwise wait in its next all-reduce for the process
group's 30-minute timeout). Lightning's launcher does it: rank 0 started the other ranks and
polls them (a non-zero exit kills all), and a failing rank 0 kills its children."""

import subprocess
import sys
import time
from pathlib import Path

import pytest

SCRIPT = Path(__file__).parent / "scripts" / "ddp_rank_fails.py"


# Two DDP processes cost ~20 s of CPU: slow (make test-slow), like the other rank-failure paths.
@pytest.mark.slow
@pytest.mark.parametrize("rank", [1, 0])
def test_a_rank_raising_at_step_2_ends_the_run_within_60_seconds(tmp_path, rank):
    process = subprocess.Popen([sys.executable, str(SCRIPT), str(tmp_path), str(rank)], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    stdout, stderr = process.communicate(timeout=600)
    ended = time.time()
    assert (tmp_path / "raised_at").exists(), stderr[-3000:]
    elapsed = ended - float((tmp_path / "raised_at").read_text())
    print(f"rank {rank} raised; every process ended {elapsed:.1f} s later, exit code {process.returncode}")
    assert process.returncode != 0
    assert elapsed < 60
    assert f"rank {rank} failed at step 2" in stdout + stderr
