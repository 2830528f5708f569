import CKernels
import Foundation
import QuantLabCore
import QuantLabQuant

// The INT8 plan: the traced Q/DQ graph with TensorRT's explicit-quantization fusion applied
// (ENGINE.md rule 3), run on the integer kernels.
//
//   DQ(x), DQ(w) -> Conv -> [bias] -> [ReLU] -> [Q]   becomes one Int8Conv:
//     acc[p, k] = sum_j code_x[p, j] * code_w[j, k]                       (s32, exact)
//     int8 out:  code_y = clamp(RNE(acc * s_x s_w[k] / s_y + b[k] / s_y), ±127)   when every
//                consumer of the output is a quantizer of one scale s_y (absorbed: no kernel)
//     f32 out:   y = acc * s_x s_w[k] + b[k]                                 otherwise
//
// Everything else runs in FP32 with the reference ops. A quantizer that no conv absorbed is a
// Reformat step: Quantize (f32 -> int8 codes for an Int8Conv), QDQ (a quantizer feeding float
// ops, run as fake quantization) or Dequantize (int8 codes -> f32 for a float consumer).
// Activations in int8 are codes in NHWC order (qtensor.c); the fused conv is an im2col plus
// one u8 x s8 GEMM with the requantization epilogue (igemm.c).
//
// This increment fuses Conv (groups 1) only; ConvTranspose, Gemm, residual Add and Concat in
// int8 are the next ones (issue #12).

/// Int8 codes of an activation, NHWC, with the shape of its NCHW float tensor.
struct QTensor {
    var codes: [Int8]
    var shape: [Int] // [N, C, H, W]
    var amax: Float
}

/// A conv fused with the quantizers around it.
public final class Int8Conv {
    public let name: String
    let options: Conv2dOptions
    let inChannels: Int, outChannels: Int, kernel: (Int, Int)
    /// Per output channel: s_x * s_w[k] (f32 output) or s_x * s_w[k] / s_y (int8 output).
    let scale: [Float]
    let bias: [Float]?
    public let relu: Bool
    /// The amax of the int8 output, nil for f32 output.
    public let outputAmax: Float?
    let packed: [Int8]
    let columnSums: [Int32]
    /// The im2col buffer, kept between runs (a plan runs one batch at a time).
    private var columns: [UInt8] = []

    /// Weight [K, C, KH, KW] quantized per output channel with `weightAmax` (as the simulator's
    /// weight quantizer does), packed once as the GEMM's B operand in the (kh, kw, c) order of
    /// the NHWC im2col.
    init(name: String, weight: Tensor, bias: Tensor?, options: Conv2dOptions, inputAmax: Float, weightAmax: [Float],
         relu: Bool, outputAmax: Float?) throws {
        let (k, c, kh, kw) = (weight.shape[0], weight.shape[1], weight.shape[2], weight.shape[3])
        guard weightAmax.count == k else { throw EngineError("\(name): \(weightAmax.count) weight scales for \(k) channels") }
        self.name = name
        self.options = options
        inChannels = c
        outChannels = k
        kernel = (kh, kw)
        self.relu = relu
        self.outputAmax = outputAmax
        let qmax: Float = 127
        let sx = inputAmax / qmax
        let sy = outputAmax.map { $0 / qmax }
        var b = [Int8](repeating: 0, count: kh * kw * c * k) // B[(kh, kw, c), k]
        var scale = [Float](repeating: 0, count: k)
        for o in 0..<k {
            let sw = weightAmax[o] / qmax
            scale[o] = sy.map { sx * sw / $0 } ?? sx * sw
            for ci in 0..<c {
                for i in 0..<kh {
                    for j in 0..<kw {
                        let w = weight.data[((o * c + ci) * kh + i) * kw + j]
                        // the fake quantizer's codes: RNE(w / s) clamped to ±127 (0 when amax is 0)
                        let q = sw > 0 ? min(max((w / sw).rounded(.toNearestOrEven), -qmax), qmax) : 0
                        b[((i * kw + j) * c + ci) * k + o] = Int8(q)
                    }
                }
            }
        }
        self.scale = scale
        self.bias = bias.map { t in (0..<k).map { o in sy.map { t.data[o] / $0 } ?? t.data[o] } }
        let depth = kh * kw * c
        var packed = [Int8](repeating: 0, count: ql_igemm_packed_size(Int32(depth), Int32(k)))
        var sums = [Int32](repeating: 0, count: k)
        guard ql_igemm_pack_b(&packed, &sums, b, Int32(k), Int32(depth), Int32(k)) == 0 else { throw EngineError("\(name): weight packing failed") }
        self.packed = packed
        columnSums = sums
    }

