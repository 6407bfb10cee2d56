"""The gateway's CPU per request, this tree against another source tree, in alternating cells:
two keyed gateways (the client's key as in `bench.proxy --keyed`), wrk against nginx's fixed
completion, one gateway then the other, the order swapped each round.

    python -m bench.paired_cost --baseline-src ../base/src [--rounds 10] [--duration 2]
                                [--connections 64,1]

On a machine shared with other work one run of `bench.proxy` swings by ±20 % from cell to
cell; a change of a few percent shows only in many short cells side by side. Prints, per
connection count, the median CPU per request of each and the median of the paired ratios
(this tree / baseline, cell by cell). Needs wrk and nginx (`make bench-deps`).
"""

from __future__ import annotations

import argparse
import shutil
import signal
import statistics
import subprocess
import tempfile
from pathlib import Path

from bench import proxy
from bench.proc_usage import ProcessTree, user_and_system_seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline-src", required=True, help="the other tree's src/ folder")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--duration", type=float, default=2.0, help="seconds per cell")
    parser.add_argument("--connections", default="64,1", help="wrk connections, comma-separated")
    args = parser.parse_args()
    source = str(Path(args.baseline_src).resolve())
    gateways: dict[str, tuple[subprocess.Popen[bytes], str, Path, ProcessTree]] = {}
    admin = {"Authorization": f"Bearer {proxy.ADMIN_KEY}"}
    client = {"Authorization": f"Bearer {proxy.CLIENT_KEY}"}
    try:
        for name, env in (("this tree", None), ("baseline", {"PYTHONPATH": source})):
            workdir = Path(tempfile.mkdtemp(prefix="modelyard-paired-"))
            label = "paired-" + name.replace(" ", "-")
            process, url = proxy.start_gateway(workdir, keyed=True, env=env, label=label)
            proxy.engine_url(url, "fast", admin)
            gateways[name] = (process, url, workdir, ProcessTree(process.pid, proxy.is_upstream))
        for connections in (int(c) for c in args.connections.split(",")):
            cpu: dict[str, list[float]] = {name: [] for name in gateways}
            rps: dict[str, list[float]] = {name: [] for name in gateways}
            for round_ in range(args.rounds):
                names = list(gateways) if round_ % 2 == 0 else list(reversed(gateways))
                for name in names:
                    _process, url, workdir, tree = gateways[name]
                    user_before, system_before = user_and_system_seconds(tree.pids())
                    result = proxy.wrk(url, connections, args.duration, workdir, headers=client)
                    user_after, system_after = user_and_system_seconds(tree.pids())
                    spent = user_after - user_before + system_after - system_before
                    cpu[name].append(spent / max(result["requests"], 1) * 1e6)
                    rps[name].append(result["rps"])
            ratios = [a / b for a, b in zip(cpu["this tree"], cpu["baseline"], strict=True)]
            print(
                f"c={connections}: CPU/request (medians) this tree "
                f"{statistics.median(cpu['this tree']):.0f} µs, baseline "
                f"{statistics.median(cpu['baseline']):.0f} µs; paired ratio "
                f"{statistics.median(ratios):.3f} (range {min(ratios):.3f}-{max(ratios):.3f}); "
                f"req/s {statistics.median(rps['this tree']):,.0f} against "
                f"{statistics.median(rps['baseline']):,.0f}",
                flush=True,
            )
    finally:
        for process, _url, workdir, _tree in gateways.values():
            process.send_signal(signal.SIGTERM)
            process.wait(timeout=30)
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
