"""Atomic checkpoint writes: a process killed (SIGKILL) at any moment of a save leaves the
previous checkpoint loadable, no temporary in the system temp folder, and at most a hidden
temporary of the dead process in the checkpoint folder (none where the filesystem offers
O_TMPFILE), which the next save deletes. The saver is scripts/save_checkpoints.py, which saves
through the function AtomicCheckpointIO uses."""

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from deft_lightning.atomic_io import atomic_torch_save, atomic_write_folder, clean_stale_temporaries
from deft_lightning.safe_load import load_checkpoint

SCRIPT = Path(__file__).parent / "scripts" / "save_checkpoints.py"


def start_saving(path: Path, first: int, count: int, env: dict) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(SCRIPT), str(path), str(first), str(count)],
                            stdout=subprocess.PIPE, text=True, env=env)


def test_a_save_killed_at_any_moment_keeps_the_previous_checkpoint(tmp_path):
    folder, system_temp = tmp_path / "checkpoints", tmp_path / "system_tmp"
    system_temp.mkdir()
    path = folder / "last.ckpt"
    env = {**os.environ, "TMPDIR": str(system_temp)}
    atomic_torch_save({"generation": 0, "weights": torch.zeros(8)}, path)
    saved, killed_mid_save = 0, 0
    for delay in (0.0, 0.05, 0.2):
        process = start_saving(path, saved + 1, 1000, env)
        line = process.stdout.readline()
        assert line.startswith("saving"), line
        time.sleep(delay)
        process.kill()
        process.wait(timeout=60)
        lines = [entry for entry in (line.strip(), *process.stdout.read().splitlines()) if entry]
        done = [int(entry.split()[1]) for entry in lines if entry.startswith("saved")]
        killed_mid_save += lines[-1].startswith("saving")
        saved = max(done, default=saved)
        checkpoint = load_checkpoint(path)
        generation = checkpoint["generation"]
        assert generation in (saved, saved + 1)  # the last complete save, or the one that completed unseen
        assert torch.equal(checkpoint["weights"], torch.full_like(checkpoint["weights"], float(generation)))
        saved = generation
        left = [p.name for p in folder.iterdir() if p.name != "last.ckpt"]
        assert all(name == f".last.ckpt.partial-{process.pid}" for name in left), left
        assert not [p for p in system_temp.rglob("*") if p.is_file() and p.stat().st_size > 1_000_000]
    assert killed_mid_save >= 1, "no kill landed inside a save: the test checked nothing"
    atomic_torch_save({"generation": saved + 1}, path)  # the next save cleans up after the dead
    assert sorted(p.name for p in folder.iterdir()) == ["last.ckpt"]
    assert load_checkpoint(path)["generation"] == saved + 1


def test_stale_temporaries_of_dead_processes_only_are_cleaned(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / f".last.ckpt.partial-{dead.pid}").write_bytes(b"partial")
    (tmp_path / f".exported.old-{dead.pid}").mkdir()
    alive = tmp_path / f".last.ckpt.partial-{os.getppid()}"
    alive.write_bytes(b"being written by a live process")
    removed = clean_stale_temporaries(tmp_path)
    assert len(removed) == 2 and alive.exists()


def test_a_folder_write_that_fails_keeps_the_old_folder(tmp_path):
    out = tmp_path / "exported"
    atomic_write_folder(out, lambda folder: (folder / "model.safetensors").write_text("old"))

    def fail(folder):
        (folder / "model.safetensors").write_text("half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        atomic_write_folder(out, fail)
    assert (out / "model.safetensors").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exported"]
