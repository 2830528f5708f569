import Foundation
import Testing
@testable import QuantLabCore
@testable import QuantLabData
@testable import QuantLabModels
@testable import QuantLabQuant
@testable import QuantLabReport

@Suite("Re-parameterisable blocks")
struct RepBlockTests {
    /// Random BN statistics and affine parameters, so that folding is really exercised.
    private func randomizeNorms(_ m: Module, _ rng: inout SeededGenerator) {
        for (_, sub) in m.namedModules() {
            guard let bn = sub as? BatchNorm2d else { continue }
            for c in 0..<bn.weight.count {
                bn.weight.data[c] = 0.5 + rng.nextFloat()
                bn.bias.data[c] = rng.nextFloat() - 0.5
                bn.runningMean.data[c] = rng.nextFloat() - 0.5
                bn.runningVar.data[c] = 0.5 + rng.nextFloat()
            }
        }
        for (_, sub) in m.namedModules() {
            if let s = sub as? ScaleLayer { for c in 0..<s.scale.count { s.scale.data[c] = 0.5 + rng.nextFloat() } }
        }
    }

    @Test("fuse() gives one 3x3 conv equal to the block in eval mode",
          arguments: [BlockKind.repvgg, .qarepvgg, .repopt, .repoptSearch], [(4, 4, 1), (4, 6, 1), (3, 5, 2), (6, 6, 2)])
    func fuseEquality(kind: BlockKind, shape: (Int, Int, Int)) {
        let (cin, cout, stride) = shape
        var rng = SeededGenerator(seed: UInt64(cin * 100 + cout * 10 + stride))
        let block = makeRepBlock(kind, cin, cout, stride: stride, rng: &rng)
        randomizeNorms(block, &rng)
        block.eval()
        let x = Tensor.randn([2, cin, 9, 7], rng: &rng)
        let before = withNoGrad { block(x) }
        block.fuse()
        #expect(block.isDeployed)
        #expect(block.namedParameters().map(\.0) == ["rbr_reparam.weight", "rbr_reparam.bias"])
        let after = withNoGrad { block(x) }
        #expect(firstMismatch(after.values, before.values, atol: 1e-5, rtol: 1e-4) == nil, "\(kind) \(shape)")
    }

    @Test("a model fuses all its blocks; names keep their dotted paths")
    func modelFuse() {
        var rng = SeededGenerator(seed: 3)
        let model = Sequential([RepVGGBlock(3, 8, stride: 2, rng: &rng), RepVGGBlock(8, 8, rng: &rng)])
        #expect(model.repBlocks().map(\.0) == ["0", "1"])
        #expect(model.namedParameters().contains { $0.0 == "1.rbr_identity.weight" })
        model.fuseRepBlocks()
        #expect(model.namedParameters().map(\.0) == ["0.rbr_reparam.weight", "0.rbr_reparam.bias", "1.rbr_reparam.weight", "1.rbr_reparam.bias"])
    }

    /// RepOpt's claim: SGD with gradient mask s3^2 (+ s1^2 at the centre, + 1 at the centre of
    /// the diagonal) on the single kernel W' = s3 W3 + s1 pad(W1) + diag(d) makes exactly the
    /// same steps as plain SGD on the branch weights W3, W1 and the identity weights d.
    @Test("RepOptSGD on the plain conv equals SGD on the multi-branch form", arguments: [false, true])
    func repOptEquivalence(momentum: Bool) throws {
        var rng = SeededGenerator(seed: 11)
        let c = 4, lr: Float = 0.05, mom: Float = momentum ? 0.9 : 0
        let scales = RepOptScales(conv3x3: (0..<c).map { _ in 0.5 + rng.nextFloat() }, conv1x1: (0..<c).map { _ in 0.5 + rng.nextFloat() },
                                  identity: (0..<c).map { _ in 0.5 + rng.nextFloat() })
        let s3 = try Tensor(shape: [c, 1, 1, 1], values: scales.conv3x3), s1 = try Tensor(shape: [c, 1, 1, 1], values: scales.conv1x1)
        let w3 = Tensor.randn([c, c, 3, 3], std: 0.3, rng: &rng), w1 = Tensor.randn([c, c, 1, 1], std: 0.3, rng: &rng)
        let d = try Tensor(shape: [1, c, 1, 1], values: scales.identity!)
        let x = Tensor.randn([2, c, 6, 5], rng: &rng), target = Tensor.randn([2, c, 6, 5], rng: &rng)
        // multi-branch: y = conv3(x, s3 W3) + conv1(x, s1 W1) + d * x
        for p in [w3, w1, d] { p.requiresGrad = true }
        let branchSGD = SGD([ParameterGroup([w3, w1, d], weightDecay: 0)], learningRate: lr, momentum: mom)
        // single kernel W' with RepOptSGD
        let wPrime = scales.initialKernel(w3: w3, w1: w1)
        wPrime.requiresGrad = true
        let repopt = RepOptSGD([ParameterGroup([wPrime], weightDecay: 0)], masks: [(wPrime, scales.gradientMask(inChannels: c))],
                               learningRate: lr, momentum: mom)
        func loss(_ y: Tensor) -> Tensor { ((y - target) * (y - target)).sum() }
        for _ in 0..<3 {
            let yb = conv2d(x, weight: w3 * s3, options: Conv2dOptions(padding: 1)) + conv2d(x, weight: w1 * s1) + x * d
            branchSGD.zeroGrad()
            loss(yb).backward()
            branchSGD.step()
            let yp = conv2d(x, weight: wPrime, options: Conv2dOptions(padding: 1))
            repopt.zeroGrad()
            loss(yp).backward()
            repopt.step()
        }
        // W' implied by the branch weights after training
        let implied = withNoGrad { scales.initialKernel(w3: w3, w1: w1) }
        for o in 0..<c { implied.data[(o * c + o) * 9 + 4] += d.data[o] - scales.identity![o] }
        #expect(firstMismatch(wPrime.values, implied.values, atol: 1e-5, rtol: 1e-4) == nil)
    }

