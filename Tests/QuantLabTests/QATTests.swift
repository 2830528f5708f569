import Foundation
import Testing
@testable import QuantLabCore
@testable import QuantLabData
@testable import QuantLabModels
@testable import QuantLabQuant

// QAT's pieces (issue #13): YOLOv6's channel-wise distillation loss, its decay, and LSQ.

@Suite("QAT: channel-wise distillation, LSQ")
struct QATTests {
    @Test("CWD on a hand case: T^2 / (N C) * sum KL(softmax(t / T) || softmax(s / T)) over the H*W positions, per channel; zero when student = teacher")
    func cwdHandCase() throws {
        // one image, two channels, 1 x 2 positions
        let s = Tensor([0, 0, 1, -1], shape: [1, 2, 1, 2]), t = Tensor([Float(log(3.0)), 0, 1, -1], shape: [1, 2, 1, 2])
        func kl(_ p: [Double], _ q: [Double]) -> Double { zip(p, q).reduce(0) { $0 + $1.0 * log($1.0 / $1.1) } }
        func softmax(_ z: [Double]) -> [Double] { let e = z.map(exp); let sum = e.reduce(0, +); return e.map { $0 / sum } }
        for temperature in [Float(1), 2] {
            let T = Double(temperature)
            // channel 0: p_t = softmax([log 3, 0] / T), p_s = [1/2, 1/2]; channel 1 equal: 0
            let want = T * T / 2 * kl(softmax([log(3.0) / T, 0]), [0.5, 0.5])
            let got = Double(channelWiseDistillationLoss(student: [s], teacher: [t], temperature: temperature).item())
            #expect(abs(got - want) < 1e-6, "T = \(temperature): \(got) vs \(want)")
        }
        #expect(abs(channelWiseDistillationLoss(student: [t, s], teacher: [t, s]).item()) < 1e-6)
        // summed over scales
        let two = channelWiseDistillationLoss(student: [s, s], teacher: [t, t]).item(), one = channelWiseDistillationLoss(student: [s], teacher: [t]).item()
        #expect(abs(two - 2 * one) < 1e-6)
    }

    @Test("CWD's gradient reaches the student (checked against finite differences) and never the teacher")
    func cwdGradient() throws {
        var rng = SeededGenerator(seed: 61)
        let s1 = tensor([2, 3, 2, 3], &rng), s2 = tensor([2, 2, 3, 3], &rng)
        let t1 = tensor([2, 3, 2, 3], &rng), t2 = tensor([2, 2, 3, 3], &rng)
        t1.requiresGrad = true
        let failures = gradientCheck("cwd", [s1, s2], eps: 1e-2, atol: 1e-4, rtol: 1e-2) { x in
            channelWiseDistillationLoss(student: x, teacher: [t1, t2], temperature: 2).reshaped([1])
        }
        #expect(failures.isEmpty, "\(failures.prefix(3))")
        #expect(t1.grad == nil || t1.grad!.values.allSatisfy { $0 == 0 }, "no gradient into the teacher")
    }

    @Test("the distillation decay runs from 1 at the first epoch to 0.01 at the last, 0.505 half way")
    func decay() {
        #expect(distillationDecay(epoch: 0, epochs: 10) == 1)
        #expect(abs(distillationDecay(epoch: 10, epochs: 10) - 0.01) < 1e-6)
        #expect(abs(distillationDecay(epoch: 5, epochs: 10) - 0.505) < 1e-6)
    }

    @Test("LSQ's forward is the symmetric fake quantizer with amax = step * Qp (to one code)")
    func lsqForward() throws {
        var rng = SeededGenerator(seed: 62)
        let x = tensor([1000], &rng, low: -3, high: 3)
        let amax: Float = 2
        let lsq = lsqFakeQuantize(x, step: Tensor([amax / 127], shape: [1]), qn: -127, qp: 127)
        let fq = fakeQuantize(x, amax: [amax], spec: .int8PerTensor)
        let diffs = zip(lsq.values, fq.values).map { abs($0 - $1) }
        #expect(diffs.max()! <= amax / 127 * 1.001, "within one code")
        #expect(diffs.filter { $0 > 0 }.count <= 5, "\(diffs.filter { $0 > 0 }.count) of 1000 differ (x / s vs the kernel's x * (1 / s) at a rounding tie)")
    }

