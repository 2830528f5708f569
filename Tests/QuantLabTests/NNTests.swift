import Foundation
import Testing
@testable import QuantLabCore
@testable import QuantLabData
@testable import QuantLabModels
@testable import QuantLabQuant
@testable import QuantLabReport
import QuantLabBench
import QuantLabEngine

@Suite("Modules, optimizers, schedules, EMA and end-to-end training")
struct NNTests {
    /// `qlab bench --profile` and issue #18's breakdown rest on this.
    @Test("OpProfiler: convolutions keyed by geometry forward and backward, scoped keys, marks, and off outside measure")
    func opProfiler() {
        var rng = SeededGenerator(seed: 5)
        let conv = Conv2d(3, 4, kernel: 3, padding: 1, rng: &rng)
        let x = Tensor.uniform([2, 3, 6, 6], low: -1, high: 1, rng: &rng)
        let (_, entries) = OpProfiler.measure {
            let y = conv(x).relu()
            let loss = OpProfiler.scoped("loss/") { (y * y).sum() }
            OpProfiler.mark("before backward")
            loss.backward()
        }
        let keys = Set(entries.map(\.key))
        #expect(keys.contains("forward conv2d 3x3/1 3->4 6x6 n2"))
        #expect(keys.contains("backward conv2d 3x3/1 3->4 6x6 n2"))
        #expect(keys.contains("forward relu") && keys.contains("backward relu"))
        #expect(keys.contains("forward loss/mul") && keys.contains("backward loss/mul"))
        #expect(keys.contains("before backward"))
        #expect(entries.allSatisfy { $0.seconds >= 0 && $0.calls >= 1 })
        #expect(!OpProfiler.isActive)
        // outside measure, node names are the plain op names
        #expect(conv(x).node?.name == "conv2d")
        let kinds = TrainingBenchmark.breakdown(entries).map(\.kind)
        #expect(kinds.contains("backward conv2d") && kinds.contains("loss (assigner, targets, its ops fwd+bwd)"))
    }

    @Test("conv2dReLU: conv2d(x).relu()'s bits with the ReLU fused where no gradient or tracer needs the two ops; the two ops otherwise")
    func convReLUFused() throws {
        var rng = SeededGenerator(seed: 8)
        let conv = Conv2d(6, 20, kernel: 3, stride: 2, rng: &rng)
        let x = Tensor.uniform([3, 6, 11, 9], low: -1, high: 1, rng: &rng)
        let fused = withNoGrad { conv.reluForward(x) }, plain = withNoGrad { conv(x).relu() }
        #expect(fused.shape == plain.shape && fused.values.map(\.bitPattern) == plain.values.map(\.bitPattern))
        #expect(fused.values.contains(0) && fused.values.contains { $0 > 0 }, "both sides of the ReLU")
        // with a gradient wanted: the recorded ops, and the same gradient as conv then relu
        let y = conv.reluForward(x)
        #expect(y.node?.name == "relu")
        y.sum().backward()
        let g1 = conv.weight.grad!.values
        conv.zeroGrad()
        conv(x).relu().sum().backward()
        #expect(conv.weight.grad!.values == g1)
        // traced: a Conv and a Relu node, as unfused
        conv.eval()
        let graph = try Graph.trace(conv, example: x) { input in [withNoGrad { conv.reluForward(input) }] }
        #expect(graph.nodes.map(\.op.name) == ["Conv", "Relu"])
    }

    @Test("dotted names for parameters and buffers, PyTorch-style")
    func dottedNames() {
        var rng = SeededGenerator(seed: 1)
        let block = Sequential([Conv2d(3, 4, kernel: 3, bias: false, rng: &rng), BatchNorm2d(4)])
        let model = Sequential([block, Lambda.relu(), Linear(4, 2, rng: &rng)])
        #expect(model.namedParameters().map(\.0) == ["0.0.weight", "0.1.weight", "0.1.bias", "2.weight", "2.bias"])
        #expect(model.namedBuffers().map(\.0) == ["0.1.running_mean", "0.1.running_var", "0.1.num_batches_tracked"])
        #expect(model.parameterCount == 4 * 3 * 9 + 4 + 4 + 8 + 2)
    }