    // MARK: - RepVGG's custom L2 and the block statistics (exp02b)

    /// The hand-written gradient of (wd / 2) * customL2 against central differences of the
    /// loss itself, on every kernel entry (centre taps and the 1x1 included), with random BN
    /// scales so that t3 != t1.
    @Test("custom L2: its gradient equals finite differences of its value")
    func customL2Gradient() {
        var rng = SeededGenerator(seed: 21)
        let block = RepVGGBlock(3, 3, rng: &rng)
        randomizeNorms(block, &rng)
        let wd: Float = 0.3
        block.addCustomL2Gradient(weightDecay: wd)
        for kernel in [block.rbrDense.conv.weight, block.rbr1x1.conv.weight] {
            let grad = kernel.grad!
            for i in 0..<kernel.count {
                let saved = kernel.data[i], h: Float = 1e-2
                kernel.data[i] = saved + h
                let plus = block.customL2()
                kernel.data[i] = saved - h
                let minus = block.customL2()
                kernel.data[i] = saved
                let numeric = Double(wd) / 2 * (plus - minus) / Double(2 * h)
                #expect(abs(numeric - Double(grad.data[i])) <= 1e-3 * max(1, abs(numeric)), "entry \(i): numeric \(numeric), analytic \(grad.data[i])")
            }
        }
    }

    /// With equal BN scales on both branches the custom L2 of the centre is (K3c + K1)^2 / 2:
    /// it decays the sum that the deployed kernel holds, not each branch.
    @Test("custom L2 on a hand case; the optimizer groups leave its kernels to it")
    func customL2Value() {
        var rng = SeededGenerator(seed: 2)
        let block = RepVGGBlock(1, 1, stride: 2, rng: &rng) // no identity
        for i in 0..<9 { block.rbrDense.conv.weight.data[i] = i == 4 ? 3 : 1 }
        block.rbr1x1.conv.weight.data[0] = -1
        // default BN (gamma 1, var 1): t = 1 / sqrt(1 + eps) on both branches
        #expect(abs(block.customL2() - (8 + 4.0 / 2)) < 1e-4)
        let model = Sequential([block])
        let plain = model.parameterGroups(weightDecay: 0.1, form: .plain)
        let custom = model.parameterGroups(weightDecay: 0.1, form: .repvggCustomL2)
        #expect(plain[0].parameters.count == 2 && custom[0].parameters.isEmpty)
        #expect(Set(model.customL2Kernels().map { ObjectIdentifier($0) }) == Set([block.rbrDense.conv.weight, block.rbr1x1.conv.weight].map { ObjectIdentifier($0) }))
    }

    @Test("block statistics: identity scale, its share of the centre tap, channel spread")
    func blockStatistics() {
        var rng = SeededGenerator(seed: 5)
        let block = RepVGGBlock(2, 2, rng: &rng)
        block.eval()
        for bn in [block.rbrDense.bn, block.rbr1x1.bn, block.rbrIdentity!] { // t = gamma exactly
            for c in 0..<2 { bn.weight.data[c] = 1; bn.runningVar.data[c] = 1 - bn.eps; bn.runningMean.data[c] = 0; bn.bias.data[c] = 0 }
        }
        block.rbrIdentity!.weight.data[1] = 3
        for i in 0..<block.rbrDense.conv.weight.count { block.rbrDense.conv.weight.data[i] = 0 }
        for i in 0..<block.rbr1x1.conv.weight.count { block.rbr1x1.conv.weight.data[i] = 0 }
        block.rbrDense.conv.weight.data[4] = 1 // [0, 0, 1, 1]: channel 0's diagonal centre
        let stats = Sequential([block]).repBlockStatistics()
        #expect(stats.count == 1)
        #expect(abs(stats[0].identityScaleMax! - 3) < 1e-5)
        // channel 0: identity 1 of (1 + 1 + 0); channel 1: identity 3 of 3
        #expect(abs(stats[0].identityCentreShare! - (0.5 + 1) / 2) < 1e-5)
        // fused channel ranges 2 and 3: max / median = 3 / 2.5
        #expect(abs(stats[0].channelRangeSpread - 1.2) < 1e-5)
        block.fuse()
        #expect(Sequential([block]).repBlockStatistics().isEmpty)
    }

    @Test("classifier recipes: file-safe names, custom L2 is plain for RepOpt, bad values named; signed percentages")
    func classifierRecipes() throws {
        let r = Baselines.ClassifierRecipe(epochs: 30, widthMultiplier: 2, weightDecay: 5e-4, decayForm: .repvggCustomL2)
        #expect(r.description == "e30-w2-wd0.0005-custom-l2")
        #expect(r.normalized(for: .repopt).decayForm == .plain && r.normalized(for: .repvgg).decayForm == .repvggCustomL2)
        expectError(ModelFileError.self, mentioning: "widthMultiplier") { try Baselines.ClassifierRecipe(widthMultiplier: 0).validate() }
        expectError(ModelFileError.self, mentioning: "weightDecay") { try Baselines.ClassifierRecipe(weightDecay: -1).validate() }
        #expect(signedPercent(-0.04) == "−4.0%" && signedPercent(0.005) == "+0.5%" && signedPercent(-0.0001) == "0.0%")
    }
}

