import Foundation
import QuantLabCore
import QuantLabData

// Re-parameterisable blocks: the article's central comparison is ONE architecture trained
// three ways. Each block has a train-time form and a deploy form (one 3x3 conv with bias),
// and `fuse()` switches to the deploy form, which computes the same function in eval mode.

/// Which block a model is built from.
public enum BlockKind: String, Codable, CaseIterable, Sendable {
    /// RepVGG: 3x3 conv+BN, 1x1 conv+BN and identity BN branches, summed, then ReLU.
    case repvgg
    /// QARepVGG ("Make RepVGG Greater Again"): BN only on the 3x3 branch, one BN after the sum.
    case qarepvgg
    /// RepOpt stage 2: a plain 3x3 conv+BN+ReLU trained with RepOptSGD's gradient masks.
    case repopt
    /// RepOpt stage 1 ("hyper-search"): LinearAddBlock with trainable per-channel branch scales.
    case repoptSearch = "repopt-search"
}

/// A block with a deploy form.
public protocol RepBlock: Layer {
    var inChannels: Int { get }
    var outChannels: Int { get }
    var stride: Int { get }
    var isDeployed: Bool { get }
    /// The single 3x3 kernel [out, in, 3, 3] and bias [out] equal to the block before its
    /// activation, in eval mode.
    func equivalentKernel() -> (weight: Tensor, bias: Tensor)
    /// Replaces the branches by `rbr_reparam`, one 3x3 conv with bias.
    func fuse()
}

/// Conv (no bias) followed by BatchNorm, registered as `conv` and `bn` as in YOLOv6.
public final class ConvBN: Module, Layer {
    public let conv: Conv2d
    public let bn: BatchNorm2d

    public init(_ inChannels: Int, _ outChannels: Int, kernel: Int, stride: Int = 1, padding: Int? = nil, rng: inout SeededGenerator) {
        conv = Conv2d(inChannels, outChannels, kernel: kernel, stride: stride, padding: padding, bias: false, rng: &rng)
        bn = BatchNorm2d(outChannels)
        super.init()
        registerModule("conv", conv)
        registerModule("bn", bn)
    }

    public func callAsFunction(_ x: Tensor) -> Tensor { bn(conv(x)) }

    /// BN folded into the conv: W * gamma / sqrt(var + eps), beta - mean * gamma / sqrt(var + eps).
    public func folded() -> (weight: Tensor, bias: Tensor) { foldBatchNorm(weight: conv.weight, bias: nil, bn) }
}

/// Folds an eval-mode BatchNorm that follows a conv (weight [K, ...], optional bias [K]) into
/// the conv: y = gamma * (Wx + b - mean) / sqrt(var + eps) + beta.
public func foldBatchNorm(weight: Tensor, bias: Tensor?, _ bn: BatchNorm2d) -> (weight: Tensor, bias: Tensor) {
    let k = weight.shape[0]
    let w = scalingOutputChannels(weight) { bn.affine(channel: $0).scale }
    let b = Tensor(zeros: [k])
    for c in 0..<k { b.data[c] = bn.bias.data[c] + ((bias?.data[c] ?? 0) - bn.runningMean.data[c]) * bn.affine(channel: c).scale }
    return (w, b)
}

/// A copy of `weight` [K, ...] with output channel o multiplied by `scale(o)`.
func scalingOutputChannels(_ weight: Tensor, by scale: (Int) -> Float) -> Tensor {
    let k = weight.shape[0], per = weight.count / k
    let w = Tensor(zeros: weight.shape)
    for o in 0..<k {
        let s = scale(o)
        for i in 0..<per { w.data[o * per + i] = weight.data[o * per + i] * s }
    }
    return w
}

/// Adds a [K, C, 1, 1] kernel (times per-output-channel `scale`, if any) at the centre of a
/// [K, C, 3, 3] kernel, in place.
func addCentre(_ w3: Tensor, _ w1: Tensor, scale: (Int) -> Float = { _ in 1 }) {
    let (k, c) = (w3.shape[0], w3.shape[1])
    for o in 0..<k {
        let s = scale(o)
        for i in 0..<c { w3.data[(o * c + i) * 9 + 4] += w1.data[o * c + i] * s }
    }
}

/// Adds `value[o]` at the centre tap of the diagonal (o, o) of a [K, K, 3, 3] kernel: the
/// identity branch as a 3x3 conv.
func addIdentity(_ w3: Tensor, value: (Int) -> Float) {
    let k = w3.shape[0]
    for o in 0..<k { w3.data[(o * k + o) * 9 + 4] += value(o) }
}

