import CKernels
import Foundation
import Testing
import QuantLabBench
@testable import QuantLabCore
@testable import QuantLabEngine
@testable import QuantLabModels
@testable import QuantLabQuant

/// A deploy-form tiny detector with BN statistics that are not the identity and non-trivial
/// predictors (YOLOv6 starts them at zero), for the engine tests.
func deployedDetector(seed: UInt64, inputSize: Int = 64, classes: Int = 3) -> YOLOv6 {
    var rng = SeededGenerator(seed: seed)
    let model = YOLOv6(.tiny(block: .repvgg, numClasses: classes, inputSize: inputSize), rng: &rng)
    model.train()
    _ = withNoGrad { model(Tensor.randn([2, 3, inputSize, inputSize], rng: &rng)) }
    model.eval()
    model.convertToDeployForm()
    for (name, p) in model.namedParameters() where name.hasPrefix("detect.cls_preds") || name.hasPrefix("detect.reg_preds") {
        try! p.copyValues(from: Tensor.uniform(p.shape, low: -0.3, high: 0.3, rng: &rng))
    }
    return model
}

/// `deployedDetector(seed:)` with the simulator installed and max-calibrated on one batch
/// [2, 3, 64, 64] drawn from `rng`; the caller removes the simulator.
func calibratedDeployedDetector(seed: UInt64, rng: inout SeededGenerator) throws -> (YOLOv6, QuantizationSimulator) {
    let model = deployedDetector(seed: seed)
    let sim = try QuantizationSimulator(model)
    sim.calibrate(on: [Tensor.uniform([2, 3, 64, 64], low: 0, high: 1, rng: &rng)]) { _ = model($0) }
    try sim.applyCalibration(.max)
    return (model, sim)
}

@Suite("Engine graph: tracing a model and running the graph")
struct EngineGraphTests {
    @Test("a small net traces to Conv, Relu, MaxPool, GlobalAveragePool, Gemm named by layer; the graph recomputes it on another input")
    func smallNet() throws {
        var rng = SeededGenerator(seed: 3)
        let model = Sequential([Conv2d(3, 4, kernel: 3, rng: &rng), Lambda.relu(), Lambda.maxPool(2), Lambda.globalAvgPool(), Linear(4, 5, rng: &rng)])
        model.eval()
        let graph = try Graph.trace(model, example: Tensor(zeros: [2, 3, 8, 8])) { [model($0)] }
        #expect(graph.nodes.map(\.op.name) == ["Conv", "Relu", "MaxPool", "GlobalAveragePool", "Gemm"])
        #expect(graph.nodes.map(\.name) == ["0", "Relu", "MaxPool", "GlobalAveragePool", "4"])
        #expect(Set(graph.constants.keys.map { graph.values[$0].name }) == ["0.weight", "0.bias", "4.weight", "4.bias"])
        #expect(graph.values[graph.outputs[0]].shape == [2, 5])
        let x = Tensor.uniform([2, 3, 8, 8], low: -1, high: 1, rng: &rng)
        #expect(try ReferenceExecutor(graph).run([x])[0].values == withNoGrad { model(x) }.values)
        let plan = graph.explain()
        #expect(plan.contains("Conv(s1 p1)") && plan.contains("ops: Conv 1, Gemm 1, GlobalAveragePool 1, MaxPool 1, Relu 1"), "\(plan)")
    }

    @Test("the deploy-form detector traces with YOLOv6's layer names, and the graph equals the model bit for bit")
    func detector() throws {
        let model = deployedDetector(seed: 5)
        let graph = try Graph.trace(model, batch: 2)
        let convModules = model.namedModules().filter { $0.1 is Conv2d }.count
        #expect(graph.opCounts["Conv"] == convModules)
        #expect(graph.opCounts["ConvTranspose"] == 2 && graph.opCounts["Concat"]! >= 6 && graph.opCounts["MaxPool"] == 3)
        let names = Set(graph.nodes.map(\.name))
        for n in ["backbone.stem.rbr_reparam", "neck.reduce_layer1.conv", "neck.upsample1.upsample_transpose", "detect.cls_preds.0"] {
            #expect(names.contains(n), "no node \(n)")
        }
        var rng = SeededGenerator(seed: 6)
        let x = Tensor.uniform([2, 3, 64, 64], low: 0, high: 1, rng: &rng)
        let out = try ReferenceExecutor(graph).run([x])
        let (logits, distances) = withNoGrad { model(x) }
        #expect(out[0].values == logits.values && out[1].values == distances.values)
        #expect(out[0].shape == logits.shape && out[1].shape == distances.shape)
        expectError(EngineError.self, mentioning: "expected shape [2, 3, 64, 64]") { _ = try ReferenceExecutor(graph).run([Tensor(zeros: [1, 3, 64, 64])]) }
    }

