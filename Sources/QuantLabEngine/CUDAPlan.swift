import CQLCuda
import Foundation
import QuantLabCore

/// An INT8 plan run on the GPU (issue #21): the same steps as `Int8Plan.run`, in the same order,
/// with the activations kept in device memory between them.
///
/// - Int8 slots are NHWC codes in device buffers, allocated once per slot and reused by every
///   run (a plan's shapes are fixed when it is traced, as a TensorRT engine's are).
/// - An INT8 conv is the plugin's int8 im2col (codes shifted by 128, so the column matrix is
///   unsigned) and its integer GEMM with the fused epilogue: the offset's contribution,
///   -128 * sum_k w[k, o], comes back as a per-column integer offset, so the accumulator is the
///   CPU's exactly and the epilogue (fmaf, round half to even, the same SiLU operations) gives
///   the CPU plan's codes bit for bit. A transposed conv is the same GEMM and a scatter.
/// - Quantize, Requantize, Dequantize, max pooling and concatenation in int8 have device
///   kernels with the CPU's arithmetic (cuda/engine.cu). An integer Gemm (a linear layer)
///   quantizes its input and runs the same GEMM; an integer MatMul of two activations
///   (attention's products) quantizes both and packs b at every run.
/// - A float step runs on the device when its op has a device kernel (conv, linear, matmul,
///   the elementwise ops, softmax, reshape, transpose, slice, concat); the others run on the
///   CPU, their inputs copied over. `hostSteps` names them;
///   a float step's result is within rounding of the CPU's (a different summation order),
///   not bit-exact.
public final class CUDAPlan {
    public let plan: Int8Plan
    let api: qlc_api
    /// Where each step runs.
    public enum Placement: Sendable, Equatable { case device, host }
    public let placements: [Placement]

    /// The names of the steps that run on the CPU, in plan order.
    public var hostSteps: [String] {
        zip(plan.steps, placements).compactMap { step, place in place == .host ? Self.stepName(step) : nil }
    }

    /// A GEMM's B operand in the GPU layout with its epilogue's per-column scale, bias and
    /// offsets, -128 * sum_k B[k, o] (the A operand holds codes + 128, unsigned), from one
    /// `igemm_pack_b_offsets`. Weights are packed once; attention's b is packed again into
    /// the same buffers for every batch entry.
    final class DeviceWeights {
        let depth: Int, columns: Int
        let packed: CUDABuffer<Int8>
        let offsets: CUDABuffer<Int32>
        let scale: CUDABuffer<Float>
        let bias: CUDABuffer<Float>?

        init(depth: Int, columns: Int, scale: [Float], bias: [Float]?, api: qlc_api) throws {
            (self.depth, self.columns) = (depth, columns)
            packed = try CUDABuffer<Int8>(count: api.igemm_packed_size(Int32(depth), Int32(columns)))
            offsets = try CUDABuffer<Int32>(count: columns)
            self.scale = try CUDABuffer(scale)
            self.bias = try bias.map { try CUDABuffer($0) }
        }

        /// Weights: codes [depth][columns] packed once.
        convenience init(_ name: String, codes: [Int8], depth: Int, scale: [Float], bias: [Float]?, api: qlc_api) throws {
            try self.init(depth: depth, columns: scale.count, scale: scale, bias: bias, api: api)
            let b = try CUDABuffer(codes)
            try pack(b.typed, api: api, name)
        }

        /// Packs B [depth][columns] (device codes) and its offsets.
        func pack(_ b: UnsafePointer<Int8>, api: qlc_api, _ name: String) throws {
            try CUDA.shared.check(api.igemm_pack_b_offsets(nil, packed.pointer, offsets.typed, b, Int32(columns), Int32(depth), Int32(columns), 128),
                                  "\(name): packing")
        }

