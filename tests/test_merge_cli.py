"""docs/merging.md's commands, run as written through `deft-lightning` (bash), at tiny sizes.

A bash function in front of the doc's block appends tiny-net/tiny-data arguments to every
`deft-lightning <verb>` call of the block; the commands themselves are the doc's, verbatim.
Recipe (a) (fit with a checkpoint every N steps, merge the last 4, test, export) runs once for
the module; recipe (b) (nine fits) is slow.
"""

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import segmentation_models_pytorch as smp
import torch

from deft_lightning import JointFinetune
from deft_lightning.merge_checkpoints import newest_checkpoints
from deft_lightning.merging import load_net_state, merge_layerwise

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "merging.md"

TINY_MODEL = ["--model.init_args.arch=Unet", "--model.init_args.encoder_name=resnet18",
              "--model.init_args.encoder_weights=null",
              '--model.init_args.arch_kwargs={"encoder_depth": 3, "decoder_channels": [32, 16, 8]}']
TINY_DATA = ["--data.init_args.synthetic_train_size=8", "--data.init_args.synthetic_val_size=4",
             "--data.init_args.synthetic_image_size=[64, 128]", "--data.init_args.crop_size=[64, 128]",
             "--data.init_args.batch_size=4", "--data.init_args.eval_batch_size=4",
             '--data.init_args.synthetic_targets=["night"]']
QUIET = ["--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"]
# Four steps, a checkpoint after each (the doc's every_n_train_steps is the last callback's).
FIT = [*TINY_MODEL, *TINY_DATA, *QUIET, "--trainer.max_steps=4", "--trainer.num_sanity_val_steps=0",
       "--trainer.limit_val_batches=0"]
TEST = [*TINY_MODEL, *TINY_DATA, *QUIET]

PRELUDE = f"""
FIT=({shlex.join(FIT)})
TEST=({shlex.join(TEST)})
deft-lightning() {{
  local verb=$1; shift
  local extra=()
  case $verb in
    fit) extra=("${{FIT[@]}}")
         if [[ "$*" == *every_n_train_steps* ]]; then extra+=(--trainer.callbacks.every_n_train_steps=1); fi
         if [[ "$*" == *deft.yaml* ]]; then extra+=(--model.init_args.warmup_steps=1); fi ;;
    test) extra=("${{TEST[@]}}") ;;
  esac
  command deft-lightning "$verb" "$@" "${{extra[@]}}"
}}
"""


def doc_block(name: str) -> str:
    """The ```bash block after ``<!-- recipe: name -->`` in docs/merging.md."""
    match = re.search(rf"<!-- recipe: {name} -->\s*```bash\n(.*?)```", DOC.read_text(), re.S)
    assert match, f"no recipe {name!r} in {DOC}"
    return match.group(1)


def run_block(name: str, cwd: Path) -> subprocess.CompletedProcess:
    (cwd / "configs").symlink_to(ROOT / "configs")
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    return subprocess.run(["bash", "-euo", "pipefail", "-c", PRELUDE + doc_block(name)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=1200, stdin=subprocess.DEVNULL)


@pytest.fixture(scope="module")
def last_checkpoints(tmp_path_factory):
    cwd = tmp_path_factory.mktemp("recipe_last")
    return cwd, run_block("last-checkpoints", cwd)


def test_recipe_last_checkpoints_runs(last_checkpoints):
    cwd, result = last_checkpoints
    assert result.returncode == 0, result.stderr[-4000:]
    assert "test/mIoU_mean" in result.stdout + result.stderr


def test_merged_checkpoint_is_the_layerwise_merge_of_the_last_four(last_checkpoints):
    cwd, result = last_checkpoints
    steps = sorted(str(p) for p in (cwd / "runs/joint_steps").glob("*.ckpt"))
    assert [Path(p).name for p in steps] == [f"step={n}.ckpt" for n in range(1, 5)], result.stderr[-2000:]
    newest_first = newest_checkpoints(steps, 4)
    assert newest_first[0].endswith("step=4.ckpt")
    expected = merge_layerwise(newest_first, anchor=0)
    task = JointFinetune.load_from_checkpoint(cwd / "runs/merged/joint_last4.ckpt")
    for key, value in expected.items():
        assert torch.equal(task.net.state_dict()[key], value), key
    anchor = load_net_state(newest_first[0]).state  # the first layer is an average, not the anchor's
    assert not torch.equal(task.net.encoder.conv1.weight, anchor["encoder.conv1.weight"])


def test_exported_merge_loads_with_smp_and_computes_the_merged_net(last_checkpoints):
    cwd, result = last_checkpoints
    out = cwd / "runs/merged/joint_last4"
    model = smp.from_pretrained(str(out)).eval()
    preprocessing = json.loads((out / "preprocessing.json").read_text())
    mean = torch.tensor(preprocessing["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(preprocessing["std"]).view(1, 3, 1, 1)
    images = torch.rand(2, 3, 64, 128, generator=torch.Generator().manual_seed(0))
    task = JointFinetune.load_from_checkpoint(cwd / "runs/merged/joint_last4.ckpt").eval()
    with torch.no_grad():
        torch.testing.assert_close(model((images - mean) / std), task.net(images), rtol=1e-5, atol=1e-5)


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_recipe_methods_and_seeds_runs(tmp_path):
    result = run_block("methods-and-seeds", tmp_path)
    assert result.returncode == 0, result.stderr[-4000:]
    merged = torch.load(tmp_path / "runs/merged/methods.ckpt", weights_only=True)
    assert merged["merge"]["anchor"] == "runs/recipes/deft-0/last.ckpt"
    seeds = torch.load(tmp_path / "runs/merged/joint_seeds.ckpt", weights_only=True)["merge"]
    assert seeds["mode"] == "uniform" and len(seeds["inputs"]) == 3
    assert "test/mIoU_mean" in result.stdout + result.stderr