    /// Runs on input codes; returns int8 codes (outputAmax set) or an NCHW float tensor.
    func run(_ x: QTensor) throws -> (QTensor?, Tensor?) {
        let (n, c, h, w) = (x.shape[0], x.shape[1], x.shape[2], x.shape[3])
        guard c == inChannels else { throw EngineError("\(name): input has \(c) channels, the conv \(inChannels)") }
        var g = ql_conv_geom(N: Int32(n), C: Int32(c), H: Int32(h), W: Int32(w), K: Int32(outChannels), KH: Int32(kernel.0), KW: Int32(kernel.1),
                             SH: Int32(options.stride.0), SW: Int32(options.stride.1), PH: Int32(options.padding.0), PW: Int32(options.padding.1),
                             DH: Int32(options.dilation.0), DW: Int32(options.dilation.1), groups: 1)
        var oh: Int32 = 0, ow: Int32 = 0
        guard ql_conv_out_size(&g, &oh, &ow) == 0 else { throw EngineError("\(name): input \(x.shape) does not fit the conv") }
        let m = n * Int(oh) * Int(ow), depth = kernel.0 * kernel.1 * c
        // codes >= 0 (after a ReLU) are their own u8 view; otherwise shift by 128 and let the
        // epilogue subtract 128 * sum_k w[k, o]
        let offset: Int32 = ql_s8_min(x.codes, Int64(x.codes.count)) >= 0 ? 0 : 128
        if columns.count < m * depth { columns = [UInt8](repeating: 0, count: m * depth) } // kept between runs
        guard ql_im2col_nhwc_s8u8(&columns, x.codes, &g, offset) == 0 else { throw EngineError("\(name): im2col failed for input \(x.shape)") }
        let col = columns
        let offsets = offset == 0 ? nil : columnSums.map { -offset * $0 }
        let outShape = [n, outChannels, Int(oh), Int(ow)]
        return try withEpilogue(offsets) { ep in
            if let amax = outputAmax {
                var out = [Int8](repeating: 0, count: m * outChannels)
                guard ql_igemm_u8s8_s8(Int32(m), Int32(outChannels), Int32(depth), col, Int32(depth), packed, &ep, &out, Int32(outChannels)) == 0 else {
                    throw EngineError("\(name): INT8 GEMM failed")
                }
                return (QTensor(codes: out, shape: outShape, amax: amax), nil)
            }
            let nhwc = Tensor(zeros: [n, Int(oh), Int(ow), outChannels])
            guard ql_igemm_u8s8_f32(Int32(m), Int32(outChannels), Int32(depth), col, Int32(depth), packed, &ep, nhwc.data, Int32(outChannels)) == 0 else {
                throw EngineError("\(name): INT8 GEMM failed")
            }
            return (nil, nhwc.permuted([0, 3, 1, 2]))
        }
    }

    private func withEpilogue<T>(_ offsets: [Int32]?, _ body: (inout ql_requant_params) throws -> T) rethrows -> T {
        try scale.withUnsafeBufferPointer { sc in
            try (bias ?? []).withUnsafeBufferPointer { bi in
                try (offsets ?? []).withUnsafeBufferPointer { off in
                    var ep = ql_requant_params(col_offset: offsets == nil ? nil : off.baseAddress, scale: sc.baseAddress,
                                               bias: bias == nil ? nil : bi.baseAddress, relu: relu ? 1 : 0)
                    return try body(&ep)
                }
            }
        }
    }
}

/// One step of the INT8 plan.
public enum PlanStep {
    /// A graph node run in FP32 with the reference op.
    case float(GraphNode)
    /// Reformat: f32 -> int8 codes, for an Int8Conv (`value` is the quantizer's output).
    case quantize(GraphNode)
    /// Reformat: int8 codes -> f32, for a float consumer of a quantizer a conv absorbed.
    case dequantize(value: Int)
    /// A fused conv: reads the int8 codes of `input`, writes `output` (int8 codes of each
    /// absorbed quantizer's output, or f32).
    case int8Conv(Int8Conv, input: Int, output: Int, absorbed: [Int])

    /// "Reformat" kinds, for counting.
    public var reformatKind: String? {
        switch self {
        case .quantize: return "quantize"
        case .dequantize: return "dequantize"
        case .float(let n): if case .quantizeDequantize = n.op { return "qdq (float)" } else { return nil }
        case .int8Conv: return nil
        }
    }
}

