import CKernels
import Foundation
import QuantLabCore
import QuantLabQuant

// The INT8 plan: the traced Q/DQ graph with TensorRT's explicit-quantization rules applied
// (ENGINE.md), run on the integer kernels.
//
//   DQ(x), DQ(w) -> Conv -> [bias] -> [ReLU | SiLU] -> [Q]   becomes one Int8Conv:
//     acc[p, k] = sum_j code_x[p, j] * code_w[j, k]                       (s32, exact)
//     int8 out:  code_y = clamp(RNE(acc * s_x s_w[k] / s_y + b[k] / s_y), ±127)   when every
//                reader of the output wants it at one scale s_y (its quantizers are absorbed)
//     f32 out:   y = acc * s_x s_w[k] + b[k]                                 otherwise
//   (with SiLU, which does not commute with s_y, the epilogue writes y and a second pass
//   quantizes it). Max pooling and channel concat run on codes of one scale.
//
// Everything else runs in FP32 with the reference ops. A quantizer that no compute step
// absorbed is a Reformat step: Quantize (f32 -> int8 codes), Requantize (codes at another
// scale), Dequantize (codes -> f32 for a float reader) or QDQ (a quantizer feeding float ops,
// run as fake quantization). Activations in int8 are codes in NHWC order (qtensor.c); the fused
// conv reads them in place with the direct kernel (iconv.c: per output pixel a pointer per
// kernel tap, no column matrix) or copies them to an im2col matrix for one u8 x s8 GEMM
// (igemm.c); the same requantization epilogue and the same bits either way, so each conv
// times both on its first run and keeps the faster (Int8Conv.RouteChoice).
//
// A transposed conv whose kernel equals its stride (the neck's upsampling) is the same GEMM with
// KH*KW*K columns and a scatter. Gemm (linear) and MatMul of two quantized activations run on the
// same integer GEMM with f32 output (Int8Gemm.swift). Not yet in int8 (issue #12): other
// transposed convs, residual Add, grouped convs.

/// Int8 codes of an activation, NHWC, with the shape of its NCHW float tensor.
struct QTensor {
    var codes: [Int8]
    var shape: [Int] // [N, C, H, W]
    var amax: Float
}

/// A conv fused with the quantizers around it; or a transposed conv whose kernel equals its
/// stride (the neck's 2x upsampling), which is the same GEMM with KH*KW*K columns and a scatter:
/// every input pixel writes its own KH x KW block of the output,
///   y[n, k, h*S + i, w*S + j] = sum_c x[n, c, h, w] * W[c, k, i, j] + b[k].
public final class Int8Conv {
    public let name: String
    let options: Conv2dOptions
    let inChannels: Int, outChannels: Int, kernel: (Int, Int)
    /// A transposed conv (kernel == stride, no padding): GEMM columns are (i, j, k).
    public let transposed: Bool
    /// Per GEMM column: s_x * s_w[k] (f32 output) or s_x * s_w[k] / s_y (int8 output).
    let scale: [Float]
    let bias: [Float]?
    /// The activation fused into the epilogue.
    public enum Activation: Int32, Sendable { case none = 0, relu = 1, silu = 2 }
    public let activation: Activation
    public var relu: Bool { activation == .relu }
    /// The amax of the int8 output, nil for f32 output.
    public let outputAmax: Float?
    let packed: [Int8]
    let columnSums: [Int32]
    /// The GEMM's B operand as it was before packing, [depth][columns] (the GPU packs its own
    /// layout from it; read back from the packing rather than kept twice), and its depth.
    var weightCodes: [Int8] { unpackedB(packed, depth: depth, columns: gemmColumns) }
    let depth: Int
    /// "Int8Conv" or "Int8ConvTranspose", in plans and profiles.
    public var kindName: String { transposed ? "Int8ConvTranspose" : "Int8Conv" }
    /// The GEMM's columns: K for a conv, KH * KW * K for a transposed conv.
    var gemmColumns: Int { scale.count }
    /// The im2col buffer, kept between runs (a plan runs one batch at a time).
    private var columns: [UInt8] = []
    /// For a conv whose input channels are not a multiple of 4 (the 3-channel image): the
    /// weights packed again with zero weights for the channels up to the next multiple of 4, so
    /// that the direct kernel (iconv.c) runs on the input padded with zero channels; and that
    /// padded input, kept between runs.
    private let paddedPacked: [Int8]?
    private var paddedInput: [Int8] = []
    /// How the last run computed the product: "direct" (iconv.c, reading the codes in place),
    /// "direct, channels padded to 4", or "im2col + GEMM" (igemm.c); nil before the first run.
    /// It depends on `routeChoice`, on the timing and on the codes (the direct kernel declines
    /// signed codes when a weight is -128), so it is known only by running.
    public private(set) var route: String?
    /// Which route runs where both apply (the direct kernel and im2col + GEMM give the same
    /// bits, so this is a choice of speed only).
    public enum RouteChoice: String, Sendable, CaseIterable {
        /// The first run at each input shape runs both routes, interleaved, three times each,
        /// and keeps the faster for that shape, as TensorRT's builder times its tactics: which
        /// one wins depends on the CPU (on AVX-512 the VNNI GEMM multiplies 2-4x faster than
        /// the direct kernel's AVX2 code, but im2col costs most on narrow convs and small maps).
        case timed
        /// Always the direct kernel where it applies, else im2col + GEMM.
        case direct
        /// Always im2col + GEMM.
        case im2col

        /// `QL_CONV_ROUTE` (timed, direct or im2col); timed when unset.
        public static func fromEnvironment() throws -> RouteChoice {
            guard let text = ProcessInfo.processInfo.environment["QL_CONV_ROUTE"], !text.isEmpty else { return .timed }
            guard let choice = RouteChoice(rawValue: text) else {
                throw EngineError("QL_CONV_ROUTE=\(text): expected one of \(allCases.map(\.rawValue).joined(separator: ", "))")
            }
            return choice
        }
    }
    /// Set by the plan (`Int8Plan.convRouteChoice`).
    public var routeChoice = RouteChoice.timed {
        didSet { timing.reset() }
    }
    /// `.timed`: per input shape, whether the direct kernel (first) won.
    private var timing = TimedChoice()
    /// `.timed`: the best of three times (seconds) of each route at the shape timed last; nil
    /// before a timing, or where only one route applied.
    public var routeTimes: (direct: Double, im2col: Double)? { timing.times.map { ($0.first, $0.second) } }
    /// `route`, with the times that chose it where it was timed.
    public var routeSummary: String? {
        guard let route else { return nil }
        guard let t = routeTimes else { return route }
        return String(format: "%@; timed: direct %.0f us, im2col + GEMM %.0f us", route, t.direct * 1e6, t.im2col * 1e6)
    }
    /// Integer operations (2 per multiply-add) of the last run, for rates in profiles.
    public private(set) var lastOps: Double = 0

    /// `b`: the weight codes as the GEMM's B operand [depth][columns]; `scale` and `bias` per
    /// column, the output scale already folded in.
    private init(name: String, options: Conv2dOptions, inChannels: Int, outChannels: Int, kernel: (Int, Int), transposed: Bool,
                 b: [Int8], depth: Int, scale: [Float], bias: [Float]?, activation: Activation, outputAmax: Float?) throws {
        self.name = name
        self.options = options
        self.inChannels = inChannels
        self.outChannels = outChannels
        self.kernel = kernel
        self.transposed = transposed
        self.scale = scale
        self.bias = bias
        self.activation = activation
        self.outputAmax = outputAmax
        let n = scale.count
        var packed = [Int8](repeating: 0, count: ql_igemm_packed_size(Int32(depth), Int32(n)))
        var sums = [Int32](repeating: 0, count: n)
        guard ql_igemm_pack_b(&packed, &sums, b, Int32(n), Int32(depth), Int32(n)) == 0 else { throw EngineError("\(name): weight packing failed") }
        self.packed = packed
        columnSums = sums
        self.depth = depth
        let c4 = (inChannels + 3) / 4 * 4
        if !transposed && c4 != inChannels {
            let taps = kernel.0 * kernel.1
            var b4 = [Int8](repeating: 0, count: taps * c4 * n)
            for t in 0..<taps { for ci in 0..<inChannels { for o in 0..<n { b4[(t * c4 + ci) * n + o] = b[(t * inChannels + ci) * n + o] } } }
            var packed4 = [Int8](repeating: 0, count: ql_igemm_packed_size(Int32(taps * c4), Int32(n)))
            guard ql_igemm_pack_b(&packed4, nil, b4, Int32(n), Int32(taps * c4), Int32(n)) == 0 else { throw EngineError("\(name): weight packing failed") }
            paddedPacked = packed4
        } else {
            paddedPacked = nil
        }
    }

