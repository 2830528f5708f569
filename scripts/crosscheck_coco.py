#!/usr/bin/env python3
"""Compare `qlab eval-coco` with pycocotools on generated cases (run by `make crosscheck`).

Each case is a ground-truth file and a detections file written here from a seeded numpy
generator; both evaluators read the same two files. All 12 numbers must agree within 1e-4.
Cases: crowd boxes, images without ground truth, images without detections, only small
objects, more than 100 detections on an image, and a random mix with exact-threshold IoUs
(integer boxes). Exit status 1 if any number differs.
"""
import contextlib
import io
import json
import os
import subprocess
import sys
import tempfile

import numpy as np
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

TOL = 1e-4


def make_case(rng, n_images=12, n_cats=3, crowd_rate=0.0, empty_gt_rate=0.0, empty_dt_rate=0.0,
              size_range=(8, 200), dets_per_gt=(0, 3), extra_dets=(0, 4), integer=False, img=256, jitter=0.15):
    images, anns, dets = [], [], []
    cats = [{"id": c, "name": f"class{c}"} for c in (1, 3, 7)[:n_cats]]
    aid = 1
    for i in range(1, n_images + 1):
        images.append({"id": i, "file_name": f"{i:06d}.jpg", "width": img, "height": img})
        n_gt = 0 if rng.random() < empty_gt_rate else int(rng.integers(1, 8))
        gts = []
        for _ in range(n_gt):
            w, h = rng.uniform(*size_range, size=2)
            x, y = rng.uniform(0, img - w), rng.uniform(0, img - h)
            if integer:
                x, y, w, h = map(float, np.round([x, y, w, h]))
            cat = cats[int(rng.integers(len(cats)))]["id"]
            crowd = int(rng.random() < crowd_rate)
            area = float(w * h * rng.uniform(0.6, 1.0))  # like a segmentation area
            anns.append({"id": aid, "image_id": i, "category_id": cat, "bbox": [x, y, w, h],
                         "area": area, "iscrowd": crowd})
            gts.append((x, y, w, h, cat))
            aid += 1
        if rng.random() < empty_dt_rate:
            continue
        for (x, y, w, h, cat) in gts:
            for _ in range(int(rng.integers(dets_per_gt[0], dets_per_gt[1] + 1))):
                j = rng.normal(0, jitter, size=4) * [w, h, w, h]
                b = [x + j[0], y + j[1], max(1.0, w + j[2]), max(1.0, h + j[3])]
                if integer:
                    b = list(map(float, np.round(b)))
                dcat = cat if rng.random() < 0.85 else cats[int(rng.integers(len(cats)))]["id"]
                dets.append({"image_id": i, "category_id": dcat, "bbox": b, "score": float(np.round(rng.random(), 3))})
        for _ in range(int(rng.integers(extra_dets[0], extra_dets[1] + 1))):
            w, h = rng.uniform(*size_range, size=2)
            b = [rng.uniform(0, img - w), rng.uniform(0, img - h), w, h]
            dets.append({"image_id": i, "category_id": cats[int(rng.integers(len(cats)))]["id"],
                         "bbox": b, "score": float(rng.random())})
    return {"images": images, "annotations": anns, "categories": cats}, dets


def pycoco_stats(gt_path, dt_path):
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(gt_path)
        dt = gt.loadRes(dt_path)
        e = COCOeval(gt, dt, "bbox")
        e.evaluate()
        e.accumulate()
        e.summarize()
    return list(map(float, e.stats))


def main():
    qlab = sys.argv[1] if len(sys.argv) > 1 else ".build/release/qlab"
    rng = np.random.default_rng(2024)
    cases = {
        "crowd boxes": dict(crowd_rate=0.3),
        "images without ground truth": dict(empty_gt_rate=0.4),
        "images without detections": dict(empty_dt_rate=0.4),
        "only small objects": dict(size_range=(2, 31)),
        "more than 100 detections per image": dict(n_images=4, extra_dets=(120, 180)),
        "a good detector (AP near 0.6)": dict(n_images=40, dets_per_gt=(1, 2), extra_dets=(0, 2), jitter=0.03),
        "random mix, integer boxes": dict(n_images=30, crowd_rate=0.1, empty_gt_rate=0.1, empty_dt_rate=0.1,
                                          size_range=(4, 160), integer=True),
    }
    failures = 0
    with tempfile.TemporaryDirectory() as tmp:
        for name, kw in cases.items():
            gt, dt = make_case(rng, **kw)
            gt_path, dt_path, out = (os.path.join(tmp, f) for f in ("gt.json", "dt.json", "ours.json"))
            json.dump(gt, open(gt_path, "w"))
            json.dump(dt, open(dt_path, "w"))
            ref = pycoco_stats(gt_path, dt_path)
            subprocess.run([qlab, "eval-coco", "--gt", gt_path, "--dt", dt_path, "--json", out],
                           check=True, stdout=subprocess.DEVNULL)
            ours = json.load(open(out))["stats"]
            diff = max(abs(a - b) for a, b in zip(ours, ref))
            ok = diff <= TOL
            failures += not ok
            print(f"{'✓' if ok else '✗'} {name:38s} max |diff| {diff:.2e}   "
                  f"(AP {ours[0]:.4f} vs {ref[0]:.4f}, {len(gt['annotations'])} gt, {len(dt)} dets)")
            if not ok:
                for k, (a, b) in enumerate(zip(ours, ref)):
                    print(f"    stat {k:2d}: ours {a:.6f} pycocotools {b:.6f}")
    print(f"{len(cases) - failures} passed, {failures} failed")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
