import Foundation
import CKernels

// Neural-network ops: convolution, normalisation, pooling, resampling, matrix products and
// losses. Shapes follow PyTorch: images NCHW, conv weights [K, C/groups, KH, KW],
// transposed-conv weights [C_in, C_out/groups, KH, KW], linear weights [out, in].

/// Stride, padding and dilation of a 2-D convolution or pooling window.
public struct Conv2dOptions: Equatable, Sendable {
    public var stride: (Int, Int)
    public var padding: (Int, Int)
    public var dilation: (Int, Int)
    public var groups: Int

    public init(stride: Int = 1, padding: Int = 0, dilation: Int = 1, groups: Int = 1) {
        self.init(stride: (stride, stride), padding: (padding, padding), dilation: (dilation, dilation), groups: groups)
    }

    public init(stride: (Int, Int), padding: (Int, Int), dilation: (Int, Int) = (1, 1), groups: Int = 1) {
        self.stride = stride
        self.padding = padding
        self.dilation = dilation
        self.groups = groups
    }

    public static func == (a: Conv2dOptions, b: Conv2dOptions) -> Bool {
        a.stride == b.stride && a.padding == b.padding && a.dilation == b.dilation && a.groups == b.groups
    }
}

private func geometry(input: [Int], weight: [Int], _ o: Conv2dOptions) -> ql_conv_geom {
    require(input.count == 4 && weight.count == 4, "conv2d: input \(input) and weight \(weight) must be 4-D")
    return ql_conv_geom(N: Int32(input[0]), C: Int32(input[1]), H: Int32(input[2]), W: Int32(input[3]),
                        K: Int32(weight[0]), KH: Int32(weight[2]), KW: Int32(weight[3]),
                        SH: Int32(o.stride.0), SW: Int32(o.stride.1), PH: Int32(o.padding.0), PW: Int32(o.padding.1),
                        DH: Int32(o.dilation.0), DW: Int32(o.dilation.1), groups: Int32(o.groups))
}

/// Counts multiply-accumulates of conv, transposed conv, linear and matmul forwards run
/// inside `count { }` (2 FLOPs per MAC), for the FLOPs column of result tables.
public final class FLOPCounter: @unchecked Sendable {
    @TaskLocal static var active: FLOPCounter?
    private let lock = NSLock()
    public private(set) var macs: Int = 0

    public init() {}

    func add(_ n: Int) { lock.lock(); macs += n; lock.unlock() }

    /// FLOPs (2 x MACs) of the forward passes in `body`.
    public static func count(_ body: () throws -> Void) rethrows -> Double {
        let c = FLOPCounter()
        try $active.withValue(c, operation: body)
        return 2 * Double(c.macs)
    }
}

@inline(__always) private func check(_ status: Int32, _ name: String) {
    require(status == 0, "\(name): kernel returned status \(status)")
}

/// 2-D convolution. x [N, C, H, W], weight [K, C/groups, KH, KW], bias [K] or nil.
/// conv2d's geometry and output size, after checking that the shapes fit (and counting FLOPs).
private func checkedConvGeometry(_ x: Tensor, _ weight: Tensor, _ bias: Tensor?, _ o: Conv2dOptions) -> (ql_conv_geom, oh: Int32, ow: Int32) {
    checkedConvGeometry(input: x.shape, weight, bias, o)
}

/// The same for an input of NCHW shape `input` (an NHWC tensor's logical shape).
private func checkedConvGeometry(input: [Int], _ weight: Tensor, _ bias: Tensor?, _ o: Conv2dOptions) -> (ql_conv_geom, oh: Int32, ow: Int32) {
    var g = geometry(input: input, weight: weight.shape, o)
    var oh: Int32 = 0, ow: Int32 = 0
    require(ql_conv_out_size(&g, &oh, &ow) == 0 && weight.shape[1] * o.groups == input[1],
                 "conv2d: input \(input), weight \(weight.shape), stride \(o.stride), padding \(o.padding), groups \(o.groups) do not fit")
    if let b = bias { require(b.shape == [weight.shape[0]], "conv2d: bias \(b.shape) for \(weight.shape[0]) channels") }
    FLOPCounter.active?.add(input[0] * weight.count * Int(oh) * Int(ow))
    return (g, oh, ow)
}