/// A graph compiled to integer kernels where Q/DQ allow it.
public final class Int8Plan {
    public let graph: Graph
    public private(set) var steps: [PlanStep] = []

    /// Applies the fusion rules to a graph traced with the simulator's quantizers installed.
    public init(_ graph: Graph) throws {
        self.graph = graph
        var consumers: [Int: [Int]] = [:] // value -> node indices
        for (i, n) in graph.nodes.enumerated() { for case let v? in n.inputs { consumers[v, default: []].append(i) } }
        func node(_ value: Int?) -> GraphNode? { value.flatMap { graph.producer(of: $0) } }
        func qdq(_ n: GraphNode?) -> (amax: [Float], axis: Int?, bits: Int)? {
            if case .quantizeDequantize(let a, let axis, let bits)? = n?.op { return (a, axis, bits) }
            return nil
        }
        let index = Dictionary(uniqueKeysWithValues: graph.nodes.enumerated().map { ($0.element.name, $0.offset) })

        // 1. Which convs fuse, with their ReLU and output quantizers.
        struct Fusion { var conv: Int8Conv; var input: Int; var output: Int; var absorbed: [Int]; var skip: Set<Int> }
        var fusions: [Int: Fusion] = [:] // by conv node index
        var absorbedBy: [Int: Int] = [:] // quantizer output value -> conv node index
        for (i, n) in graph.nodes.enumerated() {
            guard case .conv(let o) = n.op, o.groups == 1, n.inputs.count >= 2,
                  let xq = node(n.inputs[0]), let x = qdq(xq), x.axis == nil, x.bits == 8,
                  let wq = node(n.inputs[1]), let w = qdq(wq), w.axis == 0, w.bits == 8,
                  let wSource = wq.inputs[0], let weight = graph.constants[wSource] else { continue }
            let bias = n.inputs.count > 2 ? n.inputs[2].flatMap { graph.constants[$0] } : nil
            var out = n.output, skip: Set<Int> = []
            var relu = false
            if let users = consumers[out], users.count == 1, case .relu = graph.nodes[users[0]].op {
                relu = true
                skip.insert(users[0])
                out = graph.nodes[users[0]].output
            }
            // int8 output when every consumer is a per-tensor int8 quantizer of one amax
            let users = consumers[out] ?? []
            let quantizers = users.compactMap { u -> (Int, Float)? in
                guard let q = qdq(graph.nodes[u]), q.axis == nil, q.bits == 8 else { return nil }
                return (u, q.amax[0])
            }
            let int8Out = !users.isEmpty && quantizers.count == users.count && Set(quantizers.map(\.1)).count == 1
                && !graph.outputs.contains(out)
            let conv = try Int8Conv(name: n.name, weight: weight, bias: bias, options: o, inputAmax: x.amax[0], weightAmax: w.amax,
                                    relu: relu, outputAmax: int8Out ? quantizers[0].1 : nil)
            let absorbed = int8Out ? quantizers.map { graph.nodes[$0.0].output } : []
            for (u, _) in int8Out ? quantizers : [] { skip.insert(u) }
            fusions[i] = Fusion(conv: conv, input: xq.output, output: out, absorbed: absorbed, skip: skip)
            for a in absorbed { absorbedBy[a] = i }
        }
        _ = index

        // 2. Steps in graph order.
        var skipped: Set<Int> = []
        for f in fusions.values { skipped.formUnion(f.skip) }
        let fusedInputs = Set(fusions.values.map(\.input))
        for (i, n) in graph.nodes.enumerated() {
            if skipped.contains(i) {
                // an absorbed quantizer still feeds float ops: they need its f32 form
                if absorbedBy[n.output] != nil, (consumers[n.output] ?? []).contains(where: { fusions[$0] == nil || fusions[$0]!.input != n.output }) {
                    steps.append(.dequantize(value: n.output))
                }
                continue
            }
            if let f = fusions[i] {
                steps.append(.int8Conv(f.conv, input: f.input, output: f.output, absorbed: f.absorbed))
                continue
            }
            if let q = qdq(n) {
                // a weight quantizer consumed only by fused convs was folded into their weights
                if let src = n.inputs[0], graph.constants[src] != nil,
                   (consumers[n.output] ?? []).allSatisfy({ fusions[$0] != nil }) { continue }
                if fusedInputs.contains(n.output), q.axis == nil, q.bits == 8 {
                    steps.append(.quantize(n))
                    // float consumers of the same quantizer need its f32 form too
                    if (consumers[n.output] ?? []).contains(where: { fusions[$0] == nil }) { steps.append(.float(n)) }
                    continue
                }
            }
            steps.append(.float(n))
        }
    }

