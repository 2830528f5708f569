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
        let (logits, distances) = withNoGrad { model(x) }
        let ortF32 = try peer.run(graph: qdq.withoutQuantizers(), input: x, runs: 1)
        #expect(relativeMaxDifference(ortF32.outputs[0], logits) < 1e-5 && relativeMaxDifference(ortF32.outputs[1], distances) < 1e-5)
        // Q/DQ: onnxruntime computes DQ(Q(x)) in float too; codes can differ by one where float
        // summation order moves a value across a rounding boundary, and its Q saturates at -128.
        let ours = try Int8Plan(qdq).run([x])
        let ortQ = try peer.run(graph: qdq, input: x, runs: 1)
        for i in 0..<2 {
            let d = relativeMaxDifference(ortQ.outputs[i], ours[i])
            #expect(d < 0.05, "output \(i): onnxruntime and our INT8 plan differ by \(d) of the output's scale")
        }
    }
}

@Suite("Layer by layer against a peer")
struct LayerComparisonTests {
    func profiledPlan(_ graph: Graph, _ x: Tensor) throws -> Int8Plan {
        let plan = try Int8Plan(graph)
        plan.profile = true
        for _ in 0..<3 { _ = try plan.run([x]) }
        return plan
    }

    @Test("products are matched by name, losses and wins signed and sorted, the rest summed per side")
    func matching() throws {
        var rng = SeededGenerator(seed: 41)
        let model = Sequential([Conv2d(3, 8, kernel: 3, rng: &rng), Lambda.relu(), Lambda.maxPool(2), Conv2d(8, 16, kernel: 3, rng: &rng), Lambda.relu()])
        model.eval()
        let x = Tensor.uniform([1, 3, 12, 12], low: 0, high: 1, rng: &rng)
        let plan = try profiledPlan(try Graph.trace(model, example: x) { [model($0)] }, x)
        let medians = plan.stepMedians
        let products = plan.steps.indices.filter { plan.stepLayer($0).isProduct }
        #expect(products.count == 2)
        let (a, b) = (plan.stepLayer(products[0]).name, plan.stepLayer(products[1]).name)
        // the peer: twice our time on the first conv, half on the second, plus two nodes of its own
        let peer = [a: 2 * medians[products[0]], b: medians[products[1]] / 2, LayerComparison.peerReorderKey: 1e-5, "Transpose_token_0": 2e-5]
        let c = LayerComparison(plan: plan, peer: peer)
        #expect(c.rows.map(\.name) == [a, b] && c.oursOnly.isEmpty)
        #expect(c.rows[0].loss < 0 && c.rows[1].loss > 0)
        #expect(abs(c.peerOther - 3e-5) < 1e-12 && c.peerReorders == 1e-5)
        let rest = plan.steps.indices.filter { !plan.stepLayer($0).isProduct }
        #expect(c.oursOtherCount == rest.count && abs(c.oursOther - rest.map { medians[$0] }.reduce(0, +)) < 1e-12)
        let report = c.report(peerName: "peer")
        #expect(report.contains("where ours loses (1 layers") && report.contains("where ours wins (1 layers") && report.contains(b))
        // a product the peer has no timing for is listed, not matched
        let missing = LayerComparison(plan: plan, peer: [a: 1e-4])
        #expect(missing.rows.map(\.name) == [a] && missing.oursOnly == [b] && missing.report(peerName: "peer").contains("not found in peer's timings: 1"))
    }

