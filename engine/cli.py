"""The ``umim`` command line.

Every failure is one line on stderr and a non-zero exit status, never a Python traceback
(``umim -v ...`` prints the traceback too): a bad config, data, resource or run error and a
file-system error exit with 2, an interrupt with 130 (and says how to resume), anything
unexpected with 1.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import inspect
import json
import logging
import os
import shlex
import sys
import traceback
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from rich.console import Console
from rich.markup import escape
from rich.table import Table

if TYPE_CHECKING:
    from engine.config import ExperimentConfig

logger = logging.getLogger(__name__)

EXIT_UNEXPECTED = 1
EXIT_ERROR = 2
EXIT_INTERRUPTED = 130

# engine options a function may not take yet, and the environment variable the engine reads
# instead (``engine.cluster.connect`` reads $RAY_ADDRESS, ``engine.data.root`` $UMIM_CACHE_DIR)
_ENV_FALLBACK = {"address": "RAY_ADDRESS", "cache_dir": "UMIM_CACHE_DIR"}


def _version() -> str:
    """``engine.__version__``, read from the already loaded parent package (the layer rule
    keeps the command line from importing the ``engine`` root)."""
    return str(getattr(sys.modules.get("engine"), "__version__", "unknown"))


class UsageError(Exception):
    """A command was used wrongly (a missing folder, flags that do not go together)."""


class _Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line (``umim run: error: ...``)."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_ERROR, f"{self.prog}: error: {message} (see {self.prog} -h)\n")


# -- small helpers ----------------------------------------------------------------------------
def _err(line: str) -> None:
    """Write one line to stderr."""
    sys.stderr.write(line.rstrip("\n") + "\n")
    sys.stderr.flush()


def _one_line(text: str) -> str:
    """``text`` on one line; of an embedded traceback (a Ray task's error) keep the first
    line and the final exception."""
    lines = [line.strip() for line in str(text).splitlines() if line.strip()]
    if not lines:
        return ""
    if any(line.startswith("Traceback (most recent call last)") for line in lines):
        return lines[0] if len(lines) == 1 else f"{lines[0]} ... {lines[-1]}"
    return " ".join(lines)


def _os_message(err: OSError) -> str:
    """An OS error with its path: ``No such file or directory: /x``."""
    if err.filename is not None:
        message = f"{err.strerror or type(err).__name__}: {err.filename}"
        if err.filename2 is not None:
            message += f" -> {err.filename2}"
        return message
    return _one_line(str(err)) or type(err).__name__


def _exists(folder: str, rel: str | None = None) -> tuple[bool, bool]:
    """(whether ``folder`` is an existing directory, whether it holds file ``rel``), for a
    local path or a pyarrow URI; creates nothing."""
    if "://" not in folder:
        path = Path(folder).expanduser()
        return path.is_dir(), bool(rel) and (path / rel).is_file()
    import pyarrow.fs as pafs

    fs, root = pafs.FileSystem.from_uri(folder)
    is_dir = fs.get_file_info(root).type == pafs.FileType.Directory
    has = bool(rel) and is_dir and (fs.get_file_info(f"{root.rstrip('/')}/{rel}").type
                                    == pafs.FileType.File)
    return is_dir, has


def _require_run_dir(folder: str, marker: str = "config.yaml",
                     what: str = "a umim run directory") -> None:
    """Raise :class:`UsageError` unless ``folder`` is a directory holding ``marker``; creates
    nothing."""
    if "://" not in folder:
        path = Path(folder).expanduser()
        if not path.exists():
            raise UsageError(f"{folder} does not exist")
        if not path.is_dir():
            raise UsageError(f"{folder} is not a directory")
    is_dir, has = _exists(folder, marker)
    if not is_dir:
        raise UsageError(f"{folder} does not exist or is not a directory")
    if not has:
        raise UsageError(f"{folder} holds no {marker}: not {what}")


@contextlib.contextmanager
def _environ(values: Mapping[str, str]) -> Iterator[None]:
    """Set environment variables for the block, then restore them."""
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _call(fn: Callable[..., Any], *args: Any, env: Sequence[str] = (), **options: Any) -> Any:
    """Call an engine function with the options the user gave (``None``: not given).

    An option that ``fn`` does not take (yet) is, if named in ``env``, handed over as the
    environment variable the engine reads instead (``address``: ``$RAY_ADDRESS``,
    ``cache_dir``: ``$UMIM_CACHE_DIR``); ``quiet`` becomes warnings-only logging; any other
    is a :class:`UsageError`.
    """
    params = inspect.signature(fn).parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    passed: dict[str, Any] = {}
    environ: dict[str, str] = {}
    for key, value in options.items():
        if value is None:
            continue
        if takes_any or key in params:
            passed[key] = value
        elif key in env:
            environ[_ENV_FALLBACK[key]] = str(value)
        elif key == "quiet":
            if value:
                logging.getLogger().setLevel(logging.WARNING)
        else:
            raise UsageError(f"--{key.replace('_', '-')} is not supported by "
                             f"{fn.__module__}.{fn.__qualname__}() in this version")
    with _environ(environ):
        return fn(*args, **passed)


# -- shared flags ---------------------------------------------------------------------------
def _add_data_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data-root", default=None, metavar="DIR",
                        help="folder with medmnist/*.npz and mednist/ (overrides "
                             "data.data_root; else $UMIM_DATA_ROOT, else ~/.cache/umim/data)")
    parser.add_argument("--cache-dir", default=None, metavar="DIR",
                        help="folder for derived shards and MIM bases (overrides "
                             "data.cache_dir; else $UMIM_CACHE_DIR, else ~/.cache/umim/cache)")


def _add_address(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--address", default=None,
                        help="Ray cluster to join (sets run.address; else $RAY_ADDRESS, else "
                             "a local Ray)")


def _add_quiet(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quiet", action="store_true", help="no progress display")


def _add_experiment(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="experiment YAML, e.g. experiments/quickstart.yaml")
    parser.add_argument("overrides", nargs="*", default=[], metavar="key=value",
                        help="dotted overrides, e.g. strategy.rounds=3")


# -- config and plan ------------------------------------------------------------------------
def _experiment(args: argparse.Namespace) -> ExperimentConfig:
    """The config of ``run`` / ``config show``: the file plus overrides, ``--address`` in
    ``run.address``. Data root and cache folder stay as given (they belong to a machine, not
    to the experiment; see :func:`_machine_paths`)."""
    from engine.config import load_config

    cfg = load_config(args.config, args.overrides)
    if args.address:
        cfg = dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, address=args.address))
    return cfg


def _machine_paths(cfg: ExperimentConfig, args: argparse.Namespace) -> dict[str, str]:
    """This machine's data root and cache folder for ``cfg`` (``--data-root`` /
    ``--cache-dir``, else ``data.*``, else the environment), as the run resolves them."""
    from engine.data import resolve_cache_dir, resolve_data_root

    return {"data_root": str(resolve_data_root(args.data_root or cfg.data.data_root)),
            "cache_dir": str(resolve_cache_dir(args.cache_dir or cfg.data.cache_dir))}


def _show(cfg: ExperimentConfig, paths: Mapping[str, str], *, as_json: bool,
          run_dir: str | None = None) -> None:
    """Print the config as the run saves it (YAML) and its placement plan as YAML comments,
    so the whole output is a config that replays the run; or all of it as one JSON document
    ``{config, plan, paths}``."""
    import yaml

    from engine.config import to_dict
    from engine.run.plan import format_plan, placement_plan

    plan = placement_plan(cfg)
    if as_json:
        print(json.dumps({"config": to_dict(cfg), "plan": plan, "paths": dict(paths)},
                         indent=2, default=str))
        return
    print("# resolved config")
    print(yaml.safe_dump(to_dict(cfg), sort_keys=False).rstrip())
    print("#")
    for line in format_plan(plan).splitlines():
        print(f"# {line}")
    print(f"# data root    {paths['data_root']} (this machine; not saved in the config)")
    print(f"# cache        {paths['cache_dir']} (this machine; not saved in the config)")
    if run_dir is not None:
        print(f"# run dir      {run_dir} (a dry run starts and writes nothing)")


def _cmd_config_show(args: argparse.Namespace) -> int:
    cfg = _experiment(args)
    _show(cfg, _machine_paths(cfg, args), as_json=args.json)
    return 0


# -- data -----------------------------------------------------------------------------------
def _data_settings(args: argparse.Namespace, overrides: Sequence[str]
                   ) -> tuple[dict[str, Any], Path, Path, ExperimentConfig | None, Any]:
    """The catalog, data root, cache folder, experiment (``None`` without ``--config`` and
    overrides) and MedNIST split settings that a ``data`` command works with."""
    from engine.data import (
        MedNISTSplitSettings,
        domain_catalog,
        resolve_cache_dir,
        resolve_data_root,
    )

    cfg = None
    if args.config is not None or overrides:
        from engine.config import load_config

        cfg = load_config(args.config, overrides)
    catalog = cfg.data.catalog() if cfg is not None else domain_catalog()
    data_root = resolve_data_root(args.data_root or (cfg.data.data_root if cfg else None))
    cache_dir = resolve_cache_dir(args.cache_dir or (cfg.data.cache_dir if cfg else None))
    mednist = MedNISTSplitSettings(seed=cfg.data.mednist_seed if cfg else 0)
    return catalog, data_root, cache_dir, cfg, mednist


def _cmd_data_list(args: argparse.Namespace) -> int:
    from engine.data import summarise_domains

    catalog, data_root, _, cfg, mednist = _data_settings(args, args.overrides)
    summary = summarise_domains(catalog, data_root, mednist=mednist)
    rows = summary.domains
    used = set(cfg.data.domains) if cfg is not None else None
    if args.json:
        out = {}
        for r in rows:
            out[r.spec.name] = r.to_dict()
            if used is not None:
                out[r.spec.name]["in_experiment"] = r.spec.name in used
        print(json.dumps(out, indent=2))
        return 0 if summary.ok else 1
    title = f"umim domains (data root: {data_root})"
    if cfg is not None:
        title += f", experiment {cfg.name!r}"
    table = Table(title=escape(title))
    numbers = ("classes", "train", "val", "test")
    columns = ["domain", "source", "modality", "task", *numbers]
    if used is not None:
        columns.append("used")
    for col in columns:  # numbers and names never cut; descriptions wrap when space is short
        table.add_column(col, justify="right" if col in numbers else "left",
                         no_wrap=col in (*numbers, "domain", "used"), overflow="fold")
    for r in rows:
        counts = [str(r.counts[s]) if s in r.counts else "-" for s in ("train", "val", "test")]
        cells = [r.spec.name, r.spec.source_name, r.spec.modality, r.spec.task,
                 str(r.spec.num_classes), *counts]
        if used is not None:
            cells.append("yes" if r.spec.name in used else "")
        table.add_row(*map(escape, map(str, cells)))
    console = Console(width=max(Console().width, 120))
    console.print(table)
    pool = "unknown (MedNIST missing)" if summary.pool_size is None else \
        f"{summary.pool_size} images"
    console.print(f"server pool (unlabelled MedNIST half): {pool}")
    for r in rows:
        if r.problem:
            console.print(f"[red]{escape(r.spec.name)}[/red]: {escape(r.problem)}",
                          soft_wrap=True)
    return 0 if summary.ok else 1


def _cmd_data_prepare(args: argparse.Namespace) -> int:
    from engine.data import ShardBuilder

    overrides = [item for item in args.items if "=" in item]
    names = [item for item in args.items if "=" not in item]
    catalog, data_root, cache_dir, cfg, mednist = _data_settings(args, overrides)
    if not names:
        names = list(cfg.data.domains) if cfg is not None else list(catalog)
    download = not args.offline and (cfg.data.download if cfg is not None else True)
    pool = None
    if cfg is not None:  # the experiment's pool: its pool_share and pool_sources too
        from engine.data import PoolSettings

        pool = PoolSettings(share=cfg.data.pool_share, seed=cfg.data.mednist_seed,
                            domains=cfg.data.domains, sources=cfg.data.pool_sources)
    builder = ShardBuilder(catalog, data_root, cache_dir, mednist=mednist, download=download,
                           pool=pool)
    console = Console()
    for name, paths in builder.domains(names).items():
        console.print(escape(f"{name}: {paths['train'].parent}"), soft_wrap=True)
    console.print(escape(f"server pool: {builder.pool()}"), soft_wrap=True)
    return 0


# -- runs -----------------------------------------------------------------------------------
def _cmd_run(args: argparse.Namespace) -> int:
    cfg = _experiment(args)
    if args.dry_run:
        run_dir = args.out or f"{cfg.run.storage_path.rstrip('/')}/{cfg.name}-<timestamp>"
        _show(cfg, _machine_paths(cfg, args), as_json=False, run_dir=run_dir)
        return 0
    from engine.run.study import run

    result = _call(run, cfg, out=args.out, data_root=args.data_root, cache_dir=args.cache_dir,
                   quiet=args.quiet, config_file=args.config)
    _print_summary(result.run_dir, result.summary)
    return 0


def _cmd_resume(args: argparse.Namespace) -> int:
    _require_run_dir(args.run_dir)  # before the engine, which would create a missing folder
    from engine.run.study import resume

    result = _call(resume, args.run_dir, data_root=args.data_root, cache_dir=args.cache_dir,
                   address=args.address, quiet=args.quiet, env=("address",))
    _print_summary(result.run_dir, result.summary)
    return 0


def _cmd_sweep(args: argparse.Namespace) -> int:
    if args.resume is None and args.sweep_file is None:
        raise UsageError("give SWEEP.yaml or --resume DIR")
    if args.resume is not None:
        _require_run_dir(args.resume, "sweep.yaml", "a umim sweep directory")
    from engine.tune import sweep

    result = _call(sweep, args.sweep_file, args.overrides, out=args.out, resume=args.resume,
                   data_root=args.data_root, cache_dir=args.cache_dir, address=args.address,
                   quiet=args.quiet, env=("address", "cache_dir"))
    console = Console(width=max(Console().width, 100))
    console.print_json(json.dumps(result.summary, default=str))
    console.print(f"Optuna study: optuna-dashboard {escape(result.study_url)}", soft_wrap=True)
    return 0


TINY_VIT = {"arch": "vit", "hidden_size": 32, "mlp_dim": 64, "num_layers": 1, "num_heads": 2}


def _cmd_bench(args: argparse.Namespace) -> int:
    from engine.bench.common import machine, print_table

    where = {"data_root": args.data_root, "cache_dir": args.cache_dir, "address": args.address,
             "env": ("address",)}
    if args.bench == "fedavg":
        from engine.bench.fedavg import METHODS, FedAvgWorkload, bench_fedavg

        workload = FedAvgWorkload(clients=args.clients, rounds=args.rounds,
                                  local_epochs=args.local_epochs, batch_size=args.batch_size,
                                  samples_per_client=args.samples_per_client,
                                  actors=args.actors, cpus_per_actor=args.cpus_per_actor,
                                  gpus_per_actor=args.gpus_per_actor, arch=args.arch)
        methods = tuple(args.methods.split(",")) if args.methods else METHODS
        out = _call(bench_fedavg, workload, methods=methods, **where)
        if args.json:
            print(json.dumps({**out, "machine": machine()}, indent=2, default=float))
            return 1 if out["accuracy_agrees"] is False else 0
        columns = ["method", "wall_s", "samples", "samples_per_s",
                   f"time_vs_{methods[0]}", "speedup_vs_flower", "speedup_vs_flower_resident",
                   "of_ceiling", "test_acc", "test_auc",
                   f"weight_diff_vs_{out['weight_reference']}"]
        extra = {"accuracy agrees": f"{out['accuracy_agrees']} (tolerance "
                 f"{out['tolerance']})", "max relative weight difference":
                 f"{out['max_weight_difference']:.2e}",
                 "engine time breakdown (s)": {k: round(v, 2) for k, v in
                                               out["engine_breakdown"].items()},
                 "workload": out["workload"],
                 "machine": machine()}
        print_table("umim bench fedavg", out["rows"], columns, args.json, extra)
        return 1 if out["accuracy_agrees"] is False else 0
    if args.bench == "distill":
        from engine.bench.distill import bench_distill

        out = _call(bench_distill, steps=args.steps, batch_size=args.batch_size,
                    workers=tuple(int(w) for w in args.workers.split(",")),
                    pool_size=args.pool_size, model=TINY_VIT if args.tiny else None, **where)
        print_table("umim bench distill", out["rows"],
                    ["method", "workers", "wall_s", "train_s", "samples_per_s",
                     "throughput_vs_single"], args.json,
                    {"workload": out["workload"], "machine": machine()})
        return 0
    from engine.bench.scale import bench_scale

    out = _call(bench_scale, clients=args.clients, actors=args.actors or 2, rounds=args.rounds,
                **where)
    print_table("umim bench scale", out["rows"],
                ["clients", "actors", "clients_per_actor", "shards_s", "startup_s",
                 "seconds_per_round", "rounds_per_s", "peak_rss_gb"], args.json,
                {"machine": machine()})
    return 0


def _cmd_bench_gpu(args: argparse.Namespace) -> int:
    """``umim bench gpu``: the GPU checks, one table; exit 0 iff all passed (see
    :mod:`engine.bench.gpu`)."""
    from engine.bench.common import machine, print_table
    from engine.bench.gpu import CHECKS, bench_gpu

    only = tuple(n.strip() for n in args.only.split(",") if n.strip()) if args.only else None
    unknown = sorted(set(only or ()) - set(CHECKS))
    if unknown:
        raise UsageError(f"--only: unknown check(s) {unknown}; the checks: {','.join(CHECKS)}")
    out = _call(bench_gpu, force_cpu=args.force_cpu, only=only, data_root=args.data_root,
                cache_dir=args.cache_dir, env=("cache_dir",))
    print_table("umim bench gpu", out["rows"], ["check", "result", "wall_s", "detail"],
                args.json, {"passed": out["passed"], "mode": out["mode"], "machine": machine()})
    return 0 if out["passed"] else 1


def _cmd_bench_medmnist(args: argparse.Namespace) -> int:
    """``umim bench medmnist``: the MedMNIST v2 ResNet-18 (28) recipe per dataset, beside the
    published numbers (see :mod:`engine.bench.medmnist`)."""
    from engine.bench.common import machine, print_table
    from engine.bench.medmnist import COLUMNS, DATASETS, bench_medmnist

    names = [n.strip().lower() for n in args.datasets.split(",") if n.strip()]
    unknown = sorted(set(names) - set(DATASETS))
    if unknown or not names:
        raise UsageError(f"--datasets: unknown dataset(s) {unknown}; valid: "
                         f"{','.join(DATASETS)}")
    if args.epochs < 1 or args.batch_size < 1 or not args.lr > 0:
        raise UsageError("--epochs and --batch-size must be >= 1 and --lr > 0")
    out = _call(bench_medmnist, names, epochs=args.epochs, batch_size=args.batch_size,
                lr=args.lr, data_root=args.data_root, cache_dir=args.cache_dir)
    print_table("umim bench medmnist", out["rows"], COLUMNS, args.json,
                {"published": out["published"], "workload": out["workload"],
                 "machine": machine()})
    return 0


def _cmd_bench_crossdevice(args: argparse.Namespace) -> int:
    """``umim bench crossdevice``: sequential / umim / Flower / pfl rows of one cross-device
    workload (see :mod:`engine.bench.crossdevice`); exit 1, with one line saying why, when
    a row trained other clients or its accuracy or weights disagree with the sequential
    row's. ``--scale``: the engine alone with many virtual clients (default 10,000)."""
    from engine.bench.common import machine, print_table
    from engine.bench.crossdevice import (
        ENGINE_ROWS,
        ROWS,
        CrossDeviceWorkload,
        bench_crossdevice,
        bench_crossdevice_scale,
    )

    try:
        workload = CrossDeviceWorkload(
            clients=args.clients or (10_000 if args.scale else 1000), per_round=args.per_round,
            rounds=args.rounds or (3 if args.scale else 30), local_epochs=args.local_epochs,
            batch_size=args.batch_size, lr=args.lr, actors=args.actors, seed=args.seed,
            alpha=args.alpha, samples_per_client=args.samples_per_client)
    except ValueError as err:
        raise UsageError(f"{err}") from err
    where = {"data_root": args.data_root, "cache_dir": args.cache_dir, "address": args.address,
             "env": ("address",)}
    if args.scale:
        out = _call(bench_crossdevice_scale, workload, **where)
        print_table("umim bench crossdevice --scale", out["rows"],
                    ["clients", "actors", "clients_per_actor", "per_round", "shards_s",
                     "startup_s", "ray_start_s", "actors_start_s", "seconds_per_round",
                     "rounds_per_s", "updates_per_s", "peak_rss_gb", "peak_pss_gb"], args.json,
                    {"workload": out["workload"], "machine": machine()})
        return 0
    rows = tuple(r.strip() for r in args.rows.split(",") if r.strip())
    known = [*ROWS, *ENGINE_ROWS]
    unknown = sorted(set(rows) - set(known))
    if unknown or not rows or len(set(rows)) != len(rows):
        raise UsageError(f"--rows: unknown or repeated row(s) {unknown or list(rows)}; the "
                         f"rows: {','.join(known)}")
    out = _call(bench_crossdevice, workload, rows=rows, export_dir=args.export_dir, **where)
    if args.json:
        print(json.dumps({**out, "machine": machine()}, indent=2, default=float))
    else:
        engine = {r["method"]: {k: round(r[k], 2) for k in ("ray_start_s", "actors_start_s",
                                                            "rounds_fit_s",
                                                            "busiest_actor_train_s",
                                                            "dispatch_overhead_s",
                                                            "aggregate_s", "other_s")
                                     if k in r}
                  for r in out["rows"] if r["method"] in ENGINE_ROWS and "wall_s" in r}
        print_table("umim bench crossdevice", out["rows"],
                    ["method", "result", "wall_s", "startup_s", "rounds_s", "rounds_per_s",
                     "updates_per_s", "overhead_ms_per_update", "x_flower", "x_pfl",
                     "peak_rss_gb", "peak_pss_gb", "test_acc", "max_abs_diff"], False,
                    {**{f"{r['method']} not run": r["reason"] for r in out["rows"]
                        if r["result"] == "not run"},
                     "comparison": "passed" if out["passed"] else "FAILED",
                     "tolerances": f"test accuracy {out['acc_tolerance']}, weights "
                                   f"{out['state_tolerance']:g} (vs sequential)",
                     "updates": out["updates"], "engine time breakdown (s)": engine,
                     "data": out["data"], "workload": out["workload"],
                     "machine": machine()})
    if not out["passed"]:
        _err(f"umim bench crossdevice: the rows disagree: {'; '.join(out['failures'])}")
        return EXIT_UNEXPECTED
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    _require_run_dir(args.run_dir)
    from engine.records.report import write_report

    print(write_report(args.run_dir))
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    _require_run_dir(args.run_dir)
    from engine.run.export import export_model

    print(export_model(args.run_dir, args.out, fmt=args.format, data_root=args.data_root,
                       cache_dir=args.cache_dir))
    return 0


