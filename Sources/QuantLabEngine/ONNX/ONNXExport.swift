import Foundation
import QuantLabCore
import SwiftProtobuf

// ONNX export of an engine graph (issue #12): the FP32 graph, or the Q/DQ graph that the
// quantization simulator's state describes, as a standard ONNX model that onnxruntime,
// TensorRT or Netron read. The protobuf types (onnx.pb.swift) are generated from the onnx
// wheel's onnx.proto by scripts/gen_onnx_proto.sh and committed; SwiftProtobuf's runtime
// does the encoding.
//
// Op mapping (opset 17):
//   Conv, ConvTranspose            -> Conv, ConvTranspose (kernel_shape, strides, pads, dilations, group)
//   linear                         -> Gemm(transB=1) on 2-D input; else Transpose(W) + MatMul (+ Add bias)
//   matmul, add, sub, mul, div     -> MatMul, Add, Sub, Mul, Div
//   affine(s, b)                   -> Mul(x, s) + Add(., b)
//   relu, sigmoid                  -> Relu, Sigmoid;  silu -> Sigmoid + Mul (opset 17 has no SiLU)
//   gelu                           -> x * 0.5 * (1 + Erf(x / sqrt 2)) (opset 17 has no Gelu)
//   maxPool, averagePool           -> MaxPool, AveragePool (count_include_pad as traced)
//   globalAveragePool              -> GlobalAveragePool (+ Reshape to the traced rank)
//   gatherTopK(k)                  -> ReduceMax(axis 2) + TopK(axis 1, largest, sorted) + Unsqueeze +
//                                     Expand + GatherElements(axis 1): RT-DETR's query selection
//   upsampleNearest(s)             -> Resize(nearest, asymmetric, floor; scales [1, 1, s, s])
//   concat, reshape, transpose     -> Concat, Reshape, Transpose
//   slice, softmax, layerNorm      -> Slice, Softmax(axis -1), LayerNormalization(axis -1)
//   quantizeDequantize(amax, axis) -> QuantizeLinear + DequantizeLinear, scale = amax / 127
//                                     (per tensor, or per channel along axis), int8 zero point 0
// One difference of semantics, stated rather than hidden: ONNX's QuantizeLinear saturates to
// [-128, 127], our quantizers (and TensorRT's) to [-127, 127]; they differ only for values
// below -127.5 scales, i.e. clipped values of a tensor whose amax is below its |min|.

public enum ONNXExport {
    public static let opset: Int64 = 17
    public static let irVersion: Int64 = 8

    /// The graph as an ONNX model. Throws for an op ONNX cannot express here (a quantizer of
    /// other than 8 bits, an unsupported op).
    public static func model(_ graph: Graph, name: String = "quantlab") throws -> Onnx_ModelProto {
        var builder = Builder(graph: graph)
        try builder.build()
        var g = Onnx_GraphProto()
        g.name = name
        g.node = builder.nodes
        g.initializer = builder.initializers
        g.input = graph.inputs.map { builder.valueInfo($0) }
        g.output = graph.outputs.map { builder.valueInfo($0) }
        var m = Onnx_ModelProto()
        m.irVersion = irVersion
        m.producerName = "QuantLab"
        m.producerVersion = "1"
        var op = Onnx_OperatorSetIdProto()
        op.domain = ""
        op.version = opset
        m.opsetImport = [op]
        m.graph = g
        return m
    }

    /// Encodes and writes the model atomically.
    public static func write(_ graph: Graph, to url: URL, name: String = "quantlab") throws {
        let data: Data
        do { data = try model(graph, name: name).serializedData() } catch let e as EngineError { throw e } catch {
            throw EngineError("ONNX encoding failed: \(error)")
        }
        try AtomicFile.write(data, to: url)
    }

    struct Builder {
        let graph: Graph
        var nodes: [Onnx_NodeProto] = []
        var initializers: [Onnx_TensorProto] = []
        /// Unique ONNX names by value id (graph names may repeat, e.g. a module called twice).
        var names: [Int: String] = [:]
        var used: Set<String> = []
        var nodeNames: Set<String> = []
        var counter = 0

        init(graph: Graph) { self.graph = graph }

        mutating func unique(_ base: String) -> String {
            var name = base.isEmpty ? "v" : base, k = 1
            while used.contains(name) { name = "\(base)_\(k)"; k += 1 }
            used.insert(name)
            return name
        }

