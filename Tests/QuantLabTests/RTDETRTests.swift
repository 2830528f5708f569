import Foundation
import Testing
@testable import QuantLabBench
@testable import QuantLabCore
@testable import QuantLabData
@testable import QuantLabEngine
@testable import QuantLabModels
@testable import QuantLabQuant

/// A tiny RT-DETR (64 px, hidden 16) from its own seed.
/// A self-attention module with Q/DQ at its linears and at both operands of its products,
/// calibrated (max) on its input x [2, 5, 16]; the caller removes the simulator.
func quantizedAttention(seed: UInt64) throws -> (MultiHeadAttention, Tensor, QuantizationSimulator) {
    var rng = SeededGenerator(seed: seed)
    let m = MultiHeadAttention(dim: 16, heads: 2, rng: &rng)
    m.eval()
    let x = Tensor.uniform([2, 5, 16], low: -2, high: 2, rng: &rng)
    var options = QuantizationOptions()
    options.quantizeMatMul = true
    let sim = try QuantizationSimulator(m, options: options)
    sim.calibrate { _ = m(query: x, key: x, value: x) }
    try sim.applyCalibration(.max)
    return (m, x, sim)
}

func tinyRTDETR(seed: UInt64 = 0, classes: Int = 3) -> RTDETR {
    var rng = SeededGenerator(seed: seed)
    let c = RTDETRConfig(inputSize: 64, numClasses: classes, backboneChannels: [4, 4, 8, 8, 16], backboneDepths: [1, 1, 1, 1],
                         hidden: 16, heads: 2, feedForward: 32, cspBlocks: 1, decoderLayers: 2, queries: 6)
    return RTDETR(c, rng: &rng)
}

@Suite("RT-DETR: ops, matcher, model, loss, engine")
struct RTDETRTests {
    // MARK: matcher

    /// The cheapest assignment by trying every injective map of rows to columns.
    private func bruteForce(_ cost: [[Double]]) -> Double {
        let n = cost.count, m = cost[0].count
        var best = Double.infinity
        func go(_ r: Int, _ used: Set<Int>, _ sum: Double) {
            if r == n { best = min(best, sum); return }
            for c in 0..<m where !used.contains(c) { go(r + 1, used.union([c]), sum + cost[r][c]) }
        }
        go(0, [], 0)
        return best
    }

    @Test("Hungarian assignment: hand cases and the brute-force optimum on 300 random matrices")
    func hungarian() {
        #expect(minimumCostAssignment([]) == [])
        #expect(minimumCostAssignment([[4, 1, 3], [2, 0, 5], [3, 2, 2]]) == [1, 0, 2]) // total 5
        // greedy (row 0 takes its cheapest column) is wrong here; the optimum is 1 + 1
        #expect(minimumCostAssignment([[0, 1], [0, 100]]) == [1, 0])
        #expect(minimumCostAssignment([[5, 9, 1, 7]]) == [2])
        var rng = SeededGenerator(seed: 7)
        for trial in 0..<300 {
            let n = 1 + Int(rng.next() % 4), m = n + Int(rng.next() % 3)
            // integer-valued costs make ties common: the optimum's value must still match
            let cost = (0..<n).map { _ in (0..<m).map { _ in Double(rng.next() % 7) - (trial % 2 == 0 ? 0 : 3.5) } }
            let a = minimumCostAssignment(cost)
            #expect(Set(a).count == n && a.allSatisfy { (0..<m).contains($0) }, "trial \(trial): \(a) is not injective")
            let total = zip(0..<n, a).reduce(0) { $0 + cost[$1.0][$1.1] }
            #expect(abs(total - bruteForce(cost)) < 1e-9, "trial \(trial): cost \(total) vs optimum \(bruteForce(cost)) for \(cost)")
        }
    }

    // MARK: ops

