import Foundation
import QuantLabCore
import SwiftProtobuf

// ONNX import (issue #12): an ONNX model -- ours, or a symmetric Q/DQ model from another
// tool (pytorch-quantization, TensorRT's explicit-quantization exports) -- as an engine graph,
// so that ReferenceExecutor and Int8Plan run it. The inverse of ONNXExport's op mapping, plus
// Identity, Flatten and Constant nodes; x * Sigmoid(x) becomes one SiLU again. Shapes must be static (as in a TensorRT engine built
// for one input shape); each node's output shape is found by running the op once on zeros.
// What the engine's vocabulary cannot say is refused with an error naming the node: asymmetric
// quantization (a nonzero zero point, e.g. onnxruntime's u8 activations), pads that differ
// between the two sides, a Resize that is not an integer nearest upsampling, and the like.

public enum ONNXImport {
    /// Opsets whose semantics the mapping follows (QuantizeLinear with axis needs 13).
    public static let opsets: ClosedRange<Int64> = 13...21

    public static func graph(from url: URL) throws -> Graph {
        let data: Data
        do { data = try Data(contentsOf: url) } catch { throw EngineError("\(url.path): cannot read (\(failureReason(error)))") }
        do { return try graph(from: data) } catch let e as EngineError { throw EngineError("\(url.path): \(e.description)") }
    }

    public static func graph(from data: Data) throws -> Graph {
        let model: Onnx_ModelProto
        do { model = try Onnx_ModelProto(serializedBytes: data) } catch { throw EngineError("not an ONNX model (\(error))") }
        guard model.hasGraph else { throw EngineError("not an ONNX model: no graph") }
        let opset = model.opsetImport.first { $0.domain.isEmpty || $0.domain == "ai.onnx" }?.version ?? 0
        guard opsets.contains(opset) else { throw EngineError("ONNX opset \(opset) is not supported (supported: \(opsets.lowerBound)-\(opsets.upperBound))") }
        var importer = Importer()
        try importer.run(model.graph)
        return importer.graph
    }

    /// A constant: float tensors become weights, integer ones (shapes, axes) are read as Ints.
    enum Const {
        case float(Tensor)
        case ints([Int], shape: [Int])
        case int8(raw: [Int8], shape: [Int])
        case uint8(raw: [UInt8], shape: [Int])
    }

    struct Importer {
        let graph = Graph()
        var ids: [String: Int] = [:]
        var consts: [String: Const] = [:]
        /// Values computed on zeros, for shape inference (and the constants' real values).
        var probe: [Int: Tensor] = [:]
        var pendingQuantize: [String: (input: String, node: Onnx_NodeProto)] = [:]
        /// Sigmoids held back: x * Sigmoid(x) is one SiLU (how ONNXExport writes SiLU); a
        /// sigmoid read by anything else is added as itself when first read.
        var pendingSigmoid: [String: (input: String, label: String)] = [:]

        /// Largest tensor accepted (initializer, input or computed): 2^26 floats, 256 MB.
        static let maxElements = 1 << 26