/// Shared deploy-form machinery of the blocks.
public class RepBlockBase: Module {
    public let inChannels: Int, outChannels: Int, stride: Int
    public private(set) var reparam: Conv2d?
    public var isDeployed: Bool { reparam != nil }
    var hasIdentity: Bool { inChannels == outChannels && stride == 1 }

    init(_ inChannels: Int, _ outChannels: Int, stride: Int) {
        require(stride == 1 || stride == 2, "Rep blocks use stride 1 or 2, got \(stride)")
        self.inChannels = inChannels
        self.outChannels = outChannels
        self.stride = stride
        super.init()
    }

    /// Installs `rbr_reparam` with the given kernel and drops the named branches.
    func deploy(_ kernel: (weight: Tensor, bias: Tensor), removing branches: [String]) {
        let conv = Conv2d(weight: kernel.weight, bias: kernel.bias,
                          options: Conv2dOptions(stride: (stride, stride), padding: (1, 1)))
        for b in branches { unregisterModule(b) }
        registerModule("rbr_reparam", conv)
        reparam = conv
    }
}

public final class RepVGGBlock: RepBlockBase, RepBlock {
    public let rbrDense: ConvBN, rbr1x1: ConvBN
    public let rbrIdentity: BatchNorm2d?

    public init(_ inChannels: Int, _ outChannels: Int, stride: Int = 1, rng: inout SeededGenerator) {
        rbrDense = ConvBN(inChannels, outChannels, kernel: 3, stride: stride, padding: 1, rng: &rng)
        rbr1x1 = ConvBN(inChannels, outChannels, kernel: 1, stride: stride, padding: 0, rng: &rng)
        rbrIdentity = inChannels == outChannels && stride == 1 ? BatchNorm2d(inChannels) : nil
        super.init(inChannels, outChannels, stride: stride)
        registerModule("rbr_dense", rbrDense)
        registerModule("rbr_1x1", rbr1x1)
        if let id = rbrIdentity { registerModule("rbr_identity", id) }
    }

    public func callAsFunction(_ x: Tensor) -> Tensor {
        if let r = reparam { return r.reluForward(x) }
        var y = rbrDense(x) + rbr1x1(x)
        if let id = rbrIdentity { y = y + id(x) }
        return y.relu()
    }

    public func equivalentKernel() -> (weight: Tensor, bias: Tensor) {
        let (w, b) = rbrDense.folded()
        let (w1, b1) = rbr1x1.folded()
        addCentre(w, w1)
        for c in 0..<outChannels { b.data[c] += b1.data[c] }
        if let id = rbrIdentity { // identity BN: x * a + (beta - mean * a)
            addIdentity(w) { id.affine(channel: $0).scale }
            for c in 0..<outChannels { b.data[c] += id.affine(channel: c).shift }
        }
        return (w, b)
    }

    public func fuse() {
        guard !isDeployed else { return }
        deploy(equivalentKernel(), removing: ["rbr_dense", "rbr_1x1", "rbr_identity"])
    }
}

public final class QARepVGGBlock: RepBlockBase, RepBlock {
    public let rbrDense: ConvBN, rbr1x1: Conv2d, bn: BatchNorm2d

    public init(_ inChannels: Int, _ outChannels: Int, stride: Int = 1, rng: inout SeededGenerator) {
        rbrDense = ConvBN(inChannels, outChannels, kernel: 3, stride: stride, padding: 1, rng: &rng)
        rbr1x1 = Conv2d(inChannels, outChannels, kernel: 1, stride: stride, padding: 0, bias: false, rng: &rng)
        bn = BatchNorm2d(outChannels)
        super.init(inChannels, outChannels, stride: stride)
        registerModule("rbr_dense", rbrDense)
        registerModule("rbr_1x1", rbr1x1)
        registerModule("bn", bn)
    }

    public func callAsFunction(_ x: Tensor) -> Tensor {
        if let r = reparam { return r.reluForward(x) }
        var y = rbrDense(x) + rbr1x1(x)
        if hasIdentity { y = y + x }
        return bn(y).relu()
    }

    public func equivalentKernel() -> (weight: Tensor, bias: Tensor) {
        let (w, b) = rbrDense.folded()
        addCentre(w, rbr1x1.weight)
        if hasIdentity { addIdentity(w) { _ in 1 } }
        return foldBatchNorm(weight: w, bias: b, bn)
    }

    public func fuse() {
        guard !isDeployed else { return }
        deploy(equivalentKernel(), removing: ["rbr_dense", "rbr_1x1", "bn"])
    }
}

/// Per-channel multiplier (RepOpt's ScaleLayer): y[n, c, h, w] = x[n, c, h, w] * scale[c].
public final class ScaleLayer: Module, Layer {
    public let scale: Tensor