/// The op's name; while the profiler runs, keyed by geometry: "conv2d 3x3/1 64->64 40x40 n32".
private func convProfileKey(_ op: String, _ x: Tensor, _ weight: Tensor, _ o: Conv2dOptions) -> String {
    OpProfiler.isActive ? "\(op) \(weight.shape[2])x\(weight.shape[3])/\(o.stride.0) \(x.shape[1])->\(weight.shape[0]) \(x.shape[2])x\(x.shape[3]) n\(x.shape[0])" : op
}

public func conv2d(_ x: Tensor, weight: Tensor, bias: Tensor? = nil, options o: Conv2dOptions = .init()) -> Tensor {
    var (g, oh, ow) = checkedConvGeometry(x, weight, bias, o)
    if x.device == .cuda { return CUDAOps.conv2d(x, weight, bias, g, oh: Int(oh), ow: Int(ow)) }
    let out = Tensor(uninitialized: [x.shape[0], weight.shape[0], Int(oh), Int(ow)])
    check(ql_conv2d_fwd(out.data, x.data, weight.data, bias?.data, &g), "conv2d")
    traceOp(.conv(o), [x, weight, bias], out)
    let parents = bias.map { [x, weight, $0] } ?? [x, weight]
    let name = convProfileKey("conv2d", x, weight, o)
    return record(out, name, parents) { grad in
        var g = g
        if x.requiresGrad { check(ql_conv2d_bwd_data(x.gradBuffer().data, grad.data, weight.data, &g), "conv2d_bwd_data") }
        if weight.requiresGrad || (bias?.requiresGrad ?? false) {
            let db = (bias?.requiresGrad ?? false) ? bias!.gradBuffer().data : nil
            if weight.requiresGrad {
                check(ql_conv2d_bwd_weight(weight.gradBuffer().data, db, grad.data, x.data, &g), "conv2d_bwd_weight")
            } else if let db {
                addChannelSums(db, grad)
            }
        }
    }
}

/// `conv2d(x, ...).relu()`, the same bits, with the ReLU applied as the conv writes its output
/// instead of in a pass of its own: where no gradient is wanted and no tracer is watching (a
/// traced graph sees the Conv and the Relu node it would see otherwise); else the two ops.
public func conv2dReLU(_ x: Tensor, weight: Tensor, bias: Tensor? = nil, options o: Conv2dOptions = .init()) -> Tensor {
    let wantsGradient = GradMode.isEnabled && (x.requiresGrad || weight.requiresGrad || (bias?.requiresGrad ?? false))
    guard x.device == .cpu, !wantsGradient, Tracing.active == nil else { return conv2d(x, weight: weight, bias: bias, options: o).relu() }
    var (g, oh, ow) = checkedConvGeometry(x, weight, bias, o)
    let out = Tensor(uninitialized: [x.shape[0], weight.shape[0], Int(oh), Int(ow)])
    check(ql_conv2d_fwd_prepacked(out.data, x.data, weight.data, nil, -1, bias?.data, &g, 1), "conv2d")
    return record(out, convProfileKey("conv2d+relu", x, weight, o), []) { _ in }
}

/// An activation a conv can apply as it writes its output, with the op's own bits (the C
/// kernels' `act`).
public enum ConvActivation: Int32, Sendable {
    case none = 0, relu = 1, silu = 2

    /// The op, applied to a conv's output (the unfused path).
    func apply(_ y: Tensor) -> Tensor {
        switch self {
        case .none: return y
        case .relu: return y.relu()
        case .silu: return y.silu()
        }
    }
}

/// A conv's weights packed once for its forward, for weights that do not change (an engine's
/// constants): `forward` computes `conv2d`'s bits without packing the weights on every call
/// (at batch 1 that packing cost as much as the product of a 5x5 map). No gradient.
public final class PackedConv2dWeights {
    public let weight: Tensor
    public let options: Conv2dOptions
    private let packed: UnsafeMutablePointer<Float>?
    private let level: Int32