    /// Weight [K, C, KH, KW] quantized per output channel with `weightAmax` (as the simulator's
    /// weight quantizer does), packed once as the GEMM's B operand in the (kh, kw, c) order of
    /// the NHWC im2col.
    /// With SiLU and an int8 output the epilogue writes floats (SiLU does not commute with the
    /// output scale) and a second pass quantizes them, as the simulator's quantizer does.
    convenience init(name: String, weight: Tensor, bias: Tensor?, options: Conv2dOptions, inputAmax: Float, weightAmax: [Float],
                     activation: Activation, outputAmax: Float?) throws {
        let (k, c, kh, kw) = (weight.shape[0], weight.shape[1], weight.shape[2], weight.shape[3])
        guard weightAmax.count == k else { throw EngineError("\(name): \(weightAmax.count) weight scales for \(k) channels") }
        let qmax: Float = 127
        let sx = inputAmax / qmax
        // the output scale folds into the epilogue's scale and bias unless SiLU is in between
        let sy = activation == .silu ? nil : outputAmax.map { $0 / qmax }
        // the weight quantizer's codes, per output channel [K, C, KH, KW], by the fake quantizer's
        // own rounding (one C definition), then reordered to B[(kh, kw, c), k]
        let per = c * kh * kw
        var codes = [Int8](repeating: 0, count: k * per)
        codes.withUnsafeMutableBufferPointer { out in
            for o in 0..<k { ql_quantize_s8(out.baseAddress! + o * per, weight.data + o * per, Int64(per), weightAmax[o], 127) }
        }
        var b = [Int8](repeating: 0, count: k * per)
        var scale = [Float](repeating: 0, count: k)
        for o in 0..<k {
            let sw = weightAmax[o] / qmax
            scale[o] = sy.map { sx * sw / $0 } ?? sx * sw
            for ci in 0..<c { for i in 0..<kh { for j in 0..<kw { b[((i * kw + j) * c + ci) * k + o] = codes[((o * c + ci) * kh + i) * kw + j] } } }
        }
        try self.init(name: name, options: options, inChannels: c, outChannels: k, kernel: (kh, kw), transposed: false, b: b, depth: per,
                      scale: scale, bias: bias.map { t in (0..<k).map { o in sy.map { t.data[o] / $0 } ?? t.data[o] } },
                      activation: activation, outputAmax: outputAmax)
    }

    /// Whether a transposed conv has the form this class runs in int8: kernel == stride, no
    /// padding or output padding, no dilation, one group.
    static func supportsTransposed(weightShape: [Int], options o: Conv2dOptions, outputPadding: Int) -> Bool {
        weightShape.count == 4 && o.groups == 1 && outputPadding == 0 && o.padding == (0, 0) && o.dilation == (1, 1)
            && o.stride == (weightShape[2], weightShape[3])
    }

    /// A transposed conv, weight [C, K, KH, KW] quantized per output channel (axis 1, as the
    /// simulator's weight quantizer of a transposed conv does), B[c, (i, j, k)]. No activation
    /// is fused (the neck's upsampling has none).
    convenience init(transposedName name: String, weight: Tensor, bias: Tensor?, options: Conv2dOptions, inputAmax: Float, weightAmax: [Float],
                     outputAmax: Float?) throws {
        let (c, k, kh, kw) = (weight.shape[0], weight.shape[1], weight.shape[2], weight.shape[3])
        guard Int8Conv.supportsTransposed(weightShape: weight.shape, options: options, outputPadding: 0) else {
            throw EngineError("\(name): only transposed convs with kernel == stride and no padding run in int8")
        }
        guard weightAmax.count == k else { throw EngineError("\(name): \(weightAmax.count) weight scales for \(k) output channels") }
        let qmax: Float = 127
        let sx = inputAmax / qmax, sy = outputAmax.map { $0 / qmax }
        let block = kh * kw, cols = block * k
        var codes = [Int8](repeating: 0, count: c * k * block) // [C, K, KH, KW], each (c, k) run with amax[k]
        codes.withUnsafeMutableBufferPointer { out in
            for ci in 0..<c { for o in 0..<k { ql_quantize_s8(out.baseAddress! + (ci * k + o) * block, weight.data + (ci * k + o) * block, Int64(block), weightAmax[o], 127) } }
        }
        var b = [Int8](repeating: 0, count: c * cols)
        for ci in 0..<c { for o in 0..<k { for ij in 0..<block { b[ci * cols + ij * k + o] = codes[(ci * k + o) * block + ij] } } }
        var scale = [Float](repeating: 0, count: cols), columnBias: [Float]? = bias.map { _ in [Float](repeating: 0, count: cols) }
        for ij in 0..<block {
            for o in 0..<k {
                let s = sx * weightAmax[o] / qmax
                scale[ij * k + o] = sy.map { s / $0 } ?? s
                if let bias { columnBias![ij * k + o] = sy.map { bias.data[o] / $0 } ?? bias.data[o] }
            }
        }
        try self.init(name: name, options: options, inChannels: c, outChannels: k, kernel: (kh, kw), transposed: true, b: b, depth: c,
                      scale: scale, bias: columnBias, activation: .none, outputAmax: outputAmax)
    }

    /// The im2col geometry of the GEMM on an input [N, C, H, W], and the output map (oh, ow)
    /// its rows cover: a conv's, or for a transposed conv the input pixels as they are (a
    /// 1 x 1 im2col, its GEMM's columns KH * KW * K). Shared by the CPU run and the GPU's
    /// (CUDAPlan); throws when the input does not fit.
    func gemmGeometry(_ shape: [Int]) throws -> (geometry: ql_conv_geom, oh: Int, ow: Int) {
        let (n, c, h, w) = (shape[0], shape[1], shape[2], shape[3])
        guard c == inChannels else { throw EngineError("\(name): input has \(c) channels, the conv \(inChannels)") }
        var g = transposed
            ? ql_conv_geom(N: Int32(n), C: Int32(c), H: Int32(h), W: Int32(w), K: Int32(gemmColumns), KH: 1, KW: 1, SH: 1, SW: 1, PH: 0, PW: 0, DH: 1, DW: 1, groups: 1)
            : ql_conv_geom(N: Int32(n), C: Int32(c), H: Int32(h), W: Int32(w), K: Int32(outChannels), KH: Int32(kernel.0), KW: Int32(kernel.1),
                           SH: Int32(options.stride.0), SW: Int32(options.stride.1), PH: Int32(options.padding.0), PW: Int32(options.padding.1),
                           DH: Int32(options.dilation.0), DW: Int32(options.dilation.1), groups: 1)
        var oh: Int32 = 0, ow: Int32 = 0
        guard ql_conv_out_size(&g, &oh, &ow) == 0 else { throw EngineError("\(name): input \(shape) does not fit the conv") }
        return (g, Int(oh), Int(ow))
    }