        static func tensorConst(_ t: Onnx_TensorProto) throws -> Const {
            let shape = try t.dims.map { d -> Int in
                guard d >= 0, d <= Int64(maxElements) else { throw EngineError("initializer \(t.name): dimension \(d) out of range") }
                return Int(d)
            }
            let count = shape.reduce(1) { a, b in a.multipliedReportingOverflow(by: b).overflow ? Int.max : a * b }
            guard count <= maxElements else { throw EngineError("initializer \(t.name): \(shape) is too large") }
            guard !t.hasDataLocation || t.dataLocation == .default else { throw EngineError("initializer \(t.name): external data is not supported") }
            func raw<T>(_ type: T.Type) throws -> [T] {
                guard t.rawData.count == count * MemoryLayout<T>.size else {
                    throw EngineError("initializer \(t.name): \(t.rawData.count) bytes of data for shape \(shape)")
                }
                return t.rawData.withUnsafeBytes { Array($0.bindMemory(to: T.self)) }
            }
            // raw_data when present, else the typed field; either way exactly one value per element
            func values<T>(_ type: T.Type, _ typed: @autoclosure () -> [T]) throws -> [T] {
                let v = t.hasRawData ? try raw(type) : typed()
                guard v.count == count else { throw EngineError("initializer \(t.name): \(v.count) values for shape \(shape)") }
                return v
            }
            switch Onnx_TensorProto.DataType(rawValue: Int(t.dataType)) {
            case .float?: return .float(try Tensor(shape: shape, values: try values(Float.self, t.floatData)))
            case .int64?: return .ints(try values(Int64.self, t.int64Data).map { Int(clamping: $0) }, shape: shape)
            case .int32?: return .ints(try values(Int32.self, t.int32Data).map(Int.init), shape: shape)
            case .int8?: return .int8(raw: try values(Int8.self, t.int32Data.map { Int8(truncatingIfNeeded: $0) }), shape: shape)
            case .uint8?: return .uint8(raw: try values(UInt8.self, t.int32Data.map { UInt8(truncatingIfNeeded: $0) }), shape: shape)
            default:
                throw EngineError("initializer \(t.name): data type \(t.dataType) is not supported (float, int64, int32, int8, uint8)")
            }
        }

        mutating func value(_ name: String, shape: [Int]) -> Int {
            graph.values.append(GraphValue(name: name, shape: shape, dtype: .f32))
            let id = graph.values.count - 1
            ids[name] = id
            return id
        }

        /// The value id of a tensor read by a node: a computed value, or a float constant made
        /// into a graph constant on first use.
        mutating func use(_ name: String, by node: String) throws -> Int {
            if let id = ids[name] { return id }
            if let p = pendingSigmoid[name] {
                try add(p.label, .sigmoid, [try use(p.input, by: p.label)], output: name)
                return ids[name]!
            }
            guard let c = consts[name] else { throw EngineError("node \(node) reads \(name), which no earlier node, input or initializer defines") }
            guard case .float(let t) = c else { throw EngineError("node \(node) reads the integer constant \(name) as a tensor") }
            guard t.shape.count <= 8, t.shape.allSatisfy({ $0 > 0 }) else { throw EngineError("node \(node) reads \(name) of shape \(t.shape): rank above 8 or an empty dimension") }
            let id = value(name, shape: t.shape)
            graph.constants[id] = t
            probe[id] = t
            return id
        }

        func ints(_ name: String, for node: String) throws -> [Int] {
            guard case .ints(let v, _)? = consts[name] else { throw EngineError("node \(node): input \(name) must be a constant integer tensor") }
            return v
        }

        func floats(_ name: String, for node: String) throws -> [Float] {
            guard case .float(let t)? = consts[name] else { throw EngineError("node \(node): input \(name) must be a constant float tensor") }
            return t.values
        }

        static func attribute(_ n: Onnx_NodeProto, _ name: String) -> Onnx_AttributeProto? { n.attribute.first { $0.name == name } }
        static func int(_ n: Onnx_NodeProto, _ name: String, _ fallback: Int) -> Int { attribute(n, name).map { Int(clamping: $0.i) } ?? fallback }
        static func ints(_ n: Onnx_NodeProto, _ name: String) -> [Int]? { attribute(n, name).map { $0.ints.map { Int(clamping: $0) } } }
        static func string(_ n: Onnx_NodeProto, _ name: String, _ fallback: String) -> String {
            attribute(n, name).map { String(decoding: $0.s, as: UTF8.self) } ?? fallback
        }