    @Test("with the simulator installed the graph carries its Q/DQ: named per layer, weights per channel, the simulator's amax; equal to the fake-quantized model")
    func quantizedDetector() throws {
        var rng = SeededGenerator(seed: 8)
        let (model, sim) = try calibratedDeployedDetector(seed: 7, rng: &rng)
        defer { sim.remove() }
        let graph = try Graph.trace(model, batch: 2)
        let qdq = graph.nodes.filter { if case .quantizeDequantize = $0.op { return true } else { return false } }
        #expect(qdq.count == 2 * sim.layers.count, "one input and one weight quantizer per conv / transposed conv")
        for layer in sim.layers {
            guard let conv = graph.nodes.first(where: { $0.name == layer.name }) else { Issue.record("no node \(layer.name)"); continue }
            let input = conv.inputs[0].flatMap { graph.producer(of: $0) }, weight = conv.inputs[1].flatMap { graph.producer(of: $0) }
            #expect(input?.name == "\(layer.name).input" && weight?.name == "\(layer.name).weight", "\(layer.name): \(input?.name ?? "-") / \(weight?.name ?? "-")")
            if case .quantizeDequantize(let amax, let axis, let bits)? = weight?.op {
                #expect(amax == layer.weight!.amax! && axis == layer.weight!.spec.axis && bits == 8)
            } else { Issue.record("\(layer.name): the weight does not pass through a QDQ node") }
            if case .quantizeDequantize(let amax, let axis, _)? = input?.op {
                #expect(amax == layer.input.amax! && axis == nil)
            } else { Issue.record("\(layer.name): the input does not pass through a QDQ node") }
        }
        let x = Tensor.uniform([2, 3, 64, 64], low: 0, high: 1, rng: &rng)
        let out = try ReferenceExecutor(graph).run([x])
        let (logits, distances) = withNoGrad { model(x) }
        #expect(out[0].values == logits.values && out[1].values == distances.values)
        #expect(graph.explain().contains("QDQ(int8 per-channel axis 0"))
    }

    @Test("what an engine cannot run is refused by name: a BN not folded, a model in training mode")
    func refused() throws {
        var rng = SeededGenerator(seed: 9)
        let model = YOLOv6(.tiny(block: .repvgg, numClasses: 3, inputSize: 64), rng: &rng)
        expectError(EngineError.self, mentioning: "eval mode") { _ = try Graph.trace(model) }
        model.eval()
        expectError(EngineError.self, mentioning: "batch_norm", "convertToDeployForm") { _ = try Graph.trace(model) }
    }
}

@Suite("Engine INT8 plan: fusion, Reformat steps, integer execution against the simulator")
struct EngineInt8Tests {
    /// The simulator's codes of a fake-quantized f32 tensor (its values are code * s).
    private func codes(_ t: Tensor, amax: Float) -> QTensor {
        var c = [Int8](repeating: 0, count: t.count)
        ql_quantize_nchw_to_nhwc_s8(&c, t.data, Int32(t.shape[0]), Int32(t.shape[1]), Int32(t.shape[2] * t.shape[3]), amax, 127)
        return QTensor(codes: c, shape: t.shape, amax: amax)
    }

    /// For every fused conv: given the simulator's input codes, the engine's output equals the
    /// simulator's output codes or differs by one code (the float order of acc * s_x s_w / s_y
    /// + b / s_y vs (sum of products + b) / s_y); f32 outputs agree to float rounding. Returns
    /// (elements compared, elements one code apart).
    private func compareLayers(_ plan: Int8Plan, _ reference: [Int: Tensor]) throws -> (compared: Int, oneOff: Int) {
        var compared = 0, oneOff = 0
        for step in plan.steps {
            guard case .int8Conv(let conv, _, let output) = step else { continue }
            // the simulator's input codes: its input quantizer's output, divided by the scale
            guard let node = plan.graph.nodes.first(where: { $0.name == conv.name }), let xv = node.inputs[0], let x = reference[xv],
                  case .quantizeDequantize(let xAmax, _, _)? = plan.graph.producer(of: xv)?.op else { Issue.record("\(conv.name): no reference input"); continue }
            let (q, t) = try conv.run(codes(x, amax: xAmax[0]))
            guard let y = reference[output] else { Issue.record("\(conv.name): no reference output"); continue }
            if let q, let amax = conv.outputAmax {
                // the simulator's output codes: what the quantizers after the conv compute from its float output
                let want = codes(y, amax: amax).codes
                for (a, b) in zip(q.codes, want) {
                    let d = abs(Int(a) - Int(b))
                    #expect(d <= 1, "\(conv.name): engine code \(a) vs simulator \(b)")
                    compared += 1
                    if d == 1 { oneOff += 1 }
                }
            } else if let t {
                let top = y.values.map(Swift.abs).max() ?? 1
                #expect(firstMismatch(t.values, y.values, atol: 1e-5 * Double(top), rtol: 1e-4) == nil, "\(conv.name): f32 output")
            }
        }
        return (compared, oneOff)
    }