    @Test("loadStateDict: missing, unexpected and mis-shaped keys are errors, and nothing is written")
    func stateDictErrors() throws {
        var rng = SeededGenerator(seed: 2)
        let model = Sequential([Linear(3, 2, rng: &rng)])
        let before = model.stateDict().map { $0.1.values }
        var state = Dictionary(uniqueKeysWithValues: model.stateDict().map { ($0.0, Tensor.full($0.1.shape, 7)) })
        state["0.bias"] = nil
        #expect(throws: ModuleError.missingKeys(["0.bias"])) { try model.loadStateDict(state) }
        state["0.bias"] = Tensor.full([2], 7)
        state["extra"] = Tensor.full([1], 0)
        #expect(throws: ModuleError.unexpectedKeys(["extra"])) { try model.loadStateDict(state) }
        state["extra"] = nil
        state["0.bias"] = Tensor.full([3], 7)
        #expect(throws: ModuleError.shapeMismatch(name: "0.bias", expected: [2], got: [3])) { try model.loadStateDict(state) }
        #expect(model.stateDict().map { $0.1.values } == before)
        state["0.bias"] = Tensor.full([2], 7)
        try model.loadStateDict(state)
        #expect(model.stateDict().allSatisfy { $0.1.values.allSatisfy { $0 == 7 } })
    }

    @Test("BatchNorm2d running statistics follow PyTorch's update (unbiased variance)")
    func batchNormRunningStats() throws {
        let bn = BatchNorm2d(1, momentum: 0.1)
        let x = try Tensor(shape: [2, 1, 1, 2], values: [1, 2, 3, 6])
        let y = bn(x)
        // mean 3, biased var (4 + 1 + 0 + 9) / 4 = 3.5, unbiased 14/3
        #expect(abs(bn.runningMean.item() - 0.3) < 1e-6)
        #expect(abs(bn.runningVar.item() - (0.9 + 0.1 * 14.0 / 3)) < 1e-6)
        let expected = [1, 2, 3, 6].map { (Float($0) - 3) / (3.5 + 1e-5).squareRoot() }
        #expect(firstMismatch(y.values, expected, atol: 1e-6, rtol: 1e-5) == nil)
        bn.eval()
        let z = bn(x)
        let rm = bn.runningMean.item(), rv = bn.runningVar.item()
        #expect(firstMismatch(z.values, [1, 2, 3, 6].map { (Float($0) - rm) / (rv + 1e-5).squareRoot() }, atol: 1e-6, rtol: 1e-5) == nil)
        #expect(bn.numBatchesTracked.item() == 1)
    }

    @Test("SGD with momentum, Nesterov and weight decay matches PyTorch's rule by hand")
    func sgdSteps() throws {
        let p = try Tensor(shape: [2], values: [1, -2])
        p.requiresGrad = true
        let opt = SGD([ParameterGroup([p], weightDecay: 0.1)], learningRate: 0.5, momentum: 0.9, nesterov: true)
        var pd: [Double] = [1, -2], buf: [Double] = [0, 0]
        let grads: [[Float]] = [[0.5, 1], [-1, 0.25]]
        for (step, g) in grads.enumerated() {
            p.grad = try Tensor(shape: [2], values: g)
            opt.step()
            for i in 0..<2 {
                let gi = Double(g[i]) + 0.1 * pd[i]
                buf[i] = step == 0 ? gi : 0.9 * buf[i] + gi
                pd[i] -= 0.5 * (gi + 0.9 * buf[i])
            }
        }
        #expect(firstMismatch(p.values, pd.map(Float.init), atol: 1e-6, rtol: 1e-6) == nil)
    }

