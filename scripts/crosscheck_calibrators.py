#!/usr/bin/env python3
"""Compare `qlab histogram-amax` with a numpy implementation of pytorch-quantization's
histogram calibrators (run by `make crosscheck`).

The numpy side follows the published algorithms (pytorch_quantization/calib/histogram.py),
written independently here with numpy only:
  entropy     bins[0] := bins[1]; for every candidate i >= 128 bins: P = bins[:i] with the
              clipped mass added to P[i-1]; Q = the first i bins merged into 128 groups
              (np.digitize over linspace(0, i, 129)), each group's mass spread evenly over its
              non-empty bins; KL(P/sum P || Q/sum Q); amax = edge[i] of the LAST minimum.
  mse         amax = the bin centre c_i (i >= 128) minimising sum_k n_k (fq(c_k; c_i) - c_k)^2.
  percentile  amax = edge[searchsorted(cumsum(n / total), p / 100)].
Histograms: |x| of a normal, a ReLU'd heavy tail, a Laplace with far outliers, a sparse
one, and a narrow one. amax must agree to 1e-5 relative (entropy and percentile pick a bin
edge, so a disagreement is a whole bin). Exit status 1 on any difference.
"""
import json
import os
import subprocess
import sys
import tempfile

import numpy as np

REL_TOL = 1e-5


def entropy_amax(counts, width, num_bits=8, start=128):
    bins = counts.astype(np.float64).copy()
    bins[0] = bins[1]
    n = len(bins)
    levels = 1 << (num_bits - 1)
    best, best_i = np.inf, n
    for i in range(start, n + 1):
        space = np.linspace(0, i, num=levels + 1)
        group = np.digitize(np.arange(i), space) - 1
        nonzero = bins[:i] != 0
        mass = np.bincount(group[nonzero], weights=bins[:i][nonzero], minlength=levels)
        members = np.bincount(group[nonzero], minlength=levels)
        q = np.zeros(i)
        q[nonzero] = mass[group[nonzero]] / members[group[nonzero]]
        p = bins[:i].copy()
        p[-1] += bins[i:].sum()
        ps, qs = p / p.sum(), q / q.sum()
        mask = ps > 0
        if np.any(qs[mask] == 0):
            kl = np.inf
        else:
            kl = float(np.sum(ps[mask] * np.log(ps[mask] / qs[mask])))
        if kl <= best:
            best, best_i = kl, i
    return best_i * width


def fake_quant(x, amax, num_bits=8):
    qmax = (1 << (num_bits - 1)) - 1
    s = np.float32(amax) / np.float32(qmax)
    return np.clip(np.round(x / s), -qmax, qmax) * s


def mse_amax(counts, width, start=128):
    centres = ((np.arange(len(counts)) + 0.5) * width).astype(np.float32)
    errors = [float(np.sum(counts * (fake_quant(centres, centres[i]) - centres).astype(np.float64) ** 2))
              for i in range(start, len(centres))]
    return float(centres[start + int(np.argmin(errors))])


def percentile_amax(counts, width, p):
    cdf = np.cumsum(counts / counts.sum())
    return float(np.searchsorted(cdf, p / 100) * width)


def histograms(rng):
    def hist(x, bins=2048):
        x = np.abs(x)
        width = x.max() / bins
        counts = np.minimum((x / width).astype(np.int64), bins - 1)
        return np.bincount(counts, minlength=bins), float(np.float32(width))
    yield "normal", *hist(rng.normal(size=200_000))
    yield "relu-lognormal", *hist(np.maximum(rng.lognormal(0, 1, size=200_000) - 1, 0))
    yield "laplace+outliers", *hist(np.concatenate([rng.laplace(size=200_000), [60.0, -75.0, 90.0]]))
    c, w = hist(rng.exponential(size=50_000), bins=600)
    c[::7] = 0
    yield "sparse-600", c, w
    yield "narrow", *hist(rng.uniform(0, 1, size=100_000) ** 6)


def main():
    qlab = sys.argv[1] if len(sys.argv) > 1 else ".build/release/qlab"
    rng = np.random.default_rng(7)
    failures = 0
    with tempfile.TemporaryDirectory() as tmp:
        for name, counts, width in histograms(rng):
            path = os.path.join(tmp, f"{name}.json")
            with open(path, "w") as f:
                json.dump({"counts": [int(v) for v in counts], "bin_width": width}, f)
            out = subprocess.run([qlab, "histogram-amax", path], check=True, capture_output=True, text=True).stdout
            ours = json.loads(out)
            ref = {"entropy": entropy_amax(counts, width), "mse": mse_amax(counts, width),
                   "percentile-99.99": percentile_amax(counts, width, 99.99),
                   "percentile-99.9": percentile_amax(counts, width, 99.9)}
            for k, v in ref.items():
                ok = abs(ours[k] - v) <= REL_TOL * max(abs(v), 1e-12)
                failures += not ok
                print(f"{'✓' if ok else '✗'} {name:18s} {k:17s} ours {ours[k]:.6g}  numpy {v:.6g}  ({v / width:.1f} bins)")
    print("calibrators: all amax agree" if failures == 0 else f"calibrators: {failures} disagreement(s)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
