"""The performance benchmarks run at tiny sizes, so they cannot rot (figures are not asserted:
only that every script runs end to end and prints its table)."""

import re
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import data_pipeline  # noqa: E402
import ema_bandwidth  # noqa: E402
import speedups  # noqa: E402
import throughput  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore")


def ratios(table: str) -> list[float]:
    """The bold figures of a table (the ratios each script reports)."""
    return [float(value) for value in re.findall(r"\*\*(\d+\.\d+)\*\*", table)]


def test_speedups_channels_last_and_compile_columns():
    table = speedups.main(["--nets", "tiny", "--compile-nets", "tiny", "--compile-backend", "eager",
                           "--steps", "1", "--warmup", "0"])
    row = next(line for line in table.splitlines() if line.startswith("| tiny"))
    assert "fell back" not in row
    assert len(ratios(row)) == 2 and all(r > 0 for r in ratios(row))


def test_ema_against_bandwidth():
    table = ema_bandwidth.main(["--nets", "tiny", "--copy-mib", "8", "--reps", "1"])
    assert len(ratios(table)) == 1 and ratios(table)[0] > 0


def test_throughput_lightning_against_bare_loop_and_peak_memory():
    table = throughput.main(["--net", "tiny", "--methods", "joint", "DeFT (stage 2)", "--steps", "1",
                             "--warmup", "1", "--rounds", "1", "--no-memory"])
    assert len(ratios(table)) == 3  # two Lightning/bare ratios and DeFT/joint
    args = throughput.parse_args(["--net", "tiny", "--warmup", "1"])
    assert throughput.peak_memory("joint", "bare", args) > 0  # the fresh-process probe


def test_throughput_with_the_gpu_switches_on_the_cpu():
    """The GPU figures' options (bf16 autocast in both loops, channels_last, regional compile,
    loader workers, batch and crop) run end to end; only the device differs on a GPU."""
    table = throughput.main(["--net", "tiny", "--methods", "DAFT", "--steps", "1", "--warmup", "1", "--rounds", "1",
                             "--no-memory", "--precision", "bf16-mixed", "--channels-last", "on", "--compile",
                             "--compile-backend", "eager", "--batch", "2", "--crop", "32", "64", "--workers", "1"])
    assert len(ratios(table)) == 1
    assert "bf16-mixed, channels_last, regional torch.compile (eager)" in table and "crop 32x64" in table


def test_data_pipeline_every_reader_and_format():
    table = data_pipeline.main(["--size", "64", "128", "--crop", "32", "32", "--images", "1", "--reps", "1"])
    rows = [line for line in table.splitlines() if line.startswith(("| PNG", "| JPEG"))]
    assert len(rows) == 2 * len(data_pipeline.READERS)


def test_write_section_replaces_only_its_own_section(tmp_path, monkeypatch):
    doc = tmp_path / "benchmarks.md"
    doc.write_text("# Benchmarks\n\n## Other\n\nkept\n")
    monkeypatch.setattr(speedups, "DOC", doc)
    speedups.write_section("first", ("<!-- x:start -->", "<!-- x:end -->"), "X")
    speedups.write_section("second", ("<!-- x:start -->", "<!-- x:end -->"), "X")
    text = doc.read_text()
    assert "kept" in text and "second" in text and "first" not in text and text.count("## X") == 1