    /// Runs on input codes; returns int8 codes (outputAmax set) or an NCHW float tensor.
    func run(_ x: QTensor) throws -> (QTensor?, Tensor?) {
        let (n, c, h, w) = (x.shape[0], x.shape[1], x.shape[2], x.shape[3])
        let (geometry, oh, ow) = try gemmGeometry(x.shape)
        var g = geometry
        if transposed { return try runTransposed(x, geometry: &g) }
        let m = n * oh * ow, depth = kernel.0 * kernel.1 * c
        let outShape = [n, outChannels, oh, ow]
        lastOps = 2 * Double(m) * Double(depth) * Double(outChannels)
        /// The product with its epilogue into `out` (NHWC rows, int8 codes or floats): the direct
        /// kernel reads the codes in place (iconv.c; a 3-channel input padded to 4 first); the
        /// im2col route copies them to a column matrix, shifted by 128 when some are negative
        /// (the epilogue then subtracts 128 * sum_k w[k, o]), and runs the GEMM. Both give the
        /// same bits; `routeChoice` picks one where both apply.
        func product(s8 out8: UnsafeMutablePointer<Int8>?, f32 out32: UnsafeMutablePointer<Float>?) throws {
            let directRoute = paddedPacked == nil ? "direct" : "direct, channels padded to 4"
            /// 0, or QL_EUNSUPPORTED where the direct kernel declines (a -128 weight under signed codes)
            func runDirect() throws -> Int32 {
                func run(_ geometry: ql_conv_geom, _ codes: [Int8], _ weights: [Int8]) -> Int32 {
                    var geometry = geometry
                    return withEpilogue(nil) { ep in
                        out8.map { ql_iconv_nhwc_s8_isa(QL_ISA_BEST, &geometry, codes, weights, &ep, $0) }
                            ?? ql_iconv_nhwc_f32_isa(QL_ISA_BEST, &geometry, codes, weights, &ep, out32)
                    }
                }
                let status: Int32
                if let paddedPacked {
                    let c4 = (c + 3) / 4 * 4
                    if paddedInput.count != n * h * w * c4 { paddedInput = [Int8](repeating: 0, count: n * h * w * c4) }
                    ql_pad_channels_nhwc_s8(&paddedInput, x.codes, Int64(n * h * w), Int32(c), Int32(c4))
                    var g4 = g
                    g4.C = Int32(c4)
                    status = run(g4, paddedInput, paddedPacked)
                } else {
                    status = run(g, x.codes, packed)
                }
                guard status == 0 || status == Int32(QL_EUNSUPPORTED) else { throw EngineError("\(name): INT8 conv failed (status \(status)) for input \(x.shape)") }
                if status == 0 { route = directRoute }
                return status
            }
            func runIm2col() throws {
                let offset: Int32 = ql_s8_min(x.codes, Int64(x.codes.count)) >= 0 ? 0 : 128
                if columns.count < m * depth { columns = [UInt8](repeating: 0, count: m * depth) } // kept between runs
                guard ql_im2col_nhwc_s8u8(&columns, x.codes, &g, offset) == 0 else { throw EngineError("\(name): im2col failed for input \(x.shape)") }
                let status = withEpilogue(offset == 0 ? nil : columnSums.map { -offset * $0 }) { ep in
                    out8.map { ql_igemm_u8s8_s8(Int32(m), Int32(outChannels), Int32(depth), columns, Int32(depth), packed, &ep, $0, Int32(outChannels)) }
                        ?? ql_igemm_u8s8_f32(Int32(m), Int32(outChannels), Int32(depth), columns, Int32(depth), packed, &ep, out32, Int32(outChannels))
                }
                guard status == 0 else { throw EngineError("\(name): INT8 GEMM failed (status \(status)) for input \(x.shape)") }
                route = "im2col + GEMM"
            }
            switch routeChoice {
            case .direct:
                if try runDirect() != 0 { try runIm2col() }
            case .im2col:
                try runIm2col()
            case .timed:
                if let direct = timing.kept(at: x.shape) {
                    if try !direct || runDirect() != 0 { try runIm2col() }
                    return
                }
                // both routes write the same bits to `out`, so timing them there is harmless; a
                // direct kernel that declines leaves im2col at this shape from now on
                if try timing.time(at: x.shape, first: { try runDirect() == 0 }, second: runIm2col) {
                    route = directRoute // the one kept, not the one run last
                }
            }
        }
        if let amax = outputAmax, activation == .silu {
            // SiLU does not commute with the output scale: floats first, then the quantizer
            let floats = try [Float](unsafeUninitializedCapacity: m * outChannels) { buffer, initialized in
                try product(s8: nil, f32: buffer.baseAddress)
                initialized = m * outChannels
            }
            var out = [Int8](repeating: 0, count: m * outChannels)
            ql_quantize_s8(&out, floats, Int64(out.count), amax, 127)
            return (QTensor(codes: out, shape: outShape, amax: amax), nil)
        }
        if let amax = outputAmax {
            let out = try [Int8](unsafeUninitializedCapacity: m * outChannels) { buffer, initialized in
                try product(s8: buffer.baseAddress, f32: nil)
                initialized = m * outChannels
            }
            return (QTensor(codes: out, shape: outShape, amax: amax), nil)
        }
        let nhwc = Tensor(uninitialized: [n, oh, ow, outChannels]) // the epilogue writes every element
        try product(s8: nil, f32: nhwc.data)
        return (nil, nhwc.permuted([0, 3, 1, 2]))
    }

    /// The transposed conv: one GEMM [N*H*W, C] x [C, KH*KW*K] on the input codes (NHWC rows are
    /// the pixels: the im2col of a 1 x 1 kernel), then each pixel's KH x KW block of K values to
    /// its place in the NHWC output.
    private func runTransposed(_ x: QTensor, geometry g: inout ql_conv_geom) throws -> (QTensor?, Tensor?) {
        route = "GEMM + scatter"
        let (n, c, h, w) = (x.shape[0], x.shape[1], x.shape[2], x.shape[3])
        let (kh, kw) = kernel, k = outChannels, cols = gemmColumns
        let (oh, ow) = (h * kh, w * kw), m = n * h * w
        lastOps = 2 * Double(m) * Double(c) * Double(cols)
        let offset: Int32 = ql_s8_min(x.codes, Int64(x.codes.count)) >= 0 ? 0 : 128
        if columns.count < m * c { columns = [UInt8](repeating: 0, count: m * c) }
        guard ql_im2col_nhwc_s8u8(&columns, x.codes, &g, offset) == 0 else { throw EngineError("\(name): input copy failed for \(x.shape)") }
        let col = columns
        let offsets = offset == 0 ? nil : columnSums.map { -offset * $0 }
        /// GEMM rows [pixel][(i, j, k)] to NHWC [N, OH, OW, K].
        func scatter<T>(_ gemm: [T], zero: T) -> [T] {
            var out = [T](repeating: zero, count: m * cols)
            gemm.withUnsafeBufferPointer { src in
                out.withUnsafeMutableBufferPointer { dst in
                    for p in 0..<m {
                        let (b, hw) = p.quotientAndRemainder(dividingBy: h * w), (y, xx) = hw.quotientAndRemainder(dividingBy: w)
                        for i in 0..<kh { for j in 0..<kw {
                            (dst.baseAddress! + ((b * oh + y * kh + i) * ow + xx * kw + j) * k).update(from: src.baseAddress! + p * cols + (i * kw + j) * k, count: k)
                        } }
                    }
                }
            }
            return out
        }
        return try withEpilogue(offsets) { ep in
            if let amax = outputAmax {
                var gemm = [Int8](repeating: 0, count: m * cols)
                guard ql_igemm_u8s8_s8(Int32(m), Int32(cols), Int32(c), col, Int32(c), packed, &ep, &gemm, Int32(cols)) == 0 else {
                    throw EngineError("\(name): INT8 GEMM failed")
                }
                return (QTensor(codes: scatter(gemm, zero: 0), shape: [n, k, oh, ow], amax: amax), nil)
            }
            var gemm = [Float](repeating: 0, count: m * cols)
            guard ql_igemm_u8s8_f32(Int32(m), Int32(cols), Int32(c), col, Int32(c), packed, &ep, &gemm, Int32(cols)) == 0 else {
                throw EngineError("\(name): INT8 GEMM failed")
            }
            let nhwc = Tensor(scatter(gemm, zero: 0), shape: [n, oh, ow, k])
            return (nil, nhwc.permuted([0, 3, 1, 2]))
        }
    }

    private func withEpilogue<T>(_ offsets: [Int32]?, _ body: (inout ql_requant_params) throws -> T) rethrows -> T {
        try scale.withUnsafeBufferPointer { sc in
            try (bias ?? []).withUnsafeBufferPointer { bi in
                try (offsets ?? []).withUnsafeBufferPointer { off in
                    var ep = ql_requant_params(col_offset: offsets == nil ? nil : off.baseAddress, scale: sc.baseAddress,
                                               bias: bias == nil ? nil : bi.baseAddress, relu: activation.rawValue)
                    return try body(&ep)
                }
            }
        }
    }
}