    /// Reformat steps by kind (a quantizer of a constant, i.e. a weight, is no Reformat: an
    /// engine folds it once).
    public var reformats: [String: Int] {
        steps.reduce(into: [:]) { r, s in
            if case .float(let n) = s, let src = n.inputs.first ?? nil, graph.constants[src] != nil { return }
            if let k = s.reformatKind { r[k, default: 0] += 1 }
        }
    }
    public var int8ConvCount: Int { steps.filter { if case .int8Conv = $0 { return true } else { return false } }.count }

    /// One line per step: what runs, in which precision, and the Reformat count by kind.
    public func explain() -> String {
        var lines = ["INT8 plan: \(steps.count) steps, \(int8ConvCount) fused INT8 convs (\(Kernels.isa) kernels)"]
        for (i, s) in steps.enumerated() {
            let text: String
            switch s {
            case .float(let n):
                let weight = (n.inputs.first ?? nil).map { graph.constants[$0] != nil } ?? false
                text = "\(n.name)  \(n.op.name) f32\(s.reformatKind != nil && !weight ? "  [Reformat: QDQ in float]" : "")"
            case .quantize(let n): text = "\(n.name)  Quantize f32 -> int8  [Reformat]"
            case .dequantize(let v): text = "\(graph.values[v].name)  Dequantize int8 -> f32  [Reformat]"
            case .int8Conv(let c, _, _, _):
                text = "\(c.name)  Int8Conv int8 -> \(c.outputAmax == nil ? "f32" : "int8")  fused: DQ(x), DQ(w), Conv, bias\(c.relu ? ", ReLU" : "")\(c.outputAmax == nil ? "" : ", Q")"
            }
            lines.append(String(format: "%4d  ", i) + text)
        }
        let r = reformats
        lines.append("Reformat steps: \(r.values.reduce(0, +))" + (r.isEmpty ? "" : " (" + r.sorted { $0.key < $1.key }.map { "\($0.key) \($0.value)" }.joined(separator: ", ") + ")"))
        return lines.joined(separator: "\n")
    }

    /// Runs the plan on NCHW float inputs; returns the graph's outputs in f32.
    public func run(_ inputs: [Tensor]) throws -> [Tensor] { try runKeepingValues(inputs).outputs }

    /// Seconds spent in each step (by step index) over the runs made with `profile` on.
    public private(set) var stepSeconds: [Double] = []
    /// Time each step of the following runs (a clock read per step).
    public var profile = false {
        didSet { stepSeconds = Array(repeating: 0, count: steps.count) }
    }

    /// Where the time went, over the profiled runs: the share of each kind of step (Reformat
    /// steps by kind), by time and by count, and the slowest steps.
    public func profileReport(top: Int = 8) -> String {
        let total = stepSeconds.reduce(0, +)
        guard total > 0 else { return "no profiled runs (set profile = true first)" }
        func kind(_ s: PlanStep) -> String {
            if case .float(let n) = s, let src = n.inputs.first ?? nil, graph.constants[src] != nil { return "weight QDQ (float)" }
            if let r = s.reformatKind { return "Reformat: \(r)" }
            switch s {
            case .int8Conv: return "Int8Conv"
            case .float(let n): return "\(n.op.name) (f32)"
            default: return "other"
            }
        }
        var byKind: [String: (seconds: Double, count: Int)] = [:]
        for (s, t) in zip(steps, stepSeconds) { byKind[kind(s), default: (0, 0)].seconds += t; byKind[kind(s), default: (0, 0)].count += 1 }
        var lines = ["time by kind of step (share of \(String(format: "%.2f", 1000 * total)) ms over the profiled runs):"]
        for (k, v) in byKind.sorted(by: { $0.value.seconds > $1.value.seconds }) {
            lines.append(String(format: "  %5.1f%%  %3d steps  %@", 100 * v.seconds / total, v.count, k))
        }
        let reformat = zip(steps, stepSeconds).filter { kind($0.0).hasPrefix("Reformat") }
        lines.append(String(format: "Reformat steps: %d of %d (%.1f%% by count), %.1f%% of the time", reformat.count, steps.count,
                            100 * Double(reformat.count) / Double(max(steps.count, 1)), 100 * reformat.reduce(0) { $0 + $1.1 } / total))
        lines.append("slowest steps:")
        for (i, t) in stepSeconds.enumerated().sorted(by: { $0.element > $1.element }).prefix(top) {
            lines.append(String(format: "  %5.1f%%  step %d  %@", 100 * t / total, i, name(of: steps[i])))
        }
        return lines.joined(separator: "\n")
    }

