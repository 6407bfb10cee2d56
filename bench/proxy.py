"""Proxy overhead, side by side in one run: straight to fast upstreams, through modelyard,
through vllm-router (Rust, PyPI `vllm-router`) and through LiteLLM's proxy (PyPI `litellm`).

    python -m bench.proxy [--duration 4] [--repeat 1] [--no-litellm] [--keyed] [--json FILE]
                          [--proxy-workers N ...]

`--keyed` adds a second modelyard, "modelyard+key", that has API keys configured: every
request carries a key (one with a token budget and a tokens-per-minute limit, both too large
to be reached, so each request is checked against them and charged to them) and goes through
the gateway's admission and usage accounting. vllm-router and LiteLLM stay keyless.
`--proxy-workers N` adds the same gateway with N proxy workers on its port (keyed with
`--keyed`). `--no-slow` and `--no-scaling` leave out the slow streams and the core-scaling cells.

Needs `wrk` and `nginx` (`make bench-deps`). The gateway starts the upstreams itself, as
`command` engines, exactly as it would start a real engine; the other proxies are pointed at
the same upstreams and installed on first use, each in its own venv under
~/.cache/modelyard-bench (bench/contenders.py). Workloads, each proxy in turn:

- wrk, POST /v1/chat/completions, 1 and 64 connections (nginx answering a fixed completion);
- SSE: 16 concurrent streams, again and again, of 400 events each (nginx, a fixed stream),
  once from an aiohttp client and once from wrk (which an aiohttp client cannot keep up with);
- 1,000 concurrent slow streams of 100 events at 20/s, all asked for at once
  (bench/stream_upstream.py and bench/stream_client.py, bare asyncio protocols on core 1; the
  proxy alone on core 0, so the delay measured is the proxy's, not the load generator's);
- core scaling: c=64 with the proxy pinned to core 0, then to cores 0-1 (wrk and nginx on
  core 1), as `taskset -a -p` would.

A gateway that does not stop within 30 s of SIGTERM is reported and its logs kept
(BENCH_GATEWAY_LOG=INFO logs every request in them).

CPU is charged to a proxy from /proc (utime + stime of all its processes and threads, engines
left out) before and after each workload: per proxied request and per streamed event.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import yaml

from bench import contenders
from bench.proc_usage import ProcessTree
from modelyard.auth.keys import generate_key, key_digest

ROOT = Path(__file__).resolve().parent.parent
CHAT = {"messages": [{"role": "user", "content": "hi"}]}
SSE_EVENTS = 400
STREAM_BODY = {"model": "sse", **CHAT, "stream": True}
SSE_STREAMS = 16
# The slow streams: the proxy alone on core 0, the client and the upstream on core 1.
ALL_CPUS = "0-1"  # this machine's two cores
SLOW_PROXY_CPUS = "0"
SLOW_LOAD_CPUS = "1"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def is_upstream(cmdline: str) -> bool:
    """The benchmark's engines, which the gateway starts as children: not the proxy's CPU."""
    return "nginx" in cmdline or "bench.stream_upstream" in cmdline


# The keyed gateway's keys: an admin key (to start the engines) and the client's key.
ADMIN_KEY = generate_key()
CLIENT_KEY = generate_key()
HUGE = 10**15  # a budget and a tokens-per-minute limit that are checked but never reached


def start_gateway(
    workdir: Path,
    keyed: bool = False,
    env: dict[str, str] | None = None,
    label: str | None = None,
    proxy_workers: int = 0,
) -> tuple[subprocess.Popen[bytes], str]:
    """A gateway on the benchmark's engines; `env`: variables added to this process's."""
    port = free_port()
    upstream = str(ROOT / "bench" / "upstream_nginx.sh")
    name = label or ("keyed" if keyed else "bench")
    config: dict[str, Any] = {
        "listen": f"127.0.0.1:{port}",
        "proxy_workers": proxy_workers,
        "state_dir": str(workdir / f"state-{name}"),
        "limits": {"max_queue": 10_000, "max_queue_per_model": 10_000},
        "models": {
            "fast": {"engine": "command", "idle_timeout": 0, "command": [upstream, "{port}"]},
            "sse": {
                "engine": "command",
                "idle_timeout": 0,
                "command": [upstream, "{port}", "sse", str(SSE_EVENTS)],
            },
            "stream": {
                "engine": "command",
                "idle_timeout": 0,
                "command": [sys.executable, "-m", "bench.stream_upstream", "--port", "{port}"],
            },
        },
    }
    if keyed:
        config["auth"] = {
            "keys": [
                {"name": "ops", "sha256": key_digest(ADMIN_KEY), "admin": True},
                {
                    "name": "client",
                    "sha256": key_digest(CLIENT_KEY),
                    "models": ["*"],
                    "token_budget": HUGE,
                    "tpm": HUGE,
                },
            ]
        }
    path = workdir / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    log = (workdir / f"{name}.log").open("wb")
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "modelyard",
            "serve",
            "-c",
            str(path),
            "--log-level",
            os.environ.get("BENCH_GATEWAY_LOG", "WARNING"),
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=ROOT,
        env={**os.environ, **env} if env else None,
    )
    url = f"http://127.0.0.1:{port}"
    contenders.wait_ready(process, url + "/health", workdir / f"{name}.log", 20)
    return process, url


def engine_url(gateway_url: str, model: str, headers: dict[str, str] | None = None) -> str:
    """Start the model through the gateway, then read the engine's own address from status."""
    body = json.dumps({"model": model, **CHAT}).encode()
    request = urllib.request.Request(
        gateway_url + "/v1/chat/completions",
        data=body,
        headers={"Content-Type": "application/json", **(headers or {})},
    )
    urllib.request.urlopen(request, timeout=60).read()
    status_request = urllib.request.Request(gateway_url + "/gateway/status", headers=headers or {})
    with urllib.request.urlopen(status_request, timeout=10) as response:
        status = json.loads(response.read())
    for entry in status["models"]:
        if entry["name"] == model:
            return f"http://127.0.0.1:{entry['port']}"
    raise SystemExit(f"no port for {model}")