        /// A [m][depth] (codes + 128, rows `lda` apart) x B, through the epilogue (activation:
        /// 0 none, 1 ReLU, 2 SiLU) into `out` [m][columns] as `mode` (QLC_OUT_S8 or _F32).
        func gemm(_ a: UnsafePointer<UInt8>, rows m: Int, lda: Int, activation: Int32 = 0, mode: Int32, into out: UnsafeMutableRawPointer,
                  api: qlc_api, _ name: String) throws {
            var p = qlc_requant_params(col_offset: offsets.typed, scale: scale.typed, bias: bias?.typed, relu: activation)
            try CUDA.shared.check(api.igemm_ex(nil, Int32(QLC_KERNEL_AUTO), mode, Int32(m), Int32(columns), Int32(depth), a, Int32(lda),
                                               packed.pointer, &p, out, Int32(columns)), "\(name): int8 GEMM")
        }
    }

    /// Buffers a step reuses from run to run (grown when a larger one is needed).
    final class Scratch {
        var buffers: [AnyHashable: AnyObject] = [:]
        func buffer<T>(_ key: AnyHashable, _ count: Int, _: T.Type) throws -> CUDABuffer<T> {
            if let b = buffers[key] as? CUDABuffer<T>, b.count >= count { return b }
            let b = try CUDABuffer<T>(count: count)
            buffers[key] = b
            return b
        }
    }

    /// The device state of one INT8 conv or integer Gemm/MatMul: its weights (a MatMul's b:
    /// made at its first run, packed at every run) and its scratch buffers.
    final class DeviceStep {
        var weights: DeviceWeights?
        let scratch = Scratch()
        init(weights: DeviceWeights?) { self.weights = weights }
    }

    /// The INT8 convs' and the integer Gemm/MatMul nodes' device state, by object.
    var devices: [ObjectIdentifier: DeviceStep] = [:]
    /// Device buffers of the int8 slots, by slot id.
    let slots = Scratch()
    /// Device copies of the graph's constants that device steps read.
    var deviceConstants: [Int: Tensor] = [:]

    /// Needs a ready CUDA device (`CUDA.shared`); throws with its notice otherwise.
    public init(_ plan: Int8Plan) throws {
        api = try CUDA.shared.requireDevice()
        self.plan = plan
        placements = plan.steps.map { step in
            switch step {
            case .float(let n): return Self.hasDeviceKernel(n.op) ? .device : .host
            case .quantize, .requantize, .dequantize, .int8Conv, .int8Op, .int8Gemm: return .device
            }
        }
        for step in plan.steps {
            if case .int8Conv(let c, _, _) = step, devices[ObjectIdentifier(c)] == nil {
                devices[ObjectIdentifier(c)] = DeviceStep(weights: try DeviceWeights(c.name, codes: c.weightCodes, depth: c.depth, scale: c.scale, bias: c.bias, api: api))
            }
            if case .int8Gemm(let g, _, _) = step, devices[ObjectIdentifier(g)] == nil {
                devices[ObjectIdentifier(g)] = DeviceStep(weights: g.kind == .matmul ? nil
                    : try DeviceWeights(g.name, codes: g.weightCodes, depth: g.inFeatures, scale: g.scale, bias: g.bias, api: api))
            }
        }
    }

    /// Float ops the library runs on CUDA tensors (CUDAOps).
    static func hasDeviceKernel(_ op: OpKind) -> Bool {
        switch op {
        case .conv, .linear, .matmul, .add, .sub, .mul, .div, .affine, .relu, .sigmoid, .silu, .gelu, .softmax, .reshape, .transpose, .slice, .concat:
            return true
        default: return false
        }
    }

    static func stepName(_ step: PlanStep) -> String {
        switch step {
        case .float(let n): return "\(n.name) (\(n.op.name))"
        case .quantize(_, _, _, let name), .requantize(_, _, _, _, let name), .dequantize(_, _, let name): return name
        case .int8Conv(let c, _, _): return c.name
        case .int8Op(let n, _, _, _): return "\(n.name) (\(n.op.name) int8)"
        case .int8Gemm(let g, _, _): return "\(g.name) (\(g.kindName) int8)"
        }
    }