    @Test("a conv stack: convs fuse with their ReLU and the next quantizer; one Quantize at the input, the head's linear on the integer GEMM; layer by layer within one code of the simulator")
    func convStack() throws {
        var rng = SeededGenerator(seed: 21)
        let model = Sequential([Conv2d(3, 8, kernel: 3, rng: &rng), Lambda.relu(), Conv2d(8, 16, kernel: 3, stride: 2, rng: &rng), Lambda.relu(),
                                Conv2d(16, 16, kernel: 1, rng: &rng), Lambda.globalAvgPool(), Linear(16, 4, rng: &rng)])
        model.eval()
        let sim = try QuantizationSimulator(model)
        defer { sim.remove() }
        let calibration = (0..<2).map { _ in Tensor.uniform([4, 3, 12, 12], low: -1, high: 1, rng: &rng) }
        sim.calibrate(on: calibration) { _ = model($0) }
        try sim.applyCalibration(.max)
        let x = Tensor.uniform([4, 3, 12, 12], low: -1, high: 1, rng: &rng)
        let graph = try Graph.trace(model, example: x) { [model($0)] }
        let plan = try Int8Plan(graph)
        #expect(plan.int8ConvCount == 3)
        let fused = plan.steps.compactMap { s -> Int8Conv? in if case .int8Conv(let c, _, _) = s { return c } else { return nil } }
        #expect(fused.map(\.relu) == [true, true, false])
        #expect(fused.map { $0.outputAmax != nil } == [true, true, false], "the last conv feeds a pooling layer: f32 out")
        #expect(plan.reformats == ["quantize": 1] && plan.int8GemmCount == 1, "\(plan.explain())")
        let reference = try ReferenceExecutor(graph).runKeepingValues([x])
        let (compared, oneOff) = try compareLayers(plan, reference)
        #expect(compared > 0)
        #expect(Double(oneOff) / Double(compared) < 0.02, "\(oneOff) of \(compared) codes one apart")
        // end to end: the same logits up to the rounding differences
        let engine = try plan.run([x])[0], simulated = withNoGrad { model(x) }
        #expect(cosineSimilarity(engine.values, simulated.values) > 0.999)
        // signed input codes (the image is in [-1, 1]) took the offset-128 path; a non-negative image the offset-0 one
        let positive = Tensor.uniform([4, 3, 12, 12], low: 0, high: 1, rng: &rng)
        #expect(cosineSimilarity(try plan.run([positive])[0].values, withNoGrad { model(positive) }.values) > 0.999)
    }

    @Test("profiling: every step timed on every profiled run; the report by kind; convRates = the convs' work over their median times, nil before")
    func profiling() throws {
        var rng = SeededGenerator(seed: 31)
        let model = Sequential([Conv2d(3, 8, kernel: 3, rng: &rng), Lambda.relu(), Conv2d(8, 16, kernel: 3, stride: 2, rng: &rng), Lambda.relu()])
        model.eval()
        let x = Tensor.uniform([2, 3, 12, 12], low: 0, high: 1, rng: &rng)
        func trace() throws -> Int8Plan { try Int8Plan(try Graph.trace(model, example: x) { [model($0)] }) }
        func profiled(_ plan: Int8Plan) throws -> [Double] {
            #expect(plan.convRates.integer == nil && plan.convRates.float == nil, "nothing profiled yet")
            plan.profile = true
            for _ in 0..<3 { _ = try plan.run([x]) }
            #expect(plan.stepSamples.count == plan.steps.count && plan.stepSamples.allSatisfy { $0.count == 3 })
            #expect(plan.outsideStepsSamples.count == 3 && plan.outsideStepsSamples.allSatisfy { $0 >= 0 })
            #expect(plan.profileReport().hasPrefix("time by kind of step") && plan.profileReport().contains("outside the steps"))
            return plan.stepMedians
        }
        // FP32: the direct convs' count, 2 x outputs x (C x 3 x 3), over the convs' median times
        let fp32 = try trace()
        fp32.floatConvRoute = .conv2d
        let fm = try profiled(fp32)
        let convSteps = fp32.steps.indices.filter { if case .float(let n) = fp32.steps[$0], case .conv = n.op { true } else { false } }
        #expect(convSteps.count == 2)
        let flops: Double = 2 * 2304 * 27 + 2 * 1152 * 72 // outputs: 2 x 8 x 12 x 12 and 2 x 16 x 6 x 6
        let convSeconds: Double = convSteps.map { fm[$0] }.reduce(0, +)
        let wantFloat = flops / convSeconds, gotFloat = try #require(fp32.convRates.float)
        #expect(fp32.convRates.integer == nil && abs(gotFloat - wantFloat) <= 1e-9 * wantFloat)
        // INT8: the integer convs' operations (the second: 2 x 72 pixels x depth 72 x 16 channels)
        let sim = try QuantizationSimulator(model)
        defer { sim.remove() }
        sim.calibrate(on: [x]) { _ = model($0) }
        try sim.applyCalibration(.max)
        let int8 = try trace()
        let im = try profiled(int8)
        let convs = int8.steps.indices.compactMap { i -> (Int8Conv, Double)? in if case .int8Conv(let c, _, _) = int8.steps[i] { (c, im[i]) } else { nil } }
        let secondOps: Double = 2 * 72 * 72 * 16
        #expect(convs.count == 2 && convs[1].0.lastOps == secondOps)
        let ops: Double = convs.map(\.0.lastOps).reduce(0, +), seconds: Double = convs.map(\.1).reduce(0, +)
        let wantInteger = ops / seconds, gotInteger = try #require(int8.convRates.integer)
        #expect(int8.convRates.float == nil && abs(gotInteger - wantInteger) <= 1e-9 * wantInteger)
    }

