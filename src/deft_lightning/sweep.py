"""``deft-lightning sweep``: run a wandb sweep file on this machine, no wandb server needed.

    deft-lightning sweep configs/sweeps/deft_beta.yaml
    deft-lightning sweep configs/sweeps/deft_beta.yaml --parallel 2 -- --trainer.max_steps=300
    deft-lightning sweep my_random_sweep.yaml --count 20 --seed 0 --test true

Reads the YAML that ``wandb sweep`` takes, unchanged (``method``, ``parameters``, ``metric``,
``program``, ``command``), and expands it here as wandb's own controller does:

- ``grid``: the product of every parameter's values, parameters in name order (``values``,
  ``value``, ``int_uniform`` and ``q_uniform`` ranges); ``--count`` takes the first points;
- ``random``: ``--count`` points (required: wandb's random search runs until stopped), each
  parameter drawn from its distribution (every wandb distribution: ``categorical`` with or
  without ``probabilities``, ``int_uniform``, ``uniform``, ``q_uniform``, ``log_uniform``
  (bounds are exponents), ``log_uniform_values``, ``inv_log_uniform[_values]``,
  ``q_log_uniform[_values]``, ``normal``, ``q_normal``, ``log_normal``, ``q_log_normal``,
  ``beta``, ``q_beta``) by a generator seeded with ``--seed``: the same seed, the same points;
- nested ``parameters`` (``model: {parameters: {init_args: {parameters: {lr: ...}}}}``) are
  expanded like the dotted name ``model.init_args.lr`` and passed as wandb's agent passes them,
  one ``--model={'init_args': {'lr': ...}}`` per top-level key;
- ``bayes`` needs wandb's server, which models the finished runs: ``wandb sweep FILE`` then
  ``wandb agent ID``. It is refused here with that message.

Every point runs the file's ``command`` as ``wandb agent`` builds it (``${env}``,
``${interpreter}``, ``${program}``, ``${args}`` and the other macros), with arguments after
``--`` placed before the point's values, then three of the runner's own: the point's folder
``<root>/<point>`` as ``trainer.default_root_dir`` (and as the logger's ``save_dir`` when the
command's configs set a logger), and a :class:`~deft_lightning.callbacks.RunSummary` that
writes ``<root>/<point>/summary.json``. With ``--test true`` each point is then tested from its
last checkpoint (the end of training; no checkpoint is chosen on target data). Points run one at
a time or ``--parallel N`` at once, the CPU cores split between them (``OMP_NUM_THREADS``);
output goes to ``<root>/<point>/sweep.log``. A point whose ``point.json`` records the same
command is kept on a re-run, so an interrupted sweep resumes where it stopped. The sweep ends
with ``<root>/sweep.md`` and ``sweep.csv``: the points sorted by the sweep's metric (its last
logged value, as wandb's run summary), best first. wandb runs are offline unless
``WANDB_MODE`` says otherwise (``wandb sync`` uploads them later), grouped by the sweep's name.
"""

from __future__ import annotations

import csv
import io
import itertools
import json
import math
import os
import random
import re
import shlex
import shutil
import subprocess
import sys
import threading
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from jsonargparse import auto_cli

from .yaml_files import config_files, load_yaml

#: wandb's command when the file has none (wandb_agent.Agent.DEFAULT_SWEEP_COMMAND).
DEFAULT_COMMAND = ["${env}", "${interpreter}", "${program}", "${args}"]
#: Distributions usable in a grid (wandb turns the two ranges into value lists).
GRID_KINDS = ("constant", "categorical", "int_uniform", "q_uniform")


class SweepError(ValueError):
    """A sweep file the local runner cannot run, with what was expected."""


# ---- the sweep file ----------------------------------------------------------------------
#: Metrics that may hold target-domain data: a sweep selecting on one warns.
TARGET_METRIC = re.compile(r"^(test/|val/mIoU_mean$|val/[^/]+/)")


