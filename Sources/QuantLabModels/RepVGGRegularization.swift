// RepVGG's "custom L2" and the per-block statistics that the PTQ-collapse study tracks.
//
// Plain L2 decay on a RepVGG block's branch kernels does not decay the kernel the block
// deploys: the 3x3 and 1x1 branches are each scaled by their BN (t = gamma / sqrt(var + eps))
// before they are added into one centre tap. The RepVGG authors (Ding et al. 2021, the
// reference repvgg.py, `get_custom_L2`) therefore regularise the equivalent kernel instead:
// ordinary L2 on the 3x3 kernel's outer ring, and on the centre tap the squared equivalent
// value (K3c t3 + K1 t1)^2, normalised by (t3^2 + t1^2) so that the coefficient means what a
// plain decay coefficient means. The BN scales enter as constants (no gradient through them).
// The QARepVGG paper ties the PTQ collapse of RepVGG partly to how this decay shapes the fused
// kernel; exp02b trains with each form and measures the effect.
import Foundation
import QuantLabCore

/// How a model's conv kernels are decayed during training.
public enum WeightDecayForm: String, Codable, Sendable, CaseIterable {
    /// L2 on every kernel as it is trained (SGD's weight decay).
    case plain
    /// RepVGG's custom L2 on the equivalent kernel of every RepVGGBlock (plain L2 elsewhere).
    case repvggCustomL2 = "repvgg-custom-l2"
}

extension RepVGGBlock {
    /// The BN scales of the 3x3 and 1x1 branches, per output channel (constants for the loss).
    private func branchScales() -> (t3: [Float], t1: [Float]) {
        ((0..<outChannels).map { rbrDense.bn.affine(channel: $0).scale }, (0..<outChannels).map { rbr1x1.bn.affine(channel: $0).scale })
    }

    /// The custom L2 of this block's branch kernels: sum of K3^2 off the centre, plus
    /// sum over (o, i) of (K3[o,i,1,1] t3[o] + K1[o,i] t1[o])^2 / (t3[o]^2 + t1[o]^2).
    public func customL2() -> Double {
        let (t3, t1) = branchScales()
        let k3 = rbrDense.conv.weight, k1 = rbr1x1.conv.weight
        let inC = k1.shape[1]
        var sum = 0.0
        for o in 0..<outChannels {
            let norm = Double(t3[o] * t3[o] + t1[o] * t1[o])
            for i in 0..<inC {
                let base = (o * inC + i) * 9
                for tap in 0..<9 where tap != 4 { sum += Double(k3.data[base + tap] * k3.data[base + tap]) }
                let eq = Double(k3.data[base + 4] * t3[o] + k1.data[o * inC + i] * t1[o])
                sum += norm > 0 ? eq * eq / norm : 0
            }
        }
        return sum
    }

    /// Adds the gradient of (weightDecay / 2) * customL2() to the branch kernels' gradients —
    /// what SGD's plain decay adds for (weightDecay / 2) * |K|^2. Call after backward, before
    /// the optimizer step, with these kernels left out of the optimizer's own decay.
    public func addCustomL2Gradient(weightDecay: Float) {
        let (t3, t1) = branchScales()
        let k3 = rbrDense.conv.weight, k1 = rbr1x1.conv.weight
        let g3 = k3.grad ?? Tensor(zeros: k3.shape), g1 = k1.grad ?? Tensor(zeros: k1.shape)
        let inC = k1.shape[1]
        for o in 0..<outChannels {
            let norm = t3[o] * t3[o] + t1[o] * t1[o]
            for i in 0..<inC {
                let base = (o * inC + i) * 9
                for tap in 0..<9 where tap != 4 { g3.data[base + tap] += weightDecay * k3.data[base + tap] }
                guard norm > 0 else { continue }
                let eq = k3.data[base + 4] * t3[o] + k1.data[o * inC + i] * t1[o]
                g3.data[base + 4] += weightDecay * eq * t3[o] / norm
                g1.data[o * inC + i] += weightDecay * eq * t1[o] / norm
            }
        }
        k3.grad = g3
        k1.grad = g1
    }
}

extension Module {
    /// The branch kernels of every RepVGGBlock (what the custom L2 decays instead of SGD).
    public func customL2Kernels() -> [Tensor] {
        repBlocks().compactMap { $0.1 as? RepVGGBlock }.filter { !$0.isDeployed }.flatMap { [$0.rbrDense.conv.weight, $0.rbr1x1.conv.weight] }
    }