def _cmd_predict(args: argparse.Namespace) -> int:
    from engine.run.export import ExportedModel, prediction_rows

    rows = prediction_rows(ExportedModel(args.model), args.images, args.domain)
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    for row in rows:
        probs = ", ".join(f"{name}: {p:.4f}" for name, p in row["probabilities"].items())
        print(f"{row['file']}\t{row['label']}\t{probs}")
    return 0


# -- strategies -----------------------------------------------------------------------------
def strategy_rows() -> list[dict[str, Any]]:
    """What every registered strategy declares (``umim strategies``)."""
    from strategies import STRATEGIES

    return [cls.describe() for _, cls in sorted(STRATEGIES.items())]


def _cmd_strategies(args: argparse.Namespace) -> int:
    rows = strategy_rows()
    if args.json:
        print(json.dumps(rows, indent=2, default=str))
        return 0
    table = Table(title="umim strategies (strategy.name; its options go beside it under "
                        "strategy:)", show_lines=True)
    flags = list(rows[0]["declares"]) if rows else []  # what every strategy declares
    for col in ("strategy", *flags, "options (default)", "description"):
        table.add_column(col, overflow="fold")
    for row in rows:
        options = "\n".join(f"{k} = {json.dumps(v, default=str)}"
                            for k, v in row["options"].items()) or "-"
        marks = ["yes" if row["declares"][flag] else "no" for flag in flags]
        table.add_row(row["name"], *marks, escape(options), escape(row["doc"]))
    console = Console(width=max(Console().width, 120))
    console.print(table)
    console.print("every strategy also takes the common keys strategy.name, strategy.rounds "
                  "and the client sampling keys strategy.fraction_fit, min_fit_clients, "
                  "fraction_evaluate, min_evaluate_clients")
    return 0


