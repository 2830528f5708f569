import CKernels
import Foundation

/// Parameters that share hyper-parameters (YOLOv6 and most detectors: no weight decay on
/// biases and normalisation weights).
public struct ParameterGroup {
    public var parameters: [Tensor]
    public var weightDecay: Float
    /// Multiplies the optimizer's learning rate for this group.
    public var lrScale: Float

    public init(_ parameters: [Tensor], weightDecay: Float, lrScale: Float = 1) {
        self.parameters = parameters
        self.weightDecay = weightDecay
        self.lrScale = lrScale
    }
}

extension Module {
    /// Two groups: weights of rank >= 2 (conv, linear) with `weightDecay`; rank <= 1
    /// tensors (biases, BN and LayerNorm scales and shifts) without.
    public func parameterGroups(weightDecay: Float) -> [ParameterGroup] {
        let params = parameters
        return [ParameterGroup(params.filter { $0.rank >= 2 }, weightDecay: weightDecay),
                ParameterGroup(params.filter { $0.rank < 2 }, weightDecay: 0)]
    }
}

public protocol Optimizer: AnyObject {
    var learningRate: Float { get set }
    var groups: [ParameterGroup] { get }
    /// Applies one update from the accumulated gradients (parameters without a gradient are skipped).
    func step()
}

extension Optimizer {
    public func zeroGrad() { for g in groups { for p in g.parameters { p.zeroGrad() } } }
}

/// SGD with momentum, Nesterov and L2 weight decay, with PyTorch's update rule
/// (see `ql_sgd_update` in ckernels.h).
public final class SGD: Optimizer {
    public var learningRate: Float
    public let momentum: Float
    public let nesterov: Bool
    public let groups: [ParameterGroup]
    private var buffers: [ObjectIdentifier: Tensor] = [:]

    public init(_ groups: [ParameterGroup], learningRate: Float, momentum: Float = 0, nesterov: Bool = false) {
        require(!nesterov || momentum > 0, "Nesterov momentum needs momentum > 0")
        self.groups = groups
        self.learningRate = learningRate
        self.momentum = momentum
        self.nesterov = nesterov
    }

    public func step() {
        for group in groups {
            for p in group.parameters {
                guard let g = p.grad else { continue }
                let key = ObjectIdentifier(p)
                let first = buffers[key] == nil
                let buf: Tensor? = momentum == 0 ? nil : (buffers[key] ?? Tensor(zeros: p.shape))
                if let buf { buffers[key] = buf }
                ql_sgd_update(p.data, buf?.data, g.data, Int64(p.count), learningRate * group.lrScale,
                              momentum, group.weightDecay, nesterov ? 1 : 0, first ? 1 : 0)
            }
        }
    }

    /// Momentum buffers by parameter position (for checkpoints).
    public func momentumBuffer(for p: Tensor) -> Tensor? { buffers[ObjectIdentifier(p)] }
    public func setMomentumBuffer(_ t: Tensor, for p: Tensor) { buffers[ObjectIdentifier(p)] = t }
}

/// AdamW (decoupled weight decay), PyTorch's defaults.
public final class AdamW: Optimizer {
    public var learningRate: Float
    public let beta1: Float, beta2: Float, eps: Float
    public let groups: [ParameterGroup]
    public private(set) var stepCount: Int64 = 0
    private var moments: [ObjectIdentifier: (Tensor, Tensor)] = [:]

    public init(_ groups: [ParameterGroup], learningRate: Float = 1e-3, beta1: Float = 0.9, beta2: Float = 0.999, eps: Float = 1e-8) {
        self.groups = groups
        self.learningRate = learningRate
        self.beta1 = beta1
        self.beta2 = beta2
        self.eps = eps
    }

    public func step() {
        stepCount += 1
        for group in groups {
            for p in group.parameters {
                guard let g = p.grad else { continue }
                let key = ObjectIdentifier(p)
                let (m, v) = moments[key] ?? (Tensor(zeros: p.shape), Tensor(zeros: p.shape))
                moments[key] = (m, v)
                ql_adamw_update(p.data, m.data, v.data, g.data, Int64(p.count), learningRate * group.lrScale,
                                beta1, beta2, eps, group.weightDecay, stepCount)
            }
        }
    }
}

