import Foundation
import QuantLabCore
import QuantLabData
import QuantLabModels

// Q/DQ placement, as pytorch-quantization's quantized modules place it: every conv,
// transposed conv and linear layer gets a quantizer on its input activation (per tensor) and
// one on its weight (per output channel). The quantizers are installed in the layers' hooks,
// so each quantized layer keeps its dotted name (`neck.reduce_layer1.conv`) and can be
// switched on or off alone: the basis of sensitivity analysis and partial quantization.

/// One quantizer: a spec, its calibration statistics, and its amax once calibrated.
public final class TensorQuantizer {
    public let spec: QuantSpec
    /// Symmetric mode: one amax (per tensor) or one per channel.
    public var amax: [Float]?
    /// Asymmetric mode: scale and zero point.
    public var affine: (scale: Float, zeroPoint: Int)?
    /// Applies fake quantization when calibrated.
    public var isEnabled = true
    /// Collects statistics and passes values through unchanged (FP32 calibration pass).
    public var isCalibrating = false
    /// QAT with PaddleSlim's moving_average_abs_max: every call first folds the batch's max |x|
    /// into the moving average (state = r state + 1, accum = r accum + max|x|) and quantizes
    /// with amax = accum / state. Off for evaluation, which uses the last value.
    public var tracksMovingAverage = false
    public var statistics: ActivationStatistics
    /// What it quantizes ("neck.reduce_layer1.conv.input"), for traced graphs and messages.
    public var label: String?

    /// LSQ (QAT.swift): a trainable step per tensor or channel, started from amax / Qp; while
    /// set, it replaces amax (`freezeLearnedStep` writes it back).
    public private(set) var learnedStep: Tensor?

    /// Starts learning the step from the calibrated amax (PaddleSlim starts from the range of
    /// the first batches; starting from the PTQ calibration is what YOLOv6's QAT starts from).
    public func enableLearnedStep() throws {
        guard spec.mode == .symmetric, let amax else { throw QuantizationError("\(label ?? "quantizer"): LSQ needs a calibrated symmetric quantizer") }
        let t = Tensor(amax.map { max($0, Float.leastNormalMagnitude) / Float(spec.qmax) }, shape: [amax.count])
        t.requiresGrad = true
        learnedStep = t
    }

    /// Ends LSQ: amax = step * Qp from now on.
    public func freezeLearnedStep() {
        guard let step = learnedStep else { return }
        amax = step.values.map { $0 * Float(spec.qmax) }
        learnedStep = nil
    }

    public init(spec: QuantSpec, histogram: Bool = true, bins: Int = 2048) {
        self.spec = spec
        statistics = ActivationStatistics(histogram: histogram && spec.axis == nil, bins: bins)
    }

    public func callAsFunction(_ x: Tensor) -> Tensor {
        if isCalibrating {
            statistics.collect(x)
            return x
        }
        guard isEnabled else { return x }
        switch spec.mode {
        case .symmetric:
            if let step = learnedStep {
                // LSQ: the step is trained; the graph sees an ordinary quantizer with amax = step * Qp
                let out = untraced { lsqFakeQuantize(x, step: step, qn: -spec.qmax, qp: spec.qmax, axis: spec.axis) }
                traceOp(.quantizeDequantize(amax: step.values.map { $0 * Float(spec.qmax) }, axis: spec.axis, bits: spec.bits), [x], out, name: label)
                return out
            }
            if tracksMovingAverage && spec.axis == nil {
                statistics.movingAverage.update(batchAbsMax: x.absMax())
                amax = statistics.movingAverage.amax.map { [$0] }
            }
            guard let amax else { fatalError("a quantizer was enabled before it was calibrated (call applyCalibration first)") }
            let out = untraced { fakeQuantize(x, amax: amax, spec: spec) }
            traceOp(.quantizeDequantize(amax: amax, axis: spec.axis, bits: spec.bits), [x], out, name: label)
            return out
        case .asymmetric:
            guard let affine else { fatalError("a quantizer was enabled before it was calibrated (call applyCalibration first)") }
            return fakeQuantizeAffine(x, scale: affine.scale, zeroPoint: affine.zeroPoint, levels: spec.levels)
        }
    }