        /// Adds a node, computing its output's shape by running the op on the probe values.
        mutating func add(_ name: String, _ op: OpKind, _ inputs: [Int?], output: String) throws {
            let node = GraphNode(name: name, op: op, inputs: inputs, output: -1)
            try Self.checkShapes(node, inputs.map { $0.flatMap { probe[$0]?.shape } })
            try checkCost(node, inputs)
            let args = inputs.map { $0.flatMap { probe[$0] } }
            let result: Tensor
            do { result = try withNoGrad { try ReferenceExecutor.apply(node, args) } } catch let e as EngineError { throw e }
            let id = value(output, shape: result.shape)
            probe[id] = result
            graph.nodes.append(GraphNode(name: name, op: op, inputs: inputs, output: id))
        }

        /// The preconditions of each op on its inputs' shapes (the library's ops trap on a
        /// violated one, which a traced graph never has but a file may): checked here, so a
        /// malformed file is an error naming the node.
        static func checkShapes(_ node: GraphNode, _ shapes: [[Int]?]) throws {
            func fail(_ why: String) -> EngineError { EngineError("node \(node.name) (\(node.op.name)): \(why)") }
            func s(_ i: Int) -> [Int]? { i < shapes.count ? shapes[i] : nil }
            for case let shape? in shapes {
                guard shape.count <= 8, shape.allSatisfy({ $0 > 0 }) else { throw fail("input of shape \(shape): rank above 8 or an empty dimension") }
            }
            switch node.op {
            case .conv(let o), .convTranspose(let o, _):
                guard let x = s(0), let w = s(1), x.count == 4, w.count == 4 else { throw fail("input \(s(0) ?? []) and weight \(s(1) ?? []) must be 4-D") }
                guard o.groups >= 1, o.stride.0 >= 1, o.stride.1 >= 1, o.dilation.0 >= 1, o.dilation.1 >= 1, o.padding.0 >= 0, o.padding.1 >= 0,
                      o.padding.0 <= 1 << 12, o.padding.1 <= 1 << 12, o.stride.0 <= 1 << 12, o.stride.1 <= 1 << 12, o.dilation.0 <= 1 << 12, o.dilation.1 <= 1 << 12
                else { throw fail("strides, dilations and groups must be positive and pads not negative (and all reasonable)") }
                if case .convTranspose(_, let p) = node.op {
                    guard w[0] == x[1], w[0] % o.groups == 0 else { throw fail("weight \(w) does not fit input \(x) in \(o.groups) groups") }
                    let h = (x[2] - 1) * o.stride.0 - 2 * o.padding.0 + o.dilation.0 * (w[2] - 1) + p + 1
                    let wd = (x[3] - 1) * o.stride.1 - 2 * o.padding.1 + o.dilation.1 * (w[3] - 1) + p + 1
                    guard h > 0, wd > 0, p >= 0, p < max(o.stride.0, o.dilation.0), p < max(o.stride.1, o.dilation.1) else { throw fail("input \(x), weight \(w) give no valid output") }
                    if let b = s(2), b != [w[1] * o.groups] { throw fail("bias \(b) for \(w[1] * o.groups) channels") }
                } else {
                    guard w[1] * o.groups == x[1], w[0] % o.groups == 0 else { throw fail("weight \(w) does not fit input \(x) in \(o.groups) groups") }
                    guard x[2] + 2 * o.padding.0 >= o.dilation.0 * (w[2] - 1) + 1, x[3] + 2 * o.padding.1 >= o.dilation.1 * (w[3] - 1) + 1 else {
                        throw fail("kernel \(w) larger than the padded input \(x)")
                    }
                    if let b = s(2), b != [w[0]] { throw fail("bias \(b) for \(w[0]) channels") }
                }
            case .linear:
                guard let x = s(0), let w = s(1), w.count == 2, x.last == w[1] else { throw fail("input \(s(0) ?? []) and weight \(s(1) ?? []) do not fit") }
                if let b = s(2), b != [w[0]] { throw fail("bias \(b) for \(w[0]) outputs") }
            case .matmul:
                guard let a = s(0), let b = s(1), a.count >= 2, b.count >= 2, a[a.count - 1] == b[b.count - 2],
                      b.count == 2 || Array(a.dropLast(2)) == Array(b.dropLast(2)) else { throw fail("\(s(0) ?? []) x \(s(1) ?? []) do not fit") }
            case .add, .sub, .mul, .div:
                guard let a = s(0), let b = s(1), broadcastShape(a, b) != nil else { throw fail("\(s(0) ?? []) and \(s(1) ?? []) do not broadcast") }
            case .maxPool(let k, let st, let p):
                guard let x = s(0), x.count == 4, k >= 1, st >= 1, p >= 0, 2 * p <= k, k <= 1 << 12, st <= 1 << 12,
                      x[2] + 2 * p >= k, x[3] + 2 * p >= k else { throw fail("input \(s(0) ?? []), kernel \(k), stride \(st), pad \(p) do not fit") }
            case .globalAveragePool:
                guard s(0)?.count == 4 else { throw fail("input \(s(0) ?? []) must be 4-D") }
            case .upsampleNearest(let f):
                guard s(0)?.count == 4, f >= 1, f <= 64 else { throw fail("input \(s(0) ?? []) must be 4-D, the factor in 1...64") }
            case .concat(let axis):
                guard let first = s(0), axis >= 0, axis < first.count,
                      shapes.allSatisfy({ t in t.map { $0.count == first.count && $0.indices.allSatisfy { $0 == axis || t![$0] == first[$0] } } ?? false })
                else { throw fail("inputs \(shapes.map { $0 ?? [] }) do not concatenate along axis \(axis)") }
            case .softmax, .layerNorm:
                guard let x = s(0), !x.isEmpty else { throw fail("a scalar input") }
                for i in [1, 2] { if let v = s(i), v.reduce(1, *) != x.last { throw fail("parameter \(v) for last dimension \(x.last!)") } }
            default: break
            }
        }