    /// One line: how many steps run where.
    public var summary: String {
        let host = hostSteps
        return "\(plan.steps.count) steps, \(plan.steps.count - host.count) on the device" + (host.isEmpty ? "" : ", \(host.count) on the CPU: " + host.joined(separator: ", "))
    }

    /// Runs on NCHW float inputs (host tensors); returns the outputs on the host.
    public func run(_ inputs: [Tensor]) throws -> [Tensor] { try runKeepingValues(inputs, keepCodes: false).outputs }

    /// Runs on a batch of any size, in chunks of the traced batch (as `Int8Plan.runBatch`).
    public func runBatch(_ images: Tensor) throws -> [Tensor] { try Int8Plan.inChunks(images, graph: plan.graph, run) }

    /// Median wall time of `runs` runs (inputs copied in, outputs copied out: the whole
    /// request), after 3 warm-up runs.
    public func medianLatency(_ inputs: [Tensor], runs: Int) throws -> Double {
        try medianWallTime(runs: runs) { _ = try run(inputs) }
    }

    func slot(_ id: Int, count: Int) throws -> CUDABuffer<Int8> { try slots.buffer(id, count, Int8.self) }

    func device(_ object: AnyObject, _ name: String) throws -> DeviceStep {
        guard let d = devices[ObjectIdentifier(object)] else { throw EngineError("\(name): not prepared for the device") }
        return d
    }

    struct DeviceCodes { let buffer: CUDABuffer<Int8>; let shape: [Int]; let amax: Float }

