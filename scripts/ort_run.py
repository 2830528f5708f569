#!/usr/bin/env python3
"""Runs an ONNX model with onnxruntime on one input, for `qlab engine --onnxruntime` and
`qlab bench --engine`: the peer of QuantLab's engine on the same model file and input.

Usage: ort_run.py MODEL.onnx INPUT.bin D0,D1,... OUT_DIR RUNS THREADS [quantize]
  INPUT.bin: little-endian float32, the shape given. Writes OUT_DIR/output<i>.bin (float32)
  and prints one JSON line: the median latency of RUNS timed runs after 3 warm-up runs, the
  output names and shapes, onnxruntime's version, and which node types the optimized graph
  kept (QLinearConv there means onnxruntime fused a Q/DQ conv into an integer one).
  quantize: MODEL is FP32; first quantize it onnxruntime's own way (quantize_static, QDQ
  format, u8 activations / s8 per-channel weights, its x86 default; calibrated on INPUT,
  which is enough for timing) and run that: onnxruntime's best INT8 on this model.
"""
import json
import os
import sys
import tempfile
import time

import numpy as np
import onnxruntime as ort

try:
    import onnx  # only to count the optimized graph's node types; onnxruntime's quantizer needs it too
except ImportError:
    onnx = None


def main():
    model, inp, shape, out_dir, runs, threads = sys.argv[1:7]
    shape = [int(d) for d in shape.split(",")]
    x = np.fromfile(inp, dtype="<f4").reshape(shape)
    if len(sys.argv) > 7 and sys.argv[7] == "quantize":
        from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

        class Reader(CalibrationDataReader):
            def __init__(self):
                self.items = iter([{ort.InferenceSession(model, providers=["CPUExecutionProvider"]).get_inputs()[0].name: x}])

            def get_next(self):
                return next(self.items, None)

        quantized = os.path.join(out_dir, "ort-quantized.onnx")
        quantize_static(model, quantized, Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
        model = quantized
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.intra_op_num_threads = int(threads)
    opts.inter_op_num_threads = 1
    optimized = os.path.join(tempfile.mkdtemp(), "optimized.onnx")
    opts.optimized_model_filepath = optimized
    sess = ort.InferenceSession(model, opts, providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    outs = sess.run(None, {name: x})
    for i, o in enumerate(outs):
        np.asarray(o, dtype="<f4").tofile(os.path.join(out_dir, f"output{i}.bin"))
    for _ in range(3):
        sess.run(None, {name: x})
    times = []
    for _ in range(int(runs)):
        t0 = time.perf_counter()
        sess.run(None, {name: x})
        times.append(time.perf_counter() - t0)
    ops = {}
    for n in (onnx.load(optimized).graph.node if onnx else []):
        ops[n.op_type] = ops.get(n.op_type, 0) + 1
    print(json.dumps({"median_s": float(np.median(times)), "version": ort.__version__, "threads": int(threads),
                      "outputs": [{"name": o.name, "shape": list(r.shape)} for o, r in zip(sess.get_outputs(), outs)],
                      "optimized_ops": ops}))


if __name__ == "__main__":
    main()