        /// Refuses a node whose shape probe would be unreasonably large (a conv's multiply-adds,
        /// an upsampled tensor): a malformed file must fail fast, not hang.
        func checkCost(_ node: GraphNode, _ inputs: [Int?]) throws {
            let shapes = inputs.map { $0.flatMap { probe[$0]?.shape } ?? [] }
            func size(_ s: [Int]) -> Double { s.reduce(1.0) { $0 * Double($1) } }
            var cost = shapes.map(size).reduce(0, +)
            switch node.op {
            case .conv(let o), .convTranspose(let o, _):
                guard shapes.count > 1, shapes[0].count == 4, shapes[1].count == 4 else { break }
                let spatial = Double(shapes[0][2] * shapes[0][3]) / Double(max(1, o.stride.0 * o.stride.1))
                cost = Double(shapes[0][0]) * spatial * size(Array(shapes[1])) * (node.op.name == "ConvTranspose" ? Double(o.stride.0 * o.stride.1) : 1)
            case .upsampleNearest(let s): cost = size(shapes.first ?? []) * Double(s * s)
            case .matmul, .linear: cost = size(shapes.first ?? []) * Double(shapes.count > 1 ? (shapes[1].last ?? 1) : 1)
            default: break
            }
            // and the size of what it writes
            var written = shapes.first.map(size) ?? 0
            switch node.op {
            case .conv(let o):
                if shapes.count > 1, shapes[0].count == 4, shapes[1].count == 4 {
                    written = Double(shapes[0][0]) * Double(shapes[1][0]) * Double(shapes[0][2] / o.stride.0 + 1) * Double(shapes[0][3] / o.stride.1 + 1)
                }
            case .convTranspose(let o, _):
                if shapes.count > 1, shapes[0].count == 4, shapes[1].count == 4 {
                    written = Double(shapes[0][0]) * Double(shapes[1][1]) * Double(o.groups) * Double(shapes[0][2] * o.stride.0 + o.dilation.0 * shapes[1][2])
                        * Double(shapes[0][3] * o.stride.1 + o.dilation.1 * shapes[1][3])
                }
            case .upsampleNearest(let f): written *= Double(f * f)
            case .add, .sub, .mul, .div: written = shapes.map(size).max() ?? 0
            case .matmul, .linear: written = cost
            case .concat: written = shapes.map(size).reduce(0, +)
            default: break
            }
            guard cost <= 1e9, written <= Double(Self.maxElements) else {
                throw EngineError("node \(node.name) (\(node.op.name)): too large to run (inputs \(shapes))")
            }
        }

