"""Every benchmark in one command: each one's table, then every target of the issue in one summary.

    python benchmarks/run_all.py [--quick] [--only finetune,scaling,meta_step,maml_peers,data_pipeline,flops,mlm_throughput,sampler_overhead,eval_order] [--json out.json]

Runs ``finetune.py``, ``scaling.py``, ``meta_step.py``, ``maml_peers.py``, ``data_pipeline.py``, ``flops.py``,
``mlm_throughput.py``, ``sampler_overhead.py`` and ``eval_order.py`` one after the other with their default sizes
(``--quick``: each one's quick mode), prints each one's report as it finishes, then a table of
every performance target they check (value, target, met or not), and writes everything to
``--json`` (default ``benchmarks/results/latest.json``). Targets are printed, never asserted: a shared machine moves
the numbers.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _measure  # noqa: E402
import data_pipeline  # noqa: E402
import eval_order  # noqa: E402
import finetune  # noqa: E402
import flops  # noqa: E402
import maml_peers  # noqa: E402
import meta_step  # noqa: E402
import mlm_throughput  # noqa: E402
import sampler_overhead  # noqa: E402
import scaling  # noqa: E402

SUITE = {"finetune": finetune, "scaling": scaling, "meta_step": meta_step, "maml_peers": maml_peers, "data_pipeline": data_pipeline,
         "flops": flops, "mlm_throughput": mlm_throughput, "sampler_overhead": sampler_overhead, "eval_order": eval_order}
DEFAULT_JSON = Path(__file__).resolve().parent / "results" / "latest.json"


def summary(results: list[dict]) -> str:
    lines = ["## targets", "", "| benchmark | target | value | limit | met |", "|---|---|---:|---|---|"]
    for result in results:
        for t in result["targets"]:
            value = "n/a" if t["value"] is None else f"{t['value']:.2f}"
            met = {True: "yes", False: "**no**", None: "not measured"}[t["met"]]
            lines.append(f"| {result['name']} | {t['name']} | {value} | {t['target']} | {met} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="each benchmark's quick mode (a smoke test)")
    p.add_argument("--only", default=",".join(SUITE), help="comma-separated subset of " + ",".join(SUITE))
    p.add_argument("--json", default=None, help=f"write every number here (default {DEFAULT_JSON}; quick: none)")
    args = p.parse_args(argv)
    names = [n.strip() for n in args.only.split(",") if n.strip()]
    if not names or any(n not in SUITE for n in names):
        p.error(f"--only: choose from {', '.join(SUITE)}")
    command = _measure.command_line(argv)
    started = time.perf_counter()
    results = []
    for name in names:
        module = SUITE[name]
        sub_argv = ["--quick"] if args.quick else []
        print(f"# {name} ...", file=sys.stderr, flush=True)
        part_started = time.perf_counter()
        result = module.run(module.parse_args(sub_argv), f"{command} (part: {name})")
        print(result["text"] + "\n", flush=True)
        print(f"# {name}: {time.perf_counter() - part_started:.1f} s", file=sys.stderr, flush=True)
        results.append(result)
    print(summary(results))
    wall = time.perf_counter() - started
    print(f"\n- command: `{command}` (cwd {os.getcwd()}); wall time {wall:.1f} s")
    path = args.json or (None if args.quick else str(DEFAULT_JSON))
    if path:
        _measure.write_json(path, {"command": command, "wall_time_s": wall,
                                   "targets": {r["name"]: r["targets"] for r in results},
                                   "results": {r["name"]: r["json"] for r in results}})
        print(f"- every number: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