def wrk(
    url: str,
    connections: int,
    duration: float,
    workdir: Path,
    cpus: str | None = None,
    headers: dict[str, str] | None = None,
    body: dict[str, Any] | None = None,
) -> dict[str, float]:
    script = workdir / "post.lua"
    script.write_text(
        'wrk.method = "POST"\n'
        f"wrk.body = '{json.dumps(body or {'model': 'fast', **CHAT})}'\n"
        'wrk.headers["Content-Type"] = "application/json"\n'
        + "".join(f'wrk.headers["{name}"] = "{value}"\n' for name, value in (headers or {}).items())
    )
    command = ["wrk", "-t", "1", "-c", str(connections), "-d", f"{int(duration)}s", "--latency"]
    command += ["-s", str(script), url + "/v1/chat/completions"]
    if cpus is not None:
        command = ["taskset", "-c", cpus, *command]
    output = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", output).group(1))  # type: ignore[union-attr]
    done = int(re.search(r"(\d+) requests in", output).group(1))  # type: ignore[union-attr]
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", output)
    return {
        "rps": rps,
        "requests": float(done),
        "p50_ms": _latency(output, "50%"),
        "p99_ms": _latency(output, "99%"),
        "non2xx": float(errors.group(1)) if errors else 0.0,
    }


def _latency(output: str, label: str) -> float:
    match = re.search(rf"^\s*{re.escape(label)}\s+([\d.]+)(us|ms|s)", output, re.MULTILINE)
    assert match, output
    value, unit = float(match.group(1)), match.group(2)
    return value / 1000 if unit == "us" else value * 1000 if unit == "s" else value


