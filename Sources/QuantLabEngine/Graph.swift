import Foundation
import QuantLabCore
import QuantLabModels

// The INT8 engine's graph of deploy-time ops (issue #12). This file holds the IR and the way a
// graph is made: by tracing a forward pass of any deploy-form Module, with or without the
// quantization simulator's Q/DQ installed (then the graph carries its quantizers, with their
// amax and names). Passes, the integer executor and ONNX come on top of this.

/// Element type of a graph value.
public enum DType: String, Codable, Sendable {
    case f32, s8, u8, s32
}

/// A tensor of the graph: an input, a constant (weights, biases) or a node's output.
public struct GraphValue: Sendable {
    public var name: String
    public var shape: [Int]
    public var dtype: DType
}

/// One op. `inputs` are value ids in the op's order (nil for an absent optional input, e.g.
/// a conv without bias); `output` is the value it writes.
public struct GraphNode: Sendable {
    public var name: String
    public var op: OpKind
    public var inputs: [Int?]
    public var output: Int
}

/// An error building or running a graph; the message names the node or value.
public struct EngineError: Error, CustomStringConvertible, Equatable {
    public let description: String
    public init(_ message: String) { description = message }
}

/// A graph of deploy-time ops in execution order (topological by construction).
public final class Graph {
    public internal(set) var values: [GraphValue] = []
    /// Initializers by value id: weights, biases, anything the model holds rather than computes.
    public internal(set) var constants: [Int: Tensor] = [:]
    public internal(set) var nodes: [GraphNode] = []
    public internal(set) var inputs: [Int] = []
    public internal(set) var outputs: [Int] = []

    init() {}

    /// Traces `forward` on `example` and returns the ops it ran as a graph. The model must be
    /// in eval mode; deploy form (`convertToDeployForm()`) is what an engine runs, and a BN
    /// left unfolded is refused. Quantizers installed by a `QuantizationSimulator` appear as
    /// QDQ nodes named after their layer ("neck.reduce_layer1.conv.input"). Shapes, the batch
    /// size included, are fixed at the traced ones, as in a TensorRT engine built for one
    /// input shape.
    public static func trace(_ model: Module, example: Tensor, _ forward: (Tensor) -> [Tensor]) throws -> Graph {
        guard !model.isTraining else { throw EngineError("trace the model in eval mode (model.eval()): training-mode BN and dropout are not deploy-time ops") }
        var names: [ObjectIdentifier: String] = [:]
        for (name, t) in model.stateDict() { names[ObjectIdentifier(t)] = name }
        let builder = GraphBuilder(parameterNames: names)
        builder.addInput(example, name: "images")
        let outs = withNoGrad { Tracing.$active.withValue(builder) { forward(example) } }
        if let e = builder.error { throw e }
        let graph = builder.graph
        for (i, t) in outs.enumerated() {
            guard let id = builder.id(of: t), graph.nodes.contains(where: { $0.output == id }) else {
                throw EngineError("output \(i) of the forward pass was not computed by a traced op")
            }
            graph.outputs.append(id)
            graph.values[id].name = outs.count == 1 ? "output" : "output\(i)"
        }
        return graph
    }

    /// A detector's graph: images [B, 3, S, S] -> class logits [B, A, C], distances [B, A, 4].
    public static func trace(_ model: YOLOv6, batch: Int = 1) throws -> Graph {
        let s = model.config.inputSize
        return try trace(model, example: Tensor(zeros: [batch, 3, s, s])) { x in
            let (logits, distances) = model(x)
            return [logits, distances]
        }
    }

    /// A classifier's graph: images [B, 3, S, S] -> logits [B, classes].
    public static func trace(_ model: RepClassifier, batch: Int = 1) throws -> Graph {
        let s = model.config.inputSize
        return try trace(model, example: Tensor(zeros: [batch, 3, s, s])) { [model($0)] }
    }

    /// An RT-DETR's graph: images [B, 3, S, S] -> logits [B, K, C], boxes [B, K, 4]; the
    /// query selection is one GatherTopK op, computed on each run's scores.
    public static func trace(_ model: RTDETR, batch: Int = 1) throws -> Graph {
        let s = model.config.inputSize
        return try trace(model, example: Tensor(zeros: [batch, 3, s, s])) { x in
            let (logits, boxes) = model(x)
            return [logits, boxes]
        }
    }

