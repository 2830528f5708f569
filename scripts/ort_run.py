#!/usr/bin/env python3
"""Runs an ONNX model with onnxruntime on one input, for `qlab engine --onnxruntime` and
`qlab bench --engine`: the peer of QuantLab's engine on the same model file and input.

Usage: ort_run.py MODEL.onnx INPUT.bin D0,D1,... OUT_DIR RUNS THREADS [quantize] [profile=N]
  INPUT.bin: little-endian float32, the shape given. Writes OUT_DIR/output<i>.bin (float32)
  and prints one JSON line: the median latency of RUNS timed runs after 3 warm-up runs, the
  output names and shapes, onnxruntime's version, and which node types the optimized graph
  kept (QLinearConv there means onnxruntime fused a Q/DQ conv into an integer one).
  quantize: MODEL is FP32; first quantize it onnxruntime's own way (quantize_static, QDQ
  format, u8 activations / s8 per-channel weights, its x86 default; calibrated on INPUT,
  which is enough for timing) and run that: onnxruntime's best INT8 on this model.
  profile=N: after the timed runs, N more runs in a second session with onnxruntime's profiler
  on; the JSON line gets "layer_seconds": each layer's median time per run, keyed by the name
  of the model's node it belongs to (see layer_of), so a per-layer comparison can line them up
  with another engine's. The timed runs stay unprofiled.
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


# ops onnxruntime fuses into the product before them, or that only carry its output on
# (activations, the Mul of x * sigmoid(x)): their time is the product's
ACTIVATIONS = {"Relu", "Sigmoid", "Mul", "Clip", "LeakyRelu", "HardSigmoid", "Tanh"}
# quantize / dequantize: their time is that of the product they feed
QDQ = {"QuantizeLinear", "DequantizeLinear"}
PRODUCTS = {"Conv", "ConvTranspose", "Gemm", "MatMul"}


def layer_of(graph):
    """A function from the name of a node onnxruntime ran to the name of the model's node it
    belongs to, so that one layer's time is one number however onnxruntime split or fused it:
    - an activation (onnxruntime names a conv fused with its activation after the activation,
      "<name>_nchwc" in its NCHWc layout; x * sigmoid(x) fused into QuickGelu after the Mul;
      in a quantized model, QLinearSigmoid and QLinearMul) walks up its first input, through
      any Q/DQ, to the conv or matrix product that produced it;
    - a QuantizeLinear / DequantizeLinear walks down to the product it feeds (a weight's
      dequantize, an input's quantize-dequantize pair);
    - a node of onnxruntime's own named after one of the model's products ("<name>_bias_dq")
      belongs to that product; the layout changes it inserts (NCHWc reorders, the transposes
      around its NHWC integer kernels) are grouped as "(onnxruntime layout changes)"; anything
      else keeps its own name."""
    nodes = {n.name: n for n in graph.node}
    producer = {o: n for n in graph.node for o in n.output}
    consumers = {}
    for n in graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    products = sorted((n.name for n in graph.node if n.op_type in PRODUCTS), key=len, reverse=True)

    def up(node):  # through activations, and the Q/DQ between an activation and its conv
        for _ in range(8):
            if node.op_type not in ACTIVATIONS | QDQ or not node.input or node.input[0] not in producer:
                break
            node = producer[node.input[0]]
        return node

    def down(node):
        for _ in range(8):
            users = consumers.get(node.output[0], []) if node.output else []
            if node.op_type not in QDQ or len(users) != 1:
                break
            node = users[0]
        return node

    def layer(name):
        if name.endswith("_nchwc") and name[: -len("_nchwc")] in nodes:
            name = name[: -len("_nchwc")]
        elif "/" in name and name.split("/", 1)[0] in nodes:
            name = name.split("/", 1)[0]
        node = nodes.get(name)
        if node is None:
            if name.startswith(("ReorderInput", "ReorderOutput", "Transpose_token_")):
                return "(onnxruntime layout changes)"
            return next((p for p in products if name.startswith(p) and name[len(p)] in "._/"), name)
        found = down(node) if node.op_type in QDQ else up(node)
        if found.op_type not in PRODUCTS and node.op_type in QDQ:
            found = up(node)  # a Q/DQ feeding no product (several consumers, or an output)
        return found.name if found.op_type in PRODUCTS else name

    return layer


def profile_layers(model, opts_for, name, x, runs):
    """Median seconds per run of each layer (layer_of) over `runs` profiled runs."""
    opts = opts_for()
    opts.enable_profiling = True
    opts.profile_file_prefix = os.path.join(tempfile.mkdtemp(), "ort-profile")
    sess = ort.InferenceSession(model, opts, providers=["CPUExecutionProvider"])
    warmup = 3
    for _ in range(warmup + runs):
        sess.run(None, {name: x})
    path = sess.end_profiling()
    with open(path) as f:
        events = json.load(f)
    os.remove(path)
    layer = layer_of(onnx.load(model).graph)
    per_node = {}  # onnxruntime node -> its time in each run, in order
    for e in events:
        if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time"):
            per_node.setdefault(e["name"][: -len("_kernel_time")], []).append(e["dur"] * 1e-6)
    layers = {}
    for node, times in per_node.items():  # in run order: the warm-up runs' events first
        key = layer(node)
        layers[key] = layers.get(key, 0.0) + float(np.median(times[warmup:] or times))
    return layers


def main():
    model, inp, shape, out_dir, runs, threads = sys.argv[1:7]
    flags = sys.argv[7:]
    profile_runs = next((int(f.split("=", 1)[1]) for f in flags if f.startswith("profile=")), 0)
    shape = [int(d) for d in shape.split(",")]
    x = np.fromfile(inp, dtype="<f4").reshape(shape)
    if "quantize" in flags:
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
    def options():
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.intra_op_num_threads = int(threads)
        opts.inter_op_num_threads = 1
        return opts

    opts = options()
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
    result = {"median_s": float(np.median(times)), "version": ort.__version__, "threads": int(threads),
              "outputs": [{"name": o.name, "shape": list(r.shape)} for o, r in zip(sess.get_outputs(), outs)],
              "optimized_ops": ops}
    if profile_runs > 0:
        if onnx is None:
            sys.exit("profile: needs the onnx package (make venv) to name the layers")
        result["layer_seconds"] = profile_layers(model, options, name, x, profile_runs)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