async def sse_throughput(
    url: str, duration: float, headers: dict[str, str] | None = None
) -> dict[str, float]:
    """SSE_STREAMS clients, each asking for one 400-event stream after another."""
    events = 0
    failed = 0
    marker = b'"delta":'
    body = {"model": "sse", **CHAT, "stream": True}

    async def client(session: aiohttp.ClientSession, until: float) -> None:
        nonlocal events, failed
        while time.monotonic() < until:
            async with session.post(url + "/v1/chat/completions", json=body) as response:
                if response.status != 200:
                    failed += 1
                    await response.read()
                    continue
                tail = b""
                async for chunk in response.content.iter_any():
                    data = tail + chunk
                    events += data.count(marker)
                    tail = data[-(len(marker) - 1) :]

    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector, headers=headers) as session:
        began = time.monotonic()
        await asyncio.gather(*(client(session, began + duration) for _ in range(SSE_STREAMS)))
        elapsed = time.monotonic() - began
    return {"events": float(events), "events_per_s": events / elapsed, "failed": float(failed)}


async def slow_streams(
    url: str,
    count: int,
    chunks: int,
    rate: float,
    tree: ProcessTree | None,
    headers: dict[str, str] | None = None,
) -> dict[str, float]:
    """`count` concurrent streams of `chunks` events at `rate`/s, all asked for at once.

    The client (bench/stream_client.py) runs on core 1 beside the upstream; the proxy is
    pinned to core 0 by the caller, so neither the client nor the upstream takes the proxy's
    CPU. Inter-chunk is the time between two events of one stream as the client received
    them (1/rate when nothing stutters); first chunk is from sending the request to the
    first event.
    """
    command = ["taskset", "-c", SLOW_LOAD_CPUS, sys.executable, "-m", "bench.stream_client"]
    command += ["--url", url, "--count", str(count), "--chunks", str(chunks)]
    command += ["--rate", str(rate)]
    for name, value in (headers or {}).items():
        command += ["--header", f"{name}: {value}"]
    rss_before = tree.rss() if tree is not None else 0
    peak_rss = rss_before
    client = await asyncio.create_subprocess_exec(
        *command, cwd=ROOT, stdout=asyncio.subprocess.PIPE
    )
    reading = asyncio.ensure_future(client.communicate())
    while not reading.done():
        if tree is not None:
            peak_rss = max(peak_rss, tree.rss())
        await asyncio.wait([reading], timeout=0.25)
    output, _ = reading.result()
    if client.returncode != 0:
        raise SystemExit(f"bench.stream_client failed ({client.returncode})")
    result: dict[str, float] = json.loads(output)
    result["rss_growth_mib"] = (peak_rss - rss_before) / 2**20 if tree else 0.0
    return result


@dataclass
class Proxy:
    name: str
    fast: str  # base URLs, one per upstream (vllm-router runs one router per upstream)
    sse: str
    stream: str
    trees: list[ProcessTree] = field(default_factory=list)  # empty: direct, nothing charged
    headers: dict[str, str] = field(default_factory=dict)  # sent with every request (a key)

    def cpu(self) -> float:
        return sum(tree.cpu() for tree in self.trees)


def pin_all(trees: list[ProcessTree], cpus: str) -> None:
    for tree in trees:
        tree.pin(cpus)


def measure(proxy: Proxy, workload: Any) -> tuple[dict[str, float], float]:
    before = proxy.cpu()
    result = workload()
    return result, proxy.cpu() - before


