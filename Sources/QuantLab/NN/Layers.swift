import Foundation

/// PyTorch's default initialisation for conv and linear layers (kaiming_uniform with
/// a = sqrt(5)): weights and biases uniform in +-1/sqrt(fan_in).
private func defaultInit(_ shape: [Int], fanIn: Int, rng: inout SeededGenerator) -> Tensor {
    let bound = 1 / Float(max(fanIn, 1)).squareRoot()
    return Tensor.uniform(shape, low: -bound, high: bound, rng: &rng)
}

public final class Conv2d: Module, Layer {
    public let weight: Tensor
    public let bias: Tensor?
    public let options: Conv2dOptions

    public init(_ inChannels: Int, _ outChannels: Int, kernel: Int, stride: Int = 1, padding: Int? = nil,
                dilation: Int = 1, groups: Int = 1, bias: Bool = true, rng: inout SeededGenerator) {
        precondition(inChannels % groups == 0 && outChannels % groups == 0, "Conv2d: channels \(inChannels)->\(outChannels) not divisible by groups \(groups)")
        let fanIn = inChannels / groups * kernel * kernel
        options = Conv2dOptions(stride: stride, padding: padding ?? (dilation * (kernel - 1)) / 2, dilation: dilation, groups: groups)
        weight = defaultInit([outChannels, inChannels / groups, kernel, kernel], fanIn: fanIn, rng: &rng)
        self.bias = bias ? defaultInit([outChannels], fanIn: fanIn, rng: &rng) : nil
        super.init()
        registerParameter("weight", weight)
        if let b = self.bias { registerParameter("bias", b) }
    }

    public func callAsFunction(_ x: Tensor) -> Tensor { conv2d(x, weight: weight, bias: bias, options: options) }
}

public final class ConvTranspose2d: Module, Layer {
    public let weight: Tensor
    public let bias: Tensor?
    public let options: Conv2dOptions
    public let outputPadding: Int

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
        convTranspose2d(x, weight: weight, bias: bias, options: options, outputPadding: (outputPadding, outputPadding))
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
}

public final class Linear: Module, Layer {
    public let weight: Tensor
    public let bias: Tensor?

    public init(_ inFeatures: Int, _ outFeatures: Int, bias: Bool = true, rng: inout SeededGenerator) {
        weight = defaultInit([outFeatures, inFeatures], fanIn: inFeatures, rng: &rng)
        self.bias = bias ? defaultInit([outFeatures], fanIn: inFeatures, rng: &rng) : nil
        super.init()
        registerParameter("weight", weight)
        if let b = self.bias { registerParameter("bias", b) }
    }

    public func callAsFunction(_ x: Tensor) -> Tensor { linear(x, weight: weight, bias: bias) }
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