def _print_summary(run_dir: str, summary: dict) -> None:
    console = Console(width=max(Console().width, 100))
    split = summary.get("scored_split", "test")  # evaluation.split=val scores val, not test
    table = Table(title=escape(f"{summary['name']} ({summary['strategy']}): {split} metrics"))
    for col in ("domain", "AUC", "ACC"):
        table.add_column(col, justify="left" if col == "domain" else "right")
    for domain, row in summary["domains"].items():
        table.add_row(escape(domain), f"{row['auc']:.3f}", f"{row['acc']:.3f}")
    console.print(table)
    console.print(escape(f"mean {split} AUC {summary['mean_test_auc']:.3f}; run directory: "
                         f"{run_dir}"), soft_wrap=True)
    if summary.get("failures"):
        console.print(f"[yellow]{len(summary['failures'])} client failure(s) recorded[/yellow]")
    if summary.get("evaluation_failures"):
        console.print(f"[yellow]{len(summary['evaluation_failures'])} fine-tuning call(s) "
                      "failed; their pairs are missing from the comparisons (summary.json: "
                      "evaluation_failures)[/yellow]")


# -- the parser -----------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``umim`` (exposed for tests and docs)."""
    verbose = _Parser(add_help=False)
    verbose.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                         help="debug logging, and the traceback of an error")
    parser = _Parser(prog="umim", description=__doc__,
                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"umim {_version()}")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="debug logging, and the traceback of an error")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(parent: Any, name: str, help_text: str) -> argparse.ArgumentParser:
        return parent.add_parser(name, help=help_text, description=help_text,
                                 parents=[verbose])

    data = command(commands, "data", "inspect and prepare the datasets")
    data_cmds = data.add_subparsers(dest="data_command", required=True, metavar="COMMAND")
    listing = command(data_cmds, "list", "table of the domains and their sample counts")
    listing.add_argument("overrides", nargs="*", default=[], metavar="key=value",
                         help="overrides of --config, e.g. data.extra_domains=...")
    listing.add_argument("--config", default=None, metavar="CONFIG",
                         help="an experiment YAML: list its data.extra_domains too")
    _add_data_args(listing)
    listing.add_argument("--json", action="store_true", help="print JSON keyed by domain")
    listing.set_defaults(func=_cmd_data_list)
    prepare = command(data_cmds, "prepare", "build the client and pool shards once")
    prepare.add_argument("items", nargs="*", default=[], metavar="DOMAIN|key=value",
                         help="domains to prepare (default: the experiment's with --config, "
                              "else all) and overrides of --config")
    prepare.add_argument("--config", default=None, metavar="CONFIG",
                         help="an experiment YAML: its domains, extra domains and data "
                              "settings")
    _add_data_args(prepare)
    prepare.add_argument("--offline", action="store_true", help="never download")
    prepare.set_defaults(func=_cmd_data_prepare)

    config = command(commands, "config", "inspect experiment configs")
    config_cmds = config.add_subparsers(dest="config_command", required=True,
                                        metavar="COMMAND")
    show = command(config_cmds, "show", "print the resolved config and its placement plan "
                                        "(starts nothing)")
    _add_experiment(show)
    _add_data_args(show)
    _add_address(show)
    show.add_argument("--json", action="store_true",
                      help="one JSON document {config, plan}")
    show.set_defaults(func=_cmd_config_show)

    run = command(commands, "run", "run an experiment config end to end")
    _add_experiment(run)
    run.add_argument("--out", default=None, metavar="DIR",
                     help="run directory (local path or pyarrow URI; default "
                          "<run.storage_path>/<name>-<timestamp>)")
    _add_data_args(run)
    _add_address(run)
    _add_quiet(run)
    run.add_argument("--dry-run", action="store_true",
                     help="print the resolved config and the placement plan; start nothing")
    run.set_defaults(func=_cmd_run)

    resume = command(commands, "resume", "continue a run from its last checkpoint")
    resume.add_argument("run_dir", help="the run directory (holds config.yaml)")
    _add_data_args(resume)
    _add_address(resume)
    _add_quiet(resume)
    resume.set_defaults(func=_cmd_resume)

    sweep = command(commands, "sweep", "Ray Tune + Optuna sweep of an experiment")
    sweep.add_argument("sweep_file", nargs="?", help="sweep YAML, e.g. "
                       "experiments/sweeps/universal.yaml")
    sweep.add_argument("overrides", nargs="*", default=[], metavar="key=value",
                       help="dotted overrides of the sweep file, e.g. search.num_samples=8")
    sweep.add_argument("--out", default=None, metavar="DIR", help="sweep directory")
    sweep.add_argument("--resume", default=None, metavar="DIR",
                       help="continue an interrupted sweep (finished trials are kept)")
    _add_data_args(sweep)
    _add_address(sweep)
    _add_quiet(sweep)
    sweep.set_defaults(func=_cmd_sweep)

    bench = command(commands, "bench", "benchmarks (tables of side-by-side ratios)")
    bench_cmds = bench.add_subparsers(dest="bench", required=True, metavar="BENCHMARK")
    fed = command(bench_cmds, "fedavg", "sequential loop vs this engine vs Flower")
    fed.add_argument("--clients", type=int, default=8)
    fed.add_argument("--rounds", type=int, default=2)
    fed.add_argument("--local-epochs", type=int, default=1)
    fed.add_argument("--batch-size", type=int, default=128)
    fed.add_argument("--samples-per-client", type=int, default=None,
                     help="cap each client's train split (default: the IID share)")
    fed.add_argument("--actors", type=int, default=None,
                     help="client actors (default: one per client on GPU, per core on CPU)")
    fed.add_argument("--cpus-per-actor", type=float, default=None)
    fed.add_argument("--gpus-per-actor", type=float, default=None)
    fed.add_argument("--methods", default=None,
                     help="comma list of sequential,engine,flower,flower-resident,ceiling "
                     "(default: all)")
    fed.add_argument("--arch", default="resnet18", choices=["resnet18", "vit"],
                     help="resnet18 (the reference workload) or a tiny vit (quick checks)")
    dis = command(bench_cmds, "distill", "distillation: one process vs Ray Train")
    dis.add_argument("--steps", type=int, default=100)
    dis.add_argument("--batch-size", type=int, default=256)
    dis.add_argument("--workers", default="1,2", help="comma list of Train worker counts")
    dis.add_argument("--pool-size", type=int, default=4000)
    dis.add_argument("--tiny", action="store_true", help="a tiny ViT (quick checks)")
    sca = command(bench_cmds, "scale", "many virtual clients on a few actors")
    sca.add_argument("--clients", type=int, default=1000)
    sca.add_argument("--actors", type=int, default=2)
    sca.add_argument("--rounds", type=int, default=2)
    for sub in (fed, dis, sca):
        sub.add_argument("--json", action="store_true", help="print JSON")
        _add_data_args(sub)
        _add_address(sub)
    bench.set_defaults(func=_cmd_bench)
    gpu = command(bench_cmds, "gpu", "the GPU checks in one call: tests/gpu, packed actors, "
                  "MIM + distillation, bench fedavg")
    gpu.add_argument("--force-cpu", action="store_true",
                     help="without CUDA: a tiny version of the checks on the CPU under bf16")
    gpu.add_argument("--only", default=None, metavar="CHECKS",
                     help="comma list of pytest,federated,mim-distill,bench-fedavg "
                          "(default: all)")
    gpu.add_argument("--json", action="store_true", help="print JSON")
    _add_data_args(gpu)
    gpu.set_defaults(func=_cmd_bench_gpu)
    med = command(bench_cmds, "medmnist", "the MedMNIST v2 ResNet-18 (28) recipe per "
                  "dataset, centrally, beside the published numbers")
    med.add_argument("--datasets", default="breastmnist,retinamnist",
                     help="comma list of breastmnist,pneumoniamnist,retinamnist,pathmnist")
    med.add_argument("--epochs", type=int, default=100,
                     help="epochs (lr x0.1 at 50 %% and 75 %% of them)")
    med.add_argument("--batch-size", type=int, default=128)
    med.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate")
    med.add_argument("--json", action="store_true", help="print JSON")
    _add_data_args(med)
    med.set_defaults(func=_cmd_bench_medmnist)
    xdev = command(bench_cmds, "crossdevice", "cross-device FedAvg (MedNIST over many "
                   "clients, a sample per round): sequential vs umim vs Flower vs pfl")
    xdev.add_argument("--clients", type=int, default=None,
                      help="clients MedNIST is split over (default 1000; 10000 with --scale)")
    xdev.add_argument("--per-round", type=int, default=50, help="clients sampled per round")
    xdev.add_argument("--rounds", type=int, default=None,
                      help="rounds (default 30; 3 with --scale)")
    xdev.add_argument("--local-epochs", type=int, default=1)
    xdev.add_argument("--batch-size", type=int, default=32)
    xdev.add_argument("--lr", type=float, default=0.05, help="SGD learning rate")
    xdev.add_argument("--actors", type=int, default=2,
                      help="client actors of umim and of Flower (1 CPU each)")
    xdev.add_argument("--seed", type=int, default=0)
    xdev.add_argument("--alpha", type=float, default=0.5, help="Dirichlet label skew")
    xdev.add_argument("--samples-per-client", type=int, default=None,
                      help="cap each client's train split (quick checks; default: all)")
    xdev.add_argument("--rows", default="sequential,umim,flower,pfl",
                      help="comma list of sequential,umim,flower,pfl (and other engine rows "
                           "of engine.bench.crossdevice.ENGINE_ROWS), run in this order")
    xdev.add_argument("--export-dir", default=None, metavar="DIR",
                      help="keep the workload export (workload.json, train.npz, init.pt) "
                           "there (default: a temporary folder)")
    xdev.add_argument("--scale", action="store_true",
                      help="the engine alone with many virtual clients: start-up, seconds "
                           "per round, peak memory over every process")
    xdev.add_argument("--json", action="store_true", help="print JSON")
    _add_data_args(xdev)
    _add_address(xdev)
    xdev.set_defaults(func=_cmd_bench_crossdevice)

    report = command(commands, "report", "write report.md and plots for a run")
    report.add_argument("run_dir", help="the run directory (holds config.yaml)")
    report.set_defaults(func=_cmd_report)

    export = command(commands, "export", "write a finished run's global model with its "
                                         "metadata (domains, labels, normalisation, config)")
    export.add_argument("run_dir", help="the run directory (holds config.yaml)")
    export.add_argument("--format", default="safetensors", choices=["safetensors",
                                                                    "torchscript"],
                        help="safetensors (weights + metadata header; default) or "
                             "torchscript (forward(images, domain), needs only torch)")
    export.add_argument("--out", default=None, metavar="PATH",
                        help="the file to write (default <run_dir>/export/model.safetensors "
                             "or model.pt)")
    _add_data_args(export)
    export.set_defaults(func=_cmd_export)

    predict = command(commands, "predict", "class probabilities of image files from an "
                                           "exported model")
    predict.add_argument("model", help="a file written by `umim export`")
    predict.add_argument("images", nargs="+", help="PNG / JPEG images or .npy arrays")
    predict.add_argument("--domain", required=True, help="the domain head to use")
    predict.add_argument("--json", action="store_true", help="print JSON, one row per image")
    predict.set_defaults(func=_cmd_predict)

    strategies = command(commands, "strategies",
                         "list the registered strategies and their options")
    strategies.add_argument("--json", action="store_true", help="print JSON")
    strategies.set_defaults(func=_cmd_strategies)
    return parser