/// One step of the INT8 plan. Int8 values live in slots (a graph value's id when the value
/// itself is produced in int8, a fresh id for a quantized copy of a float value).
public enum PlanStep {
    /// A graph node run in FP32 with the reference op.
    case float(GraphNode)
    /// Reformat: a float value to int8 codes (`name`: the quantizer or the op it is for).
    case quantize(source: Int, slot: Int, amax: Float, name: String)
    /// Reformat: int8 codes at one scale to another.
    case requantize(source: Int, slot: Int, from: Float, to: Float, name: String)
    /// Reformat: int8 codes to floats, for a float consumer.
    case dequantize(slot: Int, value: Int, name: String)
    /// A fused conv: reads the codes in `input`, writes codes to `output` (a slot) when its
    /// output is int8, else the float value `output`.
    case int8Conv(Int8Conv, input: Int, output: Int)
    /// Max pooling or channel concat on codes of one scale (they commute with quantization).
    case int8Op(GraphNode, inputs: [Int], output: Int, amax: Float)
    /// A Gemm or MatMul on the integer GEMM: reads the floats its quantizers read (`inputs`),
    /// writes the float value `output` (Int8Gemm.swift).
    case int8Gemm(Int8Gemm, inputs: [Int], output: Int)
}

/// A graph compiled to integer kernels where its Q/DQ allow it, by TensorRT's rules
/// (ENGINE.md): convs fuse with their quantizers (rule 3); max pooling and channel concat run
/// in int8 when every consumer wants their output at one scale, the quantizer after them
/// moving onto their inputs (rules 1, 2 and 5); a tensor wanted at two scales is produced in
/// float and quantized once per scale (rule 6). What remains are the Reformat steps.
public final class Int8Plan {
    public let graph: Graph
    public private(set) var steps: [PlanStep] = []

    /// Applies the fusion rules to a graph traced with the simulator's quantizers installed
    /// (a graph without quantizers gives an all-float plan: the FP32 baseline).
    public init(_ graph: Graph) throws {
        self.graph = graph
        let nodes = graph.nodes
        let consumers = graph.consumers
        let producerIndex = Dictionary(uniqueKeysWithValues: nodes.enumerated().map { ($0.element.output, $0.offset) })
        func isConstant(_ v: Int?) -> Bool { v.map { graph.constants[$0] != nil } ?? false }
        let activationQuantizer = graph.activationQuantizerAmax
        let commutes = graph.commutesWithQuantization

        // 1. Which convs fuse, with the ReLU or SiLU that follows them.
        struct ConvFusion {
            var options: Conv2dOptions, inputQuantizer: GraphNode, weight: Tensor, weightAmax: [Float], bias: Tensor?
            var transposed = false
            var activation = Int8Conv.Activation.none
            /// The activation node fused into the conv, and so not run on its own.
            var activationNode: Int?
        }
        var convs: [Int: ConvFusion] = [:]
        var fusedActivations: Set<Int> = []
        for (i, n) in nodes.enumerated() {
            // a conv, or a transposed conv whose kernel equals its stride (weight axis 1: its output channels)
            let options: Conv2dOptions, weightAxis: Int
            switch n.op {
            case .conv(let o) where o.groups == 1: (options, weightAxis) = (o, 0)
            case .convTranspose(let o, let outputPadding) where outputPadding == 0: (options, weightAxis) = (o, 1)
            default: continue
            }
            let transposed = weightAxis == 1
            guard n.inputs.count >= 2,
                  let xi = n.inputs[0], let xq = producerIndex[xi].map({ nodes[$0] }), activationQuantizer(xq) != nil,
                  let wi = n.inputs[1], let wq = producerIndex[wi].map({ nodes[$0] }),
                  case .quantizeDequantize(let wAmax, weightAxis, 8) = wq.op, let ws = wq.inputs.first ?? nil, let weight = graph.constants[ws],
                  !transposed || Int8Conv.supportsTransposed(weightShape: weight.shape, options: options, outputPadding: 0) else { continue }
            var fusion = ConvFusion(options: options, inputQuantizer: xq, weight: weight, weightAmax: wAmax,
                                    bias: n.inputs.count > 2 ? n.inputs[2].flatMap { graph.constants[$0] } : nil, transposed: transposed)
            if !transposed, let users = consumers[n.output], users.count == 1, !graph.outputs.contains(n.output) {
                switch nodes[users[0]].op {
                case .relu: fusion.activation = .relu
                case .silu: fusion.activation = .silu
                default: break
                }
                if fusion.activation != .none {
                    fusion.activationNode = users[0]
                    fusedActivations.insert(users[0])
                }
            }
            convs[i] = fusion
        }
        // 1b. Which Gemm (linear) and MatMul nodes run on the integer GEMM: a linear whose input
        //     has an activation quantizer and whose weight a per-output-channel one; a matmul of
        //     two activations, each behind a per-tensor quantizer, with the same batch dims.
        var gemms: [Int: (Int8Gemm, sources: [Int])] = [:]
        for (i, n) in nodes.enumerated() {
            func quantized(_ k: Int) -> (GraphNode, Float)? {
                guard k < n.inputs.count, let v = n.inputs[k], let q = producerIndex[v].map({ nodes[$0] }), let a = activationQuantizer(q) else { return nil }
                return (q, a)
            }
            switch n.op {
            case .linear:
                guard let (xq, ax) = quantized(0), n.inputs.count >= 2, let wi = n.inputs[1], let wq = producerIndex[wi].map({ nodes[$0] }),
                      case .quantizeDequantize(let wAmax, 0, 8) = wq.op, let ws = wq.inputs.first ?? nil, let weight = graph.constants[ws] else { continue }
                let bias = n.inputs.count > 2 ? n.inputs[2].flatMap { graph.constants[$0] } : nil
                gemms[i] = (try Int8Gemm(linear: n.name, weight: weight, bias: bias, inputAmax: ax, weightAmax: wAmax), [xq.inputs[0]!])
            case .matmul:
                guard let (aq, aa) = quantized(0), let (bq, ab) = quantized(1),
                      graph.values[aq.output].shape.count == graph.values[bq.output].shape.count else { continue }
                gemms[i] = (Int8Gemm(matmul: n.name, amaxA: aa, amaxB: ab), [aq.inputs[0]!, bq.inputs[0]!])
            default: continue
            }
        }

        /// The value a fused conv finally writes (after its activation).
        func convOutput(_ i: Int) -> Int { convs[i]!.activationNode.map { nodes[$0].output } ?? nodes[i].output }

        // 2. Which values are produced in int8, at which amax, walking backwards: a value is
        //    int8 when every consumer wants it in int8 at one amax — a quantizer (it is then
        //    absorbed), or a commuting op that itself runs in int8.
        var int8Amax: [Int: Float] = [:] // value -> amax
        func wanted(_ v: Int) -> Float? {
            guard let users = consumers[v], !users.isEmpty, !graph.outputs.contains(v) else { return nil }
            var amax: Float?
            for u in users {
                let want: Float?
                if let a = activationQuantizer(nodes[u]) { want = a } else if commutes(nodes[u]) { want = int8Amax[nodes[u].output] } else { want = nil }
                guard let want, amax == nil || amax == want else { return nil }
                amax = want
            }
            return amax
        }
        for i in nodes.indices.reversed() {
            let n = nodes[i]
            if commutes(n) || convs[i] != nil {
                let out = convs[i] != nil ? convOutput(i) : n.output
                if let a = wanted(out) { int8Amax[out] = a }
            }
        }

        // 3. Steps in graph order.
        var slot: [Int: Int] = [:]       // value -> slot holding its int8 codes
        var slotAmax: [Int: Float] = [:]
        var nextSlot = graph.values.count
        var haveFloat = Set(graph.inputs).union(graph.constants.keys)
        func newSlot(_ amax: Float) -> Int { defer { nextSlot += 1 }; slotAmax[nextSlot] = amax; return nextSlot }
        /// Copies of a value in int8 at another amax than its own, made once per (value, amax):
        /// one Reformat kernel per scale, whatever the number of readers.
        var copies: [Int: [Float: Int]] = [:]
        /// Codes of value `v` at `amax`, adding the Reformat step that makes them if needed.
        func codes(of v: Int, at amax: Float, for name: String) -> Int {
            if let s = slot[v], slotAmax[s] == amax { return s }
            if let s = copies[v]?[amax] { return s }
            let t = newSlot(amax)
            if let s = slot[v], let from = slotAmax[s] {
                steps.append(.requantize(source: s, slot: t, from: from, to: amax, name: name))
            } else {
                steps.append(.quantize(source: v, slot: t, amax: amax, name: name))
            }
            copies[v, default: [:]][amax] = t
            return t
        }
        func needFloat(_ v: Int, for name: String) {
            guard !haveFloat.contains(v) else { return }
            if let s = slot[v] { steps.append(.dequantize(slot: s, value: v, name: name)) }
            haveFloat.insert(v)
        }
        for (i, n) in nodes.enumerated() {
            if fusedActivations.contains(i) { continue } // run by its conv
            if let f = convs[i] {
                let xin = f.inputQuantizer, inputAmax = activationQuantizer(xin)!
                let input = codes(of: xin.inputs[0]!, at: inputAmax, for: xin.name)
                slot[xin.output] = input
                let out = convOutput(i)
                let conv = f.transposed
                    ? try Int8Conv(transposedName: n.name, weight: f.weight, bias: f.bias, options: f.options, inputAmax: inputAmax,
                                   weightAmax: f.weightAmax, outputAmax: int8Amax[out])
                    : try Int8Conv(name: n.name, weight: f.weight, bias: f.bias, options: f.options,
                                   inputAmax: inputAmax, weightAmax: f.weightAmax, activation: f.activation, outputAmax: int8Amax[out])
                if let a = int8Amax[out] {
                    slot[out] = out
                    slotAmax[out] = a
                } else {
                    haveFloat.insert(out)
                }
                steps.append(.int8Conv(conv, input: input, output: out))
                continue
            }
            if let (g, sources) = gemms[i] {
                for v in sources { needFloat(v, for: n.name) }
                steps.append(.int8Gemm(g, inputs: sources, output: n.output))
                haveFloat.insert(n.output)
                continue
            }
            if let a = activationQuantizer(n) {
                let src = n.inputs[0]!
                // integer GEMMs quantize the source themselves; the quantizer serves the others
                let users = (consumers[n.output] ?? []).filter { gemms[$0] == nil }
                if users.isEmpty && !graph.outputs.contains(n.output) { continue }
                let int8Users = users.filter { convs[$0] != nil || (commutes(nodes[$0]) && int8Amax[nodes[$0].output] != nil) }
                // a quantizer read only as a fused conv's input is handled by that conv
                if !int8Users.isEmpty && int8Users.allSatisfy({ convs[$0] != nil }) && int8Users.count == users.count { continue }
                // its int8 form: the producer's codes if it wrote them at this amax (absorbed),
                // else, when int8 readers need it, a Reformat
                if !int8Users.isEmpty {
                    slot[n.output] = codes(of: src, at: a, for: n.name)
                } else if let s = slot[src], slotAmax[s] == a {
                    slot[n.output] = s
                }
                if int8Users.count < users.count || graph.outputs.contains(n.output) {
                    if let s = slot[n.output] {
                        steps.append(.dequantize(slot: s, value: n.output, name: n.name)) // code * s: the simulator's value exactly
                    } else {
                        needFloat(src, for: n.name)
                        steps.append(.float(n))
                    }
                    haveFloat.insert(n.output)
                }
                continue
            }
            if commutes(n), let a = int8Amax[n.output] {
                let inputs = n.inputs.enumerated().map { codes(of: $0.element!, at: a, for: n.inputs.count > 1 ? "\(n.name).input\($0.offset)" : n.name) }
                slot[n.output] = n.output
                slotAmax[n.output] = a
                steps.append(.int8Op(n, inputs: inputs, output: n.output, amax: a))
                continue
            }
            // a weight quantizer consumed only by fused convs was folded into their weights
            if case .quantizeDequantize = n.op, isConstant(n.inputs.first ?? nil), (consumers[n.output] ?? []).allSatisfy({ convs[$0] != nil || gemms[$0] != nil }) { continue }
            for case let v? in n.inputs { needFloat(v, for: n.name) }
            steps.append(.float(n))
            haveFloat.insert(n.output)
        }
        for v in graph.outputs { needFloat(v, for: "output") }
        // float convs on constant weights: packed once here, not on every run; a ReLU or SiLU
        // that is the conv's only reader runs as the conv writes its output (its step goes)
        var fusedSteps: Set<Int> = []
        let floatOutputs = Set(steps.compactMap { step -> Int? in if case .float(let n) = step { return n.output } else { return nil } })
        for case .float(let n) in steps {
            guard case .conv(let o) = n.op, n.inputs.count > 1, let wid = n.inputs[1], let w = graph.constants[wid] else { continue }
            packedConvs[n.output] = PackedConv2dWeights(weight: w, options: o)
            winogradConvs[n.output] = WinogradConv(weight: w, options: o)
            guard let users = consumers[n.output], users.count == 1, !graph.outputs.contains(n.output) else { continue }
            let user = nodes[users[0]]
            let activation: ConvActivation? = switch user.op { case .relu: .relu; case .silu: .silu; default: nil }
            if let activation, floatOutputs.contains(user.output) {
                floatConvActivation[n.output] = (user.output, activation)
                fusedSteps.insert(user.output)
            }
        }
        steps.removeAll { step in
            guard case .float(let r) = step else { return false }
            switch r.op { case .relu, .silu: return fusedSteps.contains(r.output); default: return false }
        }
        chainFloatConvs()
        convRouteChoice = try Int8Conv.RouteChoice.fromEnvironment()
        for conv in int8Convs { conv.routeChoice = convRouteChoice }
        let integer = steps.contains { if case .float = $0 { false } else { true } }
        floatConvRoute = try FloatConvRoute.fromEnvironment() ?? (integer ? .conv2d : .timed)
    }