    public init(_ channels: Int, initialValue: Float) {
        scale = Tensor.full([channels], initialValue)
        super.init()
        registerParameter("weight", scale)
    }

    public func callAsFunction(_ x: Tensor) -> Tensor { x * scale.reshaped([1, scale.count, 1, 1]) }
}

/// RepOpt stage 1: relu(bn(s3 * conv3x3(x) + s1 * conv1x1(x) [+ s_id * x])), scales trainable.
/// Its only product is the learned scales (`scales()`), which shape stage 2's optimizer.
public final class LinearAddBlock: RepBlockBase, RepBlock {
    public let conv: Conv2d, scaleConv: ScaleLayer, conv1x1: Conv2d, scale1x1: ScaleLayer
    public let scaleIdentity: ScaleLayer?
    public let bn: BatchNorm2d

    /// - Parameter scaleInit: initial branch scale (RepOpt: 1 for the first block, sqrt(2/l) later).
    public init(_ inChannels: Int, _ outChannels: Int, stride: Int = 1, scaleInit: Float = 1, rng: inout SeededGenerator) {
        conv = Conv2d(inChannels, outChannels, kernel: 3, stride: stride, padding: 1, bias: false, rng: &rng)
        scaleConv = ScaleLayer(outChannels, initialValue: scaleInit)
        conv1x1 = Conv2d(inChannels, outChannels, kernel: 1, stride: stride, padding: 0, bias: false, rng: &rng)
        scale1x1 = ScaleLayer(outChannels, initialValue: scaleInit)
        scaleIdentity = inChannels == outChannels && stride == 1 ? ScaleLayer(outChannels, initialValue: 1) : nil
        bn = BatchNorm2d(outChannels)
        super.init(inChannels, outChannels, stride: stride)
        registerModule("conv", conv)
        registerModule("scale_conv", scaleConv)
        registerModule("conv_1x1", conv1x1)
        registerModule("scale_1x1", scale1x1)
        if let s = scaleIdentity { registerModule("scale_identity", s) }
        registerModule("bn", bn)
    }

    public func callAsFunction(_ x: Tensor) -> Tensor {
        if let r = reparam { return r.reluForward(x) }
        var y = scaleConv(conv(x)) + scale1x1(conv1x1(x))
        if let s = scaleIdentity { y = y + s(x) }
        return bn(y).relu()
    }

    /// The learned branch scales (s3, s1, s_id) that stage 2 turns into gradient masks.
    public func scales() -> RepOptScales {
        RepOptScales(conv3x3: scaleConv.scale.values, conv1x1: scale1x1.scale.values, identity: scaleIdentity?.scale.values)
    }

    public func equivalentKernel() -> (weight: Tensor, bias: Tensor) {
        let w = scalingOutputChannels(conv.weight) { scaleConv.scale.data[$0] }
        addCentre(w, conv1x1.weight, scale: { scale1x1.scale.data[$0] })
        if let s = scaleIdentity { addIdentity(w) { s.scale.data[$0] } }
        return foldBatchNorm(weight: w, bias: nil, bn)
    }

    public func fuse() {
        guard !isDeployed else { return }
        deploy(equivalentKernel(), removing: ["conv", "scale_conv", "conv_1x1", "scale_1x1", "scale_identity", "bn"])
    }
}

/// Branch scales of one RepOpt block, per output channel.
public struct RepOptScales: Codable, Equatable, Sendable {
    public var conv3x3: [Float]
    public var conv1x1: [Float]
    public var identity: [Float]?

    public init(conv3x3: [Float], conv1x1: [Float], identity: [Float]?) {
        self.conv3x3 = conv3x3
        self.conv1x1 = conv1x1
        self.identity = identity
    }

    /// The stage-2 initial kernel: W' = s3 * W3 + pad(s1 * W1) (+ identity at the centre of the
    /// diagonal), from freshly initialised W3 [K, C, 3, 3] and W1 [K, C, 1, 1].
    public func initialKernel(w3: Tensor, w1: Tensor) -> Tensor {
        let w = scalingOutputChannels(w3) { conv3x3[$0] }
        addCentre(w, w1, scale: { conv1x1[$0] })
        if let sid = identity { addIdentity(w) { sid[$0] } }
        return w
    }

    /// RepOptSGD's per-element gradient multiplier for the 3x3 kernel [K, C, 3, 3]:
    /// s3^2 everywhere, + s1^2 at the centre tap, + 1 at the centre of the diagonal (identity).
    public func gradientMask(inChannels c: Int) -> Tensor {
        let k = conv3x3.count
        let mask = Tensor(zeros: [k, c, 3, 3])
        for o in 0..<k {
            for i in 0..<c {
                for t in 0..<9 { mask.data[(o * c + i) * 9 + t] = conv3x3[o] * conv3x3[o] }
                mask.data[(o * c + i) * 9 + 4] += conv1x1[o] * conv1x1[o]
            }
        }
        if identity != nil { addIdentity(mask) { _ in 1 } }
        return mask
    }
}

