"""The ``ddkit bench`` and ``ddkit report`` commands; ``ddkit.cli.build_parser`` adds them."""

from __future__ import annotations

from ddkit.bench.cells import statistics_methods
from ddkit.bench.results import TABLE_FILE
from ddkit.bench.runner import plan_bench, run_bench
from ddkit.bench.report import write_report
from ddkit.cli_help import COMPILE_HELP
from ddkit.errors import DDKitError
from ddkit.methods import get_spec, method_names
from ddkit.tiers import DEFAULT_TIER, TIER_CHOICES
from ddkit.utils import split_names

DEFAULT_DATASETS = "fashion-mnist,mnist"
DEFAULT_IPCS = "1,10,50"


def _names(text: str, option: str) -> list[str]:
    names = split_names(text)
    if not names:
        raise DDKitError(f"{option} is empty; give a comma-separated list")
    return names


def _positive_ints(text: str, option: str) -> list[int]:
    values = []
    for part in _names(text, option):
        try:
            value = int(part)
        except ValueError:
            raise DDKitError(f"{option} expects comma-separated positive integers, got {part!r}") from None
        if value < 1:
            raise DDKitError(f"{option} expects positive integers, got {value}")
        values.append(value)
    return values


def default_methods() -> list[str]:
    """Every registered method except the random baseline (which the bench always adds)."""
    return [name for name in method_names() if name != "random"]


def cmd_bench(args) -> int:
    """`ddkit bench` with the parsed ``args``; returns the exit code (errors raise DDKitError)."""
    methods = _names(args.methods, "--methods") if args.methods else default_methods()
    if args.plan:
        print("\n".join(plan_bench(args.tier, _names(args.datasets, "--datasets"), methods,
                                    _positive_ints(args.ipc, "--ipc"), runs=args.runs, out=args.out,
                                    seed=args.seed, archs=_names(args.arch, "--arch"),
                                    trust_results=args.trust_results)))
        return 0
    lines = run_bench(args.tier, _names(args.datasets, "--datasets"), methods, _positive_ints(args.ipc, "--ipc"),
                      runs=args.runs, out=args.out, seed=args.seed, device=args.device,
                      show_progress=not args.quiet, archs=_names(args.arch, "--arch"), compiled=args.compile,
                      trust_results=args.trust_results, scores=args.scores)
    failed = [line for line in lines if "error" in line]
    print(f"{len(lines) - len(failed)} of {len(lines)} cells done; table: {args.out}/{TABLE_FILE}")
    for line in failed:
        print(f"failed: {line['dataset']} {line['method']} ipc {line['ipc']} ({line['arch']}): "
              f"{str(line['error']).splitlines()[0]}")
    if failed:
        print("run the same command again to retry the failed cells")
    return 1 if failed else 0


def cmd_report(args) -> int:
    """`ddkit report` with the parsed ``args``; returns the exit code (errors raise DDKitError)."""
    print(write_report(args.dir, args.out))
    return 0


def add_commands(subparsers) -> None:
    """Add ``bench`` and ``report`` to the ``ddkit`` command line's subparsers."""
    soft = [name for name in method_names() if get_spec(name).protocol == "soft"]
    p = subparsers.add_parser(
        "bench", help="distill and evaluate a grid of datasets x methods x IPC (resumable)",
        description="Distill every (dataset, method, IPC) once at the tier's preset and evaluate it with the "
                    "protocol the method calls for (soft labels for " + (", ".join(soft) or "none") + "; hard labels "
                    "for the others and the random subset). The random subset is always included, and for every "
                    "statistics method M (" + ", ".join(statistics_methods()) + ") also random+M, the random subset "
                    "relabelled with M's teachers. Results "
                    "go to OUT/results.jsonl (one line per cell), OUT/table.md and OUT/plots/; running the same "
                    "command again skips finished cells, retries failed ones, continues stopped distillations and "
                    "evaluation runs, remakes cells whose preset changed (the old set is kept as "
                    "sets/<name>.superseded-<time>) and evaluates again cells whose evaluation preset changed; "
                    "--plan shows which. Several processes may run the same command on one OUT at once (e.g. one "
                    "per core or GPU): each claims a cell before running it and leaves the cells others are "
                    "running to them.")
    p.add_argument("--tier", default=DEFAULT_TIER,
                   help=f"distillation and evaluation preset: {TIER_CHOICES} (default {DEFAULT_TIER})")
    p.add_argument("--datasets", default=DEFAULT_DATASETS,
                   help=f"comma-separated dataset names (default {DEFAULT_DATASETS})")
    p.add_argument("--methods", default=None,
                   help="comma-separated methods (default: every registered method except random; random is "
                        "always added)")
    p.add_argument("--ipc", default=DEFAULT_IPCS, help=f"comma-separated images per class (default {DEFAULT_IPCS})")
    p.add_argument("--runs", type=int, default=3,
                   help="evaluation runs per cell, seeds SEED .. SEED+RUNS-1 (default 3)")
    p.add_argument("--out", required=True, help="bench directory (created; reused to resume)")
    p.add_argument("--seed", type=int, default=0, help="distillation seed and first evaluation seed (default 0)")
    p.add_argument("--arch", default="convnet",
                   help="comma-separated evaluation architectures, e.g. convnet,resnet18 (default convnet)")
    p.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:N or auto")
    p.add_argument("--compile", action="store_true",
                   help=COMPILE_HELP.format(what="train the evaluation networks, run the matching family's "
                                                 "distillation networks and train teachers not cached yet"))
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bars and no per-cell lines")
    p.add_argument("--trust-results", action="store_true",
                   help="count a cell whose line is in OUT/results.jsonl as finished even when its set under "
                        "OUT/sets is missing (a results.jsonl carried to another machine without the sets), or is "
                        "a random subset a random+M cell made again and nobody evaluated; by default such a cell "
                        "is made or evaluated again. Other cells whose set is there are checked as usual")
    p.add_argument("--scores", action="store_true",
                   help="also compute DD-Ranking's scores of every cell (HLR, IOR, LRS, ARS; docs/bench.md): a "
                        "hard-label evaluation of soft-label sets, an evaluation without augmentation, and the "
                        "full-data reference (trained once per dataset, architecture and tier, cached in "
                        "$DDKIT_DATA/references); finished cells get only the missing evaluations, and "
                        "lines scored before their baseline's line existed are rescored")
    p.add_argument("--plan", action="store_true",
                   help="print what the bench would do with each cell (done, to run, failed, make again, evaluate "
                        "again, and what a stopped bench left to continue from) and exit; runs and writes nothing")
    p.set_defaults(func=cmd_bench)

    p = subparsers.add_parser(
        "report", help="write one self-contained HTML page for a set, a bench directory or a folder of sets",
        description="Write an HTML report (images embedded, no external resources): for a set directory its "
                    "manifest summary, evaluations, image grid and loss curve; for a bench directory its table, "
                    "plots and every set's grid; for a folder of sets (say runs/, with ddkit's, baseline and imported "
                    "sets) every stored evaluation side by side and each set's grid.")
    p.add_argument("dir", help="a distilled-set directory, a bench directory, or a folder of set directories")
    p.add_argument("--out", default=None, help="the HTML file to write (default DIR/report.html)")
    p.set_defaults(func=cmd_report)