# -- errors ---------------------------------------------------------------------------------
def _prog(args: argparse.Namespace) -> str:
    """``umim <command> [<subcommand>]`` of ``args``."""
    words = ["umim", args.command]
    sub = getattr(args, "bench" if args.command == "bench" else f"{args.command}_command", None)
    if isinstance(sub, str):
        words.append(sub)
    return " ".join(words)


def _resume_hint(args: argparse.Namespace) -> str | None:
    """The command that continues what ``args`` started, when there is something to resume."""
    try:
        if args.command == "resume":
            return f"umim resume {shlex.quote(args.run_dir)}"
        if args.command == "run" and args.out and not args.dry_run \
                and _exists(args.out, "config.yaml")[1]:
            return f"umim resume {shlex.quote(str(args.out))}"
        if args.command == "sweep":
            folder = args.resume or args.out
            if folder and _exists(folder, "sweep.yaml")[1]:
                return f"umim sweep --resume {shlex.quote(str(folder))}"
    except Exception:  # a hint must never hide the interrupt
        return None
    return None


def _expected(err: Exception) -> str | None:
    """The label of an error whose message is worth showing as is (exit 2), else ``None``.

    Each class is looked up only if its module was imported (an error of a module never
    imported cannot have been raised).
    """
    kinds = [("engine.config.loader", "ConfigError", "config error"),
             ("engine.data.errors", "DataError", "data error"),
             ("engine.cluster.resources", "ResourceError", "resource error"),
             ("engine.fl.simulation", "RunError", "run error"),
             ("engine.records.lock", "RunLockError", "run error"),
             ("engine.run.export", "ExportError", "export error")]
    for module, name, label in kinds:
        cls = getattr(sys.modules.get(module), name, None)
        if isinstance(cls, type) and isinstance(err, cls):
            return label
    return None