        mutating func name(_ id: Int) -> String {
            if let n = names[id] { return n }
            let n = unique(graph.values[id].name)
            names[id] = n
            return n
        }

        mutating func fresh(_ hint: String) -> String { counter += 1; return unique("\(hint)__\(counter)") }

        func valueInfo(_ id: Int) -> Onnx_ValueInfoProto {
            var v = Onnx_ValueInfoProto()
            v.name = names[id] ?? graph.values[id].name
            var t = Onnx_TypeProto.Tensor()
            t.elemType = Int32(Onnx_TensorProto.DataType.float.rawValue)
            var shape = Onnx_TensorShapeProto()
            shape.dim = graph.values[id].shape.map { d in
                var dim = Onnx_TensorShapeProto.Dimension()
                dim.dimValue = Int64(d)
                return dim
            }
            t.shape = shape
            v.type.tensorType = t
            return v
        }

        mutating func floatConstant(_ hint: String, _ values: [Float], shape: [Int]) -> String {
            var t = Onnx_TensorProto()
            t.name = fresh(hint)
            t.dataType = Int32(Onnx_TensorProto.DataType.float.rawValue)
            t.dims = shape.map(Int64.init)
            t.rawData = values.withUnsafeBufferPointer { Data(buffer: $0) } // little-endian, as ONNX's raw_data
            initializers.append(t)
            return t.name
        }

        mutating func int64Constant(_ hint: String, _ values: [Int], shape: [Int]? = nil) -> String {
            var t = Onnx_TensorProto()
            t.name = fresh(hint)
            t.dataType = Int32(Onnx_TensorProto.DataType.int64.rawValue)
            t.dims = (shape ?? [values.count]).map(Int64.init)
            t.rawData = values.map(Int64.init).withUnsafeBufferPointer { Data(buffer: $0) }
            initializers.append(t)
            return t.name
        }

        mutating func int8Zeros(_ hint: String, count: Int?) -> String {
            var t = Onnx_TensorProto()
            t.name = fresh(hint)
            t.dataType = Int32(Onnx_TensorProto.DataType.int8.rawValue)
            t.dims = count.map { [Int64($0)] } ?? []
            t.rawData = Data(count: count ?? 1)
            initializers.append(t)
            return t.name
        }

        mutating func node(_ op: String, _ inputs: [String], _ outputs: [String], name: String, _ attributes: [Onnx_AttributeProto] = []) {
            var n = Onnx_NodeProto()
            n.opType = op
            n.input = inputs
            n.output = outputs
            var unique = name, k = 1 // node names: the graph's layer names, kept where unique
            while nodeNames.contains(unique) { unique = "\(name)_\(k)"; k += 1 }
            nodeNames.insert(unique)
            n.name = unique
            n.attribute = attributes
            nodes.append(n)
        }

        static func ints(_ name: String, _ v: [Int]) -> Onnx_AttributeProto {
            var a = Onnx_AttributeProto()
            a.name = name
            a.type = .ints
            a.ints = v.map(Int64.init)
            return a
        }
        static func int(_ name: String, _ v: Int) -> Onnx_AttributeProto {
            var a = Onnx_AttributeProto()
            a.name = name
            a.type = .int
            a.i = Int64(v)
            return a
        }
        static func float(_ name: String, _ v: Float) -> Onnx_AttributeProto {
            var a = Onnx_AttributeProto()
            a.name = name
            a.type = .float
            a.f = v
            return a
        }
        static func string(_ name: String, _ v: String) -> Onnx_AttributeProto {
            var a = Onnx_AttributeProto()
            a.name = name
            a.type = .string
            a.s = Data(v.utf8)
            return a
        }

        mutating func build() throws {
            for (id, t) in graph.constants.sorted(by: { $0.key < $1.key }) {
                var p = Onnx_TensorProto()
                p.name = name(id)
                p.dataType = Int32(Onnx_TensorProto.DataType.float.rawValue)
                p.dims = t.shape.map(Int64.init)
                let values = t.values
                p.rawData = values.withUnsafeBufferPointer { Data(buffer: $0) }
                initializers.append(p)
            }
            for id in graph.inputs { _ = name(id) }
            for n in graph.nodes { try emit(n) }
        }