    public init(weight: Tensor, options o: Conv2dOptions) {
        self.weight = weight
        options = o
        // the packed layout does not depend on the input's size: any input the kernel fits
        let kh: Int = o.dilation.0 * (weight.shape[2] - 1) + 1, kw: Int = o.dilation.1 * (weight.shape[3] - 1) + 1
        var g = geometry(input: [1, weight.shape[1] * o.groups, kh, kw], weight: weight.shape, o)
        let floats = weight.device == .cpu ? ql_conv2d_fwd_packed_floats(&g) : 0
        var buffer: UnsafeMutablePointer<Float>? = floats > 0 ? .allocate(capacity: floats) : nil
        var level: Int32 = -1
        if let b = buffer {
            level = ql_conv2d_fwd_pack(b, weight.data, &g)
            if level < 0 { b.deallocate(); buffer = nil } // conv2d packs per call then
        }
        packed = buffer
        self.level = level
    }

    deinit { packed?.deallocate() }

    /// conv2d(x, weight, bias, options), the same bits; with an `activation`, that conv's
    /// `.relu()` or `.silu()` (the same bits too), applied as the output is written instead of
    /// in a pass of its own.
    ///
    /// For a chain of convs (an engine's FP32 plan) the same values in other layouts: with
    /// `inputPadded`, x is NHWC with this conv's own padding as a zero border ([N, H + 2PH,
    /// W + 2PW, C]); with `outputPadding` (ph, pw), the output is NHWC with a zero border of that
    /// size ([N, OH + 2ph, OW + 2pw, K]), ready for a next conv whose padding it is. In NCHW a
    /// run that wants a gradient, or a traced run of a fused activation, takes the ops
    /// themselves (a graph never records a fused node); other layouts are an engine's own steps
    /// and are not traced.
    public func forward(_ x: Tensor, inputPadded: Bool = false, bias: Tensor?, activation: ConvActivation = .none,
                        outputPadding: (Int, Int)? = nil) -> Tensor {
        let nchw = !inputPadded && outputPadding == nil
        if nchw, packed == nil || x.device != .cpu || (GradMode.isEnabled && (x.requiresGrad || weight.requiresGrad))
            || (activation != .none && Tracing.active != nil) {
            return activation.apply(conv2d(x, weight: weight, bias: bias, options: options))
        }
        require(nchw || (x.rank == 4 && x.device == .cpu), "conv2d (NHWC): input \(x.shape) must be a 4-D CPU tensor")
        let layouts = ConvLayouts(input: x.shape, inputPadded: inputPadded, padding: options.padding, outputPadding: outputPadding)
        var (g, oh, ow) = checkedConvGeometry(input: layouts.logicalInput, weight, bias, options)
        if let (qh, qw) = outputPadding { require(qh >= 0 && qw >= 0, "conv2d (NHWC): negative output padding \((qh, qw))") }
        let out = Tensor(uninitialized: layouts.outputShape(channels: weight.shape[0], height: Int(oh), width: Int(ow)))
        check(ql_conv2d_fwd_prepacked_layout(out.data, layouts.output, x.data, layouts.input, weight.data, packed, level, bias?.data, &g, activation.rawValue), "conv2d")
        if nchw && activation == .none { traceOp(.conv(options), [x, weight, bias], out) }
        return out
    }

    /// Whether the forward on an NCHW input of shape `input` runs the direct kernel
    /// (ql_conv2d_fwd_direct: AVX2, one group, not pointwise), the one that reads a padded NHWC
    /// input and writes an NHWC output as they are. Elsewhere `forward` converts around the
    /// NCHW conv for the other layouts.
    public func runsDirect(input: [Int]) -> Bool {
        guard input.count == 4, weight.device == .cpu else { return false }
        var g = geometry(input: input, weight: weight.shape, options)
        return ql_conv2d_fwd_direct(&g) != 0
    }
}

/// The shapes and C layouts of a conv forward that reads NCHW, or NHWC with the conv's own
/// padding as a zero border, and writes NCHW, or NHWC with a zero border of `outputPadding`
/// (the layouts a chain of convs passes between its convs). Arithmetic only: the callers check
/// what they must (the packed conv traps, the engine's Winograd conv throws).
public struct ConvLayouts {
    /// The input as NCHW: [N, C, H, W] without the border.
    public let logicalInput: [Int]
    public let input: ql_layout, output: ql_layout
    let outputPadding: (Int, Int)?

    public init(input shape: [Int], inputPadded: Bool, padding: (Int, Int), outputPadding: (Int, Int)?) {
        let (ph, pw) = padding
        logicalInput = inputPadded ? [shape[0], shape[3], shape[1] - 2 * ph, shape[2] - 2 * pw] : shape
        input = ql_layout(nhwc: inputPadded ? 1 : 0, ph: inputPadded ? Int32(ph) : 0, pw: inputPadded ? Int32(pw) : 0)
        output = ql_layout(nhwc: outputPadding == nil ? 0 : 1, ph: Int32(outputPadding?.0 ?? 0), pw: Int32(outputPadding?.1 ?? 0))
        self.outputPadding = outputPadding
    }

