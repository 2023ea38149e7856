"""`benchmarks/compare_methods.py`, as the ablation docs and config headers tell users to run it
(`python benchmarks/compare_methods.py configs/ablations/fishertune --seeds 0 1 2 --out ...`), at
tiny sizes: a folder of configs, several seeds, the table written between the results markers."""

import json
import os
import re
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--model.init_args.encoder_weights=null", "--model.init_args.warmup_steps=1", "--trainer.max_steps=2",
        "--trainer.val_check_interval=2", "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false", "--data.init_args.synthetic_train_size=8",
        "--data.init_args.synthetic_val_size=2", "--data.init_args.synthetic_image_size=[32, 64]",
        "--data.init_args.crop_size=[32, 64]", "--data.init_args.batch_size=2", "--data.init_args.eval_batch_size=2",
        '--data.init_args.synthetic_targets=["night"]', "--model.init_args.estimation_batches=1"]


def test_an_ablation_folder_over_two_seeds_writes_one_row_per_config(tmp_path):
    folder = tmp_path / "ablation"
    folder.mkdir()
    for name in ("1_random.yaml", "4_dr_fim.yaml"):  # FisherTune rows: every row takes the overrides above
        (folder / name).write_text((ROOT / "configs/ablations/fishertune" / name).read_text())
    out = tmp_path / "results.md"
    out.write_text("# Results\n\nkept\n\n<!-- results:start -->\nSTALE TABLE\n<!-- results:end -->\n")
    command = [sys.executable, str(ROOT / "benchmarks/compare_methods.py"), str(folder), "--seeds", "0", "1",
               "--threads", "1", "--root", str(tmp_path / "runs"), "--out", str(out), *TINY]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
                            stdin=subprocess.DEVNULL)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    text = out.read_text()
    assert "kept" in text and "STALE TABLE" not in text and "python benchmarks/compare_methods.py" in text
    rows = {line.split(" | ")[0][2:]: line for line in text.splitlines() if line.startswith("| 1_") or line.startswith("| 4_")}
    assert set(rows) == {"1_random", "4_dr_fim"}
    for name, row in rows.items():
        seeds = [json.loads((tmp_path / "runs" / f"seed{s}" / name / "result.json").read_text()) for s in (0, 1)]
        per_seed = [100 * run["metrics"]["test/mIoU_mean"] for run in seeds]
        mean = statistics.mean(per_seed)
        assert re.search(rf"\*\*{mean:.1f} ± \d+\.\d\*\* \| 2 \|", row), (row, per_seed)
    rerun = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
                           stdin=subprocess.DEVNULL)
    assert rerun.returncode == 0 and rerun.stdout.count("done before, kept") == 4  # an interrupted table resumes
