"""The league table: every algorithm on each task config, N seeds, held-out reward at equal compute.

    python bench/league.py --configs configs/demo/tiny_flux_cpu.yaml configs/demo/league_jpeg.yaml \
        --seeds 3 --budget-seconds 15 --out outputs/league [--algorithms a,b,c] [--clock cpu]

Each run is the real GenerationTrainer; the held-out reward (eval/reward/mean) and the gold rewards (eval/gold/*)
are read at equal training time and at equal model evaluations (denoiser sample-evaluations, evaluation excluded;
budget: --budget-evals, or the reference algorithm's count at the time budget). Writes league.md, league.json,
league.png under --out; each run's folder (<out>/<task>/<algorithm>/seed<k>/metrics.jsonl) holds its records.
Recipes: <--recipes>/<algorithm>.yaml supplies the algorithm's section, sampling and optimiser keys (see
gen_rl/league.py RECIPE_KEYS), --recipe NAME=YAML adds one (e.g. diffusion_nft=configs/demo/tiny_flux_nft_cpu.yaml);
--recipes none keeps each task's own settings. The machinery is gen_rl/league.py.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gen_rl.algorithms import ALGORITHMS  # noqa: E402
from gen_rl.league import Budget, load_runs, run_league, write_report  # noqa: E402
from gen_rl.trainer import GenerationTrainer  # noqa: E402

RECIPES = Path(__file__).resolve().parents[1] / "configs" / "demo" / "algorithms"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", nargs="+", default=[], help="task configs (generation YAMLs)")
    parser.add_argument(
        "--report-from", nargs="+", default=[], metavar="DIR", help="no runs: merge these leagues' runs.json"
    )
    parser.add_argument(
        "--algorithms", default=None, help="comma-separated names (default: every registered)"
    )
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument(
        "--first-seed", type=int, default=0, help="seeds first-seed .. first-seed + seeds - 1"
    )
    parser.add_argument("--budget-seconds", type=float, default=15.0, help="training time per run")
    parser.add_argument("--budget-evals", type=int, default=None, help="model evaluations per run")
    parser.add_argument("--reference", default="flow_grpo", help="sets the evaluations budget when not given")
    parser.add_argument("--points", type=int, default=4, help="evaluations along the time budget")
    parser.add_argument("--max-time-factor", type=float, default=3.0)
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall", help="cpu: process CPU time")
    parser.add_argument(
        "--cpu-threads", type=int, default=0, help="torch threads on CPU (0: torch's default)"
    )
    parser.add_argument("--recipes", default=str(RECIPES), help="folder of <algorithm>.yaml recipes, or none")
    parser.add_argument(
        "--recipe",
        action="append",
        default=[],
        metavar="NAME=YAML",
        help="a recipe outside --recipes (repeatable)",
    )
    parser.add_argument("--out", default="outputs/league")
    return parser.parse_args(argv)


def recipes(args: argparse.Namespace) -> dict[str, Path] | None:
    """Algorithm name -> recipe YAML: the --recipes folder's <name>.yaml files, then each --recipe NAME=YAML."""
    found = {} if args.recipes == "none" else {p.stem: p for p in Path(args.recipes).glob("*.yaml")}
    for item in args.recipe:
        name, _, path = item.partition("=")
        found[name] = Path(path)
    return found or None


def main(argv: list[str] | None = None) -> None:
    """Run the league and write its table and plot."""
    args = parse_args(argv)
    algorithms = args.algorithms.split(",") if args.algorithms else list(ALGORITHMS)
    unknown = [name for name in algorithms if name not in ALGORITHMS and ":" not in name]
    if unknown:
        raise SystemExit(f"error: unknown algorithm(s) {unknown}; choose from {', '.join(ALGORITHMS)}")
    budget = Budget(
        seconds=args.budget_seconds,
        evals=args.budget_evals,
        points=args.points,
        max_time_factor=args.max_time_factor,
        clock=args.clock,
    )
    if args.report_from:
        results = list(
            {
                (r.task, r.algorithm, r.seed): r
                for folder in args.report_from[::-1]
                for r in load_runs(folder)
            }.values()
        )  # a run repeated in several folders counts once (the earliest folder named wins)
        table, plot = write_report(results, budget, args.out)
        print(table.read_text())
        print(f"[league] table {table}, plot {plot}")
        return
    if not args.configs:
        raise SystemExit("error: pass --configs (task YAMLs) or --report-from (league folders)")
    results = run_league(
        args.configs,
        algorithms,
        args.seeds,
        budget,
        args.out,
        GenerationTrainer,
        recipes=recipes(args),
        cpu_threads=args.cpu_threads,
        reference=args.reference if args.reference in algorithms else None,
        first_seed=args.first_seed,
    )
    table, plot = write_report(results, budget, args.out)
    print(table.read_text())
    print(f"[league] table {table}, plot {plot}")


if __name__ == "__main__":
    main()
