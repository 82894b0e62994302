"""`hladr serve` throughput and latency on loopback, bounded in count and time.

Starts the real server (2 workers), stores the bead calibration once, then submits N patient
tubes of 100k events from C concurrent clients and polls each to completion. Prints analyses per
second and p50/p99 latency (submit -> Result).

Run: python benchmarks/bench_service.py [--n 24] [--clients 4] [--events 100000] [--max-seconds 300]
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np

from hladr.simulate import simulate_beads, simulate_blood

TOKEN = "bench-token-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n", type=int, default=24)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--events", type=int, default=100_000)
    parser.add_argument("--max-seconds", type=float, default=300)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        simulate_beads(folder / "beads.fcs", "canto", seed=1, n_events=20_000)
        tubes = []
        for i in range(args.n):
            simulate_blood(folder / f"p{i}.fcs", "canto", 2000 + 500 * i, seed=10 + i, n_events=args.events)
            tubes.append((folder / f"p{i}.fcs").read_bytes())
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        url = f"http://127.0.0.1:{port}"
        cmd = [
            sys.executable,
            "-m",
            "hladr.cli",
            "serve",
            "--port",
            str(port),
            "--db",
            str(folder / "db.sqlite"),
            "--workers",
            "2",
            "--queue",
            str(args.n),
        ]
        proc = subprocess.Popen(
            cmd,
            env=dict(os.environ, HLADR_TOKENS=TOKEN),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            for _ in range(300):
                try:
                    if httpx.get(f"{url}/v1/health").status_code == 200:
                        break
                except httpx.TransportError:
                    time.sleep(0.1)
            cal = httpx.post(
                f"{url}/v1/calibrations",
                headers=AUTH,
                data={"lot": "96597"},
                files={"beads": ("b.fcs", (folder / "beads.fcs").read_bytes())},
                timeout=60,
            ).json()["id"]
            deadline = time.time() + args.max_seconds

            def one(blob: bytes) -> tuple[float, str]:
                t0 = time.perf_counter()
                job = httpx.post(
                    f"{url}/v1/analyses",
                    headers=AUTH,
                    data={"calibration_id": cal},
                    files={"sample": ("p.fcs", blob)},
                    timeout=120,
                ).json()
                while time.time() < deadline:
                    status = httpx.get(f"{url}/v1/analyses/{job['id']}", headers=AUTH).json()["status"]
                    if status not in ("queued", "running"):
                        return time.perf_counter() - t0, status
                    time.sleep(0.05)
                return float("nan"), "timed out"

            t0 = time.perf_counter()
            with ThreadPoolExecutor(args.clients) as pool:
                outcomes = list(pool.map(one, tubes))
            wall = time.perf_counter() - t0
        finally:
            proc.terminate()
            proc.wait(timeout=30)
    done = np.array([latency for latency, status in outcomes if status == "done"])
    print(f"{done.size}/{args.n} analyses of {args.events:,}-event tubes done")
    print(f"2 workers, {args.clients} clients")
    others = [status for _, status in outcomes if status != "done"]
    if others:
        print(f"not done: {', '.join(sorted(set(others)))} ({len(others)})")
    print(
        f"throughput {done.size / wall:.2f} analyses/s; latency p50 {np.percentile(done, 50):.2f} s, "
        f"p99 {np.percentile(done, 99):.2f} s"
    )


if __name__ == "__main__":
    main()
