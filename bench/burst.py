"""Bursts of streams after a quiet spell: how soon the first event of each comes, over rounds.

    python -m bench.burst --rounds 5 [--compare-with REV] [--router] [--streams 1000]

Each round waits `--quiet` seconds (past the engine connections' keep-alive, so the pool
starts empty, as after any lull), sends `--streams` requests for a stream at the same moment
straight to the upstream, waits again, then sends the same burst through the gateway, and
reports the first-chunk p50 of both and the difference. The figure of one burst swings by
tens of milliseconds with whatever else this shared machine does, so the report is the median
over rounds. With `--compare-with REV`, a second gateway runs the code of that git revision
(from a temporary worktree) beside this one, each round measuring both, so a change is judged
side by side in one run; with `--router`, vllm-router (installed by bench/proxy.py's first
run) takes the same bursts to the first gateway's engine. The proxies are pinned to core 0,
the upstreams and the client to core 1, as in bench/proxy.py's slow streams.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import signal
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from bench import contenders
from bench.proc_usage import ProcessTree
from bench.proxy import (
    ROOT,
    SLOW_LOAD_CPUS,
    SLOW_PROXY_CPUS,
    engine_trees,
    engine_url,
    free_port,
    is_upstream,
    slow_streams,
    start_gateway,
)


def start(name: str, workdir: Path, code: Path | None) -> tuple[subprocess.Popen[bytes], str, str]:
    """A gateway (with `code`'s src first on the path, if given) and its stream engine's URL."""
    env = {"PYTHONPATH": str(code / "src")} if code is not None else None
    gateway, url = start_gateway(workdir / name, env=env)
    direct = engine_url(url, "stream")
    for tree in engine_trees(gateway.pid):
        tree.pin(SLOW_LOAD_CPUS)
    ProcessTree(gateway.pid, is_upstream).pin(SLOW_PROXY_CPUS)
    return gateway, url, direct


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--streams", type=int, default=1000)
    parser.add_argument("--events", type=int, default=20, help="events per stream, 20 a second")
    parser.add_argument("--quiet", type=float, default=5.0, help="seconds before each burst")
    parser.add_argument("--compare-with", metavar="REV", help="also a gateway on this revision")
    parser.add_argument("--router", action="store_true", help="also vllm-router")
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="modelyard-burst-"))
    for name in ("this", "other"):
        (workdir / name).mkdir()
    worktree: Path | None = None
    gateways = []
    try:
        gateways.append(("this code", *start("this", workdir, None)))
        if args.compare_with:
            worktree = workdir / "other-code"
            subprocess.run(
                ["git", "worktree", "add", "--detach", str(worktree), args.compare_with],
                cwd=ROOT,
                check=True,
                capture_output=True,
            )
            gateways.append((args.compare_with, *start("other", workdir, worktree)))
        if args.router:
            engine = gateways[0][3]
            router = contenders.start_vllm_router(engine, free_port(), free_port(), workdir)
            ProcessTree(router.process.pid).pin(SLOW_PROXY_CPUS)
            gateways.append(("vllm-router", router.process, router.url, engine))
        added: dict[str, list[float]] = {name: [] for name, *_ in gateways}
        for number in range(args.rounds):
            cells = []
            for name, _gateway, url, direct in gateways:
                time.sleep(args.quiet)
                straight = asyncio.run(slow_streams(direct, args.streams, args.events, 20.0, None))
                time.sleep(args.quiet)
                through = asyncio.run(slow_streams(url, args.streams, args.events, 20.0, None))
                difference = through["first_p50_ms"] - straight["first_p50_ms"]
                added[name].append(difference)
                cells.append(
                    f"{name}: direct {straight['first_p50_ms']:.0f} ms, through "
                    f"{through['first_p50_ms']:.0f} ms ({difference:+.0f}), "
                    f"{int(through['done'])}/{args.streams} whole, inter-chunk p99 "
                    f"{through['gap_p99_ms']:.1f} ms"
                )
            print(f"round {number + 1}: " + " | ".join(cells), flush=True)
        print(
            f"\nfirst chunk p50 added to direct, {args.streams} streams at once, median of "
            f"{args.rounds} rounds:"
        )
        for name, values in added.items():
            rounded = ", ".join(f"{value:+.0f}" for value in values)
            print(f"  {name}: {statistics.median(values):+.0f} ms ({rounded})")
    finally:
        for _name, gateway, *_ in gateways:
            gateway.send_signal(signal.SIGTERM)
        for _name, gateway, *_ in gateways:
            try:
                gateway.wait(timeout=30)
            except subprocess.TimeoutExpired:
                print(f"did not stop within 30 s of SIGTERM: {gateway.args}", flush=True)
                gateway.kill()
        if worktree is not None:
            subprocess.run(
                ["git", "worktree", "remove", "--force", str(worktree)], cwd=ROOT, check=False
            )
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
