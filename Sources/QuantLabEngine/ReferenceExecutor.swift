import Foundation
import QuantLabCore
import QuantLabQuant

/// Runs a graph op by op in FP32 with the library's own ops (fake quantization for QDQ
/// nodes): the specification every faster executor is checked against. On the graph traced
/// from a model it computes exactly what the model computed, bit for bit, because it calls
/// the same kernels in the same order.
public struct ReferenceExecutor {
    public let graph: Graph

    public init(_ graph: Graph) { self.graph = graph }

    /// Inputs in the order of `graph.inputs`, each of the traced shape; returns the outputs in
    /// the order of `graph.outputs`.
    public func run(_ inputs: [Tensor]) throws -> [Tensor] {
        let values = try runKeepingValues(inputs)
        return graph.outputs.map { values[$0]! }
    }

    /// Every value computed, by value id (for tests that compare layer by layer).
    func runKeepingValues(_ inputs: [Tensor]) throws -> [Int: Tensor] {
        var env = try graph.bindInputs(inputs)
        try withNoGrad {
            for node in graph.nodes {
                let args = try node.inputs.map { id -> Tensor? in
                    guard let id else { return nil }
                    guard let t = env[id] else { throw EngineError("node \(node.name): input \(graph.values[id].name) is not computed before it") }
                    return t
                }
                env[node.output] = try Self.apply(node, args)
            }
        }
        return env
    }

    static func apply(_ node: GraphNode, _ a: [Tensor?]) throws -> Tensor {
        func arg(_ i: Int) throws -> Tensor {
            guard i < a.count, let t = a[i] else { throw EngineError("node \(node.name) (\(node.op.name)): input \(i) is missing") }
            return t
        }
        func optional(_ i: Int) -> Tensor? { i < a.count ? a[i] : nil }
        switch node.op {
        case .conv(let o): return conv2d(try arg(0), weight: try arg(1), bias: optional(2), options: o)
        case .convTranspose(let o, let p): return convTranspose2d(try arg(0), weight: try arg(1), bias: optional(2), options: o, outputPadding: (p, p))
        case .linear: return linear(try arg(0), weight: try arg(1), bias: optional(2))
        case .matmul: return matmul(try arg(0), try arg(1))
        case .add: return try arg(0) + arg(1)
        case .sub: return try arg(0) - arg(1)
        case .mul: return try arg(0) * arg(1)
        case .div: return try arg(0) / arg(1)
        case .affine(let s, let b): return try arg(0).scaled(by: s, plus: b)
        case .relu: return try arg(0).relu()
        case .sigmoid: return try arg(0).sigmoid()
        case .silu: return try arg(0).silu()
        case .gelu: return try arg(0).gelu()
        case .averagePool(let k, let s, let p, let inc): return avgPool2d(try arg(0), kernel: k, stride: s, padding: p, countIncludePad: inc)
        case .gatherTopK(let k): return gatherTopK(scores: try arg(0), try arg(1), k: k)
        case .maxPool(let k, let s, let p): return maxPool2d(try arg(0), kernel: k, stride: s, padding: p)
        case .globalAveragePool: return globalAvgPool2d(try arg(0))
        case .upsampleNearest(let s): return upsampleNearest(try arg(0), scale: s)
        case .concat(let axis): return concat(try a.indices.map(arg), dim: axis)
        case .reshape(let shape): return try arg(0).reshaped(shape)
        case .transpose(let order): return try arg(0).permuted(order)
        case .slice(let axis, let start, let end): return try arg(0).slice(dim: axis, start: start, end: end)
        case .softmax: return try arg(0).softmax()
        case .layerNorm(let eps): return layerNorm(try arg(0), weight: optional(1), bias: optional(2), eps: eps)
        case .quantizeDequantize(let amax, let axis, let bits): return fakeQuantize(try arg(0), amax: amax, spec: QuantSpec(bits: bits, axis: axis))
        case .unsupported(let what): throw EngineError("node \(node.name): op \(what) is not supported")
        }
    }
}