    /// The output tensor's shape for `channels` output channels on a height x width map.
    public func outputShape(channels: Int, height: Int, width: Int) -> [Int] {
        guard let (qh, qw) = outputPadding else { return [logicalInput[0], channels, height, width] }
        return [logicalInput[0], height + 2 * qh, width + 2 * qw, channels]
    }
}

/// db[k] += sum over n, h, w of g[n, k, h, w].
private func addChannelSums(_ db: UnsafeMutablePointer<Float>, _ g: Tensor) {
    let n = g.shape[0], k = g.shape[1], hw = g.count / max(n * k, 1)
    for i in 0..<n { for c in 0..<k { db[c] += Float(ql_sum(g.data + (i * k + c) * hw, Int64(hw))) } }
}

/// Transposed 2-D convolution (the adjoint of conv2d), as in YOLOv6's Rep-PAN upsampling.
/// x [N, C_in, H, W], weight [C_in, C_out/groups, KH, KW]; output size
/// (H - 1)*stride - 2*padding + dilation*(KH - 1) + outputPadding + 1.
public func convTranspose2d(_ x: Tensor, weight: Tensor, bias: Tensor? = nil, options o: Conv2dOptions = .init(),
                            outputPadding: (Int, Int) = (0, 0)) -> Tensor {
    require(x.rank == 4 && weight.rank == 4 && weight.shape[0] == x.shape[1],
                 "conv_transpose2d: input \(x.shape), weight \(weight.shape)")
    let cOut = weight.shape[1] * o.groups
    let hOut = (x.shape[2] - 1) * o.stride.0 - 2 * o.padding.0 + o.dilation.0 * (weight.shape[2] - 1) + outputPadding.0 + 1
    let wOut = (x.shape[3] - 1) * o.stride.1 - 2 * o.padding.1 + o.dilation.1 * (weight.shape[3] - 1) + outputPadding.1 + 1
    require(hOut > 0 && wOut > 0 && outputPadding.0 < max(o.stride.0, o.dilation.0) && outputPadding.1 < max(o.stride.1, o.dilation.1),
                 "conv_transpose2d: input \(x.shape), weight \(weight.shape) give no valid output")
    // The adjoint convolution maps [N, cOut, hOut, wOut] -> [N, C_in, H, W] with the same weight.
    var g = geometry(input: [x.shape[0], cOut, hOut, wOut], weight: weight.shape, o)
    FLOPCounter.active?.add(x.count * weight.count / max(weight.shape[0], 1))
    let out = Tensor(zeros: [x.shape[0], cOut, hOut, wOut])
    check(ql_conv2d_bwd_data(out.data, x.data, weight.data, &g), "conv_transpose2d")
    if let b = bias {
        require(b.shape == [cOut], "conv_transpose2d: bias \(b.shape) for \(cOut) channels")
        let hw = hOut * wOut
        for n in 0..<x.shape[0] { for c in 0..<cOut { let p = out.data + (n * cOut + c) * hw; ql_scale_shift(p, p, 1, b.data[c], Int64(hw)) } }
    }
    traceOp(outputPadding.0 == outputPadding.1 ? .convTranspose(o, outputPadding: outputPadding.0) : .unsupported("conv_transpose2d with unequal output padding"),
            [x, weight, bias], out)
    let parents = bias.map { [x, weight, $0] } ?? [x, weight]
    return record(out, "conv_transpose2d", parents) { grad in
        var g = g
        if x.requiresGrad {
            let tmp = Tensor(zeros: x.shape)
            check(ql_conv2d_fwd(tmp.data, grad.data, weight.data, nil, &g), "conv_transpose2d_bwd_data")
            ql_axpy_into(x.gradBuffer(), tmp)
        }
        if weight.requiresGrad {
            check(ql_conv2d_bwd_weight(weight.gradBuffer().data, nil, x.data, grad.data, &g), "conv_transpose2d_bwd_weight")
        }
        if let b = bias, b.requiresGrad { addChannelSums(b.gradBuffer().data, grad) }
    }
}