    /// The float 3x3 stride-1 convs' kernel (`FloatConvRoute`): `QL_FLOAT_CONV_ROUTE` at build;
    /// when unset, timed between the model's conv and Winograd in an all-float plan (the FP32
    /// baseline), and the model's conv (its bits) in a plan with integer steps, where the
    /// engine must equal the simulator.
    public var floatConvRoute = FloatConvRoute.conv2d {
        didSet { for w in winogradConvs.values { w.resetTimings() } }
    }
    /// The float convs that Winograd F(2x2, 3x3) can run, by output value.
    var winogradConvs: [Int: WinogradConv] = [:]
    /// Of the float convs Winograd can run, how many took it in their last run.
    public var winogradUse: (running: Int, candidates: Int) {
        (winogradConvs.values.filter { $0.ranWinograd == true }.count, winogradConvs.count)
    }

    /// The INT8 convs' choice between the direct kernel and im2col + GEMM where both apply
    /// (`Int8Conv.RouteChoice`): `QL_CONV_ROUTE` at build, timed when unset.
    public var convRouteChoice = Int8Conv.RouteChoice.timed {
        didSet { for conv in int8Convs { conv.routeChoice = convRouteChoice } }
    }
    /// The plan's fused convs, in step order.
    public var int8Convs: [Int8Conv] { steps.compactMap { if case .int8Conv(let c, _, _) = $0 { c } else { nil } } }

    /// Chains of float convs on the direct kernel (issue #12): a conv whose every reader is
    /// such a conv, reading it as its input, all with the same padding, writes its output NHWC
    /// with that padding as a zero border, the copy each reader would otherwise make of an
    /// NCHW input (and a transpose of the output fewer). The values are the same; only
    /// these convs see the layout.
    private func chainFloatConvs() {
        var readers: [Int: [Int]] = [:] // float value -> the steps that read it
        for (i, s) in steps.enumerated() {
            switch s {
            case .float(let n): for case let v? in n.inputs { readers[v, default: []].append(i) }
            case .quantize(let v, _, _, _): readers[v, default: []].append(i)
            case .int8Gemm(_, let inputs, _): for v in inputs { readers[v, default: []].append(i) }
            default: break
            }
        }
        /// The padding of step i when it is a float conv on the direct kernel reading `v` as its input only.
        func directPadding(_ i: Int, reading v: Int) -> [Int]? {
            guard case .float(let n) = steps[i], case .conv(let o) = n.op, let packed = packedConvs[n.output],
                  n.inputs.first == v, !n.inputs.dropFirst().contains(v), packed.runsDirect(input: graph.values[v].shape) else { return nil }
            return [o.padding.0, o.padding.1]
        }
        for case .float(let n) in steps {
            guard let packed = packedConvs[n.output], let x = n.inputs.first ?? nil, packed.runsDirect(input: graph.values[x].shape) else { continue }
            let out = floatConvActivation[n.output]?.output ?? n.output
            guard !graph.outputs.contains(out), let users = readers[out], !users.isEmpty else { continue }
            let pads = users.map { directPadding($0, reading: out) }
            if let first = pads[0], pads.allSatisfy({ $0 == first }) { nhwcOutputs[out] = (first[0], first[1]) }
        }
    }