        mutating func run(_ g: Onnx_GraphProto) throws {
            for t in g.initializer { consts[t.name] = try Self.tensorConst(t) }
            for input in g.input where consts[input.name] == nil {
                guard input.type.tensorType.elemType == Int32(Onnx_TensorProto.DataType.float.rawValue) else {
                    throw EngineError("input \(input.name): only float inputs are supported")
                }
                let shape = try input.type.tensorType.shape.dim.map { d -> Int in
                    guard case .dimValue(let v)? = d.value, v > 0, v <= 1 << 20 else {
                        throw EngineError("input \(input.name): dimensions must be static positive numbers (a TensorRT-style engine is built for one shape)")
                    }
                    return Int(v)
                }
                guard shape.count <= 8, shape.reduce(1, { min($0 * $1, Self.maxElements + 1) }) <= Self.maxElements else {
                    throw EngineError("input \(input.name): \(shape) is too large")
                }
                let id = value(input.name, shape: shape)
                graph.inputs.append(id)
                probe[id] = Tensor(zeros: shape)
            }
            guard !graph.inputs.isEmpty else { throw EngineError("the graph has no input") }
            for n in g.node { try node(n) }
            for o in g.output {
                if pendingSigmoid[o.name] != nil { _ = try use(o.name, by: "output") }
                guard let id = ids[o.name], graph.nodes.contains(where: { $0.output == id }) else {
                    throw EngineError("output \(o.name) is not computed by any node")
                }
                graph.outputs.append(id)
            }
            guard !graph.outputs.isEmpty else { throw EngineError("the graph has no output") }
        }