def load_sweep(path: str | Path) -> dict[str, Any]:
    """The sweep file, checked: method, parameters (each with a known distribution), metric."""
    path = Path(path)
    if not path.is_file():
        raise SweepError(f"sweep file {path} does not exist")
    try:
        sweep = load_yaml(path)
    except ValueError as error:
        raise SweepError(str(error)) from None
    if not isinstance(sweep, dict):
        raise SweepError(f"{path}: expected a mapping with 'method' and 'parameters'")
    method = sweep.get("method")
    if method == "bayes":
        raise SweepError(f"{path}: Bayesian search needs wandb's server (it models the finished runs); "
                         f"run it with `wandb sweep {path}` and `wandb agent <sweep id>`. "
                         "The local runner does 'grid' and 'random'.")
    if method not in ("grid", "random"):
        raise SweepError(f"{path}: method must be 'grid' or 'random' here (or 'bayes' through wandb), got {method!r}")
    parameters = sweep.get("parameters")
    if not isinstance(parameters, dict) or not parameters:
        raise SweepError(f"{path}: 'parameters' must be a non-empty mapping of parameter name -> spec")
    leaves = leaf_parameters(parameters, path)
    sweep["paths"] = {name: keys for name, (keys, _) in leaves.items()}
    sweep["parameters"] = parameters = {name: spec for name, (_, spec) in leaves.items()}
    for name, spec in parameters.items():
        try:
            kind = distribution(name, spec)
        except SweepError as error:
            raise SweepError(f"{path}: {error}") from None
        if method == "grid" and kind not in GRID_KINDS:
            raise SweepError(f"{path}: parameter {name!r} has distribution {kind!r}; a grid takes only "
                             f"{', '.join(GRID_KINDS)} (wandb's rule)")
    metric = sweep.get("metric")
    if metric is not None and (not isinstance(metric, dict) or "name" not in metric
                               or metric.get("goal", "minimize") not in ("minimize", "maximize")):
        raise SweepError(f"{path}: 'metric' must be {{name: ..., goal: minimize|maximize}}, got {metric!r}")
    if metric is not None and TARGET_METRIC.match(str(metric["name"])):
        warnings.warn(f"{path}: the sweep selects on {metric['name']}, which can be target-domain data: selecting "
                      "on the targets is the DG protocol's known pitfall (val/mIoU_source is the source's held-out "
                      "split)", stacklevel=2)
    if sweep.get("program", "deft-lightning") != "deft-lightning":
        raise SweepError(f"{path}: the local runner runs `deft-lightning` commands; program is {sweep['program']!r}")
    return sweep


def leaf_parameters(parameters: dict[str, Any], path: Path,
                    prefix: tuple[str, ...] = ()) -> dict[str, tuple[tuple[str, ...], Any]]:
    """Every parameter spec by its dotted name, with the keys that lead to it through wandb's
    nested ``parameters`` (``model: {parameters: {init_args: {parameters: {lr: S}}}}`` gives
    ``model.init_args.lr`` -> ``(("model", "init_args", "lr"), S)``)."""
    leaves: dict[str, tuple[tuple[str, ...], Any]] = {}
    for key, spec in parameters.items():
        keys = (*prefix, str(key))
        if isinstance(spec, dict) and "parameters" in spec:
            if not isinstance(spec["parameters"], dict) or not spec["parameters"]:
                raise SweepError(f"{path}: nested parameter {'.'.join(keys)!r}: 'parameters' must be a non-empty mapping")
            found = leaf_parameters(spec["parameters"], path, keys)
        else:
            found = {".".join(keys): (keys, spec)}
        for name in found:
            if name in leaves:
                raise SweepError(f"{path}: parameter {name!r} is given twice (once nested, once by its dotted name)")
        leaves.update(found)
    return leaves