    /// Sets amax (or scale and zero point) from the collected statistics.
    public func applyCalibration(_ method: CalibrationMethod) throws {
        let a = try statistics.amax(method, bits: spec.bits)
        switch spec.mode {
        case .symmetric: amax = [a]
        case .asymmetric:
            // a histogram of |x| gives a magnitude; a tensor that was never negative keeps [0, a]
            let lo = statistics.max.min < 0 ? -a : 0
            affine = affineParameters(min: Swift.max(lo, statistics.max.min), max: Swift.min(a, statistics.max.max), levels: spec.levels)
        }
    }

    /// Per-channel (or per-tensor) max |w| of a weight: the weight calibrator.
    public func calibrateWeight(_ w: Tensor) {
        if let axis = spec.axis {
            amax = channelAbsMax(w, axis: axis)
        } else {
            var s = MaxCollector()
            s.collect(w)
            if spec.mode == .symmetric { amax = [s.amax] } else { affine = affineParameters(min: s.min, max: s.max, levels: spec.levels) }
        }
    }

    public func resetStatistics() {
        statistics = ActivationStatistics(histogram: statistics.histogram != nil, bins: statistics.histogram?.initialBins ?? 2048,
                                          movingAverageRate: statistics.movingAverage.rate)
    }
}

/// Where quantizers go and how they quantize.
public struct QuantizationOptions: Codable, Equatable, Sendable {
    /// Activation (layer input) quantization: per tensor.
    public var activation = QuantSpec.int8PerTensor
    public var weightBits = 8
    /// Per output channel (TensorRT); false gives one scale per weight tensor.
    public var perChannelWeights = true
    /// Quantize transposed convs (the neck's upsampling) as well.
    public var quantizeUpsample = true
    /// Quantize the concat outputs in the neck (its inputs then share one scale).
    public var quantizeConcat = false
    /// Quantize both operands of the products of two activations (attention's Q.K^T and A.V,
    /// at the models' `matmulOperand` tap points), per tensor: PaddleSlim's `matmul` op type.
    /// Linear layers are weighted layers and follow the rest.
    public var quantizeMatMul = false
    /// Quantize the linear (fully connected) layers. Off: convs only (PaddleSlim's PTQ of
    /// `conv2d` alone).
    public var quantizeLinear = true
    /// Collect |x| histograms during calibration (needed by entropy, MSE, percentile).
    public var histograms = true
    public var histogramBins = 2048

    public init() {}
}

/// A layer with quantizers, addressed by its dotted module name.
public final class QuantizedLayer {
    public enum Kind: String, Codable, Sendable {
        case conv, convTranspose = "conv_transpose", linear, concat
        /// An operand of a product of two activations (no weight).
        case matmul

        /// The kind of a weighted layer.
        public init(_ layer: any WeightedLayer) {
            self = layer is ConvTranspose2d ? .convTranspose : (layer is Linear ? .linear : .conv)
        }
    }
    public let name: String
    public let kind: Kind
    public let input: TensorQuantizer
    /// nil for a concat tap point.
    public let weight: TensorQuantizer?
    public unowned let module: Module

    init(name: String, kind: Kind, input: TensorQuantizer, weight: TensorQuantizer?, module: Module) {
        self.name = name
        self.kind = kind
        self.input = input
        self.weight = weight
        self.module = module
    }

    /// Quantization of this layer on or off (input and weight together).
    public var isEnabled: Bool {
        get { input.isEnabled }
        set { input.isEnabled = newValue; weight?.isEnabled = newValue }
    }

    /// The hooks the quantizers live in.
    var hooks: LayerHooks? { (module as? any WeightedLayer)?.hooks ?? (module as? TapPoint)?.hooks }

    /// The layer's weight, if it has one.
    public var weightTensor: Tensor? { (module as? any WeightedLayer)?.weight }
}

/// A model with fake quantizers installed at every quantizable layer.
///
/// Usage (PTQ):
///   let sim = QuantizationSimulator(model)            // quantizers installed, not calibrated
///   sim.calibrate(on: batches) { _ = model($0) }      // FP32 pass, statistics collected
///   try sim.applyCalibration(.entropy)                // amax per quantizer; weights per-channel max
///   ... evaluate: every layer runs on fake-quantized input and weight ...
///   try sim.setEnabled(false, layers: ["neck.Rep_p4.block.0.rbr_reparam"])   // partial PTQ
///   sim.remove()                                      // hooks gone, the FP32 model again
public final class QuantizationSimulator {
    public let model: Module
    public let options: QuantizationOptions
    public let layers: [QuantizedLayer]
    private let byName: [String: QuantizedLayer]

