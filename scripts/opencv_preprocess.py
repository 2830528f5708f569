"""OpenCV's preprocessing as a plain Python server does it: the peer of exp06's pipelines.

Usage: opencv_preprocess.py FOLDER SIZE IMAGES THREADS

Reads the .jpg/.jpeg files of FOLDER into memory, then times, over IMAGES images (the set
cycled) spread over THREADS Python threads (OpenCV releases the GIL; cv2.setNumThreads(1) so
that each call stays on its thread): cv2.imdecode, the YOLOv6 letterbox (cv2.resize with
INTER_LINEAR to the long side SIZE, cv2.copyMakeBorder with grey 114), BGR->RGB, HWC->CHW and
scaling to [0, 1] float32. Prints one JSON line: images, seconds, img_per_s, cpu_seconds,
opencv version.
"""
import json
import os
import sys
import threading
import time

import cv2
import numpy as np


def letterbox(image, size):
    h, w = image.shape[:2]
    r = size / max(h, w)
    nw, nh = max(1, int(round(w * r))), max(1, int(round(h * r)))
    if (nw, nh) != (w, h):
        image = cv2.resize(image, (nw, nh), interpolation=cv2.INTER_LINEAR)
    left, top = int(round((size - nw) / 2)), int(round((size - nh) / 2))
    return cv2.copyMakeBorder(image, top, size - nh - top, left, size - nw - left, cv2.BORDER_CONSTANT, value=(114, 114, 114))


def preprocess(data, size):
    image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    if image is None:
        return None
    image = letterbox(image, size)
    return np.ascontiguousarray(image[:, :, ::-1].transpose(2, 0, 1)).astype(np.float32) / 255.0


def main():
    folder, size, images, threads = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    cv2.setNumThreads(1)
    names = sorted(n for n in os.listdir(folder) if n.lower().endswith((".jpg", ".jpeg")))
    if not names:
        sys.exit(f"no .jpg or .jpeg files in {folder}")
    files = [open(os.path.join(folder, n), "rb").read() for n in names]
    for data in files[:4]:
        preprocess(data, size)  # warm-up
    lock, next_index, failed = threading.Lock(), [0], [0]

    def worker():
        while True:
            with lock:
                i = next_index[0]
                if i >= images:
                    return
                next_index[0] += 1
            if preprocess(files[i % len(files)], size) is None:
                with lock:
                    failed[0] += 1

    cpu0, t0 = time.process_time(), time.perf_counter()
    pool = [threading.Thread(target=worker) for _ in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    seconds, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    print(json.dumps({"images": images, "failed": failed[0], "seconds": seconds, "img_per_s": images / seconds,
                      "cpu_seconds": cpu, "opencv": cv2.__version__}))


if __name__ == "__main__":
    main()
