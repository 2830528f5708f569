// Tracing: while a tracer is active, every op reports what it computed (its kind with
// attributes, its input tensors and its output), so that a forward pass of any model can be
// recorded as a graph of deploy-time ops. The INT8 engine builds its graph this way
// (QuantLabEngine); the ops themselves know nothing about graphs.

/// What an op computed, with the attributes needed to compute it again. Inputs are passed
/// beside it in order (nil for an absent optional input, e.g. a conv without bias).
public enum OpKind: Equatable, Sendable {
    /// x [N, C, H, W], weight [K, C/groups, KH, KW], bias [K]?
    case conv(Conv2dOptions)
    /// x [N, C, H, W], weight [C, K/groups, KH, KW], bias [K]?
    case convTranspose(Conv2dOptions, outputPadding: Int)
    /// x [..., in], weight [out, in], bias [out]? (ONNX Gemm with transB)
    case linear
    case matmul
    case add, sub, mul, div
    /// x * scale + shift with scalars.
    case affine(scale: Float, shift: Float)
    case relu, sigmoid, silu
    /// x * Phi(x), the exact (erf) form.
    case gelu
    case maxPool(kernel: Int, stride: Int, padding: Int)
    /// Square window; `countIncludePad` as ONNX's count_include_pad.
    case averagePool(kernel: Int, stride: Int, padding: Int, countIncludePad: Bool)
    case globalAveragePool
    case upsampleNearest(scale: Int)
    case concat(axis: Int)
    case reshape([Int])
    case transpose([Int])
    case slice(axis: Int, start: Int, end: Int)
    /// Over the last dimension.
    case softmax
    /// Over the last dimension; weight and bias inputs optional.
    case layerNorm(eps: Float)
    /// Inputs scores [B, T, C] and x [B, T, D]: the rows of x at the k tokens whose largest
    /// score over C is highest, in descending order (ties: lower index first, as ONNX TopK),
    /// [B, k, D]. RT-DETR's query selection (ONNX ReduceMax, TopK, GatherElements).
    case gatherTopK(k: Int)
    /// Symmetric quantize then dequantize (ONNX QuantizeLinear + DequantizeLinear, zero point 0),
    /// TensorRT's convention: scale = amax / qmax with qmax = 2^(bits-1) - 1,
    /// q = clamp(round_half_to_even(x / scale), -qmax, qmax), y = q * scale; one amax, or one
    /// per index along `axis`. amax is kept (not scale) so that the graph recomputes exactly
    /// what the fake quantizer computed.
    case quantizeDequantize(amax: [Float], axis: Int?, bits: Int)
    /// An op the engine's vocabulary does not have (its name); a graph containing one is refused.
    case unsupported(String)

    /// Short name for plans and errors.
    public var name: String {
        switch self {
        case .conv: return "Conv"
        case .convTranspose: return "ConvTranspose"
        case .linear: return "Gemm"
        case .matmul: return "MatMul"
        case .add: return "Add"
        case .sub: return "Sub"
        case .mul: return "Mul"
        case .div: return "Div"
        case .affine: return "Affine"
        case .relu: return "Relu"
        case .sigmoid: return "Sigmoid"
        case .silu: return "SiLU"
        case .gelu: return "Gelu"
        case .averagePool: return "AveragePool"
        case .gatherTopK: return "GatherTopK"
        case .maxPool: return "MaxPool"
        case .globalAveragePool: return "GlobalAveragePool"
        case .upsampleNearest: return "Resize"
        case .concat: return "Concat"
        case .reshape: return "Reshape"
        case .transpose: return "Transpose"
        case .slice: return "Slice"
        case .softmax: return "Softmax"
        case .layerNorm: return "LayerNormalization"
        case .quantizeDequantize: return "QDQ"
        case .unsupported(let n): return "unsupported(\(n))"
        }
    }
}

/// Receives the ops of a traced forward pass, in execution order.
public protocol OpTracer: AnyObject, Sendable {
    /// `name` is set where the caller knows one (a quantizer's layer, say).
    func record(_ op: OpKind, inputs: [Tensor?], output: Tensor, name: String?)
}

public enum Tracing {
    /// The tracer of the current task, if any (`Tracing.$active.withValue(tracer) { ... }`).
    @TaskLocal public static var active: (any OpTracer)?
}

/// Reports an op to the active tracer, if there is one (one task-local read otherwise).
@inline(__always)
public func traceOp(_ op: @autoclosure () -> OpKind, _ inputs: @autoclosure () -> [Tensor?], _ output: Tensor, name: String? = nil) {
    if let tracer = Tracing.active { tracer.record(op(), inputs: inputs(), output: output, name: name) }
}

/// Runs `body` with tracing off: a composite op (global average pooling as a mean, say)
/// reports itself once instead of as the ops it is made of.
public func untraced<T>(_ body: () throws -> T) rethrows -> T {
    guard Tracing.active != nil else { return try body() }
    return try Tracing.$active.withValue(nil) { try body() }
}
