"""The ``umim`` command line."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence

from rich.console import Console
from rich.table import Table

from engine.data import (
    DataError,
    ShardBuilder,
    domain_catalog,
    resolve_cache_dir,
    resolve_data_root,
    summarise_domains,
)

logger = logging.getLogger(__name__)


def _add_data_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data-root", default=None,
                        help="folder with medmnist/*.npz and mednist/ (else $UMIM_DATA_ROOT, "
                             "else ~/.cache/umim/data)")
    parser.add_argument("--cache-dir", default=None,
                        help="folder for derived shards (else $UMIM_CACHE_DIR, else "
                             "~/.cache/umim/cache)")


def _cmd_data_list(args: argparse.Namespace) -> int:
    summary = summarise_domains(domain_catalog(), resolve_data_root(args.data_root))
    rows = summary.domains
    if args.json:
        print(json.dumps({r.spec.name: r.to_dict() for r in rows}, indent=2))
        return 0 if summary.ok else 1
    table = Table(title=f"umim domains (data root: {resolve_data_root(args.data_root)})")
    for col in ("domain", "source", "modality", "task", "classes", "train", "val", "test"):
        table.add_column(col, no_wrap=True, justify="right"
                         if col in ("classes", "train", "val", "test") else "left")
    for r in rows:
        counts = [str(r.counts[s]) if s in r.counts else "-" for s in ("train", "val", "test")]
        table.add_row(r.spec.name, r.spec.source_name, r.spec.modality, r.spec.task,
                      str(r.spec.num_classes), *counts)
    console = Console(width=max(Console().width, 120))
    console.print(table)
    pool = "unknown (MedNIST missing)" if summary.pool_size is None else \
        f"{summary.pool_size} images"
    console.print(f"server pool (unlabelled MedNIST half): {pool}")
    for r in rows:
        if r.problem:
            console.print(f"[red]{r.spec.name}[/red]: {r.problem}")
    return 0 if summary.ok else 1


def _cmd_data_prepare(args: argparse.Namespace) -> int:
    catalog = domain_catalog()
    names = args.domains or list(catalog)
    builder = ShardBuilder(catalog, resolve_data_root(args.data_root),
                           resolve_cache_dir(args.cache_dir), download=not args.offline)
    console = Console()
    for name, paths in builder.domains(names).items():
        console.print(f"{name}: {paths['train'].parent}")
    console.print(f"server pool: {builder.pool()}")
    return 0


def _cmd_run(args: argparse.Namespace) -> int:
    from engine.config import load_config
    from engine.run.study import run

    overrides = list(args.overrides)
    if args.address:
        overrides.append(f"run.address={args.address}")
    cfg = load_config(args.config, overrides)
    result = run(cfg, out=args.out, data_root=args.data_root, quiet=args.quiet)
    _print_summary(result.run_dir, result.summary)
    return 0


def _cmd_resume(args: argparse.Namespace) -> int:
    from engine.run.study import resume

    result = resume(args.run_dir, quiet=args.quiet)
    _print_summary(result.run_dir, result.summary)
    return 0


def _cmd_sweep(args: argparse.Namespace) -> int:
    from engine.tune import sweep

    if args.resume is None and args.sweep_file is None:
        raise SystemExit("umim sweep: give SWEEP.yaml or --resume DIR")
    summary = sweep(args.sweep_file, args.overrides, out=args.out, resume=args.resume,
                    data_root=args.data_root)
    console = Console(width=max(Console().width, 100))
    console.print_json(json.dumps(summary, default=str))
    return 0


TINY_VIT = {"arch": "vit", "hidden_size": 32, "mlp_dim": 64, "num_layers": 1, "num_heads": 2}


def _cmd_bench(args: argparse.Namespace) -> int:
    from engine.bench.common import machine, print_table

    if args.bench == "fedavg":
        from engine.bench.fedavg import METHODS, FedAvgWorkload, bench_fedavg

        workload = FedAvgWorkload(clients=args.clients, rounds=args.rounds,
                                  local_epochs=args.local_epochs, batch_size=args.batch_size,
                                  samples_per_client=args.samples_per_client,
                                  actors=args.actors, cpus_per_actor=args.cpus_per_actor,
                                  gpus_per_actor=args.gpus_per_actor, arch=args.arch)
        methods = tuple(args.methods.split(",")) if args.methods else METHODS
        out = bench_fedavg(workload, data_root=args.data_root, methods=methods)
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

        out = bench_distill(steps=args.steps, batch_size=args.batch_size,
                            workers=tuple(int(w) for w in args.workers.split(",")),
                            pool_size=args.pool_size, data_root=args.data_root,
                            model=TINY_VIT if args.tiny else None)
        print_table("umim bench distill", out["rows"],
                    ["method", "workers", "wall_s", "train_s", "samples_per_s",
                     "throughput_vs_single"], args.json,
                    {"workload": out["workload"], "machine": machine()})
        return 0
    from engine.bench.scale import bench_scale

    out = bench_scale(clients=args.clients, actors=args.actors or 2, rounds=args.rounds,
                      data_root=args.data_root)
    print_table("umim bench scale", out["rows"],
                ["clients", "actors", "clients_per_actor", "shards_s", "startup_s",
                 "seconds_per_round", "rounds_per_s", "peak_rss_gb"], args.json,
                {"machine": machine()})
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from engine.records.report import write_report

    print(write_report(args.run_dir))
    return 0


def _cmd_strategies(args: argparse.Namespace) -> int:
    from strategies import STRATEGIES

    for name, cls in sorted(STRATEGIES.items()):
        doc = (cls.__doc__ or "").strip().splitlines()[0]
        print(f"{name:<12} {doc}")
    return 0


def _print_summary(run_dir: str, summary: dict) -> None:
    console = Console(width=max(Console().width, 100))
    table = Table(title=f"{summary['name']} ({summary['strategy']}): test metrics")
    for col in ("domain", "AUC", "ACC"):
        table.add_column(col, justify="left" if col == "domain" else "right")
    for domain, row in summary["domains"].items():
        table.add_row(domain, f"{row['auc']:.3f}", f"{row['acc']:.3f}")
    console.print(table)
    console.print(f"mean test AUC {summary['mean_test_auc']:.3f}; run directory: {run_dir}")
    if summary.get("failures"):
        console.print(f"[yellow]{len(summary['failures'])} client failure(s) recorded[/yellow]")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``umim`` (exposed for tests and docs)."""
    parser = argparse.ArgumentParser(prog="umim", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    commands = parser.add_subparsers(dest="command", required=True)

    data = commands.add_parser("data", help="inspect and prepare the datasets")
    data_cmds = data.add_subparsers(dest="data_command", required=True)
    listing = data_cmds.add_parser("list", help="table of the domains and their sample counts")
    _add_data_args(listing)
    listing.add_argument("--json", action="store_true", help="print JSON keyed by domain")
    listing.set_defaults(func=_cmd_data_list)
    prepare = data_cmds.add_parser("prepare", help="build the client and pool shards once")
    _add_data_args(prepare)
    prepare.add_argument("domains", nargs="*", help="domains to prepare (default: all)")
    prepare.add_argument("--offline", action="store_true", help="never download")
    prepare.set_defaults(func=_cmd_data_prepare)

    run = commands.add_parser("run", help="run an experiment config end to end")
    run.add_argument("config", help="experiment YAML, e.g. experiments/quickstart.yaml")
    run.add_argument("overrides", nargs="*", help="dotted overrides, e.g. strategy.rounds=3")
    run.add_argument("--data-root", default=None, help="overrides data.data_root")
    run.add_argument("--out", default=None, help="run directory (local path or pyarrow URI)")
    run.add_argument("--address", default=None, help="Ray cluster address (else $RAY_ADDRESS)")
    run.add_argument("--quiet", action="store_true", help="no progress display")
    run.set_defaults(func=_cmd_run)

    resume = commands.add_parser("resume", help="continue a run from its last checkpoint")
    resume.add_argument("run_dir")
    resume.add_argument("--quiet", action="store_true", help="no progress display")
    resume.set_defaults(func=_cmd_resume)

    sweep = commands.add_parser("sweep", help="Ray Tune + Optuna sweep of an experiment")
    sweep.add_argument("sweep_file", nargs="?", help="sweep YAML, e.g. "
                       "experiments/sweeps/universal.yaml")
    sweep.add_argument("overrides", nargs="*", help="dotted overrides of the sweep file, e.g. "
                       "search.num_samples=8")
    sweep.add_argument("--out", default=None, help="sweep directory")
    sweep.add_argument("--data-root", default=None, help="overrides the experiment's data root")
    sweep.add_argument("--resume", default=None, metavar="DIR",
                       help="continue an interrupted sweep (finished trials are kept)")
    sweep.set_defaults(func=_cmd_sweep)

    bench = commands.add_parser("bench", help="benchmarks (tables of side-by-side ratios)")
    bench_cmds = bench.add_subparsers(dest="bench", required=True)
    fed = bench_cmds.add_parser("fedavg", help="sequential loop vs this engine vs Flower")
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
    dis = bench_cmds.add_parser("distill", help="distillation: one process vs Ray Train")
    dis.add_argument("--steps", type=int, default=100)
    dis.add_argument("--batch-size", type=int, default=256)
    dis.add_argument("--workers", default="1,2", help="comma list of Train worker counts")
    dis.add_argument("--pool-size", type=int, default=4000)
    dis.add_argument("--tiny", action="store_true", help="a tiny ViT (quick checks)")
    sca = bench_cmds.add_parser("scale", help="many virtual clients on a few actors")
    sca.add_argument("--clients", type=int, default=1000)
    sca.add_argument("--actors", type=int, default=2)
    sca.add_argument("--rounds", type=int, default=2)
    for sub in (fed, dis, sca):
        sub.add_argument("--json", action="store_true", help="print JSON")
        sub.add_argument("--data-root", default=None)
    bench.set_defaults(func=_cmd_bench)

    report = commands.add_parser("report", help="write report.md and plots for a run")
    report.add_argument("run_dir")
    report.set_defaults(func=_cmd_report)

    strategies = commands.add_parser("strategies", help="list the registered strategies")
    strategies.set_defaults(func=_cmd_strategies)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``umim`` console script."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args) or 0)
    except DataError as err:
        Console(stderr=True).print(f"[red]data error:[/red] {err}")
        return 2
    except Exception as err:  # every expected failure has a message worth showing as is
        from engine.cluster.resources import ResourceError
        from engine.config import ConfigError
        from engine.fl.simulation import RunError

        if isinstance(err, ConfigError | ResourceError | RunError):
            Console(stderr=True).print(f"[red]{type(err).__name__}:[/red] {err}")
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