def run_matrix(
    proxies: list[Proxy], args: argparse.Namespace, workdir: Path, upstream_trees: list[ProcessTree]
) -> dict[str, Any]:
    results: dict[str, Any] = {}
    for proxy in proxies:
        row: dict[str, Any] = {}
        for connections in (1, 64):
            result, cpu = measure(
                proxy,
                lambda c=connections, p=proxy: wrk(
                    p.fast, c, args.duration, workdir, headers=p.headers
                ),
            )
            result["cpu_us_per_request"] = cpu / max(result["requests"], 1) * 1e6
            row[f"c{connections}"] = result
        result, cpu = measure(
            proxy, lambda p=proxy: asyncio.run(sse_throughput(p.sse, args.duration, p.headers))
        )
        result["cpu_us_per_event"] = cpu / max(result["events"], 1) * 1e6
        row["sse"] = result
        # The same streams driven by wrk (C, one thread): an aiohttp client as the load can
        # be slower than the proxy it measures, and hide the gap between proxies.
        result, cpu = measure(
            proxy,
            lambda p=proxy, stream_body=STREAM_BODY: wrk(
                p.sse, SSE_STREAMS, args.duration, workdir, headers=p.headers, body=stream_body
            ),
        )
        result["events_per_s"] = result["rps"] * SSE_EVENTS
        result["cpu_us_per_event"] = cpu / max(result["requests"] * SSE_EVENTS, 1) * 1e6
        row["sse_wrk"] = result
        results[proxy.name] = row
        print(f"  {proxy.name}: done with requests and SSE", flush=True)
    for proxy in proxies:
        if args.no_slow or (proxy.name == "LiteLLM" and not args.litellm_slow):
            continue
        tree = proxy.trees[0] if proxy.trees else None
        pin_all(upstream_trees, SLOW_LOAD_CPUS)
        pin_all(proxy.trees, SLOW_PROXY_CPUS)
        result, cpu = measure(
            proxy,
            lambda p=proxy, t=tree: asyncio.run(
                slow_streams(p.stream, args.slow_streams, 100, 20.0, t, p.headers)
            ),
        )
        pin_all([*proxy.trees, *upstream_trees], ALL_CPUS)
        result["cpu_s"] = cpu
        results[proxy.name]["slow"] = result
        print(f"  {proxy.name}: done with {args.slow_streams} slow streams", flush=True)
    for proxy in proxies:
        if args.no_scaling or not proxy.trees or proxy.name == "LiteLLM":
            continue
        scaling = {}
        pin_all(upstream_trees, "1")
        for cpus in ("0", ALL_CPUS):
            pin_all(proxy.trees, cpus)
            result, cpu = measure(
                proxy,
                lambda p=proxy: wrk(
                    p.fast, 64, args.duration, workdir, cpus="1", headers=p.headers
                ),
            )
            result["cpu_us_per_request"] = cpu / max(result["requests"], 1) * 1e6
            scaling[cpus] = result
        pin_all([*proxy.trees, *upstream_trees], ALL_CPUS)
        results[proxy.name]["scaling"] = scaling
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=4.0, help="seconds per load cell")
    parser.add_argument("--repeat", type=int, default=1, help="run the whole matrix N times")
    parser.add_argument("--slow-streams", type=int, default=1000)
    parser.add_argument("--no-litellm", action="store_true", help="skip LiteLLM")
    parser.add_argument(
        "--litellm-slow",
        action="store_true",
        help="also put LiteLLM through the slow streams (it takes minutes at 1,000)",
    )
    parser.add_argument(
        "--keyed", action="store_true", help="also a modelyard with API keys (modelyard+key)"
    )
    parser.add_argument(
        "--front-doors",
        action="store_true",
        help="also the HTTP server candidates of issue 21 (bench/front_door_relay.py on "
        "aiohttp alone, uvicorn+httptools+uvloop, granian RSGI)",
    )
    parser.add_argument(
        "--baseline-src",
        help="also a keyless modelyard run from this source folder (`modelyard before`), and "
        "with --keyed a keyed one (`modelyard+key before`), e.g. the src/ of "
        "`git archive <commit> src`",
    )
    parser.add_argument(
        "--proxy-workers",
        type=int,
        action="append",
        default=[],
        metavar="N",
        help="also a modelyard with `proxy_workers: N` (repeatable; keyed with --keyed)",
    )
    parser.add_argument("--no-slow", action="store_true", help="skip the slow streams")
    parser.add_argument("--no-scaling", action="store_true", help="skip core scaling")
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args()
    for tool in ("wrk", "nginx", "taskset"):
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} is missing: make bench-deps")
    workdir = Path(tempfile.mkdtemp(prefix="modelyard-bench-"))
    started: list[subprocess.Popen[bytes]] = []
    gateway, url = start_gateway(workdir)
    runs: list[dict[str, Any]] = []
    stuck: list[subprocess.Popen[bytes]] = []
    try:
        direct = {model: engine_url(url, model) for model in ("fast", "sse", "stream")}
        upstream_trees = engine_trees(gateway.pid)
        proxies = [
            Proxy("direct", direct["fast"], direct["sse"], direct["stream"]),
            Proxy("modelyard", url, url, url, [ProcessTree(gateway.pid, is_upstream)]),
        ]
        if args.keyed:
            proxies.append(
                second_gateway(
                    "modelyard+key",
                    workdir,
                    started,
                    upstream_trees,
                    {"Authorization": f"Bearer {ADMIN_KEY}"},
                    client_headers={"Authorization": f"Bearer {CLIENT_KEY}"},
                    keyed=True,
                )
            )
        for workers in args.proxy_workers:
            # The same gateway with proxy workers on its port (keyed when --keyed, so it is
            # compared with modelyard+key): what more processes buy on this machine.
            proxies.append(
                second_gateway(
                    f"modelyard{'+key' if args.keyed else ''} +{workers}w",
                    workdir,
                    started,
                    upstream_trees,
                    {"Authorization": f"Bearer {ADMIN_KEY}"} if args.keyed else {},
                    client_headers={"Authorization": f"Bearer {CLIENT_KEY}"}
                    if args.keyed
                    else None,
                    keyed=args.keyed,
                    label=f"workers{workers}",
                    proxy_workers=workers,
                )
            )
        if args.baseline_src:
            # The same gateway from another source tree (an older commit's `src`), keyless,
            # beside this one: a before/after measured in one run.
            source = str(Path(args.baseline_src).resolve())
            proxies.append(
                second_gateway(
                    "modelyard before",
                    workdir,
                    started,
                    upstream_trees,
                    {},
                    env={"PYTHONPATH": source},
                    label="baseline",
                )
            )
            if args.keyed:
                # And keyed, beside modelyard+key: the gateway's own rules, before and after.
                proxies.append(
                    second_gateway(
                        "modelyard+key before",
                        workdir,
                        started,
                        upstream_trees,
                        {"Authorization": f"Bearer {ADMIN_KEY}"},
                        client_headers={"Authorization": f"Bearer {CLIENT_KEY}"},
                        keyed=True,
                        env={"PYTHONPATH": source},
                        label="baseline-keyed",
                    )
                )
        routers = {
            model: contenders.start_vllm_router(direct[model], free_port(), free_port(), workdir)
            for model in direct
        }
        started += [router.process for router in routers.values()]
        proxies.append(
            Proxy(
                "vllm-router",
                routers["fast"].url,
                routers["sse"].url,
                routers["stream"].url,
                [ProcessTree(router.process.pid) for router in routers.values()],
            )
        )
        if args.front_doors:
            for name in contenders.FRONT_DOORS:
                door = contenders.start_front_door(name, direct, free_port(), workdir)
                started.append(door.process)
                tree = ProcessTree(door.process.pid)
                proxies.append(Proxy(name, door.url, door.url, door.url, [tree]))
        if not args.no_litellm:
            litellm = contenders.start_litellm(direct, free_port(), workdir)
            started.append(litellm.process)
            proxies.append(
                Proxy(
                    "LiteLLM",
                    litellm.url,
                    litellm.url,
                    litellm.url,
                    [ProcessTree(litellm.process.pid)],
                )
            )
        for number in range(args.repeat):
            print(f"run {number + 1} of {args.repeat}", flush=True)
            runs.append(run_matrix(proxies, args, workdir, upstream_trees))
    finally:
        for process in started:
            process.send_signal(signal.SIGTERM)
        gateway.send_signal(signal.SIGTERM)
        for process in [*started, gateway]:
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                # A gateway that does not stop leaves its engines running: say so, and keep
                # its log for a look rather than hiding it.
                print(f"did not stop within 30 s of SIGTERM: {process.args}", flush=True)
                stuck.append(process)
                process.kill()
    versions = contenders.describe_versions()
    for number, results in enumerate(runs):
        print(f"\nrun {number + 1} of {len(runs)} ({versions})")
        print_tables(results, args.slow_streams)
    if args.json:
        Path(args.json).write_text(json.dumps({"versions": versions, "runs": runs}, indent=2))
    if stuck:
        print(f"logs kept in {workdir}", flush=True)
    else:
        shutil.rmtree(workdir, ignore_errors=True)