    /// The outputs, and (keepCodes) every int8 slot copied to the host, for tests that compare
    /// the plan on both devices slot by slot.
    func runKeepingValues(_ inputs: [Tensor], keepCodes: Bool = true) throws -> (outputs: [Tensor], int8: [Int: QTensor]) {
        var f32 = try plan.graph.bindInputs(inputs)
        var q8: [Int: DeviceCodes] = [:]
        let graph = plan.graph
        func floatValue(_ id: Int, on device: Device, for name: String) throws -> Tensor {
            guard let t = f32[id] else { throw EngineError("step \(name): f32 value \(graph.values[id].name) is not computed before it") }
            if t.device == device { return t }
            if device == .cuda, graph.constants[id] != nil {
                if let d = deviceConstants[id] { return d }
                let d = try t.to(.cuda)
                deviceConstants[id] = d
                return d
            }
            return try t.to(device)
        }
        func codes(_ s: Int, for name: String) throws -> DeviceCodes {
            guard let q = q8[s] else { throw EngineError("step \(name): int8 slot \(s) is not computed before it") }
            return q
        }
        func check(_ status: Int32, _ what: String) throws { try CUDA.shared.check(status, what) }
        try withNoGrad {
            for (index, step) in plan.steps.enumerated() {
                switch step {
                case .float(let n):
                    let device: Device = placements[index] == .device ? .cuda : .cpu
                    let args = try n.inputs.map { try $0.map { try floatValue($0, on: device, for: n.name) } }
                    var y = try ReferenceExecutor.apply(n, args)
                    var out = n.output
                    if let (fusedOut, activation) = plan.floatConvActivation[n.output] { // the CPU plan runs it inside the conv
                        y = activation == .relu ? y.relu() : y.silu()
                        out = fusedOut
                    }
                    f32[out] = y
                case .quantize(let source, let s, let amax, let name):
                    let x = try floatValue(source, on: .cuda, for: name)
                    guard x.rank == 4 else { throw EngineError("\(name): int8 activations are 4-D, got \(x.shape)") }
                    let buffer = try slot(s, count: x.count)
                    try check(api.q8_quantize_nchw_to_nhwc(nil, buffer.typed, x.deviceData, Int32(x.shape[0]), Int32(x.shape[1]),
                                                           Int64(x.shape[2] * x.shape[3]), amax), "\(name): quantize")
                    q8[s] = DeviceCodes(buffer: buffer, shape: x.shape, amax: amax)
                case .requantize(let source, let s, _, let to, let name):
                    let x = try codes(source, for: name)
                    let count = x.shape.reduce(1, *), buffer = try slot(s, count: count)
                    try check(api.q8_requantize(nil, buffer.typed, x.buffer.typed, Int64(count), x.amax / 127, to), "\(name): requantize")
                    q8[s] = DeviceCodes(buffer: buffer, shape: x.shape, amax: to)
                case .dequantize(let s, let v, let name):
                    let q = try codes(s, for: name)
                    let out = try Tensor(shape: q.shape, storage: Storage(cudaCount: q.shape.reduce(1, *), zeroed: false))
                    try check(api.q8_dequantize_nhwc_to_nchw(nil, out.deviceData, q.buffer.typed, Int32(q.shape[0]), Int32(q.shape[1]),
                                                             Int64(q.shape[2] * q.shape[3]), q.amax / 127), "\(name): dequantize")
                    f32[v] = out
                case .int8Conv(let conv, let input, let output):
                    let x = try codes(input, for: conv.name)
                    let (q, t) = try runConv(conv, x, slot: output)
                    if let q { q8[output] = q } else { f32[output] = t }
                case .int8Gemm(let g, let inputs, let output):
                    let xs = try inputs.map { try floatValue($0, on: .cuda, for: g.name) }
                    f32[output] = g.kind == .linear ? try runLinear(g, xs[0]) : try runMatMul(g, xs[0], xs[1])
                case .int8Op(let n, let inputs, let output, let amax):
                    let xs = try inputs.map { try codes($0, for: n.name) }
                    let shape = graph.values[n.output].shape
                    let buffer = try slot(output, count: shape.reduce(1, *))
                    switch n.op {
                    case .maxPool(let k, let stride, let pad):
                        let x = xs[0]
                        try check(api.q8_maxpool_nhwc(nil, buffer.typed, x.buffer.typed, Int32(x.shape[0]), Int32(x.shape[2]), Int32(x.shape[3]),
                                                      Int32(x.shape[1]), Int32(k), Int32(stride), Int32(pad)), "\(n.name): max pooling")
                    case .concat: // NHWC: each pixel's channels, input after input
                        let pointers: [UnsafeRawPointer?] = xs.map { UnsafeRawPointer($0.buffer.pointer) }
                        try check(api.concat_rows(nil, buffer.pointer, pointers, xs.map { Int64($0.shape[1]) }, Int32(xs.count), Int64(shape[0] * shape[2] * shape[3])),
                                  "\(n.name): concat")
                    default: throw EngineError("\(n.name): \(n.op.name) has no int8 kernel")
                    }
                    q8[output] = DeviceCodes(buffer: buffer, shape: shape, amax: amax)
                }
            }
        }
        let outputs = try graph.outputs.map { try floatValue($0, on: .cpu, for: "output") }
        var kept: [Int: QTensor] = [:]
        if keepCodes { for (s, q) in q8 { kept[s] = QTensor(codes: try download(q), shape: q.shape, amax: q.amax) } }
        return (outputs, kept)
    }

    func download(_ q: DeviceCodes) throws -> [Int8] {
        let count = q.shape.reduce(1, *)
        var out = [Int8](repeating: 0, count: count)
        try out.withUnsafeMutableBytes { raw in try CUDA.shared.check(api.memcpy_d2h(raw.baseAddress, q.buffer.pointer, count, nil), "download") }
        try CUDA.shared.check(api.stream_synchronize(nil), "synchronize")
        return out
    }

