import Foundation

/// PyTorch's default initialisation for conv and linear layers (kaiming_uniform with
/// a = sqrt(5)): weights and biases uniform in +-1/sqrt(fan_in).
private func defaultInit(_ shape: [Int], fanIn: Int, rng: inout SeededGenerator) -> Tensor {
    let bound = 1 / Float(max(fanIn, 1)).squareRoot()
    return Tensor.uniform(shape, low: -bound, high: bound, rng: &rng)
}

/// Where a forward pass lets another part of the library see or replace a tensor: a layer's
/// input and its weight. Quantization installs its fake quantizers here (the role
/// pytorch-quantization gives to swapping `Conv2d` for `QuantConv2d`), so a layer keeps its
/// class and its dotted name.
public typealias TensorHook = (Tensor) -> Tensor

/// The hooks of one layer and who installed them. One owner at a time: installing over hooks
/// another owner holds is an error naming both, so a quantization simulator and an analysis
/// pass cannot silently replace each other's quantizers or statistics; removing takes only
/// the caller's own hooks away.
public final class LayerHooks {
    /// Applied to the layer's input before it computes.
    public private(set) var input: TensorHook?
    /// Applied to the layer's weight before it computes (weighted layers only).
    public private(set) var weight: TensorHook?
    /// Who holds the hooks ("QuantizationSimulator", "analyzeQuantization"), nil when free.
    public private(set) var owner: String?
    private var ownerID: ObjectIdentifier?

    public init() {}

    public var isInstalled: Bool { ownerID != nil }

    /// Installs hooks for `owner` (an object that lives while they are installed); `layer` names
    /// the layer in the error. Replacing one's own hooks is allowed.
    public func install(input: TensorHook?, weight: TensorHook? = nil, owner: AnyObject, ownerName: String, layer: String) throws {
        if let id = ownerID, id != ObjectIdentifier(owner) {
            throw ModuleError.hooksInUse(layer: layer, owner: self.owner ?? "another owner", requestedBy: ownerName)
        }
        self.input = input
        self.weight = weight
        self.owner = ownerName
        ownerID = ObjectIdentifier(owner)
    }

    /// Removes the hooks if `owner` installed them; someone else's stay.
    public func remove(owner: AnyObject) {
        guard ownerID == ObjectIdentifier(owner) else { return }
        input = nil
        weight = nil
        self.owner = nil
        ownerID = nil
    }
}

/// A layer with a weight that multiplies its input: conv, transposed conv, linear. These are
/// the layers INT8 engines run on integer kernels, so these are the ones quantized.
public protocol WeightedLayer: Layer {
    var weight: Tensor { get }
    var bias: Tensor? { get }
    /// The input and weight hooks (fake quantizers, statistics collectors).
    var hooks: LayerHooks { get }
    /// The weight's output-channel axis (0 for conv and linear, 1 for a transposed conv).
    var outputChannelAxis: Int { get }
}

public final class Conv2d: Module, WeightedLayer {
    public let weight: Tensor
    public let bias: Tensor?
    public let options: Conv2dOptions
    public let hooks = LayerHooks()
    public var outputChannelAxis: Int { 0 }

    public init(_ inChannels: Int, _ outChannels: Int, kernel: Int, stride: Int = 1, padding: Int? = nil,
                dilation: Int = 1, groups: Int = 1, bias: Bool = true, rng: inout SeededGenerator) {
        require(inChannels % groups == 0 && outChannels % groups == 0, "Conv2d: channels \(inChannels)->\(outChannels) not divisible by groups \(groups)")
        let fanIn = inChannels / groups * kernel * kernel
        options = Conv2dOptions(stride: stride, padding: padding ?? (dilation * (kernel - 1)) / 2, dilation: dilation, groups: groups)
        weight = defaultInit([outChannels, inChannels / groups, kernel, kernel], fanIn: fanIn, rng: &rng)
        self.bias = bias ? defaultInit([outChannels], fanIn: fanIn, rng: &rng) : nil
        super.init()
        registerParameter("weight", weight)
        if let b = self.bias { registerParameter("bias", b) }
    }