def second_gateway(
    name: str,
    workdir: Path,
    started: list[subprocess.Popen[bytes]],
    upstream_trees: list[ProcessTree],
    admin_headers: dict[str, str],
    client_headers: dict[str, str] | None = None,
    **settings: Any,
) -> Proxy:
    """Another modelyard beside the first (with keys), with its own engines,
    started before the load; its engines join the upstreams pinned in the scaling cells."""
    process, url = start_gateway(workdir, **settings)
    started.append(process)
    for model in ("fast", "sse", "stream"):
        engine_url(url, model, admin_headers or None)
    upstream_trees += engine_trees(process.pid)
    trees = [ProcessTree(process.pid, is_upstream)]
    return Proxy(name, url, url, url, trees, client_headers or {})


def engine_trees(gateway_pid: int) -> list[ProcessTree]:
    """The benchmark engines a gateway started, each with its children (not the proxy's)."""
    from bench.proc_usage import cmdline

    return [
        ProcessTree(pid)
        for pid in ProcessTree(gateway_pid).pids()
        if pid != gateway_pid and is_upstream(cmdline(pid))
    ]


def _cores(cell: dict[str, float]) -> float:
    return cell["rps"] * cell["cpu_us_per_request"] / 1e6


def print_tables(results: dict[str, Any], slow: int) -> None:
    direct = results["direct"]
    print(
        "| | c=1 req/s | added p50 / p99 | c=64 req/s | added p50 / p99 | CPU/request "
        f"(c=64) | SSE events/s ({SSE_STREAMS}x{SSE_EVENTS}) | CPU/event "
        "| SSE events/s, wrk | CPU/event, wrk |"
    )
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for name, row in results.items():
        cells = [name]
        for connections in (1, 64):
            cell, base = row[f"c{connections}"], direct[f"c{connections}"]
            cells.append(f"{cell['rps']:,.0f}" + (" ⚠" if cell["non2xx"] else ""))
            if name == "direct":
                cells.append(f"({cell['p50_ms']:.2f} / {cell['p99_ms']:.2f} ms)")
            else:
                added = cell["p50_ms"] - base["p50_ms"], cell["p99_ms"] - base["p99_ms"]
                cells.append(f"{added[0]:.2f} / {added[1]:.2f} ms")
        sse, by_wrk = row["sse"], row["sse_wrk"]
        wrk_events = f"{by_wrk['events_per_s'] / 1e6:.3f} M" + (" ⚠" if by_wrk["non2xx"] else "")
        if name == "direct":
            cells += ["", f"{sse['events_per_s'] / 1e6:.2f} M", "", wrk_events, ""]
        else:
            cells += [
                f"{row['c64']['cpu_us_per_request']:.0f} µs",
                f"{sse['events_per_s'] / 1e6:.3f} M" + (" ⚠" if sse["failed"] else ""),
                f"{sse['cpu_us_per_event']:.2f} µs",
                wrk_events,
                f"{by_wrk['cpu_us_per_event']:.2f} µs",
            ]
        print("| " + " | ".join(cells) + " |")
    _print_slow_streams(results, slow)
    _print_scaling(results)
    _print_ratios(results)