/// Batch normalisation over N, H, W per channel.
/// Training: normalises with the batch's biased variance and updates the running stats with
/// PyTorch's rule  running = (1 - momentum) * running + momentum * batch  (unbiased variance).
/// Evaluation: uses the running stats (a per-channel affine map, which BN folding relies on).
public func batchNorm2d(_ x: Tensor, weight: Tensor?, bias: Tensor?, runningMean: Tensor, runningVar: Tensor,
                        training: Bool, momentum: Float = 0.1, eps: Float = 1e-5) -> Tensor {
    require(x.rank >= 2, "batch_norm: input \(x.shape) needs at least 2 dims")
    let n = x.shape[0], c = x.shape[1], hw = x.count / max(n * c, 1)
    require(runningMean.count == c && runningVar.count == c, "batch_norm: \(c) channels, running stats \(runningMean.shape)")
    let mean = Tensor(zeros: [c]), rstd = Tensor(zeros: [c])
    if training {
        let variance = Tensor(zeros: [c])
        ql_channel_stats(mean.data, variance.data, x.data, Int32(n), Int32(c), Int64(hw))
        let m = Float(n * hw), unbias = m > 1 ? m / (m - 1) : 1
        for i in 0..<c {
            rstd.data[i] = 1 / (variance.data[i] + eps).squareRoot()
            runningMean.data[i] = (1 - momentum) * runningMean.data[i] + momentum * mean.data[i]
            runningVar.data[i] = (1 - momentum) * runningVar.data[i] + momentum * variance.data[i] * unbias
        }
    } else {
        for i in 0..<c {
            mean.data[i] = runningMean.data[i]
            rstd.data[i] = 1 / (runningVar.data[i] + eps).squareRoot()
        }
    }
    let out = Tensor(uninitialized: x.shape)
    ql_batch_norm_apply(out.data, x.data, mean.data, rstd.data, weight?.data, bias?.data, Int32(n), Int32(c), Int64(hw))
    traceOp(.unsupported(training ? "batch_norm (training)" : "batch_norm (fold it into the conv first: convertToDeployForm)"), [x], out)
    let parents = [x] + [weight, bias].compactMap { $0 }
    return record(out, "batch_norm", parents) { g in
        let dgamma = (weight?.requiresGrad ?? false) ? weight!.gradBuffer().data : nil
        let dbeta = (bias?.requiresGrad ?? false) ? bias!.gradBuffer().data : nil
        if training {
            // the first gradient of x is written, not added to a zero-filled buffer
            let first = x.requiresGrad && x.grad == nil
            let dx = x.requiresGrad ? (first ? Tensor(uninitialized: x.shape) : x.grad!) : nil
            ql_batch_norm_bwd_isa(QL_ISA_BEST, dx?.data, dgamma, dbeta, g.data, x.data,
                                  mean.data, rstd.data, weight?.data, Int32(n), Int32(c), Int64(hw), first ? 0 : 1)
            if first { x.grad = dx }
        } else {
            // Eval mode: y = x * a + b per channel with constants a = gamma * rstd.
            if x.requiresGrad {
                let gx = x.gradBuffer()
                for i in 0..<n { for ch in 0..<c {
                    let a = rstd.data[ch] * (weight?.data[ch] ?? 1)
                    ql_axpy(gx.data + (i * c + ch) * hw, a, g.data + (i * c + ch) * hw, Int64(hw))
                } }
            }
            if dgamma != nil || dbeta != nil {
                ql_batch_norm_bwd(nil, dgamma, dbeta, g.data, x.data, mean.data, rstd.data, weight?.data, Int32(n), Int32(c), Int64(hw))
            }
        }
    }
}