def _fail(err: Exception, verbose: bool, prog: str = "umim") -> int:
    """Print ``err`` as one line (after its traceback when ``verbose``); the exit status
    (``prog``: the command, named in a usage error)."""
    if verbose:
        traceback.print_exception(err)
    label = _expected(err)
    if label is not None:
        _err(f"umim: {label}: {_one_line(str(err)) or type(err).__name__}")
        return EXIT_ERROR
    if isinstance(err, UsageError):
        _err(f"{prog}: error: {_one_line(str(err))}")
        return EXIT_ERROR
    if isinstance(err, OSError):
        _err(f"umim: error: {_os_message(err)}")
        return EXIT_ERROR
    message = _one_line(str(err))
    hint = "" if verbose else " (run with -v for the traceback)"
    _err(f"umim: error: {type(err).__name__}{': ' + message if message else ''}{hint}")
    return EXIT_UNEXPECTED


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``umim`` console script.

    Parameters
    ----------
    argv
        The arguments (default: ``sys.argv[1:]``).

    Returns
    -------
    int
        The exit status: 0 success, 1 an unexpected error (or a failed check such as
        missing data in ``umim data list``), 2 a usage, config, data, resource, run or
        file error, 130 interrupted.
    """
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as done:  # --help, --version, or a usage error already printed
        return done.code if isinstance(done.code, int) else (0 if done.code is None else 2)
    verbose = bool(getattr(args, "verbose", False))
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        hint = _resume_hint(args)
        _err(f"interrupted; continue with: {hint}" if hint else "interrupted")
        return EXIT_INTERRUPTED
    except BrokenPipeError:  # e.g. `umim strategies | head`
        with contextlib.suppress(OSError):
            sys.stdout = open(os.devnull, "w")  # noqa: SIM115
        return EXIT_UNEXPECTED
    except Exception as err:
        return _fail(err, verbose, _prog(args))


if __name__ == "__main__":
    sys.exit(main())