def _print_slow_streams(results: dict[str, Any], slow: int) -> None:
    if not any("slow" in row for row in results.values()):
        return  # --no-slow
    print(
        f"\n| {slow} streams x 100 events at 20/s | done | inter-chunk p99 (added) | worst gap "
        "| first chunk p50 (added) | proxy RSS growth | proxy CPU |"
    )
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    base_slow = results["direct"].get("slow")
    for name, row in results.items():
        if "slow" not in row:
            continue
        s = row["slow"]
        added_gap = s["gap_p99_ms"] - base_slow["gap_p99_ms"] if base_slow else float("nan")
        added_first = s["first_p50_ms"] - base_slow["first_p50_ms"] if base_slow else float("nan")
        extra = (
            ["", ""]
            if name == "direct"
            else [f"+{s['rss_growth_mib']:.0f} MiB", f"{s['cpu_s']:.1f} s"]
        )
        print(
            f"| {name} | {s['done']:.0f}/{s['count']:.0f} | {s['gap_p99_ms']:.1f} ms"
            + ("" if name == "direct" else f" ({added_gap:+.1f})")
            + f" | {s['gap_max_ms']:.0f} ms | {s['first_p50_ms']:.0f} ms"
            + ("" if name == "direct" else f" ({added_first:+.0f})")
            + " | "
            + " | ".join(extra)
            + " |"
        )