    /// The graph of a saved model, whatever its kind.
    public static func trace(_ saved: SavedModel, batch: Int = 1) throws -> Graph {
        switch saved {
        case .detector(let m): return try trace(m, batch: batch)
        case .classifier(let m): return try trace(m, batch: batch)
        case .rtdetr(let m): return try trace(m, batch: batch)
        }
    }

    /// The same graph with every quantize-dequantize node taken out (its readers read its
    /// input instead): the FP32 graph a Q/DQ graph was traced from, without re-tracing.
    public func withoutQuantizers() -> Graph {
        let g = copy()
        g.nodes = []
        var alias: [Int: Int] = [:]
        func resolve(_ v: Int) -> Int { var v = v; while let a = alias[v] { v = a }; return v }
        for n in nodes {
            if case .quantizeDequantize = n.op, let source = n.inputs.first ?? nil {
                alias[n.output] = source
                continue
            }
            var m = n
            m.inputs = n.inputs.map { $0.map(resolve) }
            g.nodes.append(m)
        }
        g.outputs = outputs.map(resolve)
        return g
    }

    /// A graph with the same values, constants, inputs, nodes and outputs, for a pass to edit.
    func copy() -> Graph {
        let g = Graph()
        (g.values, g.constants, g.inputs, g.nodes, g.outputs) = (values, constants, inputs, nodes, outputs)
        return g
    }

    /// The nodes that read each value, by node index.
    public var consumers: [Int: [Int]] {
        var c: [Int: [Int]] = [:]
        for (i, n) in nodes.enumerated() { for case let v? in n.inputs { c[v, default: []].append(i) } }
        return c
    }

    /// The amax of a per-tensor INT8 quantizer of an activation (not of a constant), or nil when
    /// `node` is not one: the quantizers an engine fuses, absorbs or turns into Reformat steps.
    public func activationQuantizerAmax(_ node: GraphNode) -> Float? {
        guard case .quantizeDequantize(let amax, nil, 8) = node.op, amax.count == 1, let src = node.inputs.first ?? nil,
              constants[src] == nil else { return nil }
        return amax[0]
    }

    /// Whether `node` commutes with a per-tensor quantizer, so that it can run on int8 codes of
    /// one scale (TensorRT's rules 1 and 5): max pooling, and concat along channels, of 4-D
    /// tensors.
    public func commutesWithQuantization(_ node: GraphNode) -> Bool {
        guard values[node.output].shape.count == 4 else { return false }
        switch node.op {
        case .maxPool: return true
        case .concat(let axis): return axis == 1
        default: return false
        }
    }

    /// The constants and the given inputs by value id, after checking the inputs' count and
    /// shapes (the state every executor starts from).
    func bindInputs(_ inputs: [Tensor]) throws -> [Int: Tensor] {
        guard inputs.count == self.inputs.count else { throw EngineError("the graph takes \(self.inputs.count) input(s), got \(inputs.count)") }
        var bound = constants
        for (id, t) in zip(self.inputs, inputs) {
            guard t.shape == values[id].shape else { throw EngineError("input \(values[id].name): expected shape \(values[id].shape), got \(t.shape)") }
            bound[id] = t
        }
        return bound
    }

    /// Number of nodes of each op kind ("Conv": 58, ...).
    public var opCounts: [String: Int] { nodes.reduce(into: [:]) { $0[$1.op.name, default: 0] += 1 } }

    /// The node that writes value `id`, if any (nil for inputs and constants).
    public func producer(of id: Int) -> GraphNode? { nodes.first { $0.output == id } }

    /// One line per node: index, name, op with its attributes, input and output shapes and
    /// types; then the count of each op kind.
    public func explain() -> String {
        func shape(_ id: Int?) -> String {
            guard let id else { return "—" }
            let v = values[id]
            return "\(constants[id] != nil ? "const " : "")\(v.shape.map(String.init).joined(separator: "x")) \(v.dtype.rawValue)"
        }
        let weights = constants.values.reduce(0) { $0 + $1.count }
        var lines = ["graph: \(nodes.count) nodes, \(inputs.count) input\(inputs.count == 1 ? "" : "s") (\(inputs.map { shape($0) }.joined(separator: ", "))), \(outputs.count) output\(outputs.count == 1 ? "" : "s"), \(constants.count) constants (\(weights) values)"]
        let width = min(nodes.map(\.name.count).max() ?? 0, 48)
        for (i, n) in nodes.enumerated() {
            let padded = n.name.count < width ? n.name + String(repeating: " ", count: width - n.name.count) : n.name
            lines.append(String(format: "%4d  ", i) + padded + "  " + attributes(n.op) + "  "
                         + n.inputs.map { shape($0) }.joined(separator: ", ") + " -> " + shape(n.output))
        }
        lines.append("ops: " + opCounts.sorted { $0.key < $1.key }.map { "\($0.key) \($0.value)" }.joined(separator: ", "))
        return lines.joined(separator: "\n")
    }