    @Test("GELU against the erf formula in double; gather-top-k picks by the best class score, ties to the lower index")
    func opsForward() throws {
        let xs: [Float] = [-4, -1.5, -0.3, 0, 0.2, 1, 3.7]
        let y = Tensor(xs, shape: [xs.count]).gelu()
        for (i, x) in xs.enumerated() {
            let ref = 0.5 * Double(x) * (1 + erf(Double(x) / 2.0.squareRoot()))
            #expect(abs(Double(y.data[i]) - ref) <= 1e-6 + 1e-6 * abs(ref), "gelu(\(x)) = \(y.data[i]), expected \(ref)")
        }
        // scores [1, 4, 2]: token maxima 0.5, 0.9, 0.9, -1 -> order 1, 2, 0, 3
        let scores = Tensor([0.5, 0.1, 0.2, 0.9, 0.9, 0.3, -1, -2], shape: [1, 4, 2])
        #expect(topKTokens(scores, k: 3) == [[1, 2, 0]])
        let x = Tensor((0..<12).map(Float.init), shape: [1, 4, 3])
        #expect(gatherTopK(scores: scores, x, k: 2).values == [3, 4, 5, 6, 7, 8])
    }

    @Test("backward of GELU, gather-top-k and multi-head attention against finite differences")
    func gradients() {
        var rng = SeededGenerator(seed: 11)
        var failures = gradientCheck("gelu", [tensor([3, 5], &rng, low: -3, high: 3)]) { $0[0].gelu() }
        let scores = Tensor.uniform([2, 5, 3], low: -1, high: 1, rng: &rng)
        failures += gradientCheck("gather_topk", [tensor([2, 5, 4], &rng)]) { gatherTopK(scores: scores, $0[0], k: 3) }
        let attention = MultiHeadAttention(dim: 8, heads: 2, rng: &rng)
        failures += gradientCheck("attention (inputs)", [tensor([2, 3, 8], &rng), tensor([2, 5, 8], &rng), tensor([2, 5, 8], &rng)], eps: 1e-2, atol: 2e-3) {
            attention(query: $0[0], key: $0[1], value: $0[2])
        }
        let q = tensor([1, 3, 8], &rng), kv = tensor([1, 4, 8], &rng)
        failures += gradientCheck("attention (projection weights)", [attention.qProj.weight, attention.kProj.weight, attention.vProj.weight, attention.outProj.weight],
                                  eps: 1e-2, atol: 2e-3) { _ in attention(query: q, key: kv, value: kv) }
        #expect(failures.isEmpty, "\(failures.prefix(5).joined(separator: "\n"))")
    }

    @Test("multi-head attention equals softmax(QK^T / sqrt(d)) V per head computed with loops")
    func attentionReference() {
        var rng = SeededGenerator(seed: 12)
        let (b, nq, nk, d, h) = (2, 3, 4, 6, 2)
        let m = MultiHeadAttention(dim: d, heads: h, rng: &rng)
        let q = tensor([b, nq, d], &rng), kv = tensor([b, nk, d], &rng)
        let out = withNoGrad { m(query: q, key: kv, value: kv) }
        let (Q, K, V) = withNoGrad { (m.qProj(q), m.kProj(kv), m.vProj(kv)) }
        let dh = d / h
        var concatenated = [Float](repeating: 0, count: b * nq * d)
        for n in 0..<b {
            for head in 0..<h {
                for i in 0..<nq {
                    var logits = (0..<nk).map { j in
                        (0..<dh).reduce(0.0) { $0 + Double(Q.data[(n * nq + i) * d + head * dh + $1]) * Double(K.data[(n * nk + j) * d + head * dh + $1]) } / Double(dh).squareRoot()
                    }
                    let top = logits.max()!
                    logits = logits.map { Foundation.exp($0 - top) }
                    let z = logits.reduce(0, +)
                    for c in 0..<dh {
                        concatenated[(n * nq + i) * d + head * dh + c] = Float((0..<nk).reduce(0.0) { $0 + logits[$1] / z * Double(V.data[(n * nk + $1) * d + head * dh + c]) })
                    }
                }
            }
        }
        let expected = withNoGrad { m.outProj(Tensor(concatenated, shape: [b, nq, d])) }
        #expect(firstMismatch(out.values, expected.values, atol: 1e-5, rtol: 1e-4) == nil)
    }