    @Test("the detector: every conv fuses; Reformat steps are counted; layer by layer within one code of the simulator; outputs close end to end")
    func detector() throws {
        var rng = SeededGenerator(seed: 24)
        let (model, sim) = try calibratedDeployedDetector(seed: 23, rng: &rng)
        defer { sim.remove() }
        let graph = try Graph.trace(model, batch: 2)
        let plan = try Int8Plan(graph)
        plan.convRouteChoice = .direct // the routes checked below, not the timing's choice
        #expect(plan.int8ConvCount == graph.opCounts["Conv"]! + graph.opCounts["ConvTranspose"]!, "the upsampling transposed convs run in int8 too")
        #expect((plan.reformats["quantize"] ?? 0) >= 1)
        let x = Tensor.uniform([2, 3, 64, 64], low: 0, high: 1, rng: &rng)
        let (compared, oneOff) = try compareLayers(plan, try ReferenceExecutor(graph).runKeepingValues([x]))
        #expect(compared > 10_000 && Double(oneOff) / Double(compared) < 0.02, "\(oneOff) of \(compared) codes one apart")
        let out = try plan.run([x])
        let (logits, distances) = withNoGrad { model(x) }
        #expect(cosineSimilarity(out[0].values, logits.values) > 0.99 && cosineSimilarity(out[1].values, distances.values) > 0.99)
        #expect(plan.explain().contains("Int8Conv int8 -> int8"))
        // the route each conv took: the direct kernel (the image's 3 channels padded to 4; the
        // head's convs on signed codes after SiLU), on every ISA (AVX-512 runs its AVX2 code)
        let routes = plan.int8Convs.filter { !$0.transposed }.map { $0.route ?? "none" }
        #expect(Set(routes) == ["direct", "direct, channels padded to 4"] && routes.filter { $0.hasSuffix("padded to 4") }.count == 1, "\(routes)")
    }

    @Test("unpackedB reads ql_igemm_pack_b's layout back: depths not a multiple of 4, columns across panels")
    func unpackedWeights() {
        var rng = SeededGenerator(seed: 35)
        for (depth, columns) in [(1, 1), (7, 33), (36, 64), (27, 16), (130, 70)] {
            let b = (0..<(depth * columns)).map { _ in Int8(truncatingIfNeeded: rng.next()) }
            var packed = [Int8](repeating: 0, count: ql_igemm_packed_size(Int32(depth), Int32(columns)))
            #expect(ql_igemm_pack_b(&packed, nil, b, Int32(columns), Int32(depth), Int32(columns)) == 0)
            #expect(unpackedB(packed, depth: depth, columns: columns) == b, "\(depth) x \(columns)")
        }
    }

    @Test("the convs' route choice: direct, im2col + GEMM and timed give the plan's outputs bit for bit; timed keeps the faster route at each shape")
    func convRouteChoice() throws {
        var rng = SeededGenerator(seed: 32)
        let (model, sim) = try calibratedDeployedDetector(seed: 31, rng: &rng)
        defer { sim.remove() }
        let plan = try Int8Plan(try Graph.trace(model, batch: 2))
        let convs = plan.int8Convs.filter { !$0.transposed }
        let x = Tensor.uniform([2, 3, 64, 64], low: 0, high: 1, rng: &rng)
        var outputs: [Int8Conv.RouteChoice: [[Float]]] = [:]
        var routes: [Int8Conv.RouteChoice: [String]] = [:]
        for choice in [Int8Conv.RouteChoice.direct, .im2col, .timed] {
            plan.convRouteChoice = choice
            outputs[choice] = try plan.run([x]).map(\.values)
            routes[choice] = convs.map { $0.route ?? "none" }
        }
        #expect(routes[.direct]!.allSatisfy { $0.hasPrefix("direct") } && routes[.im2col]!.allSatisfy { $0 == "im2col + GEMM" }, "\(routes)")
        #expect(outputs[.direct] == outputs[.im2col] && outputs[.timed] == outputs[.direct], "the routes' bits differ")
        // every conv timed both routes (none declines here) and names the faster
        for conv in convs {
            let times = try #require(conv.routeTimes, "\(conv.name) was not timed")
            #expect(times.direct > 0 && times.im2col > 0)
            #expect(conv.route!.hasPrefix("direct") == (times.direct <= times.im2col), "\(conv.name): \(conv.routeSummary!)")
        }
        // the choice is kept per shape: a second run takes the same routes
        let kept = convs.map(\.route)
        #expect(try plan.run([x]).map(\.values) == outputs[.direct] && convs.map(\.route) == kept)
    }