    /// LSQ's gradients are those of its straight-through surrogate
    ///   s(x, a) = a * clip(x / a, Qn, Qp) + a * c,  c = round(v0) - v0 inside (held fixed),
    /// whose finite differences at the point give d/dx = 1 inside, d/da = Qn, Qp or round(v) - v.
    @Test("LSQ's gradients, per tensor and per channel: equal to finite differences of its straight-through surrogate; the step's gradient scaled by 1 / sqrt(numel * Qp)")
    func lsqGradient() throws {
        var rng = SeededGenerator(seed: 63)
        for axis in [nil, 1] as [Int?] {
            let x = tensor([2, 3, 4], &rng, low: -1.3, high: 1.3)
            let channels = axis.map { x.shape[$0] } ?? 1
            let step = Tensor((0..<channels).map { Float($0 + 1) * 0.1 }, shape: [channels])
            let (qn, qp) = (-7, 7)
            x.requiresGrad = true; step.requiresGrad = true
            let w = tensor(x.shape, &rng)
            (lsqFakeQuantize(x, step: step, qn: qn, qp: qp, axis: axis, gradScale: 1) * w).sum().backward()
            let inner = axis == nil ? x.count : 4
            let c0 = (0..<x.count).map { i -> Float in
                let v = x.data[i] / step.data[(i / inner) % channels]
                return (v < Float(qn) || v > Float(qp)) ? 0 : v.rounded(.toNearestOrEven) - v
            }
            // in double, so that a step of 1e-6 (too small to move any v across a clipping edge) is exact enough
            func surrogate(_ xs: [Double], _ a: [Double]) -> Double {
                (0..<xs.count).reduce(0.0) { acc, i in
                    let s = a[(i / inner) % channels]
                    let y = s * min(max(xs[i] / s, Double(qn)), Double(qp)) + s * Double(c0[i])
                    return acc + y * Double(w.data[i])
                }
            }
            let (xs, a) = (x.values.map(Double.init), step.values.map(Double.init))
            let eps = 1e-6
            for c in 0..<channels {
                var ap = a, am = a
                ap[c] += eps; am[c] -= eps
                let numeric = (surrogate(xs, ap) - surrogate(xs, am)) / Double(2 * eps)
                #expect(abs(Double(step.grad!.data[c]) - numeric) < 1e-2 * max(1, abs(numeric)), "axis \(String(describing: axis)) step \(c): \(step.grad!.data[c]) vs \(numeric)")
            }
            for i in stride(from: 0, to: x.count, by: 3) {
                var p = xs, m = xs
                p[i] += eps; m[i] -= eps
                let numeric = (surrogate(p, a) - surrogate(m, a)) / Double(2 * eps)
                #expect(abs(Double(x.grad!.data[i]) - numeric) < 1e-2, "x[\(i)]: \(x.grad!.data[i]) vs \(numeric)")
            }
            // some values clip (the step of channel 0 is small), so both branches were checked
            #expect((0..<x.count).contains { abs(xs[$0] / a[($0 / inner) % channels]) > Double(qp) })
            // LSQ's own scaling of the step's gradient
            let unscaled = step.grad!.values
            step.grad = nil
            (lsqFakeQuantize(x, step: step, qn: qn, qp: qp, axis: axis) * w).sum().backward()
            let g = 1 / Float(Double(x.count * qp).squareRoot())
            for (s, u) in zip(step.grad!.values, unscaled) { #expect(abs(s - u * g) <= 1e-6 * max(1, abs(u))) }
        }
    }

    @Test("a quantizer in LSQ mode starts where calibration left it (same outputs to one code), learns its step by gradient, and writes it back as amax when frozen")
    func lsqQuantizer() throws {
        var rng = SeededGenerator(seed: 64)
        let q = TensorQuantizer(spec: .int8PerTensor)
        expectError(QuantizationError.self, mentioning: "calibrated") { try q.enableLearnedStep() }
        let x = tensor([4, 8], &rng, low: -2, high: 2)
        q.amax = [1.5]
        let before = q(x)
        try q.enableLearnedStep()
        let step = try #require(q.learnedStep)
        #expect(abs(step.item() - 1.5 / 127) < 1e-9)
        let during = q(x)
        #expect(zip(before.values, during.values).allSatisfy { abs($0 - $1) <= 1.5 / 127 * 1.001 })
        during.sum().backward()
        #expect(step.grad != nil && step.grad!.item() != 0, "the step receives a gradient")
        step.data[0] = 0.02
        q.freezeLearnedStep()
        #expect(q.learnedStep == nil && abs(q.amax![0] - 0.02 * 127) < 1e-5)
    }
}

@Suite("QAT trainer")
struct QATTrainerTests {
    private static func tinyData() throws -> (URL, DetectionDataset) {
        let root = FileManager.default.temporaryDirectory.appendingPathComponent("ql-qat-\(UUID().uuidString)")
        let cfg = SyntheticShapes.Config(name: "d", imageSize: 64, trainImages: 8, valImages: 2, seed: 4, maxObjects: 2,
                                         minObjectSize: 16, maxObjectSize: 40, singleObject: false, noiseStd: 2...4, jpegQuality: 90...95)
        try SyntheticShapes(cfg).write(root: root, threads: 2)
        return (root, try DetectionDataset(root: root.appendingPathComponent("d"), split: "train2017"))
    }