    /// Optimizer groups for a decay form: with the custom L2, the RepVGG branch kernels get no
    /// decay from the optimizer (`addCustomL2Gradients` gives theirs).
    public func parameterGroups(weightDecay: Float, form: WeightDecayForm) -> [ParameterGroup] {
        guard form == .repvggCustomL2 else { return parameterGroups(weightDecay: weightDecay) }
        let custom = Set(customL2Kernels().map { ObjectIdentifier($0) })
        let params = parameters
        return [ParameterGroup(params.filter { $0.rank >= 2 && !custom.contains(ObjectIdentifier($0)) }, weightDecay: weightDecay),
                ParameterGroup(params.filter { $0.rank < 2 || custom.contains(ObjectIdentifier($0)) }, weightDecay: 0)]
    }

    /// Adds every RepVGGBlock's custom-L2 gradient (see `RepVGGBlock.addCustomL2Gradient`).
    public func addCustomL2Gradients(weightDecay: Float) {
        for (_, b) in repBlocks() { if let v = b as? RepVGGBlock, !v.isDeployed { v.addCustomL2Gradient(weightDecay: weightDecay) } }
    }
}

/// One re-parameterisable block seen from the quantizer's side (measured before fusion).
public struct RepBlockStatistics: Codable, Sendable, Equatable {
    public var name: String
    /// RepVGG blocks with an identity branch: the largest gamma / sqrt(var + eps) of the
    /// identity BN over channels — the factor the identity adds to the fused centre tap.
    public var identityScaleMax: Double?
    /// The identity's share of the fused diagonal centre tap, mean over output channels:
    /// |a_c| / (|t3 K3[c,c,1,1]| + |t1 K1[c,c]| + |a_c|).
    public var identityCentreShare: Double?
    /// The fused kernel's channel-range spread: max over output channels of max|W_c| divided
    /// by the median over channels. One per-tensor weight scale gives the median channel
    /// about 127 / spread levels; per-channel scales give every channel 127.
    public var channelRangeSpread: Double

    public init(name: String, identityScaleMax: Double?, identityCentreShare: Double?, channelRangeSpread: Double) {
        self.name = name
        self.identityScaleMax = identityScaleMax
        self.identityCentreShare = identityCentreShare
        self.channelRangeSpread = channelRangeSpread
    }
}

/// The channel-range spread of a kernel [K, ...]: max_c max|W_c| / median_c max|W_c|.
public func channelRangeSpread(_ weight: Tensor) -> Double {
    let k = weight.shape[0], per = weight.count / max(k, 1)
    let ranges = (0..<k).map { c in (0..<per).reduce(0.0) { max($0, Double(abs(weight.data[c * per + $1]))) } }.sorted()
    guard let top = ranges.last, !ranges.isEmpty else { return .nan }
    let mid = ranges.count % 2 == 1 ? ranges[ranges.count / 2] : (ranges[ranges.count / 2 - 1] + ranges[ranges.count / 2]) / 2
    return mid > 0 ? top / mid : .infinity
}

extension Module {
    /// Statistics of every Rep block that has not been fused yet, in the module's order.
    public func repBlockStatistics() -> [RepBlockStatistics] {
        repBlocks().compactMap { name, block in
            guard !block.isDeployed else { return nil }
            let spread = channelRangeSpread(block.equivalentKernel().weight)
            guard let v = block as? RepVGGBlock, let id = v.rbrIdentity else {
                return RepBlockStatistics(name: name, identityScaleMax: nil, identityCentreShare: nil, channelRangeSpread: spread)
            }
            let w3 = v.rbrDense.folded().weight, w1 = v.rbr1x1.folded().weight
            let inC = w1.shape[1]
            var scaleMax = 0.0, share = 0.0
            for c in 0..<v.outChannels {
                let a = Double(abs(id.affine(channel: c).scale))
                let dense = Double(abs(w3.data[(c * inC + c) * 9 + 4])), point = Double(abs(w1.data[c * inC + c]))
                scaleMax = max(scaleMax, a)
                share += a + dense + point > 0 ? a / (a + dense + point) : 0
            }
            return RepBlockStatistics(name: name, identityScaleMax: scaleMax, identityCentreShare: share / Double(v.outChannels), channelRangeSpread: spread)
        }
    }
}