    @Test("the FP32 plan (no quantizers): each ReLU or SiLU that is a conv's only reader runs inside the conv, chains of direct convs pass NHWC tensors; the outputs are the model's bits")
    func floatPlanFusesReLU() throws {
        let model = deployedDetector(seed: 29)
        var rng = SeededGenerator(seed: 30)
        let graph = try Graph.trace(model, batch: 2)
        let plan = try Int8Plan(graph)
        #expect(plan.floatConvRoute == .timed, "an all-float plan times Winograd by default")
        plan.floatConvRoute = .conv2d // the model's bits, checked below
        let consumers = graph.consumers
        func fusable(_ op: String) -> Int {
            graph.nodes.filter { n in
                guard case .conv = n.op, let users = consumers[n.output], users.count == 1, !graph.outputs.contains(n.output) else { return false }
                return graph.nodes[users[0]].op.name == op
            }.count
        }
        func steps(_ op: String) -> Int { plan.steps.filter { if case .float(let n) = $0 { return n.op.name == op } else { return false } }.count }
        #expect(fusable("Relu") > 10 && steps("Relu") == graph.opCounts["Relu", default: 0] - fusable("Relu"), "\(fusable("Relu")) fusable, \(steps("Relu")) ReLU steps left")
        #expect(fusable("SiLU") >= 6 && steps("SiLU") == graph.opCounts["SiLU", default: 0] - fusable("SiLU"), "\(fusable("SiLU")) fusable, \(steps("SiLU")) SiLU steps left")
        #expect(plan.explain().contains("fused: bias, ReLU") && plan.explain().contains("fused: bias, SiLU"))
        // on AVX2 the RepVGG stages' convs read their input as the previous conv wrote it
        // (padded NHWC); where the direct kernel does not run, every tensor stays NCHW
        let chained = plan.explain().components(separatedBy: "in: NHWC padded").count - 1
        #expect(Kernels.isa == .avx2 ? chained >= 5 : chained == 0, "\(chained) convs read NHWC")
        let x = Tensor.uniform([2, 3, 64, 64], low: 0, high: 1, rng: &rng)
        let out = try plan.run([x]), want = withNoGrad { model(x) }
        #expect(out[0].values == want.0.values && out[1].values == want.1.values)
        #expect(try ReferenceExecutor(graph).run([x]).map(\.values) == out.map(\.values))
    }

    @Test("the FP32 plan's 3x3 stride-1 convs on Winograd F(2x2, 3x3): the model's values within a few units in the last place, in chains too; timed keeps the faster; a plan with integer steps keeps the model's convs")
    func floatPlanWinograd() throws {
        let model = deployedDetector(seed: 33)
        var rng = SeededGenerator(seed: 34)
        let plan = try Int8Plan(try Graph.trace(model, batch: 2))
        let x = Tensor.uniform([2, 3, 64, 64], low: 0, high: 1, rng: &rng)
        let want = withNoGrad { model(x) }
        plan.floatConvRoute = .winograd
        let out = try plan.run([x])
        let use = plan.winogradUse
        #expect(use.candidates >= 10 && use.running == use.candidates, "\(use)")
        #expect(plan.explain().contains("[Winograd]") && plan.explain().contains("in: NHWC padded") == (Kernels.isa == .avx2))
        // close, not equal: each output within 1e-4 of the outputs' scale, and not the same bits
        for (got, ref) in zip(out, [want.0, want.1]) {
            #expect(relativeMaxDifference(got, ref) < 1e-4, "\(relativeMaxDifference(got, ref))")
        }
        #expect(out[1].values != want.1.values, "Winograd gave the direct conv's bits: did it run?")
        // timed: every candidate timed both at this shape and runs the faster
        plan.floatConvRoute = .timed
        let timed = try plan.run([x])
        #expect(zip(timed, [want.0, want.1]).allSatisfy { relativeMaxDifference($0, $1) < 1e-4 })
        for conv in plan.winogradConvs.values {
            let t = try #require(conv.times)
            #expect(conv.ranWinograd == (t.winograd < t.conv2d), "\(conv.summary ?? "")")
        }
        // with quantizers the float convs keep the model's bits (the engine equals the simulator)
        let sim = try QuantizationSimulator(model)
        defer { sim.remove() }
        sim.calibrate(on: [x]) { _ = model($0) }
        try sim.applyCalibration(.max)
        #expect(try Int8Plan(try Graph.trace(model, batch: 2)).floatConvRoute == .conv2d)
    }