    @Test("AdamW matches its definition by hand")
    func adamwSteps() throws {
        let p = try Tensor(shape: [1], values: [1])
        p.requiresGrad = true
        let opt = AdamW([ParameterGroup([p], weightDecay: 0.01)], learningRate: 0.1)
        var x = 1.0, m = 0.0, v = 0.0
        for (t, g) in [0.5, -0.25, 1.0].enumerated() {
            p.grad = Tensor.scalar(Float(g)).reshaped([1])
            opt.step()
            x *= 1 - 0.1 * 0.01
            m = 0.9 * m + 0.1 * g
            v = 0.999 * v + 0.001 * g * g
            let mh = m / (1 - pow(0.9, Double(t + 1))), vh = v / (1 - pow(0.999, Double(t + 1)))
            x -= 0.1 * mh / (vh.squareRoot() + 1e-8)
        }
        #expect(abs(Double(p.item()) - x) < 1e-6)
    }

    @Test("no weight decay on biases and normalisation parameters")
    func parameterGroups() {
        var rng = SeededGenerator(seed: 3)
        let model = Sequential([Conv2d(1, 2, kernel: 3, rng: &rng), BatchNorm2d(2)])
        let groups = model.parameterGroups(weightDecay: 5e-4)
        #expect(groups[0].parameters.count == 1 && groups[0].weightDecay == 5e-4)
        #expect(groups[1].parameters.count == 3 && groups[1].weightDecay == 0)
    }

    @Test("warm-up + cosine schedule: endpoints and monotone decay")
    func schedule() {
        let s = WarmupCosineSchedule(base: 0.1, warmupSteps: 10, totalSteps: 110, warmupStartFactor: 0.1, finalFactor: 0.01)
        #expect(abs(s.learningRate(at: 0) - 0.01) < 1e-7)
        #expect(abs(s.learningRate(at: 10) - 0.1) < 1e-7)
        #expect(abs(s.learningRate(at: 60) - 0.1 * (0.01 + 0.99 * 0.5)) < 1e-6)
        #expect(abs(s.learningRate(at: 110) - 0.001) < 1e-7)
        let decay = (10...110).map { s.learningRate(at: $0) }
        #expect(zip(decay, decay.dropFirst()).allSatisfy { $0 >= $1 })
    }

    @Test("EMA: ramped decay, averaged weights, copied counters")
    func ema() throws {
        var rng = SeededGenerator(seed: 4)
        let model = Sequential([Linear(2, 1, rng: &rng)])
        let ema = ModelEMA(model, decay: 0.9, tau: 1)
        let w0 = model.stateDict()[0].1.values
        model.stateDict()[0].1.fill(1)
        ema.update(from: model)
        let d = 0.9 * (1 - Foundation.exp(-1.0))
        let expected = w0.map { Float(d * Double($0) + (1 - d)) }
        #expect(firstMismatch(ema.shadow[0].1.values, expected, atol: 1e-6, rtol: 1e-6) == nil)
        let other = Sequential([Linear(2, 1, rng: &rng)])
        try ema.copy(into: other)
        #expect(other.stateDict()[0].1.values == ema.shadow[0].1.values)
    }

    @Test("a small conv net learns the toy task end to end")
    func learnsToyTask() {
        var rng = SeededGenerator(seed: 2024)
        let model = ToyShapes.model(rng: &rng)
        let report = ToyShapes.train(model, steps: 150, rng: &rng)
        // chance is 25% accuracy and ln 4 = 1.39 loss
        #expect(report.firstLoss > 1.2)
        #expect(report.lastLoss < 0.35, "final loss \(report.lastLoss)")
        #expect(report.accuracy > 0.9, "held-out accuracy \(report.accuracy)")
    }
}

@Suite("Integer tensors")
struct IntTensorTests {
    @Test("int8 and int32 tensors hold values, check shapes and are 64-byte aligned")
    func basics() throws {
        let t = try Int8Tensor(shape: [2, 3], values: [-128, -1, 0, 1, 2, 127])
        #expect(t.values == [-128, -1, 0, 1, 2, 127] && t.count == 6)
        #expect(Int(bitPattern: t.data) % 64 == 0)
        #expect(throws: TensorError.self) { try Int32Tensor(shape: [2, 2], values: [1, 2, 3]) }
        #expect(Int32Tensor(zeros: [4]).values == [0, 0, 0, 0])
    }
}