    /// A conv with the given weight [K, C/groups, kh, kw], bias [K] and geometry: how a deploy
    /// form replaces layers by their folded equivalent (the values are copied).
    public convenience init(weight: Tensor, bias: Tensor, options: Conv2dOptions) {
        require(weight.shape.count == 4 && weight.shape[2] == weight.shape[3] && bias.shape == [weight.shape[0]],
                     "Conv2d(weight:bias:options:): weight \(weight.shape) with bias \(bias.shape)")
        require(options.stride.0 == options.stride.1 && options.padding.0 == options.padding.1 && options.dilation.0 == options.dilation.1,
                     "Conv2d layers are square in stride, padding and dilation")
        var rng = SeededGenerator(seed: 0) // every value is overwritten below
        self.init(weight.shape[1] * options.groups, weight.shape[0], kernel: weight.shape[2], stride: options.stride.0,
                  padding: options.padding.0, dilation: options.dilation.0, groups: options.groups, bias: true, rng: &rng)
        self.weight.data.update(from: weight.data, count: weight.count)
        self.bias!.data.update(from: bias.data, count: bias.count)
    }

    public func callAsFunction(_ x: Tensor) -> Tensor {
        conv2d(hooks.input?(x) ?? x, weight: hooks.weight?(weight) ?? weight, bias: bias, options: options)
    }

    /// `self(x).relu()`, the ReLU fused into the conv where nothing needs the two apart
    /// (`conv2dReLU`): a deploy-form Rep block's forward.
    public func reluForward(_ x: Tensor) -> Tensor {
        conv2dReLU(hooks.input?(x) ?? x, weight: hooks.weight?(weight) ?? weight, bias: bias, options: options)
    }
}

public final class ConvTranspose2d: Module, WeightedLayer {
    public let weight: Tensor
    public let bias: Tensor?
    public let options: Conv2dOptions
    public let outputPadding: Int
    public let hooks = LayerHooks()
    /// The weight is [in, out / groups, kh, kw].
    public var outputChannelAxis: Int { 1 }

    public init(_ inChannels: Int, _ outChannels: Int, kernel: Int, stride: Int = 1, padding: Int = 0,
                outputPadding: Int = 0, groups: Int = 1, bias: Bool = true, rng: inout SeededGenerator) {
        // PyTorch computes fan_in from weight.shape[1] * k * k for transposed convs.
        let fanIn = outChannels / groups * kernel * kernel
        options = Conv2dOptions(stride: stride, padding: padding, groups: groups)
        self.outputPadding = outputPadding
        weight = defaultInit([inChannels, outChannels / groups, kernel, kernel], fanIn: fanIn, rng: &rng)
        self.bias = bias ? defaultInit([outChannels], fanIn: fanIn, rng: &rng) : nil
        super.init()
        registerParameter("weight", weight)
        if let b = self.bias { registerParameter("bias", b) }
    }

    public func callAsFunction(_ x: Tensor) -> Tensor {
        convTranspose2d(hooks.input?(x) ?? x, weight: hooks.weight?(weight) ?? weight, bias: bias, options: options,
                        outputPadding: (outputPadding, outputPadding))
    }
}

public final class BatchNorm2d: Module, Layer {
    public let weight: Tensor, bias: Tensor
    public let runningMean: Tensor, runningVar: Tensor, numBatchesTracked: Tensor
    public let eps: Float, momentum: Float

    public init(_ channels: Int, eps: Float = 1e-5, momentum: Float = 0.1) {
        self.eps = eps
        self.momentum = momentum
        weight = Tensor.full([channels], 1)
        bias = Tensor(zeros: [channels])
        runningMean = Tensor(zeros: [channels])
        runningVar = Tensor.full([channels], 1)
        numBatchesTracked = Tensor(zeros: [])
        super.init()
        registerParameter("weight", weight)
        registerParameter("bias", bias)
        registerBuffer("running_mean", runningMean)
        registerBuffer("running_var", runningVar)
        registerBuffer("num_batches_tracked", numBatchesTracked)
    }

