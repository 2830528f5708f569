import Foundation
import Testing
@testable import QuantLabCore
@testable import QuantLabData
@testable import QuantLabModels
@testable import QuantLabQuant
@testable import QuantLabReport

/// Every op's backward against central finite differences of sum(f(x) * W).
@Suite("Backward of every op against finite differences")
struct GradientTests {
    private func expectGradients(_ name: String, _ inputs: [Tensor], eps: Float = 1e-2, atol: Double = 1e-3, rtol: Double = 1e-2,
                                 _ f: @escaping ([Tensor]) -> Tensor) {
        let failures = gradientCheck(name, inputs, eps: eps, atol: atol, rtol: rtol, f)
        #expect(failures.isEmpty, "\(failures.prefix(5).joined(separator: "\n"))")
    }

    @Test("unary ops")
    func unary() {
        var rng = SeededGenerator(seed: 1)
        expectGradients("relu", [spacedTensor([2, 3, 4], &rng)]) { $0[0].relu() }
        expectGradients("abs", [spacedTensor([2, 3, 4], &rng)]) { $0[0].abs() }
        expectGradients("sigmoid", [tensor([2, 5], &rng, low: -3, high: 3)]) { $0[0].sigmoid() }
        expectGradients("silu", [tensor([2, 5], &rng, low: -3, high: 3)]) { $0[0].silu() }
        expectGradients("tanh", [tensor([2, 5], &rng, low: -2, high: 2)]) { $0[0].tanh() }
        expectGradients("exp", [tensor([2, 5], &rng)]) { $0[0].exp() }
        expectGradients("log", [tensor([2, 5], &rng, low: 0.5, high: 2)]) { $0[0].log() }
        expectGradients("sqrt", [tensor([2, 5], &rng, low: 0.5, high: 2)]) { $0[0].sqrt() }
        expectGradients("neg", [tensor([3], &rng)]) { -$0[0] }
        expectGradients("scale_shift", [tensor([3, 2], &rng)]) { $0[0].scaled(by: -1.5, plus: 0.3) }
    }

    @Test("binary ops with broadcasting")
    func binary() {
        var rng = SeededGenerator(seed: 2)
        expectGradients("add", [tensor([2, 3, 4], &rng), tensor([3, 1], &rng)]) { $0[0] + $0[1] }
        expectGradients("sub", [tensor([2, 1, 4], &rng), tensor([3, 4], &rng)]) { $0[0] - $0[1] }
        expectGradients("mul", [tensor([2, 3, 4], &rng), tensor([1, 3, 1], &rng)]) { $0[0] * $0[1] }
        expectGradients("div", [tensor([2, 3], &rng), tensor([2, 3], &rng, low: 0.5, high: 2)]) { $0[0] / $0[1] }
        let a = spacedTensor([3, 4], &rng), b = spacedTensor([3, 4], &rng, gap: 0.07, offset: 0.01)
        expectGradients("maximum", [a, b]) { maximum($0[0], $0[1]) }
        expectGradients("minimum", [a, b]) { minimum($0[0], $0[1]) }
        let x = tensor([2, 3], &rng)
        expectGradients("same tensor twice (accumulation)", [x]) { $0[0] * $0[0] + $0[0] }
    }

    @Test("shape ops")
    func shapeOps() {
        var rng = SeededGenerator(seed: 3)
        expectGradients("reshape", [tensor([2, 6], &rng)]) { ($0[0].reshaped([3, -1]) * $0[0].reshaped([3, 4])) }
        expectGradients("permute", [tensor([2, 3, 4], &rng)]) { $0[0].permuted([2, 0, 1]) }
        expectGradients("transpose", [tensor([3, 5], &rng)]) { $0[0].transposed(0, 1) }
        expectGradients("slice", [tensor([2, 5, 3], &rng)]) { $0[0].slice(dim: 1, start: 1, end: 4) }
        expectGradients("expand", [tensor([3, 1], &rng)]) { $0[0].expanded(to: [2, 3, 4]) }
        expectGradients("concat", [tensor([2, 2, 3], &rng), tensor([2, 3, 3], &rng)]) { concat($0, dim: 1) }
        expectGradients("flatten", [tensor([2, 3, 2, 2], &rng)]) { $0[0].flattened() }
    }

    @Test("reductions and softmax family")
    func reductions() {
        var rng = SeededGenerator(seed: 4)
        expectGradients("sum", [tensor([3, 4], &rng)]) { $0[0].sum() }
        expectGradients("mean", [tensor([3, 4], &rng)]) { $0[0].mean() }
        expectGradients("sum dims", [tensor([2, 3, 4], &rng)]) { $0[0].sum(dims: [0, 2]) }
        expectGradients("mean dims keep", [tensor([2, 3, 4], &rng)]) { $0[0].mean(dims: [1], keepDims: true) }
        expectGradients("softmax", [tensor([3, 5], &rng, low: -2, high: 2)]) { $0[0].softmax() }
        expectGradients("log_softmax", [tensor([3, 5], &rng, low: -2, high: 2)]) { $0[0].logSoftmax() }
    }