    // The stored properties below are internal, not private, on purpose: with Swift 6.3's
    // default cross-module optimisation (release builds), a module that inlined
    // `Int8Plan(graph)` allocated the object without its private stored properties (41 of 65
    // bytes), and the initialiser then wrote past the allocation: heap corruption that crashed
    // exp05 and exp08 in release builds only (debug and ASan builds were fine). Keep any stored
    // property of this class internal or public; scripts/check_class_sizes.py checks the
    // release binaries for a class allocated with two sizes.
    /// The float convs' weights, packed for their forward (by the node's output value).
    var packedConvs: [Int: PackedConv2dWeights] = [:]
    /// Float convs with their ReLU or SiLU fused: conv output value -> the activation's output
    /// value, which the conv step writes, and the activation.
    var floatConvActivation: [Int: (output: Int, activation: ConvActivation)] = [:]
    /// " + ReLU" or " + SiLU" for a float conv with its activation fused, else "".
    private func fusedActivationName(_ n: GraphNode) -> String {
        switch floatConvActivation[n.output]?.activation { case .relu?: " + ReLU"; case .silu?: " + SiLU"; default: "" }
    }
    /// Float values that their conv writes NHWC with a zero border (rows, columns) for the
    /// convs that read them (`chainFloatConvs`).
    var nhwcOutputs: [Int: (Int, Int)] = [:]

    /// The kind of Reformat a step is, or nil: quantize, requantize, dequantize, or "qdq
    /// (float)" for a quantizer run as fake quantization — but not a quantizer of a constant (a
    /// weight): an engine folds that once.
    public func reformatKind(of step: PlanStep) -> String? {
        switch step {
        case .quantize: return "quantize"
        case .requantize: return "requantize"
        case .dequantize: return "dequantize"
        case .float(let n):
            guard case .quantizeDequantize = n.op, let src = n.inputs.first ?? nil, graph.constants[src] == nil else { return nil }
            return "qdq (float)"
        case .int8Conv, .int8Op, .int8Gemm: return nil
        }
    }

    /// Reformat steps by kind.
    public var reformats: [String: Int] { steps.reduce(into: [:]) { r, s in if let k = reformatKind(of: s) { r[k, default: 0] += 1 } } }
    /// All Reformat steps.
    public var reformatCount: Int { steps.reduce(0) { $0 + (reformatKind(of: $1) == nil ? 0 : 1) } }
    public var int8ConvCount: Int { int8Convs.count }
    /// Gemm and MatMul nodes on the integer GEMM.
    public var int8GemmCount: Int { steps.filter { if case .int8Gemm = $0 { return true } else { return false } }.count }

    /// One line per step: what runs, in which precision, and the Reformat count by kind.
    public func explain() -> String {
        var lines = ["INT8 plan: \(steps.count) steps, \(int8ConvCount) fused INT8 convs (\(Kernels.isa) kernels)"]
        for (i, s) in steps.enumerated() {
            let text: String
            switch s {
            case .float(let n):
                let out = floatConvActivation[n.output]?.output ?? n.output
                let layout = (nhwcOutputs[out] != nil ? "  out: NHWC padded" : "") + (n.inputs.first.flatMap { $0 }.map { nhwcOutputs[$0] != nil ? "  in: NHWC padded" : "" } ?? "")
                let fused = fusedActivationName(n).dropFirst(3)
                let route = winogradConvs[n.output].map { w in "  [\(w.summary ?? (floatConvRoute == .timed ? "timed: conv2d or Winograd" : floatConvRoute == .winograd ? "Winograd" : "conv2d"))]" } ?? ""
                text = "\(n.name)  \(n.op.name) f32\(fused.isEmpty ? "" : "  fused: bias, \(fused)")\(layout)\(route)\(reformatKind(of: s) != nil ? "  [Reformat: QDQ in float]" : "")"
            case .quantize(_, _, let a, let name): text = String(format: "%@  Quantize f32 -> int8 (amax %.4g)  [Reformat]", name, a)
            case .requantize(_, _, let from, let to, let name): text = String(format: "%@  Requantize int8 -> int8 (amax %.4g -> %.4g)  [Reformat]", name, from, to)
            case .dequantize(_, let v, let name): text = "\(name)  Dequantize int8 -> f32 (\(graph.values[v].name))  [Reformat]"
            case .int8Conv(let c, _, _):
                text = "\(c.name)  \(c.kindName) int8 -> \(c.outputAmax == nil ? "f32" : "int8")  fused: DQ(x), DQ(w), \(c.transposed ? "ConvTranspose" : "Conv"), bias\(c.activation == .relu ? ", ReLU" : c.activation == .silu ? ", SiLU" : "")\(c.outputAmax == nil ? "" : ", Q")\(c.routeSummary.map { "  [\($0)]" } ?? "")"
            case .int8Op(let n, _, _, let a): text = String(format: "%@  %@ int8 (amax %.4g)", n.name, n.op.name, a)
            case .int8Gemm(let g, _, _): text = "\(g.name)  \(g.kindName) int8 -> f32  fused: Q(inputs), \(g.kind == .linear ? "DQ(w), Gemm, bias" : "MatMul")"
            }
            lines.append(String(format: "%4d  ", i) + text)
        }
        let r = reformats
        lines.append("Reformat steps: \(r.values.reduce(0, +))" + (r.isEmpty ? "" : " (" + r.sorted { $0.key < $1.key }.map { "\($0.key) \($0.value)" }.joined(separator: ", ") + ")"))
        return lines.joined(separator: "\n")
    }

    /// Runs the plan on NCHW float inputs; returns the graph's outputs in f32.
    public func run(_ inputs: [Tensor]) throws -> [Tensor] { try runKeepingValues(inputs).outputs }

    /// When the plan's first step quantizes its one input (an INT8 first layer): that step's
    /// slot and amax. A preprocessing stage can then write the codes itself (NHWC, this amax,
    /// `run(inputCodes:)`) and the plan starts one step later.
    var inputQuantizer: (slot: Int, amax: Float)? {
        guard graph.inputs.count == 1, case .quantize(let source, let slot, let amax, _) = steps.first, source == graph.inputs[0] else { return nil }
        return (slot, amax)
    }

    /// The amax of the plan's input quantizer, or nil when the plan takes float input.
    public var inputAmax: Float? { inputQuantizer?.amax }

    /// Runs on int8 codes of the input, NHWC at the scale `inputAmax / 127`: the same result as
    /// `run` on the floats those codes quantize (the first step is skipped, nothing else
    /// changes). A plan that also reads the float input elsewhere throws.
    public func run(inputCodes: [Int8]) throws -> [Tensor] { try runKeepingValues([], inputCodes: inputCodes).outputs }

    /// Every profiled run's time of each step (by step index).
    public private(set) var stepSamples: [[Double]] = []
    /// Seconds spent in each step (by step index) over the runs made with `profile` on.
    public var stepSeconds: [Double] { stepSamples.map { $0.reduce(0, +) } }
    /// Time each step of the following runs (a clock read per step).
    public var profile = false {
        didSet { (stepSamples, outsideStepsSamples) = (Array(repeating: [], count: steps.count), []) }
    }
    /// Every profiled run's time outside its steps: the run's wall time less its steps' times
    /// (binding the inputs, the executor's bookkeeping between steps, collecting the outputs).
    public private(set) var outsideStepsSamples: [Double] = []

    /// Each step's median time over the profiled runs (robust to a run that the OS interrupted).
    public var stepMedians: [Double] {
        stepSamples.map { s in s.isEmpty ? 0 : s.sorted()[s.count / 2] }
    }

    /// The Reformat steps' share of the plan's time, from the per-step medians, and of its steps.
    public var reformatShare: (time: Double, count: Double) {
        let medians = stepMedians, total = medians.reduce(0, +)
        let reformat = zip(steps, medians).filter { reformatKind(of: $0.0) != nil }
        return (total > 0 ? reformat.reduce(0) { $0 + $1.1 } / total : 0, Double(reformat.count) / Double(max(steps.count, 1)))
    }