    public func callAsFunction(_ x: Tensor) -> Tensor {
        if isTraining { numBatchesTracked.data[0] += 1 }
        return batchNorm2d(x, weight: weight, bias: bias, runningMean: runningMean, runningVar: runningVar,
                           training: isTraining, momentum: momentum, eps: eps)
    }

    /// The eval-mode affine map of channel c, y = a * x + b: a = gamma / sqrt(var + eps),
    /// b = beta - mean * a. What folding a BN into the conv before it multiplies and adds.
    public func affine(channel c: Int) -> (scale: Float, shift: Float) {
        let a = weight.data[c] / (runningVar.data[c] + eps).squareRoot()
        return (a, bias.data[c] - runningMean.data[c] * a)
    }
}

public final class Linear: Module, WeightedLayer {
    public let weight: Tensor
    public let bias: Tensor?
    public let hooks = LayerHooks()
    public var outputChannelAxis: Int { 0 }

    public init(_ inFeatures: Int, _ outFeatures: Int, bias: Bool = true, rng: inout SeededGenerator) {
        weight = defaultInit([outFeatures, inFeatures], fanIn: inFeatures, rng: &rng)
        self.bias = bias ? defaultInit([outFeatures], fanIn: inFeatures, rng: &rng) : nil
        super.init()
        registerParameter("weight", weight)
        if let b = self.bias { registerParameter("bias", b) }
    }

    public func callAsFunction(_ x: Tensor) -> Tensor { linear(hooks.input?(x) ?? x, weight: hooks.weight?(weight) ?? weight, bias: bias) }
}

public final class LayerNorm: Module, Layer {
    public let weight: Tensor, bias: Tensor
    public let eps: Float

    public init(_ features: Int, eps: Float = 1e-5) {
        self.eps = eps
        weight = Tensor.full([features], 1)
        bias = Tensor(zeros: [features])
        super.init()
        registerParameter("weight", weight)
        registerParameter("bias", bias)
    }

    public func callAsFunction(_ x: Tensor) -> Tensor { layerNorm(x, weight: weight, bias: bias, eps: eps) }
}

/// A named point in a forward pass with no computation of its own: identity unless a hook is
/// installed. Models put one where a tensor that is not a layer input may be quantized: the
/// output of a concat (whose inputs an INT8 engine must give one shared scale), or an operand
/// of a product of two activations (attention's Q.K^T and A.V, which PaddleSlim quantizes as
/// `matmul` when asked to).
public final class TapPoint: Module, Layer {
    public enum Role: String, Codable, Sendable {
        case concat
        /// One operand of a matmul between two activations.
        case matmulOperand = "matmul_operand"
    }
    public let hooks = LayerHooks()
    public let role: Role
    public init(role: Role = .concat) {
        self.role = role
        super.init()
    }
    public func callAsFunction(_ x: Tensor) -> Tensor { hooks.input?(x) ?? x }
}

/// A parameter-free function as a layer (activations, pooling, flatten).
public final class Lambda: Module, Layer {
    public let name: String
    private let fn: (Tensor) -> Tensor

    public init(_ name: String, _ fn: @escaping (Tensor) -> Tensor) {
        self.name = name
        self.fn = fn
    }

    public func callAsFunction(_ x: Tensor) -> Tensor { fn(x) }

    public static func relu() -> Lambda { Lambda("relu") { $0.relu() } }
    public static func silu() -> Lambda { Lambda("silu") { $0.silu() } }
    public static func flatten() -> Lambda { Lambda("flatten") { $0.flattened() } }
    public static func globalAvgPool() -> Lambda { Lambda("global_avg_pool") { globalAvgPool2d($0) } }
    public static func maxPool(_ k: Int, stride: Int? = nil) -> Lambda { Lambda("max_pool") { maxPool2d($0, kernel: k, stride: stride) } }
}