def distribution(name: str, spec: Any) -> str:
    """The wandb distribution of a parameter spec, inferred as wandb does when not given."""
    if not isinstance(spec, dict):
        raise SweepError(f"parameter {name!r}: expected a mapping such as {{values: [...]}}, got {spec!r}")
    kind = spec.get("distribution")
    if kind is None:
        if "value" in spec:
            kind = "constant"
        elif "values" in spec:
            kind = "categorical_w_probabilities" if "probabilities" in spec else "categorical"
        elif "min" in spec and "max" in spec:
            both_int = all(isinstance(spec[k], int) and not isinstance(spec[k], bool) for k in ("min", "max"))
            kind = "int_uniform" if both_int else "uniform"
        else:
            raise SweepError(f"parameter {name!r}: give value, values, min/max or a distribution; got {spec!r}")
    required = {"constant": ["value"], "categorical": ["values"], "categorical_w_probabilities": ["values", "probabilities"]}
    required.update({k: ["min", "max"] for k in (
        "int_uniform", "uniform", "q_uniform", "log_uniform", "log_uniform_values", "inv_log_uniform",
        "inv_log_uniform_values", "q_log_uniform", "q_log_uniform_values")})
    required.update({k: [] for k in ("normal", "q_normal", "log_normal", "q_log_normal", "beta", "q_beta")})
    if kind not in required:
        raise SweepError(f"parameter {name!r}: unknown distribution {kind!r}; known: {', '.join(required)}")
    missing = [key for key in required[kind] if key not in spec]
    if missing:
        raise SweepError(f"parameter {name!r}: distribution {kind!r} needs {', '.join(missing)}")
    if kind in ("categorical", "categorical_w_probabilities") and not isinstance(spec["values"], list):
        raise SweepError(f"parameter {name!r}: 'values' must be a list, got {spec['values']!r} (one value: value: ...)")
    if kind in ("categorical", "categorical_w_probabilities") and not spec["values"]:
        raise SweepError(f"parameter {name!r}: 'values' is empty")
    if kind == "categorical_w_probabilities" and len(spec["probabilities"]) != len(spec["values"]):
        raise SweepError(f"parameter {name!r}: {len(spec['probabilities'])} probabilities for {len(spec['values'])} values")
    for key in ("min", "max"):
        if isinstance(spec.get(key), str):
            raise SweepError(f"parameter {name!r}: {key} {spec[key]!r} is text, not a number (YAML reads 1e-4 as "
                             f"text: write 1.0e-4)")
    if "min" in spec and "max" in spec and not spec["min"] < spec["max"]:
        raise SweepError(f"parameter {name!r}: min {spec['min']} is not less than max {spec['max']}")
    return kind


def grid_values(name: str, spec: dict[str, Any]) -> list[Any]:
    kind = distribution(name, spec)
    if kind == "constant":
        return [spec["value"]]
    if kind == "categorical":
        return list(spec["values"])
    if kind == "int_uniform":
        return list(range(spec["min"], spec["max"] + 1))
    q = spec.get("q", 1.0)  # q_uniform: numpy.arange(min, max, q), as wandb's grid
    return [spec["min"] + i * q for i in range(math.ceil((spec["max"] - spec["min"]) / q))]


def sample(name: str, spec: dict[str, Any], rng: random.Random) -> Any:
    """One draw of a parameter from its wandb distribution."""
    kind = distribution(name, spec)
    q = spec.get("q", 1.0)

    def quantize(value: float) -> float | int:
        value = round(value / q) * q
        return int(value) if isinstance(q, int) else value

    if kind == "constant":
        return spec["value"]
    if kind == "categorical":
        return rng.choice(spec["values"])
    if kind == "categorical_w_probabilities":
        return rng.choices(spec["values"], weights=spec["probabilities"])[0]
    if kind == "int_uniform":
        return rng.randint(spec["min"], spec["max"])
    low, high = spec.get("min"), spec.get("max")
    if kind == "uniform":
        return rng.uniform(low, high)
    if kind == "q_uniform":
        return quantize(rng.uniform(low, high))
    if kind in ("log_uniform", "q_log_uniform"):  # bounds are natural-log exponents
        value = math.exp(rng.uniform(low, high))
        return quantize(value) if kind.startswith("q_") else value
    if kind in ("log_uniform_values", "q_log_uniform_values"):
        value = math.exp(rng.uniform(math.log(low), math.log(high)))
        return quantize(value) if kind.startswith("q_") else value
    if kind == "inv_log_uniform":  # 1/x is log-uniform with exponent bounds [min, max]
        return math.exp(-rng.uniform(low, high))
    if kind == "inv_log_uniform_values":  # bounds are values of x
        return math.exp(rng.uniform(math.log(low), math.log(high)))
    mu, sigma = spec.get("mu", 0.0), spec.get("sigma", 1.0)
    if kind in ("normal", "q_normal"):
        value = rng.gauss(mu, sigma)
    elif kind in ("log_normal", "q_log_normal"):
        value = rng.lognormvariate(mu, sigma)
    else:  # beta, q_beta
        value = rng.betavariate(spec.get("a", 1.0), spec.get("b", 1.0))
    return quantize(value) if kind.startswith("q_") else value


def expand(sweep: dict[str, Any], count: int | None = None, seed: int = 0) -> list[dict[str, Any]]:
    """The sweep's points, as ``{parameter: value}`` dicts in wandb's order (names sorted)."""
    names = sorted(sweep["parameters"])
    if sweep["method"] == "grid":
        product = itertools.product(*(grid_values(n, sweep["parameters"][n]) for n in names))
        points = [dict(zip(names, values)) for values in product]
        return points if count is None else points[:count]
    if count is None or count < 1:
        raise SweepError("a random sweep needs --count N (wandb's random search runs until it is stopped)")
    rng = random.Random(seed)
    return [{n: sample(n, sweep["parameters"][n], rng) for n in names} for _ in range(count)]


