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

    /// The device state of one INT8 conv: its weights packed in the GPU layout, the epilogue's
    /// per-column scale, bias and offset, and the column matrix (kept between runs).
    final class DeviceConv {
        let packed: CUDABuffer<Int8>
        let scale: CUDABuffer<Float>
        let bias: CUDABuffer<Float>?
        let offsets: CUDABuffer<Int32>
        var columns: CUDABuffer<UInt8>?
        var floats: CUDABuffer<Float>?
        var gemm8: CUDABuffer<Int8>?

        init(_ conv: Int8Conv, api: qlc_api) throws {
            let (depth, n) = (conv.depth, conv.gemmColumns)
            let b = try CUDABuffer(conv.weightCodes)
            packed = try CUDABuffer<Int8>(count: api.igemm_packed_size(Int32(depth), Int32(n)))
            try CUDA.shared.check(api.igemm_pack_b(nil, packed.pointer, nil, b.typed, Int32(n), Int32(depth), Int32(n)), "\(conv.name): weight packing")
            scale = try CUDABuffer(conv.scale)
            bias = try conv.bias.map { try CUDABuffer($0) }
            offsets = try CUDABuffer(conv.columnSums.map { -128 * $0 })
        }
    }

    /// The device state of an integer Gemm (a linear layer): the weight packed in the GPU
    /// layout, the epilogue's scale, bias and offset, and the input's codes, signed and
    /// shifted by 128 (kept between runs). A MatMul of two activations keeps only the buffers
    /// (its b is packed at every run).
    final class DeviceGemm {
        var packed: CUDABuffer<Int8>
        var scale: CUDABuffer<Float>
        let bias: CUDABuffer<Float>?
        var offsets: CUDABuffer<Int32>
        var codes: CUDABuffer<Int8>?
        var shifted: CUDABuffer<UInt8>?
        var codesB: CUDABuffer<Int8>?

        init(matmul: ()) throws {
            (packed, scale, bias, offsets) = (try CUDABuffer<Int8>(count: 16), try CUDABuffer<Float>(count: 1), nil, try CUDABuffer<Int32>(count: 1))
        }

        init(_ g: Int8Gemm, api: qlc_api) throws {
            let (k, n) = (g.inFeatures, g.outFeatures)
            let b = try CUDABuffer(g.weightCodes)
            packed = try CUDABuffer<Int8>(count: api.igemm_packed_size(Int32(k), Int32(n)))
            try CUDA.shared.check(api.igemm_pack_b(nil, packed.pointer, nil, b.typed, Int32(n), Int32(k), Int32(n)), "\(g.name): weight packing")
            scale = try CUDABuffer(g.scale)
            bias = try g.bias.map { try CUDABuffer($0) }
            offsets = try CUDABuffer((0..<n).map { o in -128 * (0..<k).reduce(Int32(0)) { $0 + Int32(g.weightCodes[$1 * n + o]) } })
        }
    }

    var convs: [ObjectIdentifier: DeviceConv] = [:]
    var gemms: [ObjectIdentifier: DeviceGemm] = [:]
    /// Device buffers of the int8 slots, by slot id.
    var slots: [Int: CUDABuffer<Int8>] = [:]
    /// Device copies of the graph's constants that device steps read.
    var deviceConstants: [Int: Tensor] = [:]

    /// Needs a ready CUDA device (`CUDA.shared`); throws with its notice otherwise.
    public init(_ plan: Int8Plan) throws {
        api = try CUDA.shared.requireDevice()
        self.plan = plan
        placements = plan.steps.map { step in
            switch step {
            case .float(let n): return Self.hasDeviceKernel(n.op) ? .device : .host
            case .int8Gemm: return .device
            case .quantize, .requantize, .dequantize, .int8Conv, .int8Op: return .device
            }
        }
        for step in plan.steps {
            if case .int8Conv(let conv, _, _) = step, convs[ObjectIdentifier(conv)] == nil { convs[ObjectIdentifier(conv)] = try DeviceConv(conv, api: api) }
            if case .int8Gemm(let g, _, _) = step, gemms[ObjectIdentifier(g)] == nil {
                gemms[ObjectIdentifier(g)] = g.kind == .linear ? try DeviceGemm(g, api: api) : try DeviceGemm(matmul: ())
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

    func slot(_ id: Int, count: Int) throws -> CUDABuffer<Int8> {
        if let b = slots[id], b.count >= count { return b }
        let b = try CUDABuffer<Int8>(count: count)
        slots[id] = b
        return b
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

    /// An integer Gemm on the device: the input quantized (the quantizer's rounding), its codes
    /// shifted by 128 (a 1 x 1 int8 im2col), the GEMM with -128 * sum_k w[k, o] as the
    /// epilogue's offset: the CPU's exact accumulator, so the CPU's floats.
    func runLinear(_ g: Int8Gemm, _ x: Tensor) throws -> Tensor {
        guard let dev = gemms[ObjectIdentifier(g)] else { throw EngineError("\(g.name): not prepared for the device") }
        guard x.shape.last == g.inFeatures else { throw EngineError("\(g.name): input \(x.shape) for \(g.inFeatures) features") }
        let (k, n) = (g.inFeatures, g.outFeatures), m = x.count / max(k, 1)
        if (dev.codes?.count ?? -1) < x.count { (dev.codes, dev.shifted) = (try CUDABuffer<Int8>(count: x.count), try CUDABuffer<UInt8>(count: x.count)) }
        let (codes, shifted) = (dev.codes!, dev.shifted!)
        try CUDA.shared.check(api.q8_quantize_nchw_to_nhwc(nil, codes.typed, x.deviceData, 1, 1, Int64(x.count), g.amaxA), "\(g.name): quantize")
        var rows = qlc_conv_geom(N: 1, C: Int32(k), H: Int32(m), W: 1, K: Int32(n), KH: 1, KW: 1, SH: 1, SW: 1, PH: 0, PW: 0, DH: 1, DW: 1, groups: 1)
        try CUDA.shared.check(api.q8_im2col_nhwc(nil, shifted.typed, codes.typed, &rows, 128), "\(g.name): shift")
        let out = try Tensor(shape: Array(x.shape.dropLast()) + [n], storage: Storage(cudaCount: m * n, zeroed: false))
        var p = qlc_requant_params(col_offset: dev.offsets.typed, scale: dev.scale.typed, bias: dev.bias?.typed, relu: 0)
        try CUDA.shared.check(api.igemm_ex(nil, Int32(QLC_KERNEL_AUTO), Int32(QLC_OUT_F32), Int32(m), Int32(n), Int32(k), shifted.typed, Int32(k),
                                           dev.packed.pointer, &p, out.deviceData, Int32(n)), "\(g.name): int8 GEMM")
        return out
    }

    /// a [..., M, K] x b [..., K, N] of two activations on the device: both quantized, a's codes
    /// shifted by 128, each batch entry's b packed with -128 * its column sums as the offsets.
    func runMatMul(_ g: Int8Gemm, _ a: Tensor, _ b: Tensor) throws -> Tensor {
        guard let dev = gemms[ObjectIdentifier(g)], let amaxB = g.amaxB else { throw EngineError("\(g.name): not prepared for the device") }
        guard a.rank >= 2, b.rank == a.rank, Array(a.shape.dropLast(2)) == Array(b.shape.dropLast(2)), a.shape[a.rank - 1] == b.shape[b.rank - 2] else {
            throw EngineError("\(g.name): \(a.shape) x \(b.shape) do not multiply")
        }
        let (m, k, n) = (a.shape[a.rank - 2], a.shape[a.rank - 1], b.shape[b.rank - 1])
        let batch = a.count / max(m * k, 1)
        if (dev.codes?.count ?? -1) < a.count { (dev.codes, dev.shifted) = (try CUDABuffer<Int8>(count: a.count), try CUDABuffer<UInt8>(count: a.count)) }
        if (dev.codesB?.count ?? -1) < b.count { dev.codesB = try CUDABuffer<Int8>(count: b.count) }
        let packedCount = api.igemm_packed_size(Int32(k), Int32(n))
        if dev.packed.count < packedCount { dev.packed = try CUDABuffer<Int8>(count: packedCount) }
        if dev.offsets.count < n { dev.offsets = try CUDABuffer<Int32>(count: n) }
        if dev.scale.count != n { dev.scale = try CUDABuffer([Float](repeating: (g.amaxA / 127) * (amaxB / 127), count: n)) }
        let (codes, shifted, codesB) = (dev.codes!, dev.shifted!, dev.codesB!)
        try CUDA.shared.check(api.q8_quantize_nchw_to_nhwc(nil, codes.typed, a.deviceData, 1, 1, Int64(a.count), g.amaxA), "\(g.name): quantize a")
        var rows = qlc_conv_geom(N: 1, C: Int32(k), H: Int32(batch * m), W: 1, K: Int32(n), KH: 1, KW: 1, SH: 1, SW: 1, PH: 0, PW: 0, DH: 1, DW: 1, groups: 1)
        try CUDA.shared.check(api.q8_im2col_nhwc(nil, shifted.typed, codes.typed, &rows, 128), "\(g.name): shift")
        try CUDA.shared.check(api.q8_quantize_nchw_to_nhwc(nil, codesB.typed, b.deviceData, 1, 1, Int64(b.count), amaxB), "\(g.name): quantize b")
        let out = try Tensor(shape: Array(a.shape.dropLast()) + [n], storage: Storage(cudaCount: batch * m * n, zeroed: false))
        var p = qlc_requant_params(col_offset: dev.offsets.typed, scale: dev.scale.typed, bias: nil, relu: 0)
        for i in 0..<batch { // one packed b at a time: the stream runs them in order
            try CUDA.shared.check(api.igemm_pack_b_offsets(nil, dev.packed.pointer, dev.offsets.typed, codesB.typed + i * k * n, Int32(n), Int32(k), Int32(n), 128),
                                  "\(g.name): pack b")
            try CUDA.shared.check(api.igemm_ex(nil, Int32(QLC_KERNEL_AUTO), Int32(QLC_OUT_F32), Int32(m), Int32(n), Int32(k), shifted.typed + i * m * k, Int32(k),
                                               dev.packed.pointer, &p, out.deviceData + i * m * n, Int32(n)), "\(g.name): int8 GEMM")
        }
        return out
    }

    /// An INT8 conv on the device: int8 codes out (into `slot`'s buffer) or an NCHW float
    /// tensor.
    func runConv(_ conv: Int8Conv, _ x: DeviceCodes, slot output: Int) throws -> (DeviceCodes?, Tensor?) {
        guard let dev = convs[ObjectIdentifier(conv)] else { throw EngineError("\(conv.name): not prepared for the device") }
        let (n, c, h, w) = (x.shape[0], x.shape[1], x.shape[2], x.shape[3])
        guard c == conv.inChannels else { throw EngineError("\(conv.name): input has \(c) channels, the conv \(conv.inChannels)") }
        let o = conv.options, cols = conv.gemmColumns, k = conv.outChannels
        // the transposed conv's GEMM reads the input pixels as they are: a 1 x 1 im2col
        var g = conv.transposed
            ? qlc_conv_geom(N: Int32(n), C: Int32(c), H: Int32(h), W: Int32(w), K: Int32(cols), KH: 1, KW: 1, SH: 1, SW: 1, PH: 0, PW: 0, DH: 1, DW: 1, groups: 1)
            : qlc_conv_geom(N: Int32(n), C: Int32(c), H: Int32(h), W: Int32(w), K: Int32(k), KH: Int32(conv.kernel.0), KW: Int32(conv.kernel.1),
                            SH: Int32(o.stride.0), SW: Int32(o.stride.1), PH: Int32(o.padding.0), PW: Int32(o.padding.1),
                            DH: Int32(o.dilation.0), DW: Int32(o.dilation.1), groups: 1)
        let taps = conv.transposed ? 1 : conv.kernel.0 * conv.kernel.1
        let oh = conv.transposed ? h : (h + 2 * o.padding.0 - o.dilation.0 * (conv.kernel.0 - 1) - 1) / o.stride.0 + 1
        let ow = conv.transposed ? w : (w + 2 * o.padding.1 - o.dilation.1 * (conv.kernel.1 - 1) - 1) / o.stride.1 + 1
        guard oh > 0, ow > 0 else { throw EngineError("\(conv.name): input \(x.shape) does not fit the conv") }
        let m = n * oh * ow, depth = taps * c
        guard depth == conv.depth else { throw EngineError("\(conv.name): GEMM depth \(depth), weights \(conv.depth)") }
        if (dev.columns?.count ?? -1) < m * depth { dev.columns = try CUDABuffer<UInt8>(count: m * depth) }
        let columns = dev.columns!
        try CUDA.shared.check(api.q8_im2col_nhwc(nil, columns.typed, x.buffer.typed, &g, 128), "\(conv.name): im2col")
        let (outH, outW) = conv.transposed ? (h * conv.kernel.0, w * conv.kernel.1) : (oh, ow)
        let outShape = [n, k, outH, outW], outCount = m * cols
        var p = qlc_requant_params(col_offset: dev.offsets.typed, scale: dev.scale.typed, bias: dev.bias?.typed, relu: conv.activation.rawValue)
        func gemm(_ mode: Int32, _ out: UnsafeMutableRawPointer) throws {
            try CUDA.shared.check(api.igemm_ex(nil, Int32(QLC_KERNEL_AUTO), mode, Int32(m), Int32(cols), Int32(depth), columns.typed, Int32(depth),
                                               dev.packed.pointer, &p, out, Int32(cols)), "\(conv.name): int8 GEMM")
        }
        func floats() throws -> CUDABuffer<Float> {
            if (dev.floats?.count ?? -1) < outCount { dev.floats = try CUDABuffer<Float>(count: outCount) }
            return dev.floats!
        }
        if let amax = conv.outputAmax {
            let buffer = try slot(output, count: outCount)
            if conv.activation == .silu { // SiLU does not commute with the output scale: floats, then the quantizer
                let f = try floats()
                try gemm(Int32(QLC_OUT_F32), f.pointer)
                try CUDA.shared.check(api.q8_quantize_nchw_to_nhwc(nil, buffer.typed, f.typed, 1, 1, Int64(outCount), amax), "\(conv.name): quantize")
            } else if conv.transposed {
                if (dev.gemm8?.count ?? -1) < outCount { dev.gemm8 = try CUDABuffer<Int8>(count: outCount) }
                try gemm(Int32(QLC_OUT_S8), dev.gemm8!.pointer)
                try CUDA.shared.check(api.scatter_blocks_nhwc(nil, buffer.pointer, dev.gemm8!.pointer, 1, Int32(n), Int32(h), Int32(w),
                                                              Int32(conv.kernel.0), Int32(conv.kernel.1), Int32(k)), "\(conv.name): scatter")
            } else {
                try gemm(Int32(QLC_OUT_S8), buffer.pointer)
            }
            return (DeviceCodes(buffer: buffer, shape: outShape, amax: amax), nil)
        }
        let f = try floats()
        try gemm(Int32(QLC_OUT_F32), f.pointer)
        var nhwc = f
        if conv.transposed {
            let scattered = try CUDABuffer<Float>(count: outCount)
            try CUDA.shared.check(api.scatter_blocks_nhwc(nil, scattered.pointer, f.pointer, 4, Int32(n), Int32(h), Int32(w),
                                                          Int32(conv.kernel.0), Int32(conv.kernel.1), Int32(k)), "\(conv.name): scatter")
            nhwc = scattered
        }
        let out = try Tensor(shape: outShape, storage: Storage(cudaCount: outCount, zeroed: false))
        try CUDA.shared.check(api.nhwc_to_nchw_f32(nil, out.deviceData, nhwc.typed, Int32(n), Int64(outH * outW), Int32(k)), "\(conv.name): to NCHW")
        return (nil, out)
    }
}