    @Test("onnxruntime's profiled nodes of the exported detector come back under our steps' names: every conv and ConvTranspose, FP32, Q/DQ and onnxruntime's own INT8",
          .enabled(if: onnxRuntime != nil, "no Python with onnxruntime here (make venv)"))
    func onnxruntimeLayers() throws {
        let peer = try #require(onnxRuntime)
        let (model, sim) = try ONNXExportTests().quantizedTinyDetector()
        let qdq = try Graph.trace(model, batch: 1)
        sim.remove()
        var rng = SeededGenerator(seed: 42)
        let x = Tensor.uniform([1, 3, 64, 64], low: 0, high: 1, rng: &rng)
        for graph in [qdq.withoutQuantizers(), qdq] {
            let plan = try profiledPlan(graph, x)
            let ort = try peer.run(graph: graph, input: x, runs: 1, profileRuns: 3)
            let c = LayerComparison(plan: plan, peer: ort.layerSeconds)
            // ReLU convs (fused by onnxruntime, named after the Relu), SiLU convs (x * sigmoid(x)
            // fused into QuickGelu, named after the Mul), the ConvTranspose upsamplers; the Q/DQ
            // graph's DequantizeLinear / QuantizeLinear count with the conv they feed from
            #expect(c.oursOnly.isEmpty, "not matched: \(c.oursOnly)")
            #expect(c.rows.count == plan.steps.indices.filter { plan.stepLayer($0).isProduct }.count && c.rows.allSatisfy { $0.peer > 0 })
            // and nothing of onnxruntime's is left under a name no step of ours has (an activation
            // fused into our conv, say), but the layout changes it inserts itself
            let ourNames = Set(plan.steps.indices.map { plan.stepLayer($0).name })
            let stray = ort.layerSeconds.keys.filter { !ourNames.contains($0) && $0 != LayerComparison.peerReorderKey && !$0.contains("_token_") }
            #expect(stray.isEmpty, "onnxruntime nodes under no step's name: \(stray.sorted())")
        }
        // onnxruntime's own INT8 (its quantizer on the FP32 export: QLinearConv, NHWC, its
        // sigmoid and mul of SiLU quantized on their own) against our INT8 plan: the same convs
        let int8 = try profiledPlan(qdq, x)
        let own = try peer.run(graph: qdq.withoutQuantizers(), input: x, runs: 1, quantizeFirst: true, profileRuns: 3)
        let c = LayerComparison(plan: int8, peer: own.layerSeconds)
        #expect(c.oursOnly.isEmpty && !c.rows.isEmpty, "not matched: \(c.oursOnly)")
        #expect(!own.layerSeconds.keys.contains { $0.hasPrefix("SiLU") }, "SiLU's quantized sigmoid and mul count with their conv")
    }
}