    /// A calibrated deploy-form tiny detector, and a fixed input.
    private func quantized(seed: UInt64, classes: Int) throws -> (YOLOv6, QuantizationSimulator, Tensor) {
        let model = deployedDetector(seed: seed, classes: classes)
        var rng = SeededGenerator(seed: seed &+ 1)
        let sim = try QuantizationSimulator(model)
        sim.calibrate(on: [Tensor.uniform([2, 3, 64, 64], low: 0, high: 1, rng: &rng)]) { _ = model($0) }
        try sim.applyCalibration(.max)
        return (model, sim, Tensor.uniform([2, 3, 64, 64], low: 0, high: 1, rng: &rng))
    }

    @Test("QAT with learning rate 0 leaves the PTQ model's outputs unchanged (EMA, momentum, decay and distillation included)")
    func zeroLearningRate() throws {
        let (root, train) = try Self.tinyData()
        defer { try? FileManager.default.removeItem(at: root) }
        let (model, sim, x) = try quantized(seed: 71, classes: train.classCount)
        defer { sim.remove() }
        let teacher = deployedDetector(seed: 72, classes: train.classCount)
        let before = withNoGrad { model(x) }
        var config = QATConfig()
        config.learningRate = 0
        config.batchSize = 4
        config.epochs = 2
        config.cwdWeight = 10
        config.workers = 1
        let trainer = try QATTrainer(model: model, simulator: sim, teacher: teacher, train: train, config: config, log: { _ in })
        try trainer.run()
        #expect(trainer.step == 4)
        let after = withNoGrad { model(x) }
        // the EMA's d * w + (1 - d) * w rounds to w within an ulp, so equal up to float rounding
        for (a, b) in [(after.classLogits, before.classLogits), (after.distances, before.distances)] {
            #expect(firstMismatch(a.values, b.values, atol: 1e-5, rtol: 1e-5) == nil, "\(firstMismatch(a.values, b.values, atol: 1e-5, rtol: 1e-5) ?? "")")
        }
    }

    @Test("QAT moves the weights with a learning rate; with LSQ the steps move too and are written back as amax; distillation without a teacher is an error")
    func learns() throws {
        let (root, train) = try Self.tinyData()
        defer { try? FileManager.default.removeItem(at: root) }
        let (model, sim, x) = try quantized(seed: 73, classes: train.classCount)
        defer { sim.remove() }
        let before = withNoGrad { model(x) }
        let amaxBefore = sim.activationAmax
        var config = QATConfig()
        config.learningRate = 1e-2
        config.batchSize = 4
        config.lsq = true
        config.workers = 1
        config.emaTau = 1 // the EMA follows the weights at once: the change shows after one epoch
        let trainer = try QATTrainer(model: model, simulator: sim, teacher: nil, train: train, config: config, log: { _ in })
        try trainer.run()
        let after = withNoGrad { model(x) }
        #expect(after.distances.values != before.distances.values)
        #expect(sim.layers.allSatisfy { $0.input.learnedStep == nil }, "steps frozen back into amax")
        #expect(sim.activationAmax != amaxBefore, "LSQ moved some step")
        config.cwdWeight = 10
        expectError(QuantizationError.self, mentioning: "teacher") { _ = try QATTrainer(model: model, simulator: sim, teacher: nil, train: train, config: config) }
    }
}