def _print_scaling(results: dict[str, Any]) -> None:
    if not any("scaling" in row for row in results.values()):
        return  # --no-scaling
    print(
        "\n| core scaling, c=64 (wrk, nginx on core 1) | 1 core req/s | 2 cores req/s | ratio "
        "| CPU/request 1 / 2 cores | cores used 1 / 2 |"
    )
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for name, row in results.items():
        if "scaling" not in row:
            continue
        one, two = row["scaling"]["0"], row["scaling"][ALL_CPUS]
        print(
            f"| {name} | {one['rps']:,.0f} | {two['rps']:,.0f} | {two['rps'] / one['rps']:.2f}x "
            f"| {one['cpu_us_per_request']:.0f} / {two['cpu_us_per_request']:.0f} µs "
            # CPU seconds per wall second: whether the proxy can use a second core at all.
            f"| {_cores(one):.2f} / {_cores(two):.2f} |"
        )


def _print_ratios(results: dict[str, Any]) -> None:
    ours, keyed = results.get("modelyard"), results.get("modelyard+key")
    if ours and keyed:
        print(
            "\nmodelyard with a key / without: CPU per request "
            f"{keyed['c64']['cpu_us_per_request'] / ours['c64']['cpu_us_per_request']:.2f}x, "
            "CPU per event "
            f"{keyed['sse']['cpu_us_per_event'] / ours['sse']['cpu_us_per_event']:.2f}x"
        )
    rust = results.get("vllm-router")
    if not rust:
        return
    print(
        "\n| / vllm-router | CPU/request (c=64) | CPU/event (wrk) | c=64 req/s "
        "| SSE events/s (wrk) |"
    )
    print("| --- | ---: | ---: | ---: | ---: |")
    for name, row in results.items():
        if name in ("direct", "vllm-router"):
            continue
        print(
            f"| {name} "
            f"| {row['c64']['cpu_us_per_request'] / rust['c64']['cpu_us_per_request']:.2f}x "
            f"| {row['sse_wrk']['cpu_us_per_event'] / rust['sse_wrk']['cpu_us_per_event']:.2f}x "
            f"| {row['c64']['rps'] / rust['c64']['rps']:.2f}x "
            f"| {row['sse_wrk']['events_per_s'] / rust['sse_wrk']['events_per_s']:.2f}x |"
        )


if __name__ == "__main__":
    main()
