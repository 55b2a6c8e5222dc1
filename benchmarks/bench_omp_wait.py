"""Does OMP_WAIT_POLICY=PASSIVE change CPU timings, quiet and oversubscribed?

Times zoo:fashion_cnn (torch eager, torch's default threads: one per core) at batch 1 and 64 in a
fresh child process per measurement (the policy is read when OpenMP starts), with the policy unset
and with PASSIVE, alternating the order every round; then the same with ``--hogs N`` busy Python
loops running (oversubscribed). Prints the medians over rounds and the PASSIVE/unset ratios.

    flock -x /tmp/quiet.lock python benchmarks/bench_omp_wait.py --rounds 3 --hogs 2
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

CHILD = r"""
import json, statistics, time, torch
from compress_cli.sources.zoo import fashion_cnn
m = fashion_cnn().eval()
out = {}
with torch.inference_mode():
    for bs, n in ((1, 200), (64, 40)):
        x = torch.randn(bs, 1, 28, 28)
        for _ in range(10):
            m(x)
        t = []
        for _ in range(n):
            t0 = time.perf_counter(); m(x); t.append(time.perf_counter() - t0)
        out[bs] = statistics.median(t) * 1e3
print(json.dumps({"threads": torch.get_num_threads(), **out}))
"""


def child(policy: str | None) -> dict[str, float]:
    """One child's medians (ms) at batch 1 and 64 with OMP_WAIT_POLICY=``policy`` (None: unset)."""
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    if policy:
        env["OMP_WAIT_POLICY"] = policy
    r = subprocess.run([sys.executable, "-c", CHILD], env=env, capture_output=True, text=True, check=True)
    return json.loads(r.stdout.strip().splitlines()[-1])


def hogs(n: int) -> list[subprocess.Popen[bytes]]:
    """``n`` busy Python loops (the other work on a shared machine)."""
    return [subprocess.Popen([sys.executable, "-c", "while 1: pass"]) for _ in range(n)]


def main() -> None:
    """Run the rounds and print one JSON line per condition."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--hogs", type=int, default=2)
    a = ap.parse_args()
    for busy in (0, a.hogs):
        procs = hogs(busy)
        time.sleep(1.0 if busy else 0.0)
        res: dict[str, list[dict[str, float]]] = {"unset": [], "PASSIVE": []}
        try:
            for r in range(a.rounds):
                order = ("unset", "PASSIVE") if r % 2 == 0 else ("PASSIVE", "unset")
                for p in order:
                    res[p].append(child(None if p == "unset" else p))
        finally:
            for p in procs:
                p.kill()
                p.wait()
        row: dict[str, object] = {"busy_loops": busy, "threads": res["unset"][0]["threads"]}
        for bs in ("1", "64"):
            u = statistics.median(x[bs] for x in res["unset"])
            pa = statistics.median(x[bs] for x in res["PASSIVE"])
            ratios = [p[bs] / q[bs] for p, q in zip(res["PASSIVE"], res["unset"], strict=True)]
            row[f"b{bs}_unset_ms"] = round(u, 3)
            row[f"b{bs}_passive_ms"] = round(pa, 3)
            row[f"b{bs}_passive_over_unset"] = round(statistics.median(ratios), 3)
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
