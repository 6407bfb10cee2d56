"""What the request log's line costs: the same gateway at `--log-level WARNING` and at INFO
(one line per request), side by side, wrk at c=64 against nginx's fixed completion.

    python -m bench.log_cost [--duration 3] [--repeat 3]

Prints requests/s and the gateway's CPU per request (user and system, from /proc) for each
level in turn, then the median difference. Needs wrk and nginx (`make bench-deps`).
"""

from __future__ import annotations

import argparse
import os
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
    parser.add_argument("--duration", type=float, default=3.0)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    gateways: dict[str, tuple[subprocess.Popen[bytes], str, Path, ProcessTree]] = {}
    try:
        for level in ("WARNING", "INFO"):
            os.environ["BENCH_GATEWAY_LOG"] = level
            workdir = Path(tempfile.mkdtemp(prefix=f"modelyard-log-{level.lower()}-"))
            process, url = proxy.start_gateway(workdir)
            proxy.engine_url(url, "fast")
            gateways[level] = (process, url, workdir, ProcessTree(process.pid, proxy.is_upstream))
        per_request: dict[str, list[float]] = {level: [] for level in gateways}
        for _ in range(args.repeat):
            for level, (_process, url, workdir, tree) in gateways.items():
                user_before, system_before = user_and_system_seconds(tree.pids())
                result = proxy.wrk(url, 64, args.duration, workdir)
                user_after, system_after = user_and_system_seconds(tree.pids())
                count = max(result["requests"], 1)
                user = (user_after - user_before) / count * 1e6
                system = (system_after - system_before) / count * 1e6
                per_request[level].append(user + system)
                print(
                    f"{level:8} {result['rps']:8,.0f} req/s  CPU per request: user {user:5.1f} µs,"
                    f" system {system:5.1f} µs",
                    flush=True,
                )
        added = statistics.median(per_request["INFO"]) - statistics.median(per_request["WARNING"])
        print(f"a request's log line adds {added:.0f} µs of CPU (medians)")
    finally:
        for process, _url, workdir, _tree in gateways.values():
            process.send_signal(signal.SIGTERM)
            process.wait(timeout=30)
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
