"""Save checkpoints in a loop, atomically, for the kill test (test_atomic_io.py).

    python save_checkpoints.py PATH FIRST_GENERATION COUNT

Checkpoint generation g holds a 32 MB tensor filled with g. Before each save the script prints
"saving g" (the parent kills it at some moment after that), after it "saved g". It loads
``deft_lightning/atomic_io.py`` (what ``AtomicCheckpointIO`` saves through) as a file, without
the package's imports, so each start costs only torch's import.
"""

import importlib.util
import sys
from pathlib import Path

import torch

SIZE = 8 * 1024 * 1024  # float32: 32 MB


def atomic_io_module():
    package = Path(importlib.util.find_spec("deft_lightning").submodule_search_locations[0])
    spec = importlib.util.spec_from_file_location("atomic_io", package / "atomic_io.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main(path: str, first: int, count: int) -> None:
    atomic_torch_save = atomic_io_module().atomic_torch_save
    for generation in range(first, first + count):
        checkpoint = {"generation": generation, "weights": torch.full((SIZE,), float(generation))}
        print(f"saving {generation}", flush=True)
        atomic_torch_save(checkpoint, path)
        print(f"saved {generation}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))
