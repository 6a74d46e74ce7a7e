#!/usr/bin/env python3
"""Replay throughput: `visutility replay` vs a plain Python loop with River.

Generates (once) an NDJSON stream of N snapshots, then for each detector:
  * runs `visutility replay --strategy builtin:<detector>` on it and reads the
    rate it reports (end to end: reading, validating and evaluating);
  * runs the loop a River user would write: `json.loads` each line and feed
    `river.drift.<Detector>`, timed the same way (end to end);
  * checks that both fire at exactly the same indices, and prints the rates
    and their ratio.

    pip install river==0.26.0
    cargo build --release
    python3 bench/replay_vs_river.py --bin target/release/visutility --points 1000000
"""
import argparse
import csv
import json
import os
import random
import subprocess
import sys
import time

# River 0.26 subscripts csv.DictReader at import time, which needs Python
# 3.12; on 3.11 make it subscriptable (no effect on the detectors).
if not hasattr(csv.DictReader, "__class_getitem__"):
    csv.DictReader.__class_getitem__ = classmethod(lambda cls, item: cls)

DETECTORS = {
    "page-hinkley": ("PageHinkley", {}),
    "adwin": ("ADWIN", {}),
}


def generate(path, n, seed=7):
    """A score stream with noise and a level shift every 50,000 points."""
    rng = random.Random(seed)
    levels = [0.92, 0.80, 0.88]
    t0 = 1_780_000_000_000
    with open(path, "w") as f:
        for i in range(n):
            score = round(levels[(i // 50_000) % 3] + rng.gauss(0, 0.02), 6)
            f.write('{"model_version":"m","score":%r,"timestamp":%d}\n' % (score, t0 + i * 1000))


def run_visutility(binary, detector, path, config):
    t = time.perf_counter()
    out = subprocess.run(
        [binary, "replay", "--strategy", f"builtin:{detector}", "--config", json.dumps(config), "--input", path],
        check=True, capture_output=True, text=True,
    )
    wall = time.perf_counter() - t
    indices = [json.loads(line)["index"] for line in out.stdout.splitlines()]
    return wall, indices, out.stderr.strip()


def run_river(detector, path, config):
    from river import drift

    cls, _ = DETECTORS[detector]
    d = getattr(drift, cls)(**config)
    indices = []
    t = time.perf_counter()
    with open(path) as f:
        for i, line in enumerate(f):
            snap = json.loads(line)
            d.update(snap["score"])
            if d.drift_detected:
                indices.append(i)
    return time.perf_counter() - t, indices


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", default="target/release/visutility")
    ap.add_argument("--points", type=int, default=1_000_000)
    ap.add_argument("--input", default=None, help="NDJSON file (generated when missing)")
    ap.add_argument("--detectors", default="page-hinkley,adwin")
    args = ap.parse_args()

    path = args.input or f"/tmp/visutility-replay-{args.points}.ndjson"
    if not os.path.exists(path):
        generate(path, args.points)
    n = sum(1 for _ in open(path))
    print(f"stream: {path}, {n} snapshots\n")
    print("| detector | visutility replay (snapshots/s) | River loop (snapshots/s) | ratio | detections | identical |")
    print("| --- | ---: | ---: | ---: | ---: | --- |")
    ok = True
    for det in args.detectors.split(","):
        config = DETECTORS[det][1]
        wall_v, idx_v, summary = run_visutility(args.bin, det, path, config)
        wall_r, idx_r = run_river(det, path, config)
        same = idx_v == idx_r
        ok &= same
        print(f"| {det} | {n / wall_v:,.0f} | {n / wall_r:,.0f} | {wall_r / wall_v:.1f}x | {len(idx_v)} | {'yes' if same else 'NO'} |")
        print(f"<!-- visutility: {summary} -->", file=sys.stderr)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
