import Foundation
import SwiftProtobuf
import Testing
@testable import QuantLabBench
@testable import QuantLabCore
@testable import QuantLabEngine
@testable import QuantLabModels
@testable import QuantLabQuant

/// onnxruntime in the project's Python (`make venv`), for the cross-checks; nil without it.
let onnxRuntime: OnnxRuntimePeer? = OnnxRuntimePeer.locate().flatMap { $0.isAvailable ? $0 : nil }

@Suite("ONNX export of engine graphs")
struct ONNXExportTests {
    func quantizedTinyDetector() throws -> (YOLOv6, QuantizationSimulator) {
        let model = deployedDetector(seed: 21)
        var rng = SeededGenerator(seed: 22)
        let sim = try QuantizationSimulator(model)
        sim.calibrate(on: [Tensor.uniform([2, 3, 64, 64], low: 0, high: 1, rng: &rng)]) { _ = model($0) }
        try sim.applyCalibration(.max)
        return (model, sim)
    }

    @Test("the exported model decodes to the graph's ops, initializers, shapes and Q/DQ pairs (scale = amax / 127)")
    func structure() throws {
        let (model, sim) = try quantizedTinyDetector()
        defer { sim.remove() }
        let graph = try Graph.trace(model, batch: 1)
        let bytes = try ONNXExport.model(graph).serializedData()
        let m = try Onnx_ModelProto(serializedBytes: bytes)
        #expect(m.opsetImport.first?.version == ONNXExport.opset && m.irVersion == ONNXExport.irVersion)
        let ops = Dictionary(grouping: m.graph.node, by: \.opType).mapValues(\.count)
        #expect(ops["Conv"] == graph.opCounts["Conv"] && ops["ConvTranspose"] == graph.opCounts["ConvTranspose"])
        #expect(ops["QuantizeLinear"] == graph.opCounts["QDQ"] && ops["DequantizeLinear"] == graph.opCounts["QDQ"], "\(ops)")
        #expect(ops["Concat"] == graph.opCounts["Concat"] && ops["MaxPool"] == graph.opCounts["MaxPool"])
        // every node input is a graph input, an initializer or an earlier node's output
        var known = Set(m.graph.input.map(\.name) + m.graph.initializer.map(\.name) + [""])
        for n in m.graph.node {
            for i in n.input { #expect(known.contains(i), "node \(n.name) reads \(i) before it exists") }
            known.formUnion(n.output)
        }
        #expect(m.graph.output.allSatisfy { known.contains($0.name) })
        #expect(m.graph.input.first?.type.tensorType.shape.dim.map(\.dimValue) == [1, 3, 64, 64])
        // a per-channel weight quantizer: scale vector = amax / 127, axis 0, int8 zero points
        let layer = sim.layers[0]
        let q = try #require(m.graph.node.first { $0.opType == "QuantizeLinear" && $0.name.hasPrefix("\(layer.name).weight") })
        let scale = try #require(m.graph.initializer.first { $0.name == q.input[1] })
        let values = scale.rawData.withUnsafeBytes { Array($0.bindMemory(to: Float.self)) }
        #expect(values == layer.weight!.amax!.map { $0 / 127 })
        #expect(q.attribute.first { $0.name == "axis" }?.i == 0)
        let zero = try #require(m.graph.initializer.first { $0.name == q.input[2] })
        #expect(zero.dataType == Int32(Onnx_TensorProto.DataType.int8.rawValue) && zero.rawData.count == values.count)
    }

    @Test("taking the quantizers out gives back the FP32 graph: same ops but QDQ, same outputs as the model without the simulator")
    func withoutQuantizers() throws {
        let (model, sim) = try quantizedTinyDetector()
        let qdq = try Graph.trace(model, batch: 1)
        sim.remove()
        let plain = qdq.withoutQuantizers()
        #expect(plain.opCounts["QDQ"] == nil && plain.nodes.count == qdq.nodes.count - qdq.opCounts["QDQ"]!)
        var rng = SeededGenerator(seed: 23)
        let x = Tensor.uniform([1, 3, 64, 64], low: 0, high: 1, rng: &rng)
        let (logits, distances) = withNoGrad { model(x) }
        let out = try ReferenceExecutor(plain).run([x])
        #expect(out[0].values == logits.values && out[1].values == distances.values)
    }

    @Test("ops ONNX cannot express here are refused by name")
    func refused() throws {
        var rng = SeededGenerator(seed: 24)
        let model = Sequential([Conv2d(3, 4, kernel: 3, rng: &rng)])
        model.eval()
        let graph = try Graph.trace(model, example: Tensor(zeros: [1, 3, 8, 8])) { x in
            [fakeQuantize(model(x), amax: [1], spec: QuantSpec(bits: 4, axis: nil))]
        }
        expectError(EngineError.self, mentioning: "4-bit") { _ = try ONNXExport.model(graph) }
    }

    @Test("onnxruntime runs the exported FP32 graph to the same outputs (1e-5 of their scale), and the Q/DQ graph close to our INT8 plan",
          .enabled(if: onnxRuntime != nil, "no Python with onnxruntime here (make venv)"))
    func onnxruntimeAgrees() throws {
        let peer = try #require(onnxRuntime)
        let (model, sim) = try quantizedTinyDetector()
        let qdq = try Graph.trace(model, batch: 1)
        sim.remove()
        var rng = SeededGenerator(seed: 25)
        let x = Tensor.uniform([1, 3, 64, 64], low: 0, high: 1, rng: &rng)
        let dir = FileManager.default.temporaryDirectory
        let f32 = dir.appendingPathComponent("quantlab-test-\(ProcessInfo.processInfo.processIdentifier)-fp32.onnx")
        let q = dir.appendingPathComponent("quantlab-test-\(ProcessInfo.processInfo.processIdentifier)-qdq.onnx")
        defer { try? FileManager.default.removeItem(at: f32); try? FileManager.default.removeItem(at: q) }
        try ONNXExport.write(qdq.withoutQuantizers(), to: f32)
        try ONNXExport.write(qdq, to: q)
        let (logits, distances) = withNoGrad { model(x) }
        let ortF32 = try peer.run(model: f32, input: x, runs: 1)
        #expect(relativeMaxDifference(ortF32.outputs[0], logits) < 1e-5 && relativeMaxDifference(ortF32.outputs[1], distances) < 1e-5)
        // Q/DQ: onnxruntime computes DQ(Q(x)) in float too; codes can differ by one where float
        // summation order moves a value across a rounding boundary, and its Q saturates at -128.
        let ours = try Int8Plan(qdq).run([x])
        let ortQ = try peer.run(model: q, input: x, runs: 1)
        for i in 0..<2 {
            let d = relativeMaxDifference(ortQ.outputs[i], ours[i])
            #expect(d < 0.05, "output \(i): onnxruntime and our INT8 plan differ by \(d) of the output's scale")
        }
    }
}