def swept_names(sweep: dict[str, Any]) -> list[str]:
    """The parameters that vary (not ``value``-constants), in name order."""
    return [n for n in sorted(sweep["parameters"]) if distribution(n, sweep["parameters"][n]) != "constant"]


def agent_command(sweep: dict[str, Any], values: dict[str, Any], extra: list[str] = (),
                  args_json_file: str = "args.json") -> list[str]:
    """The command ``wandb agent`` runs for one point (wandb_agent.Agent._command_run), with
    ``extra`` arguments placed just before the point's ``${args}``. Nested parameters become one
    argument per top-level key whose value is the nested mapping, as wandb's run config holds
    it (``--model={'init_args': {'lr': 0.01}}``: jsonargparse reads it as YAML and keeps the
    config's class_path)."""
    values = run_config(sweep, values)
    flags = [f"--{k}={v}" for k, v in values.items()]
    macros = {
        "env": ["/usr/bin/env"],
        "interpreter": ["python"],
        "program": [sweep.get("program", "deft-lightning")],
        "args": [*extra, *flags],
        "args_no_equals": [part for k, v in values.items() for part in (f"--{k}", str(v))],
        "args_no_hyphens": [f"{k}={v}" for k, v in values.items()],
        "args_no_boolean_flags": [f"--{k}" if v is True else f"--{k}={v}" for k, v in values.items() if v is not False],
        "args_json": [json.dumps(values)],
        "args_json_file": [args_json_file],
        "args_append_hydra": [f"+{k}={v}" for k, v in values.items()],
        "args_override_hydra": [f"++{k}={v}" for k, v in values.items()],
    }
    command: list[str] = []
    for part in map(str, sweep.get("command") or DEFAULT_COMMAND):
        if part.startswith("${envvar:") and part.endswith("}"):
            command.append(os.environ.get(part[9:-1], part[9:-1]))
        elif part.startswith("${") and part.endswith("}"):
            command += macros.get(part[2:-1], [])
        else:
            command.append(part)
    if extra and "${args}" not in map(str, sweep.get("command") or DEFAULT_COMMAND):
        command += extra
    return command


def run_config(sweep: dict[str, Any], values: dict[str, Any]) -> dict[str, Any]:
    """A point's values keyed as wandb's run config: nested parameters as nested mappings."""
    config: dict[str, Any] = {}
    for name, value in values.items():
        *parents, last = sweep.get("paths", {}).get(name, (name,))
        node = config
        for key in parents:
            node = node.setdefault(key, {})
        node[last] = value
    return config


def point_names(points: list[dict[str, Any]], swept: list[str]) -> list[str]:
    """Folder names from the swept values (``beta_encoder=0.99,lr=0.01``); the last part of a
    dotted name when that is unambiguous; a ``-<index>`` suffix where two points would clash."""
    short = {n: n.rsplit(".", 1)[-1] for n in swept}
    if len(set(short.values())) < len(short):
        short = {n: n for n in swept}

    def text(value: Any) -> str:
        return f"{value:.4g}" if isinstance(value, float) else str(value)

    names = [",".join(f"{short[n]}={text(p[n])}" for n in swept).replace("/", "_") or "point" for p in points]
    clashing = {n for n in names if names.count(n) > 1}
    return [f"{n}-{i}" if n in clashing else n for i, n in enumerate(names)]


# ---- running points ----------------------------------------------------------------------
@dataclass
class Point:
    name: str
    values: dict[str, Any]
    folder: Path
    command: list[str]
    config: dict[str, Any] = field(default_factory=dict)  # as wandb's run config (nested parameters nested)
    result: dict[str, Any] = field(default_factory=dict)

    @property
    def record(self) -> Path:
        return self.folder / "point.json"


def _sets_logger(command: list[str]) -> bool:
    """Whether the command's configs or arguments choose a logger class (then its save_dir moves
    into the point's folder); otherwise Lightning's default logger writes under default_root_dir."""
    chosen = False
    for path in config_files(command):
        config = load_yaml(path) if path.is_file() else None
        logger = ((config or {}).get("trainer") or {}).get("logger", "unset") if isinstance(config, dict) else "unset"
        if logger != "unset":
            chosen = isinstance(logger, dict) and "class_path" in logger
    for part in command:
        if part.startswith("--trainer.logger="):
            value = part.split("=", 1)[1]
            chosen = value.lower() not in ("false", "true", "null", "none")
    return chosen