    @Test("convolutions", arguments: [
        Conv2dOptions(stride: 1, padding: 1), Conv2dOptions(stride: 2, padding: 0, dilation: 2),
        Conv2dOptions(stride: (2, 1), padding: (1, 0), groups: 2),
    ])
    func convolutions(options: Conv2dOptions) {
        var rng = SeededGenerator(seed: 5)
        let x = tensor([2, 4, 7, 6], &rng), w = tensor([6, 4 / options.groups, 3, 3], &rng), b = tensor([6], &rng)
        expectGradients("conv2d \(options)", [x, w, b]) { conv2d($0[0], weight: $0[1], bias: $0[2], options: options) }
    }

    @Test("pointwise conv, and conv without bias")
    func pointwiseConv() {
        var rng = SeededGenerator(seed: 6)
        expectGradients("conv2d 1x1", [tensor([2, 3, 4, 5], &rng), tensor([5, 3, 1, 1], &rng)]) {
            conv2d($0[0], weight: $0[1])
        }
    }

    @Test("transposed convolution (stride 2, output padding, groups)")
    func transposedConv() {
        var rng = SeededGenerator(seed: 7)
        let o = Conv2dOptions(stride: 2, padding: 1, groups: 2)
        expectGradients("conv_transpose2d", [tensor([2, 4, 3, 4], &rng), tensor([4, 3, 3, 3], &rng), tensor([6], &rng)]) {
            convTranspose2d($0[0], weight: $0[1], bias: $0[2], options: o, outputPadding: (1, 1))
        }
        expectGradients("conv_transpose2d 2x2 stride 2", [tensor([1, 3, 3, 3], &rng), tensor([3, 2, 2, 2], &rng)]) {
            convTranspose2d($0[0], weight: $0[1], options: Conv2dOptions(stride: 2))
        }
    }

    @Test("batch norm (training and evaluation) and layer norm")
    func normalisation() {
        var rng = SeededGenerator(seed: 8)
        let rm = tensor([3], &rng), rv = tensor([3], &rng, low: 0.5, high: 2)
        expectGradients("batch_norm train", [tensor([4, 3, 2, 3], &rng), tensor([3], &rng), tensor([3], &rng)]) {
            batchNorm2d($0[0], weight: $0[1], bias: $0[2], runningMean: rm.detached(), runningVar: rv.detached(), training: true)
        }
        expectGradients("batch_norm eval", [tensor([2, 3, 2, 2], &rng), tensor([3], &rng), tensor([3], &rng)]) {
            batchNorm2d($0[0], weight: $0[1], bias: $0[2], runningMean: rm, runningVar: rv, training: false)
        }
        expectGradients("layer_norm", [tensor([3, 6], &rng), tensor([6], &rng), tensor([6], &rng)]) {
            layerNorm($0[0], weight: $0[1], bias: $0[2])
        }
    }

    @Test("pooling and upsampling")
    func pooling() {
        var rng = SeededGenerator(seed: 9)
        expectGradients("max_pool2d", [spacedTensor([2, 2, 5, 5], &rng)]) { maxPool2d($0[0], kernel: 3, stride: 2, padding: 1) }
        expectGradients("avg_pool2d", [tensor([2, 2, 5, 5], &rng)]) { avgPool2d($0[0], kernel: 3, stride: 2, padding: 1, countIncludePad: false) }
        expectGradients("global_avg_pool2d", [tensor([2, 3, 3, 4], &rng)]) { globalAvgPool2d($0[0]) }
        expectGradients("upsample_nearest", [tensor([1, 2, 3, 2], &rng)]) { upsampleNearest($0[0], scale: 2) }
    }

    @Test("linear and batched matmul")
    func matrixProducts() {
        var rng = SeededGenerator(seed: 10)
        expectGradients("linear", [tensor([2, 3, 5], &rng), tensor([4, 5], &rng), tensor([4], &rng)]) {
            linear($0[0], weight: $0[1], bias: $0[2])
        }
        expectGradients("matmul batched", [tensor([2, 3, 4], &rng), tensor([2, 4, 5], &rng)]) { matmul($0[0], $0[1]) }
        expectGradients("matmul shared rhs", [tensor([2, 3, 4], &rng), tensor([4, 2], &rng)]) { matmul($0[0], $0[1]) }
    }

    @Test("losses")
    func losses() {
        var rng = SeededGenerator(seed: 11)
        expectGradients("cross_entropy", [tensor([4, 5], &rng, low: -2, high: 2)]) { crossEntropy(logits: $0[0], targets: [0, 4, 2, 2]) }
        let t = tensor([3, 4], &rng, low: 0, high: 1)
        expectGradients("bce_with_logits", [tensor([3, 4], &rng, low: -3, high: 3)]) { binaryCrossEntropyWithLogits($0[0], targets: t) }
        let target = tensor([2, 5], &rng).softmax().detached()
        expectGradients("kl_div", [tensor([2, 5], &rng)]) { klDivergence(logInput: $0[0].logSoftmax(), target: target) }
        expectGradients("kl_div wrt target", [tensor([2, 5], &rng, low: 0.1, high: 1)]) { klDivergence(logInput: Tensor.full([2, 5], -1.6), target: $0[0]) }
        expectGradients("l1", [spacedTensor([3, 3], &rng), tensor([3, 3], &rng, low: -0.01, high: 0.01)]) { l1Loss($0[0], $0[1]) }
    }