/// Layer normalisation over the last dim.
public func layerNorm(_ x: Tensor, weight: Tensor?, bias: Tensor?, eps: Float = 1e-5) -> Tensor {
    let cols = x.shape.last ?? 1, rows = x.count / max(cols, 1)
    if let w = weight { require(w.count == cols, "layer_norm: weight \(w.shape) for last dim \(cols)") }
    let out = Tensor(zeros: x.shape), mean = Tensor(zeros: [rows]), rstd = Tensor(zeros: [rows])
    ql_layer_norm_fwd(out.data, mean.data, rstd.data, x.data, weight?.data, bias?.data, Int64(rows), Int32(cols), eps)
    let parents = [x] + [weight, bias].compactMap { $0 }
    traceOp(.layerNorm(eps: eps), [x, weight, bias], out)
    return record(out, "layer_norm", parents) { g in
        // the kernel always writes dx; a scratch buffer takes it when x needs no gradient
        let dx = x.requiresGrad ? x.gradBuffer() : Tensor(zeros: x.shape)
        withExtendedLifetime(dx) {
            ql_layer_norm_bwd(dx.data, (weight?.requiresGrad ?? false) ? weight!.gradBuffer().data : nil,
                              (bias?.requiresGrad ?? false) ? bias!.gradBuffer().data : nil,
                              g.data, x.data, mean.data, rstd.data, weight?.data, Int64(rows), Int32(cols))
        }
    }
}

// MARK: - Pooling and resampling

private func poolOut(_ h: Int, _ k: Int, _ s: Int, _ p: Int) -> Int { (h + 2 * p - k) / s + 1 }

public func maxPool2d(_ x: Tensor, kernel: Int, stride: Int? = nil, padding: Int = 0) -> Tensor {
    let s = stride ?? kernel
    require(x.rank == 4 && 2 * padding <= kernel, "max_pool2d: input \(x.shape), kernel \(kernel), padding \(padding)")
    let (h, w) = (x.shape[2], x.shape[3])
    let (oh, ow) = (poolOut(h, kernel, s, padding), poolOut(w, kernel, s, padding))
    require(oh > 0 && ow > 0, "max_pool2d: input \(x.shape) smaller than kernel \(kernel)")
    let planes = x.shape[0] * x.shape[1]
    let out = Tensor(uninitialized: [x.shape[0], x.shape[1], oh, ow])
    // the indices only where a backward will read them
    guard GradMode.isEnabled && x.requiresGrad else {
        ql_max_pool2d_fwd(out.data, nil, x.data, Int64(planes), Int32(h), Int32(w), Int32(kernel), Int32(kernel),
                          Int32(s), Int32(s), Int32(padding), Int32(padding))
        traceOp(.maxPool(kernel: kernel, stride: stride ?? kernel, padding: padding), [x], out)
        return record(out, "max_pool2d", []) { _ in }
    }
    var argmax = [Int32](repeating: 0, count: out.count)
    ql_max_pool2d_fwd(out.data, &argmax, x.data, Int64(planes), Int32(h), Int32(w), Int32(kernel), Int32(kernel),
                      Int32(s), Int32(s), Int32(padding), Int32(padding))
    traceOp(.maxPool(kernel: kernel, stride: stride ?? kernel, padding: padding), [x], out)
    return record(out, "max_pool2d", [x]) { g in
        ql_max_pool2d_bwd(x.gradBuffer().data, g.data, argmax, Int64(planes), Int32(h), Int32(w), Int32(oh), Int32(ow))
    }
}

public func avgPool2d(_ x: Tensor, kernel: Int, stride: Int? = nil, padding: Int = 0, countIncludePad: Bool = true) -> Tensor {
    let s = stride ?? kernel
    require(x.rank == 4 && 2 * padding <= kernel, "avg_pool2d: input \(x.shape), kernel \(kernel), padding \(padding)")
    let (h, w) = (x.shape[2], x.shape[3])
    let (oh, ow) = (poolOut(h, kernel, s, padding), poolOut(w, kernel, s, padding))
    require(oh > 0 && ow > 0, "avg_pool2d: input \(x.shape) smaller than kernel \(kernel)")
    let planes = Int64(x.shape[0] * x.shape[1])
    let out = Tensor(zeros: [x.shape[0], x.shape[1], oh, ow])
    let k = Int32(kernel), st = Int32(s), p = Int32(padding), inc: Int32 = countIncludePad ? 1 : 0
    ql_avg_pool2d_fwd(out.data, x.data, planes, Int32(h), Int32(w), k, k, st, st, p, p, inc)
    traceOp(.averagePool(kernel: kernel, stride: s, padding: padding, countIncludePad: countIncludePad), [x], out)
    return record(out, "avg_pool2d", [x]) { g in
        ql_avg_pool2d_bwd(x.gradBuffer().data, g.data, planes, Int32(h), Int32(w), k, k, st, st, p, p, inc)
    }
}

