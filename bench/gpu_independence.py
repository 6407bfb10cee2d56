"""Issue 22's case, measured: does slow work for GPU 0 hold a cold start on GPU 1?

    python -m bench.gpu_independence [--exit 10] [--start 2] [--after 1]

Two 24 GiB GPUs (declared). `a` (20 GiB) runs on GPU 0; its engine takes `--exit` seconds to
exit, as vLLM on a GPU takes seconds to free its CUDA memory. A request for `b` (20 GiB, GPU 0)
must evict `a`. `--after` seconds later a request comes for `c` (10 GiB, GPU 1, free), whose
engine starts in `--start` seconds. Printed: how long `c` and `b` waited. `c` should wait its
own start; before issue 22 it waited for `a`'s exit too (11.1 s for a 10 s exit and a 2 s
start). Also run with `--slow sleep` (a's /sleep takes the seconds) and `--slow wake`.

The gateway runs in-process with test engines (tests/harness.py) standing for vLLM's slow exit,
sleep and start; no GPU is needed.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
from pathlib import Path

import aiohttp

if __package__ in (None, ""):
    _ROOT = Path(__file__).resolve().parents[1]
    sys.path[:0] = [str(_ROOT), str(_ROOT / "src")]

from tests.harness import Behaviour, in_process_gateway, timed_chat, vllm_on_gpu


async def measure(slow: str, seconds: float, start: float, after: float) -> dict[str, float]:
    a = {
        "stop": Behaviour(exit_after=seconds),
        "sleep": Behaviour(sleep_after=seconds, sleep_mode=True),
    }[slow]
    with tempfile.TemporaryDirectory() as folder:
        async with (
            in_process_gateway(
                Path(folder),
                {
                    "a": vllm_on_gpu("20GiB", 0, **({"sleep": 1} if slow == "sleep" else {})),
                    "b": vllm_on_gpu("20GiB", 0),
                    "c": vllm_on_gpu("10GiB", 1),
                },
                {"a": a, "c": Behaviour(ready_after=start)},
                gpus=[{"index": 0, "memory": "24GiB"}, {"index": 1, "memory": "24GiB"}],
            ) as gateway,
            aiohttp.ClientSession() as session,
        ):
            await timed_chat(session, gateway.url, "a")
            for_b = asyncio.ensure_future(timed_chat(session, gateway.url, "b"))
            await asyncio.sleep(after)
            c_status, c_took = await timed_chat(session, gateway.url, "c")
            b_status, b_took = await for_b
    assert c_status == b_status == 200, (c_status, b_status)
    return {"c": c_took, "b": b_took}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--slow", choices=["stop", "sleep"], default="stop")
    parser.add_argument("--exit", type=float, default=10.0, help="seconds of the slow part")
    parser.add_argument("--start", type=float, default=2.0, help="c's start, seconds")
    parser.add_argument("--after", type=float, default=1.0, help="c's request after b's")
    args = parser.parse_args(argv)
    found = asyncio.run(measure(args.slow, args.exit, args.start, args.after))
    print(
        f"slow {args.slow} of {args.exit:.0f} s on GPU 0; c starts in {args.start:.0f} s on "
        f"GPU 1, asked {args.after:.0f} s after b: c answered after {found['c']:.1f} s, "
        f"b after {found['b']:.1f} s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