    /// Where the time went, over the profiled runs: the share of each kind of step (Reformat
    /// steps by kind), by time and by count, and the slowest steps.
    public func profileReport(top: Int = 8) -> String {
        let stepSeconds = self.stepSeconds, total = stepSeconds.reduce(0, +)
        guard total > 0 else { return "no profiled runs (set profile = true first)" }
        func kind(_ s: PlanStep) -> String {
            if let r = reformatKind(of: s) { return "Reformat: \(r)" }
            switch s {
            case .int8Conv(let c, _, _): return c.kindName + (c.route.map { " (\($0.hasPrefix("direct") ? "direct" : $0))" } ?? "")
            case .int8Op(let n, _, _, _): return "\(n.op.name) (int8)"
            case .int8Gemm(let g, _, _): return g.kindName
            case .float(let n):
                if case .quantizeDequantize = n.op { return "weight QDQ (float)" }
                return "\(n.op.name)\(fusedActivationName(n)) (f32\(winogradConvs[n.output]?.ranWinograd == true ? ", Winograd" : ""))"
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
        if !outsideStepsSamples.isEmpty {
            let outside = outsideStepsSamples.sorted()[outsideStepsSamples.count / 2]
            lines.append(String(format: "outside the steps (inputs bound, bookkeeping between steps, outputs collected): %.1f us per run (median), %.1f%% of the steps' median sum",
                                1e6 * outside, 100 * outside / max(stepMedians.reduce(0, +), 1e-12)))
        }
        lines.append("slowest steps (share of the time, median time of a run; convs: route and rate, from the median):")
        let medians = stepMedians
        func rate(_ i: Int) -> (Int8Conv, Double)? {
            guard case .int8Conv(let c, _, _) = steps[i], medians[i] > 0 else { return nil }
            return (c, c.lastOps / medians[i] / 1e9)
        }
        /// A float conv's GFLOP/s (floatConvFLOPs over its median time).
        func floatRate(_ i: Int) -> Double? {
            guard medians[i] > 0, let flops = floatConvFLOPs(steps[i]) else { return nil }
            return flops / medians[i] / 1e9
        }
        func line(_ i: Int) -> String {
            let detail = rate(i).map { String(format: "  %@, %.0f GOPS", $0.0.routeSummary ?? "not run", $0.1) }
                ?? floatRate(i).map { rate in
                    let route = stepNode(i).flatMap { winogradConvs[$0.output]?.summary }.map { "  \($0)," } ?? ""
                    return String(format: "%@  %.0f GFLOP/s", route, rate)
                } ?? ""
            return String(format: "  %5.1f%%  %7.1f us  step %d  %@%@", 100 * stepSeconds[i] / total, 1e6 * medians[i], i, name(of: steps[i]), detail)
        }
        for (i, _) in stepSeconds.enumerated().sorted(by: { $0.element > $1.element }).prefix(top) { lines.append(line(i)) }
        let intRates = steps.indices.compactMap { i in rate(i).map { (i, $0.1) } }
        let slowestRates = (intRates.isEmpty ? steps.indices.compactMap { i in floatRate(i).map { (i, $0) } } : intRates)
            .sorted { $0.1 < $1.1 }.prefix(min(top, 6))
        if !slowestRates.isEmpty {
            lines.append("lowest rates (\(intRates.isEmpty ? "float" : "integer") convs):")
            for (i, _) in slowestRates { lines.append(line(i)) }
        }
        return lines.joined(separator: "\n")
    }

    /// The convs' aggregate rates over the profiled runs (from each step's median time):
    /// integer convs in operations per second (2 per multiply-add, of the work their kernels
    /// do), float convs in FLOP/s of the direct convolution's count (2 x outputs x inputs per
    /// output; Winograd does fewer multiplies, so its convs count above the hardware's rate).
    /// Nil where the plan has no such conv or nothing was profiled. Read against
    /// `Kernels.peakRates()` x threads: how close the convs run to what the CPU can issue.
    public var convRates: (integer: Double?, float: Double?) {
        let medians = stepMedians
        var (iOps, iSec, fOps, fSec) = (0.0, 0.0, 0.0, 0.0)
        for (s, median) in zip(steps, medians) where median > 0 { // no samples before `profile` is set
            switch s {
            case .int8Conv(let c, _, _):
                iOps += c.lastOps
                iSec += median
            case .float:
                guard let flops = floatConvFLOPs(s) else { continue }
                fOps += flops
                fSec += median
            default: continue
            }
        }
        return (iSec > 0 ? iOps / iSec : nil, fSec > 0 ? fOps / fSec : nil)
    }

    /// One line: `convRates` as a share of `peak` x the kernels' threads (integer convs against
    /// the INT8 peak, float convs against the FP32 peak); nil before any profiled run.
    public func convRatesReport(against peak: Kernels.PeakRates) -> String? {
        let rates = convRates, cores = Double(Kernels.threads)
        var parts: [String] = []
        if let i = rates.integer {
            parts.append(String(format: "integer convs %.0f GOPS, %.0f%% of the INT8 peak", i / 1e9, 100 * i / (2 * peak.int8 * cores)))
        }
        if let f = rates.float {
            parts.append(String(format: "float convs %.0f GFLOP/s counted as direct convs, %.0f%% of the FP32 peak%@", f / 1e9,
                                100 * f / (2 * peak.fp32 * cores), winogradUse.running > 0 ? " (Winograd's fewer multiplies count above it)" : ""))
        }
        return parts.isEmpty ? nil : "convs against this CPU's peak (\(Kernels.threads) threads x one core's \(peak.isa) peak): " + parts.joined(separator: "; ")
    }

    /// A float conv step's FLOPs as a direct convolution counts them: 2 x output elements x
    /// (input channels per group x kernel area); nil for other steps.
    private func floatConvFLOPs(_ s: PlanStep) -> Double? {
        guard case .float(let n) = s, case .conv = n.op, let w = n.inputs.count > 1 ? n.inputs[1] : nil else { return nil }
        let ws = graph.values[w].shape, outputs = graph.values[n.output].shape.reduce(1, *)
        return 2 * Double(outputs) * Double(ws.dropFirst().reduce(1, *))
    }

    private func stepNode(_ i: Int) -> GraphNode? { if case .float(let n) = steps[i] { n } else { nil } }

    /// Step `i`'s layer: the name of the graph node it computes (a fused conv's is the conv's;
    /// an ONNX export names its nodes the same, so another engine's per-node timings of the
    /// exported file line up with these steps), whether it is a conv or a matrix product, and
    /// the route its kernel took ("Winograd", "conv2d", "direct", ...; nil before a run or for
    /// a step without a choice).
    public func stepLayer(_ i: Int) -> (name: String, isProduct: Bool, route: String?) {
        switch steps[i] {
        case .float(let n):
            switch n.op {
            case .conv: return (n.name, true, winogradConvs[n.output]?.ranWinograd.map { $0 ? "Winograd" : "conv2d" })
            case .convTranspose, .linear, .matmul: return (n.name, true, nil)
            default: return (n.name, false, nil)
            }
        case .quantize(_, _, _, let name), .requantize(_, _, _, _, let name), .dequantize(_, _, let name): return (name, false, nil)
        case .int8Conv(let c, _, _): return (c.name, true, c.route.map { $0.hasPrefix("direct") ? "direct" : $0 })
        case .int8Op(let n, _, _, _): return (n.name, false, nil)
        case .int8Gemm(let g, _, _): return (g.name, true, nil)
        }
    }

    private func name(of s: PlanStep) -> String {
        switch s {
        case .float(let n): return "\(n.name) (\(n.op.name))"
        case .quantize(_, _, _, let name): return "\(name) (Quantize)"
        case .requantize(_, _, _, _, let name): return "\(name) (Requantize)"
        case .dequantize(_, _, let name): return "\(name) (Dequantize)"
        case .int8Conv(let c, _, _): return "\(c.name) (\(c.kindName))"
        case .int8Op(let n, _, _, _): return "\(n.name) (\(n.op.name) int8)"
        case .int8Gemm(let g, _, _): return "\(g.name) (\(g.kindName))"
        }
    }

    /// The outputs and every int8 slot computed (for tests that compare layer by layer).
    func runKeepingValues(_ inputs: [Tensor], inputCodes: [Int8]? = nil) throws -> (outputs: [Tensor], int8: [Int: QTensor]) {
        var f32: [Int: Tensor]
        var q8: [Int: QTensor] = [:]
        var nhwc: [Int: Tensor] = [:] // float values in a conv chain's layout (nhwcOutputs)
        var first = 0
        let runClock: Stopwatch? = profile ? Stopwatch() : nil
        var inSteps = 0.0 // this run's step times, when profiled
        if let inputCodes {
            guard let (slot, amax) = inputQuantizer else { throw EngineError("the plan does not start by quantizing its one input: it takes floats") }
            let shape = graph.values[graph.inputs[0]].shape
            guard inputCodes.count == shape.reduce(1, *) else {
                throw EngineError("input codes: expected \(shape.reduce(1, *)) for \(shape), got \(inputCodes.count)")
            }
            f32 = graph.constants
            q8[slot] = QTensor(codes: inputCodes, shape: shape, amax: amax)
            first = 1
        } else {
            f32 = try graph.bindInputs(inputs)
        }
        func floatValue(_ id: Int, for name: String) throws -> Tensor {
            guard let t = f32[id] else { throw EngineError("step \(name): f32 value \(graph.values[id].name) is not computed before it") }
            return t
        }
        func codes(_ s: Int, for name: String) throws -> QTensor {
            guard let q = q8[s] else { throw EngineError("step \(name): int8 slot \(s) is not computed before it") }
            return q
        }
        try withNoGrad {
            for (index, step) in steps.enumerated() where index >= first {
                let stepClock: Stopwatch? = profile ? Stopwatch() : nil
                defer {
                    if let t = stepClock?.seconds {
                        stepSamples[index].append(t)
                        inSteps += t
                    }
                }
                switch step {
                case .float(let n):
                    if let packed = packedConvs[n.output], let xid = n.inputs.first ?? nil {
                        let fused = floatConvActivation[n.output], out = fused?.output ?? n.output, activation = fused?.activation ?? .none
                        let bias = try n.inputs.count > 2 ? n.inputs[2].map { try floatValue($0, for: n.name) } : nil
                        let padded = nhwc[xid], x = try padded ?? floatValue(xid, for: n.name)
                        func conv2d() -> Tensor {
                            packed.forward(x, inputPadded: padded != nil, bias: bias, activation: activation, outputPadding: nhwcOutputs[out])
                        }
                        let y = try winogradConvs[n.output].map {
                            try $0.run(floatConvRoute, x, inputPadded: padded != nil, bias: bias, activation: activation,
                                       outputPadding: nhwcOutputs[out], conv2d: conv2d)
                        } ?? conv2d()
                        if nhwcOutputs[out] != nil { nhwc[out] = y } else { f32[out] = y }
                    } else {
                        let args = try n.inputs.map { try $0.map { try floatValue($0, for: n.name) } }
                        f32[n.output] = try ReferenceExecutor.apply(n, args)
                    }
                case .quantize(let source, let s, let amax, let name):
                    let x = try floatValue(source, for: name)
                    guard x.rank == 4 else { throw EngineError("\(name): int8 activations are 4-D, got \(x.shape)") }
                    var c = [Int8](repeating: 0, count: x.count)
                    ql_quantize_nchw_to_nhwc_s8(&c, x.data, Int32(x.shape[0]), Int32(x.shape[1]), Int32(x.shape[2] * x.shape[3]), amax, 127)
                    q8[s] = QTensor(codes: c, shape: x.shape, amax: amax)
                case .requantize(let source, let s, _, let to, let name):
                    let x = try codes(source, for: name)
                    var c = [Int8](repeating: 0, count: x.codes.count)
                    ql_requantize_codes_s8(&c, x.codes, Int64(c.count), x.amax / 127, to, 127)
                    q8[s] = QTensor(codes: c, shape: x.shape, amax: to)
                case .dequantize(let s, let v, let name):
                    let q = try codes(s, for: name)
                    let out = Tensor(uninitialized: q.shape)
                    ql_dequantize_nhwc_to_nchw_f32(out.data, q.codes, Int32(q.shape[0]), Int32(q.shape[1]), Int32(q.shape[2] * q.shape[3]), q.amax / 127)
                    f32[v] = out
                case .int8Conv(let conv, let input, let output):
                    let (q, t) = try conv.run(try codes(input, for: conv.name))
                    if let q { q8[output] = q } else { f32[output] = t }
                case .int8Gemm(let g, let inputs, let output):
                    let xs = try inputs.map { try floatValue($0, for: g.name) }
                    f32[output] = g.kind == .linear ? try g.run(linear: xs[0]) : try g.run(matmul: xs[0], xs[1])
                case .int8Op(let n, let inputs, let output, let amax):
                    let xs = try inputs.map { try codes($0, for: n.name) }
                    let shape = graph.values[n.output].shape
                    var out = [Int8](repeating: 0, count: shape.reduce(1, *))
                    switch n.op {
                    case .maxPool(let k, let stride, let pad):
                        let x = xs[0]
                        guard ql_maxpool_nhwc_s8(&out, x.codes, Int32(x.shape[0]), Int32(x.shape[2]), Int32(x.shape[3]), Int32(x.shape[1]),
                                                 Int32(k), Int32(stride), Int32(pad)) == 0 else { throw EngineError("\(n.name): bad pooling window") }
                    case .concat:
                        let channels = xs.map { Int32($0.shape[1]) }
                        withArrayOfPointers(xs.map(\.codes)) { pointers in
                            ql_concat_channels_nhwc_s8(&out, pointers, channels, Int32(xs.count), Int64(shape[0] * shape[2] * shape[3]))
                        }
                    default: throw EngineError("\(n.name): \(n.op.name) has no int8 kernel")
                    }
                    q8[output] = QTensor(codes: out, shape: shape, amax: amax)
                }
            }
        }
        let outputs = try graph.outputs.map { try floatValue($0, for: "output") }
        if let run = runClock?.seconds { outsideStepsSamples.append(max(0, run - inSteps)) }
        return (outputs, q8)
    }
}

/// Calls `body` with a C array of pointers to the arrays' storage.
private func withArrayOfPointers<R>(_ arrays: [[Int8]], _ body: (UnsafePointer<UnsafePointer<Int8>?>) throws -> R) rethrows -> R {
    func go(_ i: Int, _ acc: [UnsafePointer<Int8>?]) throws -> R {
        if i == arrays.count { return try acc.withUnsafeBufferPointer { try body($0.baseAddress!) } }
        return try arrays[i].withUnsafeBufferPointer { try go(i + 1, acc + [$0.baseAddress]) }
    }
    return try go(0, [])
}

extension Int8Plan {
    /// Median wall time of `runs` runs on `inputs`, after 3 warm-up runs (page faults, packing
    /// buffers, thread start): the latency `qlab engine` and `make bench-engine` report.
    public func medianLatency(_ inputs: [Tensor], runs: Int) throws -> Double {
        try medianWallTime(runs: runs) { _ = try run(inputs) }
    }

    /// Runs on a batch of any size: the graph's shapes are fixed at trace time (as a TensorRT
    /// engine's are), so a larger batch runs in chunks of the traced size and a smaller one (the
    /// last of a dataset, say) is padded with zeros; the outputs are cut back and joined.
    public func runBatch(_ images: Tensor) throws -> [Tensor] { try Self.inChunks(images, graph: graph, run) }

    /// `run` on a batch of any size, in chunks of the graph's traced batch (runBatch).
    static func inChunks(_ images: Tensor, graph: Graph, _ run: ([Tensor]) throws -> [Tensor]) throws -> [Tensor] {
        guard graph.inputs.count == 1 else { throw EngineError("runBatch needs a graph with one input") }
        let traced = graph.values[graph.inputs[0]].shape
        let (b, chunk) = (images.shape[0], traced[0])
        guard images.rank == traced.count, Array(images.shape.dropFirst()) == Array(traced.dropFirst()) else {
            throw EngineError("input \(images.shape) does not fit the traced \(traced)")
        }
        if b == chunk { return try run([images]) }
        var parts: [[Tensor]] = []
        for start in stride(from: 0, to: b, by: chunk) {
            let n = min(chunk, b - start)
            let padded = Tensor(zeros: traced)
            padded.data.update(from: images.data + start * images.count / b, count: n * images.count / b)
            parts.append(try run([padded]).map { $0.slice(dim: 0, start: 0, end: n) })
        }
        return parts.count == 1 ? parts[0] : parts[0].indices.map { i in concat(parts.map { $0[i] }, dim: 0) }
    }
}