/// Mean over H and W: [N, C, H, W] -> [N, C].
public func globalAvgPool2d(_ x: Tensor) -> Tensor {
    require(x.rank == 4, "global_avg_pool2d: input \(x.shape)")
    let out = untraced { x.mean(dims: [2, 3]) }
    traceOp(.globalAveragePool, [x], out)
    return out
}

/// Nearest-neighbour upsampling by an integer factor.
public func upsampleNearest(_ x: Tensor, scale: Int) -> Tensor {
    require(x.rank == 4 && scale >= 1, "upsample_nearest: input \(x.shape), scale \(scale)")
    let (h, w) = (x.shape[2], x.shape[3]), planes = Int64(x.shape[0] * x.shape[1])
    let out = Tensor(zeros: [x.shape[0], x.shape[1], h * scale, w * scale])
    ql_upsample_nearest_fwd(out.data, x.data, planes, Int32(h), Int32(w), Int32(scale), Int32(scale))
    traceOp(.upsampleNearest(scale: scale), [x], out)
    return record(out, "upsample_nearest", [x]) { g in
        ql_upsample_nearest_bwd(x.gradBuffer().data, g.data, planes, Int32(h), Int32(w), Int32(scale), Int32(scale))
    }
}

// MARK: - Matrix products

/// y = x W^T + b over the last dim: x [..., in], weight [out, in], bias [out].
public func linear(_ x: Tensor, weight: Tensor, bias: Tensor? = nil) -> Tensor {
    require(weight.rank == 2 && x.shape.last == weight.shape[1], "linear: input \(x.shape), weight \(weight.shape)")
    if let b = bias { require(b.shape == [weight.shape[0]], "linear: bias \(b.shape) for \(weight.shape[0]) outputs") }
    FLOPCounter.active?.add(x.count / max(weight.shape[1], 1) * weight.count)
    if x.device == .cuda { return CUDAOps.linear(x, weight, bias) }
    let (outF, inF) = (weight.shape[0], weight.shape[1]), rows = x.count / max(inF, 1)
    let out = Tensor(zeros: Array(x.shape.dropLast()) + [outF])
    if let b = bias {
        require(b.shape == [outF], "linear: bias \(b.shape) for \(outF) outputs")
        for r in 0..<rows { (out.data + r * outF).update(from: b.data, count: outF) }
    }
    check(ql_sgemm(0, 1, Int32(rows), Int32(outF), Int32(inF), 1, x.data, Int32(inF), weight.data, Int32(inF),
                   bias == nil ? 0 : 1, out.data, Int32(outF)), "linear")
    let parents = bias.map { [x, weight, $0] } ?? [x, weight]
    traceOp(.linear, [x, weight, bias], out)
    return record(out, "linear", parents) { g in
        if x.requiresGrad {
            check(ql_sgemm(0, 0, Int32(rows), Int32(inF), Int32(outF), 1, g.data, Int32(outF), weight.data, Int32(inF),
                           1, x.gradBuffer().data, Int32(inF)), "linear_bwd_x")
        }
        if weight.requiresGrad {
            check(ql_sgemm(1, 0, Int32(outF), Int32(inF), Int32(rows), 1, g.data, Int32(outF), x.data, Int32(inF),
                           1, weight.gradBuffer().data, Int32(inF)), "linear_bwd_w")
        }
        if let b = bias, b.requiresGrad {
            let gb = b.gradBuffer()
            for r in 0..<rows { ql_axpy(gb.data, 1, g.data + r * outF, Int64(outF)) }
        }
    }
}