def run_point(point: Point, threads: int, test: bool, group: str, print_lock: threading.Lock) -> Point:
    """Fit (then test) one point in a child process; record the outcome in ``point.json``."""
    if point.record.exists():
        saved = json.loads(point.record.read_text())
        if saved.get("command") == point.command and saved.get("returncode") == 0:
            point.result = saved
            with print_lock:
                print(f"{point.name}: finished before, kept", flush=True)
            return point
    if point.folder.exists():  # an unfinished or changed attempt: start the point afresh
        with print_lock:
            print(f"{point.name}: unfinished or run with other arguments before: starting afresh", flush=True)
        shutil.rmtree(point.folder)
    point.folder.mkdir(parents=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
           "WANDB_RUN_GROUP": group, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    env.setdefault("WANDB_MODE", "offline")
    (point.folder / "args.json").write_text(json.dumps(point.config) + "\n")
    start = time.perf_counter()
    with print_lock:
        print(f"{point.name}: running ({threads} threads), log {point.folder / 'sweep.log'}", flush=True)
    with open(point.folder / "sweep.log", "w") as log:
        returncode = subprocess.run(point.command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    env=env, cwd=os.getcwd()).returncode
        summary_file = point.folder / "summary.json"
        summary = json.loads(summary_file.read_text()) if summary_file.exists() else {}
        if returncode == 0 and test:
            checkpoint = summary.get("fit", {}).get("last_checkpoint") or summary.get("fit", {}).get("best_checkpoint")
            if checkpoint is None:
                log.write("\nno checkpoint to test: add a ModelCheckpoint with save_last to the command's config\n")
                returncode = 1
            else:
                fit_index = point.command.index("fit")
                test_command = [*point.command[:fit_index], "test", *point.command[fit_index + 1:],
                                f"--ckpt_path={checkpoint}"]
                log.flush()
                returncode = subprocess.run(test_command, stdout=log, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL, env=env, cwd=os.getcwd()).returncode
                summary = json.loads(summary_file.read_text()) if summary_file.exists() else {}
    point.result = {"values": point.values, "command": point.command, "returncode": returncode,
                    "minutes": (time.perf_counter() - start) / 60, "summary": summary}
    partial = point.record.with_suffix(".json.partial")
    partial.write_text(json.dumps(point.result, indent=1) + "\n")
    os.replace(partial, point.record)
    with print_lock:
        state = "done" if returncode == 0 else f"FAILED (exit {returncode}), see {point.folder / 'sweep.log'}"
        print(f"{point.name}: {state} in {point.result['minutes']:.1f} min", flush=True)
    return point


# ---- the table ---------------------------------------------------------------------------
def final_metric(point: Point, metric: str) -> float | None:
    summary = point.result.get("summary", {})
    for stage in ("fit", "test"):
        value = summary.get(stage, {}).get("metrics", {}).get(metric)
        if value is not None:
            return value
    return None


def ranked(points: list[Point], metric: str, goal: str) -> list[Point]:
    """Finished points with the metric first (best first), then the rest in sweep order."""
    scored = [p for p in points if final_metric(p, metric) is not None]
    scored.sort(key=lambda p: final_metric(p, metric), reverse=goal == "maximize")
    return scored + [p for p in points if final_metric(p, metric) is None]


def table_rows(points: list[Point], swept: list[str], metric: str, goal: str) -> list[dict[str, Any]]:
    extra = ["test/mIoU_source", "test/mIoU_mean"] if any("test" in p.result.get("summary", {}) for p in points) else []
    rows = []
    for rank, point in enumerate(ranked(points, metric, goal), 1):
        row: dict[str, Any] = {"rank": rank, "point": point.name}
        row.update({n: point.values[n] for n in swept})
        row[metric] = final_metric(point, metric)
        for key in extra:
            row[key] = point.result.get("summary", {}).get("test", {}).get("metrics", {}).get(key)
        row["status"] = "done" if point.result.get("returncode") == 0 else f"failed ({point.result.get('returncode')})"
        row["minutes"] = round(point.result.get("minutes", float("nan")), 2)
        rows.append(row)
    return rows


def markdown(rows: list[dict[str, Any]]) -> str:
    def cell(value: Any) -> str:
        if value is None:
            return "-"
        return f"{value:.4g}" if isinstance(value, float) else str(value)

    keys = list(rows[0])
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(cell(row[k]) for k in keys) + " |" for row in rows]
    return "\n".join(lines)