    /// x [rows][k] quantized at amax (the quantizer's rounding) and shifted by 128 (a 1 x 1
    /// int8 im2col): the A operand of the GEMM, in `dev`'s scratch.
    func quantizedRows(_ x: Tensor, k: Int, amax: Float, _ dev: DeviceStep, _ name: String) throws -> CUDABuffer<UInt8> {
        let codes = try dev.scratch.buffer("codes", x.count, Int8.self), shifted = try dev.scratch.buffer("shifted", x.count, UInt8.self)
        try CUDA.shared.check(api.q8_quantize_nchw_to_nhwc(nil, codes.typed, x.deviceData, 1, 1, Int64(x.count), amax), "\(name): quantize")
        var rows = qlc_conv_geom(N: 1, C: Int32(k), H: Int32(x.count / max(k, 1)), W: 1, K: 1, KH: 1, KW: 1, SH: 1, SW: 1, PH: 0, PW: 0, DH: 1, DW: 1, groups: 1)
        try CUDA.shared.check(api.q8_im2col_nhwc(nil, shifted.typed, codes.typed, &rows, 128), "\(name): shift")
        return shifted
    }

    /// An integer Gemm on the device: the input's rows quantized and shifted, the GEMM with
    /// -128 * sum_k w[k, o] as the epilogue's offset: the CPU's exact accumulator, so the CPU's
    /// floats.
    func runLinear(_ g: Int8Gemm, _ x: Tensor) throws -> Tensor {
        let dev = try device(g, g.name)
        guard let weights = dev.weights, x.shape.last == g.inFeatures else { throw EngineError("\(g.name): input \(x.shape) for \(g.inFeatures) features") }
        let m = x.count / max(g.inFeatures, 1)
        let a = try quantizedRows(x, k: g.inFeatures, amax: g.amaxA, dev, g.name)
        let out = try Tensor(shape: Array(x.shape.dropLast()) + [g.outFeatures], storage: Storage(cudaCount: m * g.outFeatures, zeroed: false))
        try weights.gemm(a.typed, rows: m, lda: g.inFeatures, mode: Int32(QLC_OUT_F32), into: out.deviceData, api: api, g.name)
        return out
    }

    /// a [..., M, K] x b [..., K, N] of two activations on the device: both quantized, a's rows
    /// shifted, each batch entry's b packed with its offsets.
    func runMatMul(_ g: Int8Gemm, _ a: Tensor, _ b: Tensor) throws -> Tensor {
        let dev = try device(g, g.name)
        guard let amaxB = g.amaxB, a.rank >= 2, b.rank == a.rank, Array(a.shape.dropLast(2)) == Array(b.shape.dropLast(2)),
              a.shape[a.rank - 1] == b.shape[b.rank - 2] else {
            throw EngineError("\(g.name): \(a.shape) x \(b.shape) do not multiply")
        }
        let (m, k, n) = (a.shape[a.rank - 2], a.shape[a.rank - 1], b.shape[b.rank - 1])
        let batch = a.count / max(m * k, 1)
        if dev.weights.map({ $0.depth != k || $0.columns != n }) ?? true {
            dev.weights = try DeviceWeights(depth: k, columns: n, scale: [Float](repeating: (g.amaxA / 127) * (amaxB / 127), count: n), bias: nil, api: api)
        }
        let weights = dev.weights!
        let rows = try quantizedRows(a, k: k, amax: g.amaxA, dev, g.name)
        let codesB = try dev.scratch.buffer("b", b.count, Int8.self)
        try CUDA.shared.check(api.q8_quantize_nchw_to_nhwc(nil, codesB.typed, b.deviceData, 1, 1, Int64(b.count), amaxB), "\(g.name): quantize b")
        let out = try Tensor(shape: Array(a.shape.dropLast()) + [n], storage: Storage(cudaCount: batch * m * n, zeroed: false))
        for i in 0..<batch { // one packed b at a time: the stream runs them in order
            try weights.pack(codesB.typed + i * k * n, api: api, g.name)
            try weights.gemm(rows.typed + i * m * k, rows: m, lda: k, mode: Int32(QLC_OUT_F32), into: out.deviceData + i * m * n, api: api, g.name)
        }
        return out
    }