    /// Installs the quantizers. A layer whose hooks another owner holds (an analysis pass, a
    /// second simulator not yet removed) is an error naming it; nothing stays installed then.
    public init(_ model: Module, options: QuantizationOptions = QuantizationOptions()) throws {
        self.model = model
        self.options = options
        var layers: [QuantizedLayer] = []
        func activationQuantizer() -> TensorQuantizer {
            TensorQuantizer(spec: options.activation, histogram: options.histograms, bins: options.histogramBins)
        }
        for (name, m) in model.namedModules() {
            if let layer = m as? any WeightedLayer {
                let kind = QuantizedLayer.Kind(layer)
                if kind == .convTranspose && !options.quantizeUpsample { continue }
                if kind == .linear && !options.quantizeLinear { continue }
                let input = activationQuantizer()
                let weight = TensorQuantizer(spec: QuantSpec(bits: options.weightBits, axis: options.perChannelWeights ? layer.outputChannelAxis : nil),
                                             histogram: false)
                input.label = "\(name).input"
                weight.label = "\(name).weight"
                layers.append(QuantizedLayer(name: name, kind: kind, input: input, weight: weight, module: m))
            } else if let tap = m as? TapPoint, tap.role == .concat ? options.quantizeConcat : options.quantizeMatMul {
                let input = activationQuantizer()
                input.label = "\(name).input"
                layers.append(QuantizedLayer(name: name, kind: tap.role == .concat ? .concat : .matmul, input: input, weight: nil, module: m))
            }
        }
        self.layers = layers
        byName = Dictionary(uniqueKeysWithValues: layers.map { ($0.name, $0) })
        do {
            for l in layers {
                let (input, weight) = (l.input, l.weight)
                try l.hooks?.install(input: { input($0) }, weight: weight.map { w in { w($0) } },
                                     owner: self, ownerName: "QuantizationSimulator", layer: l.name)
            }
        } catch {
            remove()
            throw error
        }
    }

    public var layerNames: [String] { layers.map(\.name) }

    public func layer(_ name: String) throws -> QuantizedLayer {
        guard let l = byName[name] else {
            let close = layers.map(\.name).filter { $0.contains(name) || name.contains($0) }.prefix(5)
            throw QuantizationError("no quantized layer named '\(name)'\(close.isEmpty ? "" : "; similar: \(close.joined(separator: ", "))")")
        }
        return l
    }

    /// Runs `forward` (which should push the calibration batches through the model) with every
    /// quantizer collecting statistics and none quantizing; statistics accumulate over calls
    /// until `resetStatistics`.
    public func calibrate(_ forward: () throws -> Void) rethrows {
        // weights run unquantized in the FP32 pass; their amax comes from the weights themselves
        let weightWasEnabled = layers.map { $0.weight?.isEnabled ?? false }
        for l in layers { l.input.isCalibrating = true; l.weight?.isEnabled = false }
        defer {
            for (l, on) in zip(layers, weightWasEnabled) { l.input.isCalibrating = false; l.weight?.isEnabled = on }
        }
        try withNoGrad { try forward() }
    }

    public func resetStatistics() { for l in layers { l.input.resetStatistics() } }

    /// Sets every activation amax by `method` and every weight amax to its max |w| (per
    /// channel). A layer whose input was never seen in calibration is an error naming it.
    public func applyCalibration(_ method: CalibrationMethod) throws {
        for l in layers {
            do { try l.input.applyCalibration(method) } catch let e as QuantizationError {
                throw QuantizationError("layer \(l.name): \(e.description)")
            }
            if let w = l.weight, let t = l.weightTensor { w.calibrateWeight(t) }
        }
    }

    /// Switches quantization on or off for the named layers (all layers when nil).
    public func setEnabled(_ on: Bool, layers names: [String]? = nil) throws {
        guard let names else { for l in layers { l.isEnabled = on }; return }
        for n in names { try layer(n).isEnabled = on }
    }

    public var enabledLayerNames: [String] { layers.filter(\.isEnabled).map(\.name) }

    /// Uninstalls every hook: the model computes in FP32 again.
    public func remove() {
        for l in layers { l.hooks?.remove(owner: self) }
    }

    /// Every calibrated activation amax by layer name (for tables and JSON).
    public var activationAmax: [String: Float] {
        Dictionary(uniqueKeysWithValues: layers.compactMap { l in l.input.amax.map { (l.name, $0[0]) } })
    }
}