@Suite("ONNX import")
struct ONNXImportTests {
    @Test("export then import gives the same graph: FP32 bit for bit, the Q/DQ graph's quantizers with their names and amax")
    func roundTrip() throws {
        let model = deployedDetector(seed: 31)
        var rng = SeededGenerator(seed: 32)
        let x = Tensor.uniform([1, 3, 64, 64], low: 0, high: 1, rng: &rng)
        let fp32 = try Graph.trace(model, batch: 1)
        let back = try ONNXImport.graph(from: try ONNXExport.model(fp32).serializedData())
        let (want, got) = (try ReferenceExecutor(fp32).run([x]), try ReferenceExecutor(back).run([x]))
        #expect(got[0].values == want[0].values && got[1].values == want[1].values)
        #expect(back.opCounts["Conv"] == fp32.opCounts["Conv"] && back.opCounts["ConvTranspose"] == fp32.opCounts["ConvTranspose"])
        #expect(Set(back.nodes.map(\.name)).isSuperset(of: ["backbone.stem.rbr_reparam", "neck.upsample1.upsample_transpose"]))

        let sim = try QuantizationSimulator(model)
        defer { sim.remove() }
        sim.calibrate(on: [Tensor.uniform([2, 3, 64, 64], low: 0, high: 1, rng: &rng)]) { _ = model($0) }
        try sim.applyCalibration(.max)
        let qdq = try Graph.trace(model, batch: 1)
        let qback = try ONNXImport.graph(from: try ONNXExport.model(qdq).serializedData())
        #expect(qback.opCounts["QDQ"] == qdq.opCounts["QDQ"])
        let amaxByName = Dictionary(uniqueKeysWithValues: qback.nodes.compactMap { n -> (String, [Float])? in
            if case .quantizeDequantize(let a, _, _) = n.op { return (n.name, a) } else { return nil }
        })
        for layer in sim.layers {
            let a = try #require(amaxByName["\(layer.name).input"], "no quantizer \(layer.name).input")
            #expect(abs(a[0] - layer.input.amax![0]) <= 1e-6 * layer.input.amax![0])
        }
        // the imported Q/DQ graph compiles to the same INT8 plan and computes what it computes
        let (plan, planBack) = (try Int8Plan(qdq), try Int8Plan(qback))
        #expect(planBack.int8ConvCount == plan.int8ConvCount && planBack.reformatCount == plan.reformatCount,
                "\(plan.explain())\n----\n\(planBack.explain())\n\(qdq.opCounts)\n\(qback.opCounts)")
        let (a, b) = (try plan.run([x]), try planBack.run([x]))
        #expect(relativeMaxDifference(b[0], a[0]) < 1e-2 && relativeMaxDifference(b[1], a[1]) < 1e-2)
    }

    @Test("malformed or unsupported ONNX is refused with an error that names the problem")
    func refused() throws {
        expectError(EngineError.self, mentioning: "not an ONNX model") { _ = try ONNXImport.graph(from: Data([0xFF, 0x01, 0x02, 0x03])) }
        expectError(EngineError.self, mentioning: "no graph") { _ = try ONNXImport.graph(from: Data()) }
        expectError(EngineError.self, mentioning: "cannot read") { _ = try ONNXImport.graph(from: URL(fileURLWithPath: "/nonexistent/m.onnx")) }
        var rng = SeededGenerator(seed: 33)
        let net = Sequential([Conv2d(3, 4, kernel: 3, rng: &rng), Lambda.relu()])
        net.eval()
        let qdqGraph = try Graph.trace(net, example: Tensor(zeros: [1, 3, 8, 8])) { x in
            [net(fakeQuantize(x, amax: [1], spec: QuantSpec(bits: 8, axis: nil)))]
        }
        let good = try ONNXExport.model(qdqGraph)
        #expect(try ONNXImport.graph(from: good.serializedData()).nodes.count == 3)
        var m = good
        m.opsetImport[0].version = 9
        expectError(EngineError.self, mentioning: "opset 9") { _ = try ONNXImport.graph(from: m.serializedData()) }
        m = good
        m.graph.input[0].type.tensorType.shape.dim[0].dimParam = "batch"
        expectError(EngineError.self, mentioning: "static") { _ = try ONNXImport.graph(from: m.serializedData()) }
        m = good
        let zp = try #require(m.graph.initializer.firstIndex { $0.dataType == Int32(Onnx_TensorProto.DataType.int8.rawValue) })
        m.graph.initializer[zp].rawData = Data([5])
        expectError(EngineError.self, mentioning: "asymmetric") { _ = try ONNXImport.graph(from: m.serializedData()) }
        m.graph.initializer[zp].dataType = Int32(Onnx_TensorProto.DataType.uint8.rawValue)
        expectError(EngineError.self, mentioning: "uint8") { _ = try ONNXImport.graph(from: m.serializedData()) }
        m = good
        m.graph.initializer[0].rawData = Data([1, 2, 3])
        expectError(EngineError.self, mentioning: "bytes of data") { _ = try ONNXImport.graph(from: m.serializedData()) }
        m = good
        m.graph.node[m.graph.node.count - 1].opType = "Hardmax"
        expectError(EngineError.self, mentioning: "Hardmax") { _ = try ONNXImport.graph(from: m.serializedData()) }
        m = good // found by the fuzzer: a 3-D input reaching a conv trapped in conv2d's precondition
        m.graph.input[0].type.tensorType.shape.dim.removeFirst()
        expectError(EngineError.self, mentioning: "must be 4-D") { _ = try ONNXImport.graph(from: m.serializedData()) }
        m = good
        m.graph.node.remove(at: 2) // the conv: the ReLU then reads a tensor nothing wrote
        expectError(EngineError.self, mentioning: "no earlier node") { _ = try ONNXImport.graph(from: m.serializedData()) }
    }
}