    /// An INT8 conv on the device: int8 codes out (into `slot`'s buffer) or an NCHW float
    /// tensor.
    func runConv(_ conv: Int8Conv, _ x: DeviceCodes, slot output: Int) throws -> (DeviceCodes?, Tensor?) {
        let dev = try device(conv, conv.name)
        guard let weights = dev.weights else { throw EngineError("\(conv.name): not prepared for the device") }
        let (geometry, oh, ow) = try conv.gemmGeometry(x.shape)
        let (n, h, w) = (x.shape[0], x.shape[2], x.shape[3]), k = conv.outChannels
        let m = n * oh * ow, depth = Int(geometry.KH * geometry.KW * geometry.C), cols = conv.gemmColumns
        guard depth == conv.depth else { throw EngineError("\(conv.name): GEMM depth \(depth), weights \(conv.depth)") }
        let columns = try dev.scratch.buffer("columns", m * depth, UInt8.self)
        var g = qlc_conv_geom(N: geometry.N, C: geometry.C, H: geometry.H, W: geometry.W, K: geometry.K, KH: geometry.KH, KW: geometry.KW, SH: geometry.SH,
                              SW: geometry.SW, PH: geometry.PH, PW: geometry.PW, DH: geometry.DH, DW: geometry.DW, groups: geometry.groups)
        try CUDA.shared.check(api.q8_im2col_nhwc(nil, columns.typed, x.buffer.typed, &g, 128), "\(conv.name): im2col")
        let (outH, outW) = conv.transposed ? (h * conv.kernel.0, w * conv.kernel.1) : (oh, ow)
        let outShape = [n, k, outH, outW], outCount = m * cols
        func gemm(_ mode: Int32, _ out: UnsafeMutableRawPointer) throws {
            try weights.gemm(columns.typed, rows: m, lda: depth, activation: conv.activation.rawValue, mode: mode, into: out, api: api, conv.name)
        }
        /// GEMM rows [pixel][(i, j, k)] to NHWC [N, OH, OW, K] (a transposed conv).
        func scatter(_ from: UnsafeRawPointer, _ to: UnsafeMutableRawPointer, bytes: Int32) throws {
            try CUDA.shared.check(api.scatter_blocks_nhwc(nil, to, from, bytes, Int32(n), Int32(h), Int32(w), Int32(conv.kernel.0), Int32(conv.kernel.1), Int32(k)),
                                  "\(conv.name): scatter")
        }
        if let amax = conv.outputAmax {
            let buffer = try slot(output, count: outCount)
            if conv.activation == .silu { // SiLU does not commute with the output scale: floats, then the quantizer
                let f = try dev.scratch.buffer("floats", outCount, Float.self)
                try gemm(Int32(QLC_OUT_F32), f.pointer)
                try CUDA.shared.check(api.q8_quantize_nchw_to_nhwc(nil, buffer.typed, f.typed, 1, 1, Int64(outCount), amax), "\(conv.name): quantize")
            } else if conv.transposed {
                let rows = try dev.scratch.buffer("rows", outCount, Int8.self)
                try gemm(Int32(QLC_OUT_S8), rows.pointer)
                try scatter(rows.pointer, buffer.pointer, bytes: 1)
            } else {
                try gemm(Int32(QLC_OUT_S8), buffer.pointer)
            }
            return (DeviceCodes(buffer: buffer, shape: outShape, amax: amax), nil)
        }
        var nhwc = try dev.scratch.buffer("floats", outCount, Float.self)
        try gemm(Int32(QLC_OUT_F32), nhwc.pointer)
        if conv.transposed {
            let scattered = try dev.scratch.buffer("scattered", outCount, Float.self)
            try scatter(nhwc.pointer, scattered.pointer, bytes: 4)
            nhwc = scattered
        }
        let out = try Tensor(shape: outShape, storage: Storage(cudaCount: outCount, zeroed: false))
        try CUDA.shared.check(api.nhwc_to_nchw_f32(nil, out.deviceData, nhwc.typed, Int32(n), Int64(outH * outW), Int32(k)), "\(conv.name): to NCHW")
        return (nil, out)
    }
}