        mutating func emit(_ n: GraphNode) throws {
            func input(_ i: Int) throws -> String {
                guard i < n.inputs.count, let id = n.inputs[i] else { throw EngineError("node \(n.name) (\(n.op.name)): input \(i) is missing") }
                return name(id)
            }
            func optional(_ i: Int) -> String? { i < n.inputs.count ? n.inputs[i].map { name($0) } : nil }
            let out = name(n.output), outShape = graph.values[n.output].shape
            switch n.op {
            case .conv(let o), .convTranspose(let o, _):
                guard let wid = n.inputs.count > 1 ? n.inputs[1] : nil else { throw EngineError("node \(n.name): conv without weight") }
                let w = graph.values[wid].shape
                var attrs = [Self.ints("kernel_shape", [w[2], w[3]]), Self.ints("strides", [o.stride.0, o.stride.1]),
                             Self.ints("pads", [o.padding.0, o.padding.1, o.padding.0, o.padding.1]),
                             Self.ints("dilations", [o.dilation.0, o.dilation.1]), Self.int("group", o.groups)]
                var op = "Conv"
                if case .convTranspose(_, let p) = n.op {
                    op = "ConvTranspose"
                    attrs.append(Self.ints("output_padding", [p, p]))
                }
                node(op, [try input(0), try input(1)] + (optional(2).map { [$0] } ?? []), [out], name: n.name, attrs)
            case .linear:
                let x = try input(0), w = try input(1)
                if let xid = n.inputs[0], graph.values[xid].shape.count == 2 {
                    node("Gemm", [x, w] + (optional(2).map { [$0] } ?? []), [out], name: n.name, [Self.int("transB", 1)])
                } else {
                    let wt = fresh("\(n.name).weight_t")
                    node("Transpose", [w], [wt], name: "\(n.name).transpose", [Self.ints("perm", [1, 0])])
                    if let b = optional(2) {
                        let mm = fresh("\(n.name).matmul")
                        node("MatMul", [x, wt], [mm], name: n.name)
                        node("Add", [mm, b], [out], name: "\(n.name).bias")
                    } else {
                        node("MatMul", [x, wt], [out], name: n.name)
                    }
                }
            case .matmul: node("MatMul", [try input(0), try input(1)], [out], name: n.name)
            case .add: node("Add", [try input(0), try input(1)], [out], name: n.name)
            case .sub: node("Sub", [try input(0), try input(1)], [out], name: n.name)
            case .mul: node("Mul", [try input(0), try input(1)], [out], name: n.name)
            case .div: node("Div", [try input(0), try input(1)], [out], name: n.name)
            case .affine(let s, let b):
                let scaled = fresh("\(n.name).scaled")
                node("Mul", [try input(0), floatConstant("\(n.name).scale", [s], shape: [])], [scaled], name: n.name)
                node("Add", [scaled, floatConstant("\(n.name).shift", [b], shape: [])], [out], name: "\(n.name).shift")
            case .relu: node("Relu", [try input(0)], [out], name: n.name)
            case .sigmoid: node("Sigmoid", [try input(0)], [out], name: n.name)
            case .silu:
                let x = try input(0), s = fresh("\(n.name).sigmoid")
                node("Sigmoid", [x], [s], name: "\(n.name).sigmoid")
                node("Mul", [x, s], [out], name: n.name)
            case .gelu: // opset 17 has no Gelu: x * 0.5 * (1 + Erf(x / sqrt 2))
                let x = try input(0), scaled = fresh("\(n.name).scaled"), erf = fresh("\(n.name).erf"), plus = fresh("\(n.name).plus1"),
                    half = fresh("\(n.name).half")
                node("Mul", [x, floatConstant("\(n.name).rsqrt2", [Float(0.5).squareRoot()], shape: [])], [scaled], name: "\(n.name).scale")
                node("Erf", [scaled], [erf], name: "\(n.name).erf")
                node("Add", [erf, floatConstant("\(n.name).one", [1], shape: [])], [plus], name: "\(n.name).add")
                node("Mul", [x, floatConstant("\(n.name).half_c", [0.5], shape: [])], [half], name: "\(n.name).halve")
                node("Mul", [half, plus], [out], name: n.name)
            case .averagePool(let k, let s, let p, let inc):
                node("AveragePool", [try input(0)], [out], name: n.name,
                     [Self.ints("kernel_shape", [k, k]), Self.ints("strides", [s, s]), Self.ints("pads", [p, p, p, p]), Self.int("count_include_pad", inc ? 1 : 0)])
            case .gatherTopK(let k): // ReduceMax over classes -> TopK over tokens -> GatherElements of the rows
                guard outShape.count == 3 else { throw EngineError("node \(n.name): GatherTopK output \(outShape) is not [B, k, D]") }
                let best = fresh("\(n.name).best"), values = fresh("\(n.name).values"), indices = fresh("\(n.name).indices"),
                    column = fresh("\(n.name).indices3"), rows = fresh("\(n.name).rows")
                node("ReduceMax", [try input(0)], [best], name: "\(n.name).reduce_max", [Self.ints("axes", [2]), Self.int("keepdims", 0)])
                node("TopK", [best, int64Constant("\(n.name).k", [k], shape: [1])], [values, indices], name: "\(n.name).topk",
                     [Self.int("axis", 1), Self.int("largest", 1), Self.int("sorted", 1)])
                node("Unsqueeze", [indices, int64Constant("\(n.name).axes", [2], shape: [1])], [column], name: "\(n.name).unsqueeze")
                node("Expand", [column, int64Constant("\(n.name).shape", outShape, shape: [3])], [rows], name: "\(n.name).expand")
                node("GatherElements", [try input(1), rows], [out], name: n.name, [Self.int("axis", 1)])
            case .maxPool(let k, let s, let p):
                node("MaxPool", [try input(0)], [out], name: n.name,
                     [Self.ints("kernel_shape", [k, k]), Self.ints("strides", [s, s]), Self.ints("pads", [p, p, p, p])])
            case .globalAveragePool:
                if outShape.count == 4 {
                    node("GlobalAveragePool", [try input(0)], [out], name: n.name)
                } else {
                    let pooled = fresh("\(n.name).pooled")
                    node("GlobalAveragePool", [try input(0)], [pooled], name: n.name)
                    node("Reshape", [pooled, int64Constant("\(n.name).shape", outShape)], [out], name: "\(n.name).reshape")
                }
            case .upsampleNearest(let s):
                node("Resize", [try input(0), "", floatConstant("\(n.name).scales", [1, 1, Float(s), Float(s)], shape: [4])], [out], name: n.name,
                     [Self.string("mode", "nearest"), Self.string("coordinate_transformation_mode", "asymmetric"), Self.string("nearest_mode", "floor")])
            case .concat(let axis): node("Concat", try n.inputs.indices.map(input), [out], name: n.name, [Self.int("axis", axis)])
            case .reshape(let shape): node("Reshape", [try input(0), int64Constant("\(n.name).shape", shape)], [out], name: n.name)
            case .transpose(let order): node("Transpose", [try input(0)], [out], name: n.name, [Self.ints("perm", order)])
            case .slice(let axis, let start, let end):
                node("Slice", [try input(0), int64Constant("\(n.name).starts", [start]), int64Constant("\(n.name).ends", [end]),
                               int64Constant("\(n.name).axes", [axis])], [out], name: n.name)
            case .softmax: node("Softmax", [try input(0)], [out], name: n.name, [Self.int("axis", -1)])
            case .layerNorm(let eps):
                guard let last = outShape.last else { throw EngineError("node \(n.name): LayerNorm of a scalar") }
                let scale = optional(1) ?? floatConstant("\(n.name).ones", [Float](repeating: 1, count: last), shape: [last])
                node("LayerNormalization", [try input(0), scale] + (optional(2).map { [$0] } ?? []), [out], name: n.name,
                     [Self.int("axis", -1), Self.float("epsilon", eps)])
            case .quantizeDequantize(let amax, let axis, let bits):
                guard bits == 8 else { throw EngineError("node \(n.name): a \(bits)-bit quantizer has no ONNX QuantizeLinear (8-bit only)") }
                let scales = amax.map { $0 / 127 }
                let perChannel = axis != nil
                let scale = floatConstant("\(n.name).scale", scales, shape: perChannel ? [scales.count] : [])
                let zero = int8Zeros("\(n.name).zero_point", count: perChannel ? scales.count : nil)
                let attrs = axis.map { [Self.int("axis", $0)] } ?? []
                let q = fresh("\(n.name).q")
                node("QuantizeLinear", [try input(0), scale, zero], [q], name: "\(n.name).quantize", attrs)
                node("DequantizeLinear", [q, scale, zero], [out], name: "\(n.name).dequantize", attrs)
            case .unsupported(let what): throw EngineError("node \(n.name): op \(what) has no ONNX export")
            }
        }
    }
}