def _write_atomic(path: Path, text: str) -> None:
    partial = path.with_name(path.name + ".partial")
    partial.write_text(text)
    os.replace(partial, path)


# ---- the verb ----------------------------------------------------------------------------
def sweep(sweep_file: str, *, count: int | None = None, seed: int = 0, parallel: int = 1, threads: int | None = None,
          root: str | None = None, test: bool = False, dry_run: bool = False,
          fit_args: list[str] | None = None) -> list[dict[str, Any]]:
    """Run a wandb sweep file's grid or random points as ``deft-lightning fit`` processes.

    Args:
        sweep_file: the wandb sweep YAML (as ``wandb sweep`` takes it).
        count: random search: how many points (required); grid: run only the first ``count``.
        seed: seed of the random search (same seed, same points).
        parallel: points run at once.
        threads: torch/OpenMP threads per point (default: the CPU cores split between the
            parallel points).
        root: the sweep's folder (default ``runs/sweeps/<sweep file name>``).
        test: after fitting, test each point from its last checkpoint.
        dry_run: print the points and their commands, run nothing.
        fit_args: arguments added to every point's command before its values (on the command
            line: everything after ``--``).

    Returns:
        The table's rows (best first).
    """
    config = sweep_file
    spec = load_sweep(config)
    points_values = expand(spec, count, seed)
    swept = swept_names(spec)
    metric = spec.get("metric", {}).get("name", "val/mIoU_source")
    goal = spec.get("metric", {}).get("goal", "minimize" if "metric" in spec else "maximize")
    sweep_root = Path(root or Path("runs/sweeps") / Path(config).stem)
    if parallel < 1:
        raise SweepError(f"--parallel must be >= 1, got {parallel}")
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    threads = threads or max(1, cores // parallel)
    points = []
    for name, values in zip(point_names(points_values, swept), points_values):
        folder = sweep_root / name
        command = agent_command(spec, values, fit_args or [], args_json_file=str(folder / "args.json"))
        if "fit" not in command:
            raise SweepError(f"{config}: the command must run `deft-lightning fit`; it is {' '.join(command)}")
        command += [f"--trainer.default_root_dir={folder}"]
        if _sets_logger(command):
            command += [f"--trainer.logger.init_args.save_dir={folder}"]
        command += ['--trainer.callbacks+={"class_path": "deft_lightning.callbacks.RunSummary", '
                    f'"init_args": {{"path": {json.dumps(str(folder / "summary.json"))}}}}}']
        points.append(Point(name, values, folder, command, run_config(spec, values)))
    print(f"sweep {config}: {spec['method']}, {len(points)} points, {parallel} at a time, {threads} threads each, "
          f"in {sweep_root}; selecting on {metric} ({goal})", flush=True)
    if dry_run:
        for point in points:
            print(f"{point.name}:\n  {shlex.join(point.command)}")
        return []
    sweep_root.mkdir(parents=True, exist_ok=True)
    lock = threading.Lock()
    with ThreadPoolExecutor(max_workers=parallel) as pool:
        done = list(pool.map(lambda p: run_point(p, threads, test, sweep_root.name, lock), points))
    rows = table_rows(done, swept, metric, goal)
    table = markdown(rows)
    _write_atomic(sweep_root / "sweep.md", f"Sweep `{config}` ({spec['method']}, {len(points)} points), "
                  f"sorted by {metric} ({goal}):\n\n{table}\n")
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    _write_atomic(sweep_root / "sweep.csv", buffer.getvalue())
    (sweep_root / "sweep.json").write_text(json.dumps({"config": str(config), "metric": metric, "goal": goal,
                                                       "swept": swept, "points": [p.name for p in points]}, indent=1) + "\n")
    print(f"\n{table}\n\nwritten: {sweep_root / 'sweep.md'}, {sweep_root / 'sweep.csv'}", flush=True)
    failed = [p.name for p in done if p.result.get("returncode") != 0]
    if failed:
        raise SystemExit(f"{len(failed)} of {len(points)} points failed: {', '.join(failed)} (logs: <point>/sweep.log)")
    return rows


def main(argv: list[str]) -> None:
    """``deft-lightning sweep FILE [options] [-- fit arguments]``."""
    own, fit_args = (argv[:argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv, [])
    if fit_args:
        own = [*own, f"--fit_args={json.dumps(fit_args)}"]
    try:
        auto_cli(sweep, args=own)
    except SweepError as error:
        raise SystemExit(f"deft-lightning sweep: {error}") from None