/// RepOpt stage 2: a plain 3x3 conv + BN + ReLU. Its structural prior lives in the optimizer
/// (`RepOptSGD`), not in the architecture, so the trained and deployed nets are the same and
/// the kernel's distribution stays quantization-friendly.
public final class RealVGGBlock: RepBlockBase, RepBlock {
    public let conv: Conv2d, bn: BatchNorm2d

    public init(_ inChannels: Int, _ outChannels: Int, stride: Int = 1, rng: inout SeededGenerator) {
        conv = Conv2d(inChannels, outChannels, kernel: 3, stride: stride, padding: 1, bias: false, rng: &rng)
        bn = BatchNorm2d(outChannels)
        super.init(inChannels, outChannels, stride: stride)
        registerModule("conv", conv)
        registerModule("bn", bn)
    }

    /// Re-initialises the kernel from stage-1 scales and returns its gradient mask.
    @discardableResult
    public func initialize(from scales: RepOptScales, rng: inout SeededGenerator) -> Tensor {
        let fresh3 = Conv2d(inChannels, outChannels, kernel: 3, stride: stride, bias: false, rng: &rng)
        let fresh1 = Conv2d(inChannels, outChannels, kernel: 1, stride: stride, bias: false, rng: &rng)
        let initial = scales.initialKernel(w3: fresh3.weight, w1: fresh1.weight)
        withExtendedLifetime(initial) { conv.weight.data.update(from: initial.data, count: initial.count) }
        return scales.gradientMask(inChannels: inChannels)
    }

    public func callAsFunction(_ x: Tensor) -> Tensor {
        if let r = reparam { return r.reluForward(x) }
        return bn(conv(x)).relu()
    }

    public func equivalentKernel() -> (weight: Tensor, bias: Tensor) { foldBatchNorm(weight: conv.weight, bias: nil, bn) }

    public func fuse() {
        guard !isDeployed else { return }
        deploy(equivalentKernel(), removing: ["conv", "bn"])
    }
}

/// Builds one block of the requested kind.
public func makeRepBlock(_ kind: BlockKind, _ inChannels: Int, _ outChannels: Int, stride: Int = 1, scaleInit: Float = 1,
                         rng: inout SeededGenerator) -> any RepBlock {
    switch kind {
    case .repvgg: return RepVGGBlock(inChannels, outChannels, stride: stride, rng: &rng)
    case .qarepvgg: return QARepVGGBlock(inChannels, outChannels, stride: stride, rng: &rng)
    case .repopt: return RealVGGBlock(inChannels, outChannels, stride: stride, rng: &rng)
    case .repoptSearch: return LinearAddBlock(inChannels, outChannels, stride: stride, scaleInit: scaleInit, rng: &rng)
    }
}

extension Module {
    /// Every Rep block below this module, with its dotted path.
    public func repBlocks() -> [(String, any RepBlock)] {
        namedModules().compactMap { name, m in (m as? any RepBlock).map { (name, $0) } }
    }

    /// Switches every Rep block to its deploy form (one 3x3 conv each).
    public func fuseRepBlocks() { for (_, b) in repBlocks() { b.fuse() } }
}

/// SGD whose gradients are multiplied elementwise by per-parameter masks before the usual
/// update (RepOpt's "RepOptimizer" for SGD: masks from the stage-1 scales, squared). Masked
/// gradient, then weight decay, then momentum, as the reference implementation.
public final class RepOptSGD: Optimizer {
    public var learningRate: Float {
        get { inner.learningRate }
        set { inner.learningRate = newValue }
    }
    public var groups: [ParameterGroup] { inner.groups }
    let inner: SGD
    private let masks: [ObjectIdentifier: Tensor]

    public init(_ groups: [ParameterGroup], masks: [(Tensor, Tensor)], learningRate: Float, momentum: Float = 0, nesterov: Bool = false) {
        for (p, m) in masks { require(p.shape == m.shape, "RepOptSGD: mask \(m.shape) for parameter \(p.shape)") }
        inner = SGD(groups, learningRate: learningRate, momentum: momentum, nesterov: nesterov)
        self.masks = Dictionary(uniqueKeysWithValues: masks.map { (ObjectIdentifier($0.0), $0.1) })
    }

    public func step() {
        for group in groups {
            for p in group.parameters {
                guard let g = p.grad, let m = masks[ObjectIdentifier(p)] else { continue }
                for i in 0..<g.count { g.data[i] *= m.data[i] }
            }
        }
        inner.step()
    }
}