    @Test("a transposed conv with kernel == stride runs as one GEMM and a scatter: int8 and f32 outputs, signed and non-negative inputs, within one code of the simulator; other transposed convs stay in float")
    func transposedConv() throws {
        var rng = SeededGenerator(seed: 27)
        let up = ConvTranspose2d(6, 5, kernel: 2, stride: 2, rng: &rng), other = ConvTranspose2d(5, 4, kernel: 3, stride: 2, padding: 1, rng: &rng)
        let head = Conv2d(5, 3, kernel: 1, rng: &rng)
        let model = Sequential([up, head, other]) // "0", "1", "2"
        model.eval()
        let forward: (Tensor) -> [Tensor] = { x in let u = up(x); return [head(u), other(u), up(x.relu())] }
        let sim = try QuantizationSimulator(model)
        defer { sim.remove() }
        sim.calibrate(on: [Tensor.uniform([2, 6, 5, 7], low: -1, high: 1, rng: &rng)]) { _ = forward($0) }
        try sim.applyCalibration(.max)
        try sim.layer("2").input.amax = try sim.layer("1").input.amax // one scale for both readers of u: up writes int8
        let x = Tensor.uniform([2, 6, 5, 7], low: -1, high: 1, rng: &rng)
        let graph = try Graph.trace(model, example: x, forward)
        let plan = try Int8Plan(graph)
        let kinds = plan.steps.compactMap { s -> String? in if case .int8Conv(let c, _, _) = s { return "\(c.name) \(c.kindName) \(c.outputAmax == nil ? "f32" : "int8")" } else { return nil } }
        // the first "0" reads signed codes and writes int8 for "1"; the second "0" (on relu(x)) writes f32 (a graph output)
        #expect(kinds == ["0 Int8ConvTranspose int8", "1 Int8Conv f32", "0_1 Int8ConvTranspose f32"], "\(plan.explain())")
        #expect(graph.nodes.contains { $0.name == "2" } && !plan.explain().contains("2  Int8ConvTranspose"), "kernel 3, stride 2, padding 1 stays in float")
        let (compared, oneOff) = try compareLayers(plan, try ReferenceExecutor(graph).runKeepingValues([x]))
        #expect(compared == 2 * 5 * 10 * 14 && Double(oneOff) / Double(compared) < 0.02, "\(oneOff) of \(compared) codes one apart")
        let engine = try plan.run([x]), simulated = withNoGrad { forward(x) }
        for (e, s) in zip(engine, simulated) { #expect(cosineSimilarity(e.values, s.values) > 0.999) }
    }

    @Test("INT8 activation kernels: quantize to NHWC codes equals the fake quantizer; dequantize inverts it; im2col matches the direct loop with both offsets")
    func activationKernels() throws {
        var rng = SeededGenerator(seed: 25)
        let x = Tensor.uniform([2, 3, 5, 4], low: -2, high: 2, rng: &rng)
        let amax: Float = 1.5
        let q = codes(x, amax: amax)
        let fq = withNoGrad { fakeQuantize(x, amax: [amax], spec: .int8PerTensor) }
        var back = [Float](repeating: 0, count: x.count)
        ql_dequantize_nhwc_to_nchw_f32(&back, q.codes, 2, 3, 20, amax / 127)
        #expect(back == fq.values, "code * s must equal the fake quantizer's value")
        #expect(ql_s8_min(q.codes, Int64(q.codes.count)) == -127 && ql_s8_min([3, 0, 5], 3) == 0)
        var g = ql_conv_geom(N: 2, C: 3, H: 5, W: 4, K: 1, KH: 3, KW: 2, SH: 2, SW: 1, PH: 1, PW: 1, DH: 1, DW: 1, groups: 1)
        var oh: Int32 = 0, ow: Int32 = 0
        _ = ql_conv_out_size(&g, &oh, &ow)
        let depth = 3 * 2 * 3
        for offset: Int32 in [0, 128] {
            var col = [UInt8](repeating: 0, count: 2 * Int(oh * ow) * depth)
            #expect(ql_im2col_nhwc_s8u8(&col, q.codes, &g, offset) == 0)
            for n in 0..<2 { for i in 0..<Int(oh) { for j in 0..<Int(ow) { for kh in 0..<3 { for kw in 0..<2 { for c in 0..<3 {
                let (ih, iw) = (i * 2 - 1 + kh, j - 1 + kw)
                let code = ih < 0 || ih >= 5 || iw < 0 || iw >= 4 ? 0 : Int(q.codes[((n * 5 + ih) * 4 + iw) * 3 + c])
                let got = Int(col[((n * Int(oh) + i) * Int(ow) + j) * depth + (kh * 2 + kw) * 3 + c])
                if offset == 128 { #expect(got == code + 128) } else if code >= 0 { #expect(got == code) }
            } } } } } }
        }
        #expect(ql_im2col_nhwc_s8u8(nil, q.codes, &g, 7) != 0)
    }
}

@Suite("Engine INT8 plan: TensorRT's placement rules")
struct EngineRulesTests {
    /// conv1 -> ReLU -> a, read by conv2 and conv3 (rule 6 when their input scales differ), and
    /// an SPPF-like branch a -> three max pools -> concat -> conv4 (rules 1 and 5).
    private func network(_ rng: inout SeededGenerator) -> (Sequential, (Tensor) -> [Tensor]) {
        let c1 = Conv2d(3, 8, kernel: 3, rng: &rng), c2 = Conv2d(8, 4, kernel: 1, rng: &rng)
        let c3 = Conv2d(8, 4, kernel: 3, rng: &rng), c4 = Conv2d(32, 4, kernel: 1, rng: &rng)
        let container = Sequential([c1, c2, c3, c4]) // names "0".."3"
        container.eval()
        return (container, { x in
            let a = c1(x).relu()
            let b = maxPool2d(a, kernel: 5, stride: 1, padding: 2), c = maxPool2d(b, kernel: 5, stride: 1, padding: 2), d = maxPool2d(c, kernel: 5, stride: 1, padding: 2)
            return [c2(a), c3(a), c4(concat([a, b, c, d], dim: 1))]
        })
    }

    private func plan(sameScales: Bool) throws -> (Int8Plan, Sequential, (Tensor) -> [Tensor], Tensor) {
        var rng = SeededGenerator(seed: 31)
        let (model, forward) = network(&rng)
        let sim = try QuantizationSimulator(model)
        let x = Tensor.uniform([2, 3, 16, 16], low: -1, high: 1, rng: &rng)
        sim.calibrate(on: [x]) { _ = forward($0) }
        try sim.applyCalibration(.max)
        // a's three readers: conv "1", conv "2" and (through the pools and the concat) conv "3"
        let a = try sim.layer("1").input.amax![0]
        try sim.layer("2").input.amax = [sameScales ? a : a * 0.8]
        try sim.layer("3").input.amax = [a]
        let graph = try Graph.trace(model, example: x, forward)
        return (try Int8Plan(graph), model, forward, x)
    }

    @Test("one tensor wanted at two scales is written in float and quantized once per scale (rule 6); at one scale the conv writes int8 once and nothing is reformatted")
    func twoScales() throws {
        let (split, _, _, _) = try plan(sameScales: false)
        let conv1 = split.steps.compactMap { s -> Int8Conv? in if case .int8Conv(let c, _, _) = s, c.name == "0" { return c } else { return nil } }.first
        #expect(conv1?.outputAmax == nil, "conv 0 feeds two scales: f32 out")
        #expect(split.reformats["quantize"] == 3, "the image, and a at each of its two scales: \(split.explain())")
        let (unified, model, forward, x) = try plan(sameScales: true)
        #expect(unified.reformats == ["quantize": 1], "only the image is quantized: \(unified.explain())")
        // the max pools and the concat ran on int8 codes, and equal the simulator's up to the convs' one-code differences
        #expect(unified.steps.filter { if case .int8Op = $0 { return true } else { return false } }.count == 4)
        let engine = try unified.run([x]), simulated = withNoGrad { forward(x) }
        for (e, s) in zip(engine, simulated) { #expect(cosineSimilarity(e.values, s.values) > 0.999) }
        _ = model
    }

    @Test("scale unification from the graph: the quantizers reading one tensor (directly or through pools and concat) form one group; given its max amax, the tensor is written once in int8")
    func unification() throws {
        var rng = SeededGenerator(seed: 31)
        let (model, forward) = network(&rng)
        let sim = try QuantizationSimulator(model)
        defer { sim.remove() }
        let x = Tensor.uniform([2, 3, 16, 16], low: -1, high: 1, rng: &rng)
        sim.calibrate(on: [x]) { _ = forward($0) }
        try sim.applyCalibration(.max)
        let a = try sim.layer("1").input.amax![0]
        try sim.layer("2").input.amax = [a * 0.8]
        try sim.layer("3").input.amax = [a * 1.3]
        let before = try Int8Plan(try Graph.trace(model, example: x, forward))
        let groups = scaleGroups(before.graph)
        #expect(groups == [["1.input", "2.input", "3.input"]], "\(groups)")
        let changes = try unifyScales(sim, groups: groups)
        #expect(changes.count == 1 && changes[0].after == a * 1.3)
        #expect(try sim.layer("1").input.amax == [a * 1.3] && sim.layer("2").input.amax == [a * 1.3])
        let after = try Int8Plan(try Graph.trace(model, example: x, forward))
        #expect((before.reformats["quantize"] ?? 0) > 1 && after.reformats == ["quantize": 1], "before \(before.reformats), after \(after.reformats)")
        #expect(scaleGroups(after.graph) == groups, "the groups are a property of the graph, not of the scales")
    }

    @Test("the SiLU epilogue computes the elementwise op's floats; the flat quantizer gives the fake quantizer's codes")
    func siluEpilogue() throws {
        var rng = SeededGenerator(seed: 35)
        let (m, n, k) = (7, 40, 27)
        let a = (0..<(m * k)).map { _ in UInt8(truncatingIfNeeded: rng.next()) & 0x7F }
        let b = (0..<(k * n)).map { _ in Int8(Int(rng.next() % 255) - 127) }
        var packed = [Int8](repeating: 0, count: ql_igemm_packed_size(Int32(k), Int32(n)))
        _ = ql_igemm_pack_b(&packed, nil, b, Int32(n), Int32(k), Int32(n))
        let scale = (0..<n).map { _ in 1e-4 + 1e-3 * rng.nextFloat() }, bias = randomFloats(n, &rng, low: -2, high: 2)
        var acc = [Int32](repeating: 0, count: m * n)
        _ = ql_igemm_u8s8s32_ref(Int32(m), Int32(n), Int32(k), a, Int32(k), b, Int32(n), &acc, Int32(n))
        var linear = [Float](repeating: 0, count: m * n)
        _ = ql_dequantize_f32_ref(Int32(m), Int32(n), &linear, Int32(n), acc, Int32(n), nil, scale, bias, 0)
        let want = withNoGrad { Tensor(linear, shape: [m * n]).silu() }.values
        for isa in [Kernels.ISA.reference, Kernels.isa] {
            var got = [Float](repeating: 0, count: m * n)
            scale.withUnsafeBufferPointer { sc in bias.withUnsafeBufferPointer { bi in
                var ep = ql_requant_params(col_offset: nil, scale: sc.baseAddress, bias: bi.baseAddress, relu: 2)
                _ = ql_igemm_u8s8_f32_isa(ql_isa(rawValue: UInt32(isa.rawValue)), Int32(m), Int32(n), Int32(k), a, Int32(k), packed, &ep, &got, Int32(n))
            } }
            #expect(got == want, "isa \(isa): SiLU epilogue differs from the elementwise SiLU")
        }
        var codes = [Int8](repeating: 0, count: want.count)
        ql_quantize_s8(&codes, want, Int64(want.count), 1.3, 127)
        let fq = withNoGrad { fakeQuantize(Tensor(want, shape: [want.count]), amax: [1.3], spec: .int8PerTensor) }.values
        #expect(codes.map { Float($0) * (1.3 / 127) } == fq)
    }

    @Test("NCHW floats to NHWC int8 codes: the fake quantizer's codes, one image split between threads or a batch by images")
    func quantizeToNHWC() {
        var rng = SeededGenerator(seed: 35)
        // a batch-1 stem input (two tasks of one image), an odd pixel count, a batch, a tiny map
        for (n, c, h, w) in [(1, 3, 160, 160), (1, 3, 161, 163), (3, 5, 61, 67), (2, 3, 5, 7)] {
            let x = Tensor.uniform([n, c, h, w], low: -2, high: 2, rng: &rng)
            var got = [Int8](repeating: 0, count: x.count)
            ql_quantize_nchw_to_nhwc_s8(&got, x.data, Int32(n), Int32(c), Int32(h * w), 1.7, 127)
            let fq = withNoGrad { fakeQuantize(x, amax: [1.7], spec: .int8PerTensor) }.values
            var want = [Int8](repeating: 0, count: x.count)
            for i in 0..<n { for ch in 0..<c { for p in 0..<(h * w) {
                want[(i * h * w + p) * c + ch] = Int8((fq[(i * c + ch) * h * w + p] / (1.7 / 127)).rounded())
            } } }
            let wrong = zip(got, want).filter { $0 != $1 }.count
            #expect(wrong == 0, "\([n, c, h, w]): \(wrong) of \(got.count) codes differ")
        }
    }

    @Test("int8 max pool and channel concat kernels equal quantizing the float results")
    func int8OpsCommute() throws {
        var rng = SeededGenerator(seed: 33)
        let x = Tensor.uniform([2, 3, 7, 6], low: -2, high: 2, rng: &rng), y = Tensor.uniform([2, 5, 7, 6], low: -2, high: 2, rng: &rng)
        func codes(_ t: Tensor) -> [Int8] {
            var c = [Int8](repeating: 0, count: t.count)
            ql_quantize_nchw_to_nhwc_s8(&c, t.data, Int32(t.shape[0]), Int32(t.shape[1]), Int32(t.shape[2] * t.shape[3]), 1.5, 127)
            return c
        }
        let pooled = maxPool2d(x, kernel: 3, stride: 2, padding: 1)
        var out = [Int8](repeating: 0, count: pooled.count)
        #expect(ql_maxpool_nhwc_s8(&out, codes(x), 2, 7, 6, 3, 3, 2, 1) == 0)
        #expect(out == codes(pooled))
        let joined = concat([x, y], dim: 1)
        var cat = [Int8](repeating: 0, count: joined.count)
        let (cx, cy) = (codes(x), codes(y))
        cx.withUnsafeBufferPointer { px in cy.withUnsafeBufferPointer { py in
            let ptrs: [UnsafePointer<Int8>?] = [px.baseAddress, py.baseAddress]
            ql_concat_channels_nhwc_s8(&cat, ptrs, [3, 5], 2, 2 * 7 * 6)
        } }
        #expect(cat == codes(joined))
        // requantizing codes equals two fake quantizers in a row
        let once = withNoGrad { fakeQuantize(x, amax: [1.5], spec: .int8PerTensor) }
        let twice = withNoGrad { fakeQuantize(once, amax: [0.9], spec: .int8PerTensor) }
        var requantized = [Int8](repeating: 0, count: x.count)
        ql_requantize_codes_s8(&requantized, codes(x), Int64(x.count), 1.5 / 127, 0.9, 127)
        var back = [Float](repeating: 0, count: x.count)
        ql_dequantize_nhwc_to_nchw_f32(&back, requantized, 2, 3, 42, 0.9 / 127)
        #expect(back == twice.values)
    }
}