    @Test("loss values against hand computation")
    func lossValues() throws {
        let logits = try Tensor(shape: [2, 3], values: [1, 2, 3, 0, 0, 0])
        let ce = crossEntropy(logits: logits, targets: [2, 0]).item()
        let expected = (-(3 - Foundation.log(Foundation.exp(1) + Foundation.exp(2) + Foundation.exp(3))) + Foundation.log(3.0)) / 2
        #expect(abs(Double(ce) - expected) < 1e-6)
        let z = try Tensor(shape: [2], values: [0, 100]), t = try Tensor(shape: [2], values: [1, 1])
        let bce = binaryCrossEntropyWithLogits(z, targets: t, reduction: .none).values
        #expect(abs(bce[0] - Float(Foundation.log(2.0))) < 1e-6 && bce[1] >= 0 && bce[1] < 1e-30)
        let p = try Tensor(shape: [2], values: [0.25, 0.75]), q = try Tensor(shape: [2], values: [0.5, 0.5])
        let kl = klDivergence(logInput: q.log(), target: p).item()
        #expect(abs(Double(kl) - (0.25 * Foundation.log(0.5) + 0.75 * Foundation.log(1.5))) < 1e-6)
    }

    @Test("no graph is recorded inside withNoGrad; backward frees intermediates")
    func gradMode() {
        var rng = SeededGenerator(seed: 12)
        let x = tensor([3], &rng)
        x.requiresGrad = true
        let y = withNoGrad { x * x }
        #expect(!y.requiresGrad && y.node == nil)
        let h = x * x
        let z = h.sum()
        z.backward()
        #expect(h.node == nil && h.grad == nil)
        #expect(firstMismatch(x.grad!.values, x.values.map { 2 * $0 }, atol: 1e-6, rtol: 1e-6) == nil)
    }

    /// A sum's first input takes the incoming gradient's buffer instead of a copy when the
    /// backward releases it: the gradients must be those of copies in every sharing pattern (an
    /// input used again after the sum, sums of sums, an input added to itself), and with
    /// retainGraph (no adoption) the retained gradient of a sum must stay its own.
    @Test("sums pass their gradient on without a copy, and the gradients stay those of copies")
    func sumGradientAdoption() {
        var rng = SeededGenerator(seed: 13)
        let a = tensor([2, 3], &rng), b = tensor([2, 3], &rng), w = tensor([2, 3], &rng)
        for t in [a, b] { t.requiresGrad = true }
        // v = (u + u) w + a b, u = s + a, s = a + b: v = (4a + 2b) w + a b
        let wantA = zip(w.values, b.values).map { 4 * $0 + $1 }, wantB = zip(w.values, a.values).map { 2 * $0 + $1 }
        for retain in [false, true] {
            a.zeroGrad(); b.zeroGrad()
            let s = a + b, u = s + a, v = (u + u) * w + a * b
            v.sum().backward(retainGraph: retain)
            #expect(firstMismatch(a.grad!.values, wantA, atol: 1e-5, rtol: 1e-5) == nil, "retain \(retain)")
            #expect(firstMismatch(b.grad!.values, wantB, atol: 1e-5, rtol: 1e-5) == nil, "retain \(retain)")
            if retain { // s's gradient is 2w, and a (which took more gradient after s) does not share it
                #expect(firstMismatch(s.grad!.values, w.values.map { 2 * $0 }, atol: 1e-6, rtol: 1e-6) == nil)
            }
        }
        // h takes gradient from the sum and from h * h, in either order: with retainGraph the
        // sum's gradient must come out as w whichever reaches h first
        for order in 0..<2 {
            a.zeroGrad(); b.zeroGrad()
            let h = a * Float(2), s = h + b
            let v = order == 0 ? s * w + h * h : h * h + s * w
            v.sum().backward(retainGraph: true)
            #expect(firstMismatch(s.grad!.values, w.values, atol: 1e-6, rtol: 1e-6) == nil, "retained sum gradient, order \(order)")
            #expect(firstMismatch(a.grad!.values, zip(w.values, a.values).map { 2 * ($0 + 4 * $1) }, atol: 1e-5, rtol: 1e-5) == nil, "order \(order)")
        }
        let x = tensor([2, 3], &rng)
        x.requiresGrad = true
        ((x + x) * w).sum().backward()
        #expect(firstMismatch(x.grad!.values, w.values.map { 2 * $0 }, atol: 1e-6, rtol: 1e-6) == nil, "x + x")
    }
}