/// Linear warm-up from `warmupStartFactor * base` to `base` over `warmupSteps`, then cosine
/// decay to `finalFactor * base` at `totalSteps` (YOLOv6: final factor 0.01).
public struct WarmupCosineSchedule: Sendable {
    public let base: Float, warmupSteps: Int, totalSteps: Int, warmupStartFactor: Float, finalFactor: Float

    public init(base: Float, warmupSteps: Int, totalSteps: Int, warmupStartFactor: Float = 0.1, finalFactor: Float = 0.01) {
        require(totalSteps > 0 && warmupSteps >= 0 && warmupSteps <= totalSteps, "schedule: warmup \(warmupSteps) of \(totalSteps) steps")
        self.base = base
        self.warmupSteps = warmupSteps
        self.totalSteps = totalSteps
        self.warmupStartFactor = warmupStartFactor
        self.finalFactor = finalFactor
    }

    /// Learning rate for step `t` (0-based).
    public func learningRate(at t: Int) -> Float {
        if t < warmupSteps {
            let f = Float(t) / Float(warmupSteps)
            return base * (warmupStartFactor + (1 - warmupStartFactor) * f)
        }
        let span = max(totalSteps - warmupSteps, 1)
        let progress = min(Float(t - warmupSteps) / Float(span), 1)
        let cosine = 0.5 * (1 + Foundation.cos(Float.pi * progress))
        return base * (finalFactor + (1 - finalFactor) * cosine)
    }
}

/// Exponential moving average of a model's parameters and buffers, as YOLOv6's ModelEMA:
/// decay ramps up as d = decay * (1 - exp(-updates / tau)), so early, noisy weights fade fast.
/// Floating-point buffers (BN running stats) are averaged the same way; the shadow copy can
/// be loaded into a model of the same architecture for evaluation or saved as a checkpoint.
public final class ModelEMA {
    public let decay: Float, tau: Float
    public private(set) var updates: Int
    public private(set) var shadow: [(String, Tensor)]

    public init(_ model: Module, decay: Float = 0.9999, tau: Float = 2000, updates: Int = 0) {
        self.decay = decay
        self.tau = tau
        self.updates = updates
        shadow = model.stateDict().map { ($0.0, $0.1.detached()) }
    }

    public var currentDecay: Float { decay * (1 - Foundation.exp(-Float(updates) / tau)) }

    public func update(from model: Module) {
        updates += 1
        let d = currentDecay
        let live = model.stateDict()
        require(live.count == shadow.count, "EMA: model has \(live.count) tensors, shadow \(shadow.count)")
        for ((name, s), (liveName, t)) in zip(shadow, live) {
            require(name == liveName, "EMA: \(name) vs \(liveName)")
            if name.hasSuffix("num_batches_tracked") { // a counter, not a weight: copied
                try? s.copyValues(from: t)
                continue
            }
            // s = d * s + (1 - d) * t
            ql_scale_shift(s.data, s.data, d, 0, Int64(s.count))
            ql_axpy(s.data, 1 - d, t.data, Int64(s.count))
        }
    }

    /// Restores the shadow weights and update count from a checkpoint.
    public func restore(_ tensors: [String: Tensor], updates: Int) throws {
        for (name, t) in shadow {
            guard let src = tensors[name] else { throw ModuleError.missingKeys([name]) }
            guard src.shape == t.shape else { throw ModuleError.shapeMismatch(name: name, expected: t.shape, got: src.shape) }
        }
        for (name, t) in shadow { try t.copyValues(from: tensors[name]!) }
        self.updates = updates
    }

    /// Copies the averaged weights into `model`.
    public func copy(into model: Module) throws {
        try model.loadStateDict(Dictionary(uniqueKeysWithValues: shadow.map { ($0.0, $0.1) }))
    }
}

/// Scales the gradients of `parameters` so their global L2 norm is at most `maxNorm`;
/// returns the norm before clipping.
@discardableResult
public func clipGradientNorm(_ parameters: [Tensor], maxNorm: Float) -> Float {
    var sq = 0.0
    for p in parameters { if let g = p.grad { for i in 0..<g.count { sq += Double(g.data[i]) * Double(g.data[i]) } } }
    let norm = Float(sq.squareRoot())
    if norm > maxNorm {
        let s = maxNorm / (norm + 1e-6)
        for p in parameters { if let g = p.grad { ql_scale_shift(g.data, g.data, s, 0, Int64(g.count)) } }
    }
    return norm
}