    private func attributes(_ op: OpKind) -> String {
        switch op {
        case .conv(let o), .convTranspose(let o, _):
            return "\(op.name)(s\(o.stride.0) p\(o.padding.0)\(o.dilation.0 > 1 ? " d\(o.dilation.0)" : "")\(o.groups > 1 ? " g\(o.groups)" : ""))"
        case .maxPool(let k, let s, let p): return "MaxPool(k\(k) s\(s) p\(p))"
        case .concat(let a): return "Concat(axis \(a))"
        case .upsampleNearest(let s): return "Resize(nearest x\(s))"
        case .reshape(let d): return "Reshape(\(d))"
        case .transpose(let p): return "Transpose(\(p))"
        case .slice(let a, let s, let e): return "Slice(axis \(a) [\(s), \(e)))"
        case .affine(let a, let b): return "Affine(x\(a) +\(b))"
        case .quantizeDequantize(let amax, let axis, let bits):
            return axis.map { "QDQ(int\(bits) per-channel axis \($0), \(amax.count) scales)" } ?? String(format: "QDQ(int%d scale %.6g)", bits, amax[0] / Float((1 << (bits - 1)) - 1))
        default: return op.name
        }
    }
}

/// The tracer: turns each reported op into a node; a tensor it has not seen is a graph input
/// (the example), a named constant (a parameter or buffer of the model) or an anonymous one.
final class GraphBuilder: OpTracer, @unchecked Sendable {
    let graph = Graph()
    private var ids: [ObjectIdentifier: Int] = [:]
    /// Every tensor seen, kept alive so that no object identifier is reused while tracing.
    private var seen: [Tensor] = []
    private let parameterNames: [ObjectIdentifier: String]
    private var counters: [String: Int] = [:]
    private var usedNames: Set<String> = []
    private(set) var error: EngineError?

    init(parameterNames: [ObjectIdentifier: String]) { self.parameterNames = parameterNames }

    func id(of t: Tensor) -> Int? { ids[ObjectIdentifier(t)] }

    private func addValue(_ t: Tensor, name: String) -> Int {
        graph.values.append(GraphValue(name: name, shape: t.shape, dtype: .f32))
        let id = graph.values.count - 1
        ids[ObjectIdentifier(t)] = id
        seen.append(t)
        return id
    }

    func addInput(_ t: Tensor, name: String) {
        graph.inputs.append(addValue(t, name: name))
    }

    private func value(for t: Tensor) -> Int {
        if let id = ids[ObjectIdentifier(t)] { return id }
        let name = parameterNames[ObjectIdentifier(t)] ?? unique("constant")
        let id = addValue(t, name: name)
        graph.constants[id] = t.detached()
        return id
    }

    private func unique(_ base: String) -> String {
        var name = base
        while usedNames.contains(name) {
            counters[base, default: 0] += 1
            name = "\(base)_\(counters[base]!)"
        }
        usedNames.insert(name)
        return name
    }

    /// A weighted op is named after its layer: the weight's parameter name without ".weight",
    /// looking through the weight's quantizer if it has one.
    private func layerName(weight id: Int?) -> String? {
        guard var id else { return nil }
        if graph.constants[id] == nil, let q = graph.producer(of: id), case .quantizeDequantize = q.op, let src = q.inputs.first ?? nil { id = src }
        guard graph.constants[id] != nil else { return nil }
        let n = graph.values[id].name
        return n.hasSuffix(".weight") ? String(n.dropLast(".weight".count)) : nil
    }

    func record(_ op: OpKind, inputs: [Tensor?], output: Tensor, name: String?) {
        if case .unsupported(let what) = op, error == nil {
            error = EngineError("op \(what) is not a deploy-time op the engine supports (after node \(graph.nodes.last?.name ?? "none"))")
        }
        let ins = inputs.map { $0.map(value(for:)) }
        var nodeName = name
        switch op {
        case .conv, .convTranspose, .linear: nodeName = nodeName ?? layerName(weight: ins.count > 1 ? ins[1] : nil)
        default: break
        }
        let finalName = unique(nodeName ?? op.name)
        let out = addValue(output, name: finalName)
        graph.nodes.append(GraphNode(name: finalName, op: op, inputs: ins, output: out))
    }
}