        mutating func node(_ n: Onnx_NodeProto) throws {
            guard n.domain.isEmpty || n.domain == "ai.onnx" else { throw EngineError("node \(n.name): domain \(n.domain) is not supported") }
            let label = n.name.isEmpty ? (n.output.first ?? n.opType) : n.name
            guard let out = n.output.first, !out.isEmpty else { throw EngineError("node \(label): no output") }
            func input(_ i: Int) throws -> Int {
                guard i < n.input.count, !n.input[i].isEmpty else { throw EngineError("node \(label) (\(n.opType)): input \(i) is missing") }
                return try use(n.input[i], by: label)
            }
            func optional(_ i: Int) throws -> Int? { i < n.input.count && !n.input[i].isEmpty ? try use(n.input[i], by: label) : nil }
            func pair(_ v: [Int]?, _ fallback: Int, _ what: String) throws -> (Int, Int) {
                guard let v else { return (fallback, fallback) }
                guard v.count == 2 else { throw EngineError("node \(label): \(what) must have 2 values (2-D), got \(v)") }
                return (v[0], v[1])
            }
            func symmetricPads() throws -> (Int, Int) {
                guard let p = Self.ints(n, "pads") else {
                    let auto = Self.string(n, "auto_pad", "NOTSET")
                    guard auto == "NOTSET" || auto == "VALID" else { throw EngineError("node \(label): auto_pad \(auto) is not supported; give pads") }
                    return (0, 0)
                }
                guard p.count == 4, p[0] == p[2], p[1] == p[3] else { throw EngineError("node \(label): pads \(p) differ between the two sides") }
                return (p[0], p[1])
            }
            switch n.opType {
            case "Conv", "ConvTranspose":
                let options = Conv2dOptions(stride: try pair(Self.ints(n, "strides"), 1, "strides"), padding: try symmetricPads(),
                                            dilation: try pair(Self.ints(n, "dilations"), 1, "dilations"), groups: Self.int(n, "group", 1))
                guard options.groups >= 1 else { throw EngineError("node \(label): group must be at least 1") }
                if n.opType == "Conv" {
                    try add(label, .conv(options), [try input(0), try input(1), try optional(2)], output: out)
                } else {
                    let (ph, pw) = try pair(Self.ints(n, "output_padding"), 0, "output_padding")
                    guard ph == pw else { throw EngineError("node \(label): output_padding \(ph), \(pw) differ") }
                    try add(label, .convTranspose(options, outputPadding: ph), [try input(0), try input(1), try optional(2)], output: out)
                }
            case "Gemm":
                guard Self.int(n, "transA", 0) == 0, Self.int(n, "transB", 0) == 1,
                      (Self.attribute(n, "alpha")?.f ?? 1) == 1, (Self.attribute(n, "beta")?.f ?? 1) == 1 else {
                    throw EngineError("node \(label): only Gemm with transB = 1, transA = 0, alpha = beta = 1 (a linear layer) is supported")
                }
                try add(label, .linear, [try input(0), try input(1), try optional(2)], output: out)
            case "MatMul": try add(label, .matmul, [try input(0), try input(1)], output: out)
            case "Add": try add(label, .add, [try input(0), try input(1)], output: out)
            case "Sub": try add(label, .sub, [try input(0), try input(1)], output: out)
            case "Mul":
                if n.input.count == 2, ids[n.input[0]] == nil || ids[n.input[1]] == nil,
                   let x = [0, 1].first(where: { pendingSigmoid[n.input[1 - $0]]?.input == n.input[$0] }).map({ n.input[$0] }) {
                    try add(label, .silu, [try use(x, by: label)], output: out)
                } else {
                    try add(label, .mul, [try input(0), try input(1)], output: out)
                }
            case "Div": try add(label, .div, [try input(0), try input(1)], output: out)
            case "Relu": try add(label, .relu, [try input(0)], output: out)
            case "Sigmoid":
                guard let x = n.input.first, !x.isEmpty else { throw EngineError("node \(label) (Sigmoid): input 0 is missing") }
                pendingSigmoid[out] = (x, label)
            case "Identity": ids[out] = try input(0)
            case "MaxPool":
                let (k, k2) = try pair(Self.ints(n, "kernel_shape"), 1, "kernel_shape")
                let (s, s2) = try pair(Self.ints(n, "strides"), 1, "strides")
                let (p, p2) = try symmetricPads()
                guard k == k2, s == s2, p == p2, Self.int(n, "ceil_mode", 0) == 0 else {
                    throw EngineError("node \(label): only square MaxPool with equal strides and pads, floor mode, is supported")
                }
                try add(label, .maxPool(kernel: k, stride: s, padding: p), [try input(0)], output: out)
            case "GlobalAveragePool":
                let x = try input(0)
                guard let shape = probe[x]?.shape, shape.count == 4 else { throw EngineError("node \(label): GlobalAveragePool of a non-4-D tensor") }
                try add(label, .globalAveragePool, [x], output: out + "#pooled")
                try add(label + ".reshape", .reshape([shape[0], shape[1], 1, 1]), [ids[out + "#pooled"]], output: out)
            case "Resize", "Upsample":
                let mode = Self.string(n, "mode", "nearest")
                let scalesName = n.opType == "Upsample" ? (n.input.count > 1 ? n.input[1] : "") : (n.input.count > 2 ? n.input[2] : "")
                let scales = try floats(scalesName, for: label)
                guard mode == "nearest", scales.count == 4, scales[0] == 1, scales[1] == 1, scales[2] == scales[3],
                      scales[2] >= 1, scales[2] <= 64, scales[2] == scales[2].rounded(), n.opType == "Upsample" || (n.input.count > 3 ? n.input[3].isEmpty : true) else {
                    throw EngineError("node \(label): only nearest upsampling by one integer factor (scales [1, 1, s, s]) is supported")
                }
                if n.opType == "Resize" {
                    let ctm = Self.string(n, "coordinate_transformation_mode", "half_pixel"), nearest = Self.string(n, "nearest_mode", "round_prefer_floor")
                    guard ctm == "asymmetric" && nearest == "floor" || scales[2] == 1 else {
                        throw EngineError("node \(label): Resize must be asymmetric / floor (PyTorch's nearest), got \(ctm) / \(nearest)")
                    }
                }
                try add(label, .upsampleNearest(scale: Int(scales[2])), [try input(0)], output: out)
            case "Concat":
                let xs = try n.input.indices.map(input)
                let rank = probe[xs[0]]?.shape.count ?? 0
                var axis = Self.int(n, "axis", 0)
                if axis < 0 { axis += rank }
                guard axis >= 0, axis < rank else { throw EngineError("node \(label): Concat axis out of range") }
                try add(label, .concat(axis: axis), xs, output: out)
            case "Reshape", "Flatten":
                let x = try input(0)
                guard let shape = probe[x]?.shape else { throw EngineError("node \(label): unknown input shape") }
                var target: [Int]
                if n.opType == "Flatten" {
                    var axis = Self.int(n, "axis", 1)
                    if axis < 0 { axis += shape.count }
                    guard axis >= 0, axis <= shape.count else { throw EngineError("node \(label): Flatten axis out of range") }
                    target = [shape[..<axis].reduce(1, *), shape[axis...].reduce(1, *)]
                } else {
                    target = try ints(n.input.count > 1 ? n.input[1] : "", for: label)
                    guard target.count <= 8, target.allSatisfy({ $0 >= -1 && $0 <= Self.maxElements }) else { throw EngineError("node \(label): bad shape \(target)") }
                    for (i, d) in target.enumerated() where d == 0 { guard i < shape.count else { throw EngineError("node \(label): 0 beyond the input's rank") }; target[i] = shape[i] }
                    let known = target.filter { $0 != -1 }.reduce(1, *), total = shape.reduce(1, *)
                    if let i = target.firstIndex(of: -1) { guard known > 0 else { throw EngineError("node \(label): bad shape \(target)") }; target[i] = total / known }
                    guard target.allSatisfy({ $0 > 0 }), target.reduce(1, *) == total else { throw EngineError("node \(label): cannot reshape \(shape) to \(target)") }
                }
                try add(label, .reshape(target), [x], output: out)
            case "Transpose":
                let x = try input(0)
                let rank = probe[x]?.shape.count ?? 0
                let perm = Self.ints(n, "perm") ?? Array((0..<rank).reversed())
                guard perm.sorted() == Array(0..<rank) else { throw EngineError("node \(label): perm \(perm) is not a permutation of the input's \(rank) axes") }
                try add(label, .transpose(perm), [x], output: out)
            case "Slice":
                let x = try input(0)
                guard let shape = probe[x]?.shape else { throw EngineError("node \(label): unknown input shape") }
                let starts = try ints(n.input.count > 1 ? n.input[1] : "", for: label), ends = try ints(n.input.count > 2 ? n.input[2] : "", for: label)
                let axes = n.input.count > 3 && !n.input[3].isEmpty ? try ints(n.input[3], for: label) : [0]
                let steps = n.input.count > 4 && !n.input[4].isEmpty ? try ints(n.input[4], for: label) : [1]
                guard starts.count == 1, ends.count == 1, axes.count == 1, steps == [1] else { throw EngineError("node \(label): only a Slice of one axis with step 1 is supported") }
                var axis = axes[0]
                if axis < 0 { axis += shape.count }
                guard axis >= 0, axis < shape.count else { throw EngineError("node \(label): Slice axis out of range") }
                func clampIndex(_ v: Int) -> Int { let w = v < 0 ? v + shape[axis] : v; return min(max(w, 0), shape[axis]) }
                let (start, end) = (clampIndex(starts[0]), clampIndex(ends[0]))
                guard start < end else { throw EngineError("node \(label): empty Slice") }
                try add(label, .slice(axis: axis, start: start, end: end), [x], output: out)
            case "Softmax":
                let x = try input(0)
                let rank = probe[x]?.shape.count ?? 0
                let axis = Self.int(n, "axis", -1)
                guard axis == -1 || axis == rank - 1 else { throw EngineError("node \(label): Softmax over axis \(axis); only the last axis is supported") }
                try add(label, .softmax, [x], output: out)
            case "LayerNormalization":
                let x = try input(0)
                let rank = probe[x]?.shape.count ?? 0
                let axis = Self.int(n, "axis", -1)
                guard axis == -1 || axis == rank - 1 else { throw EngineError("node \(label): LayerNormalization over axis \(axis); only the last axis is supported") }
                try add(label, .layerNorm(eps: Self.attribute(n, "epsilon")?.f ?? 1e-5), [x, try optional(1), try optional(2)], output: out)
            case "Constant":
                guard let a = Self.attribute(n, "value"), a.hasT else { throw EngineError("node \(label): only Constant with a tensor value is supported") }
                consts[out] = try Self.tensorConst(a.t)
            case "QuantizeLinear":
                // held until its DequantizeLinear: the pair is one quantize-dequantize node
                guard n.input.count >= 2 else { throw EngineError("node \(label): QuantizeLinear needs a scale") }
                pendingQuantize[out] = (n.input[0], n)
            case "DequantizeLinear":
                guard let (source, q) = n.input.first.flatMap({ pendingQuantize[$0] }) else {
                    throw EngineError("node \(label): a DequantizeLinear not fed by a QuantizeLinear (pre-quantized int8 weights are not supported)")
                }
                guard q.input.count >= 2, n.input.count >= 2, q.input[1] == n.input[1] || (try? floats(q.input[1], for: label)) == (try? floats(n.input[1], for: label)) else {
                    throw EngineError("node \(label): QuantizeLinear and DequantizeLinear use different scales")
                }
                let scales = try floats(q.input[1], for: label)
                guard !scales.isEmpty, scales.allSatisfy({ $0 > 0 && ($0 * 127).isFinite }) else { throw EngineError("node \(label): scales must be positive and finite") }
                if q.input.count > 2, !q.input[2].isEmpty {
                    switch consts[q.input[2]] {
                    case .int8(let z, _)?: guard z.allSatisfy({ $0 == 0 }) else { throw EngineError("node \(label): zero point \(z.first { $0 != 0 }!) -- asymmetric quantization is not supported (QuantLab's quantizers are symmetric, zero point 0)") }
                    case .uint8?: throw EngineError("node \(label): uint8 quantization (zero point of type uint8) is not supported: QuantLab's quantizers are symmetric int8")
                    default: throw EngineError("node \(label): the zero point must be a constant int8 tensor")
                    }
                }
                let x = try use(source, by: label)
                let rank = probe[x]?.shape.count ?? 0
                var axis: Int?
                if scales.count > 1 { // per channel along `axis` (ONNX's default 1)
                    var a = Self.int(q, "axis", 1)
                    if a < 0 { a += rank }
                    guard a >= 0, a < rank, probe[x]?.shape[a] == scales.count else {
                        throw EngineError("node \(label): \(scales.count) scales do not match axis \(a) of \(probe[x]?.shape ?? [])")
                    }
                    axis = a
                }
                try add(label.hasSuffix(".dequantize") ? String(label.dropLast(".dequantize".count)) : label,
                        .quantizeDequantize(amax: scales.map { $0 * 127 }, axis: axis, bits: 8), [x], output: out)
            default:
                throw EngineError("node \(label): op \(n.opType) is not supported by the engine")
            }
        }
    }
}