    private func name(of s: PlanStep) -> String {
        switch s {
        case .float(let n), .quantize(let n): return "\(n.name) (\(s.reformatKind == "quantize" ? "Quantize" : n.op.name))"
        case .dequantize(let v): return "\(graph.values[v].name) (Dequantize)"
        case .int8Conv(let c, _, _, _): return "\(c.name) (Int8Conv)"
        }
    }

    /// The outputs and every int8 value computed (for tests that compare layer by layer).
    func runKeepingValues(_ inputs: [Tensor]) throws -> (outputs: [Tensor], int8: [Int: QTensor]) {
        guard inputs.count == graph.inputs.count else { throw EngineError("the graph takes \(graph.inputs.count) input(s), got \(inputs.count)") }
        var f32: [Int: Tensor] = graph.constants
        var q8: [Int: QTensor] = [:]
        for (id, t) in zip(graph.inputs, inputs) {
            guard t.shape == graph.values[id].shape else { throw EngineError("input \(graph.values[id].name): expected shape \(graph.values[id].shape), got \(t.shape)") }
            f32[id] = t
        }
        func floatValue(_ id: Int, for name: String) throws -> Tensor {
            guard let t = f32[id] else { throw EngineError("step \(name): f32 value \(graph.values[id].name) is not computed before it") }
            return t
        }
        try withNoGrad {
            for (index, step) in steps.enumerated() {
                let start = profile ? DispatchTime.now().uptimeNanoseconds : 0
                defer { if profile { stepSeconds[index] += Double(DispatchTime.now().uptimeNanoseconds - start) / 1e9 } }
                switch step {
                case .float(let n):
                    f32[n.output] = try ReferenceExecutor.apply(n, n.inputs.map { try $0.map { try floatValue($0, for: n.name) } })
                case .quantize(let n):
                    guard case .quantizeDequantize(let amax, _, _) = n.op, let src = n.inputs[0] else { continue }
                    let x = try floatValue(src, for: n.name)
                    guard x.rank == 4 else { throw EngineError("\(n.name): int8 activations are 4-D, got \(x.shape)") }
                    var codes = [Int8](repeating: 0, count: x.count)
                    ql_quantize_nchw_to_nhwc_s8(&codes, x.data, Int32(x.shape[0]), Int32(x.shape[1]), Int32(x.shape[2] * x.shape[3]), amax[0], 127)
                    q8[n.output] = QTensor(codes: codes, shape: x.shape, amax: amax[0])
                case .dequantize(let v):
                    guard let q = q8[v] else { throw EngineError("dequantize \(graph.values[v].name): no int8 value") }
                    let out = Tensor(zeros: q.shape)
                    ql_dequantize_nhwc_to_nchw_f32(out.data, q.codes, Int32(q.shape[0]), Int32(q.shape[1]), Int32(q.shape[2] * q.shape[3]), q.amax / 127)
                    f32[v] = out
                case .int8Conv(let conv, let input, let output, let absorbed):
                    guard let x = q8[input] else { throw EngineError("\(conv.name): its input \(graph.values[input].name) has no int8 value") }
                    let (q, t) = try conv.run(x)
                    if let q { for a in absorbed { q8[a] = q } } else { f32[output] = t }
                }
            }
        }
        return (try graph.outputs.map { try floatValue($0, for: "output") }, q8)
    }
}

extension Int8Plan {
    /// Runs on a batch of any size up to the traced one: a smaller batch is padded with zeros
    /// and the outputs cut back (the graph's shapes are fixed at trace time, as a TensorRT
    /// engine's are; the last batch of a dataset is usually smaller).
    public func runBatch(_ images: Tensor) throws -> [Tensor] {
        guard graph.inputs.count == 1 else { throw EngineError("runBatch needs a graph with one input") }
        let traced = graph.values[graph.inputs[0]].shape
        let b = images.shape[0]
        guard images.rank == traced.count, Array(images.shape.dropFirst()) == Array(traced.dropFirst()), b <= traced[0] else {
            throw EngineError("input \(images.shape) does not fit the traced \(traced) (batch at most \(traced[0]))")
        }
        if b == traced[0] { return try run([images]) }
        let padded = Tensor(zeros: traced)
        padded.data.update(from: images.data, count: images.count)
        return try run([padded]).map { $0.slice(dim: 0, start: 0, end: b) }
    }
}