    @Test("2-D sin-cos embedding: RT-DETR's layout, sin(w omega), cos(w omega), sin(h omega), cos(h omega)")
    func sinCos() {
        let e = sinCosPositionEmbedding2D(width: 3, height: 2, dim: 8)
        #expect(e.shape == [6, 8])
        // row (h 1, w 2) = index 5; d = 2, omega = [1, 1/100]
        let row = Array(e.values[40..<48]).map(Double.init)
        let expected = [sin(2.0), sin(0.02), cos(2.0), cos(0.02), sin(1.0), sin(0.01), cos(1.0), cos(0.01)]
        for (a, b) in zip(row, expected) { #expect(abs(a - b) < 1e-6) }
        // the origin row: sines 0, cosines 1
        #expect(Array(e.values[0..<8]) == [0, 0, 1, 1, 0, 0, 1, 1])
    }

    // MARK: model and loss

    @Test("RT-DETR: shapes, the encoder's top-K set, boxes in (0, 1), a finite loss with gradients everywhere it should reach")
    func modelAndLoss() throws {
        let m = tinyRTDETR()
        try m.config.validate()
        var rng = SeededGenerator(seed: 3)
        let x = Tensor.uniform([2, 3, 64, 64], low: 0, high: 1, rng: &rng)
        let (enc, dec) = m.predictions(x)
        #expect(enc.logits.shape == [2, 6, 3] && enc.boxes.shape == [2, 6, 4])
        #expect(dec.count == 2 && dec.allSatisfy { $0.logits.shape == [2, 6, 3] && $0.boxes.shape == [2, 6, 4] })
        #expect(dec.last!.boxes.values.allSatisfy { $0 > 0 && $0 < 1 })
        let labels = [[ObjectLabel(box: Box(x1: 4, y1: 8, x2: 30, y2: 40), classIndex: 1), ObjectLabel(box: Box(x1: 40, y1: 40, x2: 60, y2: 62), classIndex: 2)], []]
        let (loss, parts) = RTDETRLoss()(m, encoder: enc, decoder: dec, labels: labels)
        #expect(loss.item().isFinite && parts.boxes == 2)
        loss.backward()
        for (name, p) in m.namedParameters() where !name.contains("running") {
            // the deepest decoder-only pieces and the heads all get a gradient; so does the backbone (through the encoder set)
            if name.hasPrefix("backbone") || name.hasPrefix("dec_score_head") || name.hasPrefix("decoder_layers.1") {
                #expect(p.grad != nil, "\(name) got no gradient")
            }
        }
    }

    @Test("the set loss is zero for L1 and GIoU when the boxes are exact, and the matcher finds them among decoys")
    func lossOnExactBoxes() {
        // 1 image, 4 queries, 2 classes; queries 2 and 0 hold the two objects' exact boxes
        let gt = [ObjectLabel(box: Box(x1: 10, y1: 10, x2: 30, y2: 50), classIndex: 0), ObjectLabel(box: Box(x1: 60, y1: 20, x2: 90, y2: 40), classIndex: 1)]
        let s = 100.0
        func cxcywh(_ b: Box) -> [Float] { b.transformed(scaleX: 1 / s, scaleY: 1 / s).cxcywh.map(Float.init) }
        let boxes = Tensor(cxcywh(gt[1].box) + [0.5, 0.5, 0.2, 0.2] + cxcywh(gt[0].box) + [0.1, 0.9, 0.1, 0.1], shape: [1, 4, 4])
        let logits = Tensor([-4, -4, -4, -4, 3, -4, -4, -4], shape: [1, 4, 2])
        let lossFn = RTDETRLoss()
        let matched = lossFn.match(logits: logits.data, boxes: boxes.data, queries: 4, classes: 2, labels: gt, inputSize: 100)
        #expect(matched == [2, 0])
        let (_, parts) = lossFn.setLoss(RTDETRPrediction(logits: logits, boxes: boxes), labels: [gt], inputSize: 100)
        #expect(parts.l1 < 1e-6 && parts.giou < 1e-5 && parts.boxes == 2)
    }

    @Test("a few AdamW steps on one batch lower the loss (the model can learn)")
    func learnsOneBatch() {
        let m = tinyRTDETR(seed: 5)
        var rng = SeededGenerator(seed: 4)
        let x = Tensor.uniform([2, 3, 64, 64], low: 0, high: 1, rng: &rng)
        let labels = [[ObjectLabel(box: Box(x1: 4, y1: 8, x2: 30, y2: 40), classIndex: 1)], [ObjectLabel(box: Box(x1: 30, y1: 10, x2: 60, y2: 50), classIndex: 0)]]
        // BN frozen (eval mode): two 64 px images give its 2x2 stride-32 maps batch statistics of 8 values,
        // which move with every step and hide the trend this test looks for
        m.eval()
        let opt = AdamW(m.parameterGroups(weightDecay: 0), learningRate: 1e-3)
        var losses: [Float] = []
        for _ in 0..<60 {
            let (e, d) = m.predictions(x)
            let (loss, _) = RTDETRLoss()(m, encoder: e, decoder: d, labels: labels)
            losses.append(loss.item())
            opt.zeroGrad()
            loss.backward()
            opt.step()
        }
        let last5 = losses.suffix(5).reduce(0, +) / 5
        #expect(last5 < 0.6 * losses.first!, "loss \(losses)")
    }

    @Test("RT-DETR config validation names the bad field")
    func configValidation() {
        var c = RTDETRConfig.lite(numClasses: 10)
        #expect(throws: Never.self) { try c.validate() }
        c.hidden = 62
        #expect(throws: ModelFileError.self) { try c.validate() }
        c = .lite(numClasses: 10)
        c.queries = 10_000
        do { try c.validate(); Issue.record("queries 10000 accepted") } catch { #expect("\(error)".contains("queries")) }
    }

    // MARK: deploy graph and engine

    @Test("the traced deploy graph reproduces the model; the INT8 plan runs attention with quantized conv, linear and matmul operands")
    func engine() throws {
        let m = tinyRTDETR(seed: 9)
        m.eval()
        m.convertToDeployForm()
        var rng = SeededGenerator(seed: 10)
        let x = Tensor.uniform([1, 3, 64, 64], low: 0, high: 1, rng: &rng)
        let expected = withNoGrad { m(x) }
        let graph = try Graph.trace(m)
        let ops = Set(graph.nodes.map(\.op.name))
        for op in ["Conv", "Gemm", "MatMul", "Softmax", "LayerNormalization", "Gelu", "AveragePool", "GatherTopK"] { #expect(ops.contains(op), "no \(op) in the graph") }
        let out = try ReferenceExecutor(graph).run([x])
        #expect(out[0].values == expected.logits.values && out[1].values == expected.boxes.values)
        // quantize conv, linear and both operands of each attention product
        var options = QuantizationOptions()
        options.quantizeMatMul = true
        let sim = try QuantizationSimulator(m, options: options)
        defer { sim.remove() }
        #expect(sim.layers.contains { $0.kind == .matmul } && sim.layers.contains { $0.kind == .linear })
        sim.calibrate { _ = m(x) }
        try sim.applyCalibration(.max)
        let fake = withNoGrad { m(x) }
        let qdq = try Graph.trace(m)
        let plan = try Int8Plan(qdq)
        #expect(plan.int8ConvCount > 0 && plan.int8GemmCount > 0)
        let engine = try plan.run([x])
        // the plan's integer convs round once where fake quantization rounds twice: agree to a small share of the scale
        for (a, b) in zip(engine, [fake.logits, fake.boxes]) {
            let scale = Double(max(b.absMax(), 1e-6))
            let worst = zip(a.values, b.values).map { Double(abs($0 - $1)) }.max() ?? 0
            #expect(worst / scale < 0.05, "INT8 plan vs fake quantization: max difference \(worst) of scale \(scale)")
        }
    }

    @Test("Int8Gemm: a quantized attention module's linears and Q.K^T, A.V products on the integer GEMM equal fake quantization up to float rounding")
    func int8GemmMatchesFakeQuantization() throws {
        let (m, x, sim) = try quantizedAttention(seed: 31)
        defer { sim.remove() }
        let graph = try Graph.trace(m, example: x) { [m(query: $0, key: $0, value: $0)] }
        let plan = try Int8Plan(graph)
        // 4 linears and 2 products, every one on the integer GEMM; no quantizer left to run in float
        #expect(plan.int8GemmCount == 6 && plan.reformatCount == 0, "\(plan.explain())")
        let fake = try ReferenceExecutor(graph).run([x])[0], ours = try plan.run([x])[0]
        let scale = Double(fake.absMax())
        let worst = zip(ours.values, fake.values).map { Double(abs($0 - $1)) }.max()!
        #expect(worst / scale < 1e-4, "integer GEMM vs fake quantization: \(worst) of \(scale)")
        // an unquantized matmul (no quantizers) stays in float
        sim.remove()
        #expect(try Int8Plan(try Graph.trace(m, example: x) { [m(query: $0, key: $0, value: $0)] }).int8GemmCount == 0)
    }

    // MARK: ACT pieces

    @Test("soft-label loss: PaddleSlim's mean cross-entropy of softmax(teacher / T) against softmax(student / T); gradient by finite differences")
    func softLabel() {
        let s = Tensor([1, 2, 0.5, -1, 0, 3], shape: [2, 3]), t = Tensor([0.2, 1.5, -0.3, 2, 2, -2], shape: [2, 3])
        for temperature: Float in [1, 2] {
            var expected = 0.0
            for r in 0..<2 {
                let sr = (0..<3).map { Double(s.data[r * 3 + $0]) / Double(temperature) }, tr = (0..<3).map { Double(t.data[r * 3 + $0]) / Double(temperature) }
                let zs = sr.map { Foundation.exp($0) }.reduce(0, +), zt = tr.map { Foundation.exp($0) }.reduce(0, +)
                for c in 0..<3 { expected -= Foundation.exp(tr[c]) / zt * (sr[c] - Foundation.log(zs)) }
            }
            expected /= 2
            #expect(abs(Double(softLabelLoss(student: s, teacher: t, temperature: temperature).item()) - expected) < 1e-5)
        }
        var rng = SeededGenerator(seed: 21)
        let teacher = tensor([2, 4, 5], &rng, low: -2, high: 2)
        let failures = gradientCheck("soft_label", [tensor([2, 4, 5], &rng, low: -2, high: 2)]) { softLabelLoss(student: $0[0], teacher: teacher) }
        #expect(failures.isEmpty, "\(failures.prefix(3).joined(separator: "\n"))")
    }

    @Test("moving-average abs max in QAT: state = 0.9 state + 1, accum = 0.9 accum + max|x|, amax = accum / state, updated before quantizing")
    func movingAverageTracking() throws {
        let q = TensorQuantizer(spec: .int8PerTensor, histogram: false)
        q.isCalibrating = true
        _ = q(Tensor([1, -2], shape: [2]))
        q.isCalibrating = false
        try q.applyCalibration(.movingAverage(rate: 0.9))
        #expect(q.amax == [2])
        q.tracksMovingAverage = true
        _ = q(Tensor([4, 0.5], shape: [2]))
        let expected = Float((0.9 * 2 + 4) / (0.9 * 1 + 1))
        #expect(abs(q.amax![0] - expected) < 1e-6)
        q.tracksMovingAverage = false
        _ = q(Tensor([100], shape: [1]))
        #expect(abs(q.amax![0] - expected) < 1e-6, "evaluation must not move amax")
    }

    @Test("the INT8 model file: int8 codes with per-channel scales decode to exactly the fake-quantized weights, 1 byte per quantized weight")
    func int8File() throws {
        let m = tinyRTDETR(seed: 2)
        m.eval()
        m.convertToDeployForm()
        var options = QuantizationOptions()
        options.quantizeMatMul = true
        let sim = try QuantizationSimulator(m, options: options)
        defer { sim.remove() }
        for l in sim.layers { if let w = l.weight, let t = l.weightTensor { w.calibrateWeight(t) } }
        let data = try Int8ModelFile.encode(m, simulator: sim)
        let decoded = try Int8ModelFile.decode(data)
        var checked = 0, weightElements = 0, scales = 0
        for l in sim.layers {
            guard let t = l.weightTensor, let q = l.weight else { continue }
            weightElements += t.count
            scales += q.amax!.count
            let expected = fakeQuantize(t, amax: q.amax!, spec: q.spec)
            #expect(decoded["\(l.name).weight"]?.values == expected.values, "\(l.name): decoded weight differs from fake quantization")
            checked += 1
        }
        #expect(checked > 10)
        // unquantized tensors come back as they were
        #expect(decoded["enc_output_norm.weight"]?.values == m.encNorm.weight.values)
        let fp32 = try SafeTensors.encode(m.stateDict().map { ($0.0, .float32($0.1)) })
        // every quantized weight saves 3 of its 4 bytes, less 4 bytes per scale (and a longer header)
        #expect(fp32.count - data.count >= 3 * weightElements - 4 * scales - 16_384, "\(fp32.count) vs \(data.count) bytes")
        // a file whose int8 tensor lost its scale is refused by name
        let noScale = try SafeTensors.encode([("w", .raw(.I8, shape: [2], bytes: Data([1, 2])))], metadata: ["axis:w": "none"])
        #expect(throws: SafeTensorsError.self) { try Int8ModelFile.decode(noScale) }
    }

    @Test("analysis covers the attention products' operands as matmul rows without a weight")
    func analysisOfMatmuls() throws {
        let m = tinyRTDETR(seed: 4)
        m.eval()
        var rng = SeededGenerator(seed: 5)
        let layers = try analyzeQuantization(m, batches: [Tensor.uniform([1, 3, 64, 64], low: 0, high: 1, rng: &rng)]) { _ = m($0) }
        let matmuls = layers.filter { $0.kind == "matmul" }
        // 3 attention modules (AIFI, 2 decoder self + 2 cross = 5) x 4 operands
        #expect(matmuls.count == 20 && matmuls.allSatisfy { $0.weightShape.isEmpty && $0.activation.count > 0 })
        #expect(layers.contains { $0.kind == "linear" } && layers.contains { $0.kind == "conv" })
        #expect(LayerAnalysis.markdownTable(layers).contains("| matmul | — |"))
    }

    @Test("onnxruntime runs the exported RT-DETR graph (GatherTopK as ReduceMax, TopK, GatherElements; GELU via Erf) to the same outputs",
          .enabled(if: onnxRuntime != nil, "no Python with onnxruntime here (make venv)"))
    func onnxruntimeRunsRTDETR() throws {
        let peer = try #require(onnxRuntime)
        let m = tinyRTDETR(seed: 6)
        m.eval()
        m.convertToDeployForm()
        var rng = SeededGenerator(seed: 7)
        let x = Tensor.uniform([1, 3, 64, 64], low: 0, high: 1, rng: &rng)
        let expected = withNoGrad { m(x) }
        let ort = try peer.run(graph: try Graph.trace(m), input: x, runs: 1)
        #expect(relativeMaxDifference(ort.outputs[0], expected.logits) < 1e-4 && relativeMaxDifference(ort.outputs[1], expected.boxes) < 1e-4)
    }
}
