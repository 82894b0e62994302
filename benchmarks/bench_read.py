"""Read speed and peak memory of hladr.read_fcs against flowio, flowkit.Sample and a raw np.fromfile.

Files of 100k, 1M and 5M events x 12 float32 channels are written into a temporary folder with
hladr.write_fcs. Each reader runs in this one process (best of a few runs); peak memory is the
tracemalloc peak of one read (numpy buffers are traced), given relative to the decoded array.

    python benchmarks/bench_read.py [--sizes 100000,1000000,5000000] [--repeat 3]
"""

from __future__ import annotations

import argparse
import gc
import tempfile
import time
import tracemalloc
import warnings
from pathlib import Path

import numpy as np

from hladr.fcs import read_fcs, write_fcs

N_CHANNELS = 12


def raw_fromfile(path: Path) -> np.ndarray:
    """The floor: DATA segment straight from disk with offsets known in advance."""
    meta = raw_fromfile.meta[path]
    return np.fromfile(path, dtype="<f4", count=meta[1], offset=meta[0]).reshape(-1, N_CHANNELS)


raw_fromfile.meta = {}


def hladr_read(path: Path) -> np.ndarray:
    return read_fcs(path).events


def flowio_read(path: Path) -> np.ndarray:
    import flowio

    return flowio.FlowData(str(path)).as_array(preprocess=False)


def flowkit_read(path: Path) -> np.ndarray:
    import flowkit

    return flowkit.Sample(str(path)).get_events(source="raw")


READERS = {"raw np.fromfile": raw_fromfile, "hladr.read_fcs": hladr_read, "flowio": flowio_read}
READERS["flowkit.Sample"] = flowkit_read


def measure(reader, path: Path, repeat: int) -> tuple[float, int, np.ndarray]:
    """Best wall time of ``repeat`` reads, and the tracemalloc peak of one more read."""
    times = []
    for _ in range(repeat):
        gc.collect()
        start = time.perf_counter()
        out = reader(path)
        times.append(time.perf_counter() - start)
        del out
    gc.collect()
    tracemalloc.start()
    out = reader(path)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return min(times), peak, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="100000,1000000,5000000")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    warnings.simplefilter("ignore")
    with tempfile.TemporaryDirectory() as tmp:
        for n in (int(s) for s in args.sizes.split(",")):
            events = rng.lognormal(6, 1.5, size=(n, N_CHANNELS)).astype(np.float32)
            path = write_fcs(Path(tmp) / f"{n}.fcs", events, [f"ch{i}" for i in range(N_CHANNELS)])
            del events
            begin = int(read_fcs(path, metadata_only=True).keywords["$BEGINDATA"])
            raw_fromfile.meta[path] = (begin, n * N_CHANNELS)
            decoded = n * N_CHANNELS * 4
            print(f"\n{n:,} events x {N_CHANNELS} channels (F32, {decoded / 2**20:.0f} MiB decoded)")
            header = f"{'reader':<18}{'time ms':>10}{'events/s':>14}{'x raw':>8}{'x hladr':>9}"
            print(header + f"{'peak MiB':>10}{'x array':>9}")
            rows, reference = {}, None
            for name, reader in READERS.items():
                repeat = 1 if (name == "flowkit.Sample" and n > 1_000_000) else args.repeat
                seconds, peak, out = measure(reader, path, repeat)
                if reference is None:
                    reference = out
                else:
                    assert np.array_equal(np.asarray(out, dtype=np.float32), reference), f"{name} disagrees"
                del out
                rows[name] = (seconds, peak)
            for name, (seconds, peak) in rows.items():
                print(
                    f"{name:<18}{seconds * 1e3:>10.1f}{n / seconds:>14,.0f}"
                    f"{seconds / rows['raw np.fromfile'][0]:>8.2f}{seconds / rows['hladr.read_fcs'][0]:>9.2f}"
                    f"{peak / 2**20:>10.1f}{peak / decoded:>9.2f}"
                )
            path.unlink()


if __name__ == "__main__":
    main()
