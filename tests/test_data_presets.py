"""Dataset entries from YAML and the command line, the data presets in configs/data/, and every
YAML snippet of docs/datasets.md, on tiny fake copies of the real layouts (tests/fake_datasets.py).

Default run: every preset and snippet parses and builds its datasets in process (one item read
from each), and two end-to-end `deft-lightning fit --trainer.max_steps=2` + `test` runs cover
every layout family: the docs' GTAV protocol (GTAV, Cityscapes, BDD100K, Mapillary, ACDC, folder)
and the Cityscapes -> BDD/SYNTHIA/GTAV preset (SYNTHIA). The other presets run end to end under
`-m slow`.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from fake_datasets import make_data_root
from test_cli import ROOT, deft_lightning

PRESETS = sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "configs/data").glob("*.yaml"))
END_TO_END_PRESETS = ["configs/data/cityscapes_to_bdd_synthia_gtav.yaml"]

# The test-size net and run: a real smp Unet, small, no pretrained weights.
TINY_ARGS = [
    "--model.init_args.encoder_name=resnet18", "--model.init_args.encoder_weights=null",
    '--model.init_args.arch_kwargs={"encoder_depth": 3, "decoder_channels": [32, 16, 8]}',
    "--data.init_args.crop_size=[32,32]", "--data.init_args.batch_size=2", "--data.init_args.eval_batch_size=1",
    "--data.init_args.num_workers=0", "--data.init_args.class_index_cache=null",
    "--data.init_args.synthetic_image_size=[32,64]", "--data.init_args.synthetic_val_size=2",
]


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    return make_data_root(tmp_path_factory.mktemp("data"))


def doc_yaml_blocks() -> list[str]:
    text = (ROOT / "docs/datasets.md").read_text()
    return re.findall(r"```yaml\n(.*?)```", text, flags=re.S)


def doc_entries() -> list[dict]:
    """Every dataset entry of the per-dataset snippets (those not a whole `data:` config)."""
    entries = []
    for block in doc_yaml_blocks():
        loaded = yaml.safe_load(block)
        if isinstance(loaded, dict) and "data" not in loaded:
            entries.append(loaded)
        elif isinstance(loaded, list):
            entries += loaded
    return entries


def write_doc_configs(folder: Path) -> list[Path]:
    """The docs' whole `data:` snippets as they are, plus one config whose targets are all the
    per-dataset entries (source GTAV, as in the docs' protocol)."""
    configs = []
    for index, block in enumerate(doc_yaml_blocks()):
        loaded = yaml.safe_load(block)
        if isinstance(loaded, dict) and "data" in loaded:
            configs.append(folder / f"doc_snippet_{index}.yaml")
            configs[-1].write_text(block)
    entries = {"source": {"name": "gtav", "root": "gtav", "split": "train"},
               "source_val": {"name": "gtav", "root": "gtav", "split": "val", "domain": "gtav-heldout"},
               "targets": doc_entries()}
    configs.append(folder / "doc_entries.yaml")
    configs[-1].write_text(yaml.safe_dump({"data": {"class_path": "deft_lightning.DGSegDataModule",
                                                    "init_args": entries}}))
    return configs


def test_the_docs_show_a_protocol_and_an_entry_per_dataset():
    assert any("data:" in block for block in doc_yaml_blocks())
    names = {entry["name"] for entry in doc_entries()}
    assert names == {"cityscapes", "gtav", "bdd100k", "mapillary", "synthia", "acdc", "folder"}


def build(configs: list[Path], data_root: Path, *extra: str):
    from deft_lightning.cli import lightning_cli

    args = ["--config", str(ROOT / "configs/joint.yaml"), *(a for c in configs for a in ("--config", str(c))),
            "--trainer.logger=false", f"--data.init_args.data_root={data_root}", *TINY_ARGS, *extra]
    return lightning_cli(args, run=False)


@pytest.mark.parametrize("config", [*PRESETS, "docs"])
def test_preset_or_doc_snippet_builds_every_dataset(config, data_root, tmp_path):
    configs = write_doc_configs(tmp_path) if config == "docs" else [ROOT / config]
    for path in configs:
        datamodule = build([path], data_root).datamodule
        datamodule.setup("fit")
        sample = datamodule.train_set[0]
        assert sample["image"].shape[1:] == (32, 32)  # the test's crop
        for domain, dataset in datamodule.eval_sets.items():
            item = dataset[0]
            assert item["domain"] == domain and item["mask"].shape == item["image"].shape[1:]
        if config != "configs/data/synthetic.yaml":
            assert datamodule.source_val_domain == datamodule.eval_domains[0]


def test_entries_parse_as_dicts_dataclasses_and_overrides(data_root, tmp_path):
    config = tmp_path / "entries.yaml"
    config.write_text(yaml.safe_dump({"data": {"init_args": {
        "source": {"class_path": "deft_lightning.DatasetSpec", "init_args": {"name": "gtav", "root": "gtav"}},
        "targets": [{"name": "cityscapes", "root": "cityscapes", "split": "val"},
                    {"name": "synthetic", "domain": "fog", "split": "val", "options": {"length": 3}}]}}}))
    datamodule = build([config], data_root, "--data.init_args.source.split=all",  # one key of an entry
                       '--data.init_args.targets=[{"name": "cityscapes", "root": "cityscapes", "split": "val", '
                       '"domain": "cs"}, {"name": "synthetic", "domain": "fog", "split": "val", '
                       '"options": {"length": 3}}]').datamodule
    from deft_lightning import DatasetSpec

    assert datamodule.source == DatasetSpec("gtav", "gtav", "all")
    datamodule.setup("validate")
    assert datamodule.eval_domains == ["cs", "fog"]  # no held-out split named, none invented
    assert len(datamodule.eval_sets["fog"]) == 3


def test_unknown_entry_key_and_a_real_source_without_targets_fail_clearly(data_root, tmp_path, capsys,
                                                                          monkeypatch):
    from deft_lightning.cli import main

    monkeypatch.chdir(tmp_path)
    bad = tmp_path / "bad.yaml"
    bad.write_text("data:\n  init_args:\n    source: {name: gtav, root: gtav, splt: train}\n"
                   "    targets: [{name: cityscapes, root: cityscapes, split: val}]\n")
    no_targets = tmp_path / "no_targets.yaml"
    no_targets.write_text("data:\n  init_args:\n    source: {name: gtav, root: gtav, split: train}\n")
    for config, message in [(bad, "splt"), (no_targets, "no `targets`")]:
        with pytest.raises(SystemExit) as exit_info:
            main(["fit", "--config", str(ROOT / "configs/joint.yaml"), "--config", str(config),
                  "--trainer.max_steps=1", "--model.init_args.encoder_weights=null"])
        stderr = capsys.readouterr().err
        assert exit_info.value.code != 0
        assert message in stderr, stderr[-3000:]
        assert "Traceback" not in stderr
    assert not (tmp_path / "runs").exists()  # the failed runs left no folder


def fit_and_test(configs: list[Path], data_root: Path, cwd: Path) -> tuple:
    args = ["--config", str(ROOT / "configs/joint.yaml"), *(a for c in configs for a in ("--config", str(c))),
            *TINY_ARGS, "--trainer.limit_test_batches=2"]
    env = {"DEFT_DATA_ROOT": str(data_root)}
    fit = deft_lightning("fit", *args, "--trainer.max_steps=2", cwd=cwd, env=env)
    assert fit.returncode == 0, fit.stderr[-4000:]
    (checkpoint,) = cwd.glob("runs/*/version_0/checkpoints/last.ckpt")
    test = deft_lightning("test", *args, f"--ckpt_path={checkpoint}", cwd=cwd, env=env)
    assert test.returncode == 0, test.stderr[-4000:]
    return fit, test


def expected_domains(config: Path, data_root: Path) -> list[str]:
    return build([config], data_root).datamodule.eval_domains


def test_doc_protocol_and_entries_fit_and_test_from_the_command_line(data_root, tmp_path):
    config = write_doc_configs(tmp_path)[-1]  # every per-dataset entry as a target of a GTAV source
    _, test = fit_and_test([config], data_root, tmp_path)
    (table,) = tmp_path.glob("runs/*/version_0/test/test_iou.md")
    header = table.read_text().splitlines()[0]
    for domain in expected_domains(config, data_root):
        assert domain in header


@pytest.mark.parametrize("preset", [p if p in END_TO_END_PRESETS else pytest.param(p, marks=pytest.mark.slow)
                                    for p in PRESETS if p != "configs/data/synthetic.yaml"])
def test_preset_fits_and_tests_from_the_command_line(preset, data_root, tmp_path):
    fit_and_test([ROOT / preset], data_root, tmp_path)
    (table,) = tmp_path.glob("runs/*/version_0/test/test_iou.md")
    for domain in expected_domains(ROOT / preset, data_root):
        assert domain in table.read_text().splitlines()[0]