/// Batched matrix product over the last two dims: a [..., M, K] x b [..., K, N]. The batch
/// dims must be equal, or b may be 2-D (shared by every batch entry).
public func matmul(_ a: Tensor, _ b: Tensor) -> Tensor {
    require(a.rank >= 2 && b.rank >= 2 && a.shape[a.rank - 1] == b.shape[b.rank - 2],
                 "matmul: \(a.shape) x \(b.shape)")
    let (m, k, n) = (a.shape[a.rank - 2], a.shape[a.rank - 1], b.shape[b.rank - 1])
    let batchA = Array(a.shape.dropLast(2)), batchB = Array(b.shape.dropLast(2))
    require(batchB.isEmpty || batchA == batchB, "matmul: batch dims \(batchA) vs \(batchB)")
    let batch = batchA.reduce(1, *), sharedB = batchB.isEmpty
    FLOPCounter.active?.add(batch * m * k * n)
    if a.device == .cuda { return CUDAOps.matmul(a, b, batch: batch, m: m, k: k, n: n, sharedB: sharedB, outShape: batchA + [m, n]) }
    let out = Tensor(zeros: batchA + [m, n])
    let (I, J, K) = (Int32(m), Int32(n), Int32(k))
    for i in 0..<batch {
        check(ql_sgemm(0, 0, I, J, K, 1, a.data + i * m * k, K, b.data + (sharedB ? 0 : i * k * n), J, 0,
                       out.data + i * m * n, J), "matmul")
    }
    traceOp(.matmul, [a, b], out)
    return record(out, "matmul", [a, b]) { g in
        for i in 0..<batch {
            let gi = g.data + i * m * n, bi = b.data + (sharedB ? 0 : i * k * n)
            if a.requiresGrad { // dA = G B^T
                check(ql_sgemm(0, 1, I, K, J, 1, gi, J, bi, J, 1, a.gradBuffer().data + i * m * k, K), "matmul_bwd_a")
            }
            if b.requiresGrad { // dB = A^T G
                check(ql_sgemm(1, 0, K, J, I, 1, a.data + i * m * k, K, gi, J, 1,
                               b.gradBuffer().data + (sharedB ? 0 : i * k * n), J), "matmul_bwd_b")
            }
        }
    }
}

// MARK: - Losses

public enum Reduction: Sendable { case none, sum, mean }

private func reduce(_ t: Tensor, _ r: Reduction) -> Tensor {
    switch r {
    case .none: return t
    case .sum: return t.sum()
    case .mean: return t.mean()
    }
}

/// Cross-entropy of logits [N, C] against class indices, averaged over N (PyTorch default).
public func crossEntropy(logits: Tensor, targets: [Int], reduction: Reduction = .mean) -> Tensor {
    require(logits.rank == 2 && logits.shape[0] == targets.count, "cross_entropy: logits \(logits.shape), \(targets.count) targets")
    let classes = logits.shape[1]
    require(targets.allSatisfy { $0 >= 0 && $0 < classes }, "cross_entropy: a target is outside [0, \(classes))")
    let logp = logits.logSoftmax()
    // nll: out[i] = -logp[i, t_i]
    let out = Tensor(zeros: [targets.count])
    for (i, t) in targets.enumerated() { out.data[i] = -logp.data[i * classes + t] }
    let nll = record(out, "nll", [logp]) { g in
        let gl = logp.gradBuffer()
        for (i, t) in targets.enumerated() { gl.data[i * classes + t] -= g.data[i] }
    }
    return reduce(nll, reduction)
}

/// Binary cross-entropy on logits, numerically stable; targets may be soft (in [0, 1]).
public func binaryCrossEntropyWithLogits(_ logits: Tensor, targets: Tensor, reduction: Reduction = .mean) -> Tensor {
    require(logits.shape == targets.shape, "bce_with_logits: logits \(logits.shape), targets \(targets.shape)")
    let out = Tensor(zeros: logits.shape)
    ql_bce_logits_fwd(out.data, logits.data, targets.data, Int64(logits.count))
    let loss = record(out, "bce_with_logits", [logits]) { g in
        ql_bce_logits_bwd(logits.gradBuffer().data, g.data, logits.data, targets.data, Int64(logits.count))
    }
    return reduce(loss, reduction)
}

/// KL(target || exp(logInput)) = sum target * (log target - logInput), PyTorch's `kl_div`
/// with `log_target=False`. Terms with target == 0 contribute 0. `.mean` averages over all
/// elements, as PyTorch's 'mean'; use `.sum` and divide yourself for 'batchmean'.
public func klDivergence(logInput: Tensor, target: Tensor, reduction: Reduction = .sum) -> Tensor {
    require(logInput.shape == target.shape, "kl_div: input \(logInput.shape), target \(target.shape)")
    let logTarget = maximum(target, Tensor.scalar(Float.leastNormalMagnitude)).log()
    return reduce(target * (logTarget - logInput), reduction)
}

/// Mean (or sum) absolute difference.
public func l1Loss(_ a: Tensor, _ b: Tensor, reduction: Reduction = .mean) -> Tensor {
    require(a.shape == b.shape, "l1_loss: \(a.shape) vs \(b.shape)")
    return reduce((a - b).abs(), reduction)
}
