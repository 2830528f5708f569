import CKernels
import Foundation
import QuantLabCore
import QuantLabData
import QuantLabModels

// Quantization analysis, the first step of both articles (Meituan's Fig. 2, PaddleSlim's
// analysis tool): per quantizable layer, how its weights and its input activations are
// distributed, what each calibrator would clip them to, and how much the weight loses to
// INT8. Wide, heavy-tailed distributions (high kurtosis, many values beyond 3 sigma) are the
// ones a single per-tensor scale serves badly.

/// Summary of a distribution of values.
public struct DistributionSummary: Codable, Equatable, Sendable {
    public var count: Int
    public var min: Double
    public var max: Double
    public var mean: Double
    public var std: Double
    /// Excess kurtosis E[(x - mean)^4] / std^4 - 3: 0 for a normal distribution, larger for
    /// heavier tails.
    public var kurtosis: Double
    /// Share of values with |x - mean| > 3 std (0.27% for a normal distribution).
    public var beyond3Sigma: Double
}

/// Streaming moments (sums of x, x^2, x^3, x^4 about a shift, for stability).
struct MomentAccumulator {
    var n = 0, shift: Double? = nil
    var s1 = 0.0, s2 = 0.0, s3 = 0.0, s4 = 0.0
    var lo = Double.infinity, hi = -Double.infinity

    mutating func add(_ p: UnsafePointer<Float>, _ count: Int) {
        guard count > 0 else { return }
        let c = shift ?? Double(p[0])
        shift = c
        var a1 = 0.0, a2 = 0.0, a3 = 0.0, a4 = 0.0
        var l = Float.infinity, h = -Float.infinity
        for i in 0..<count {
            let v = p[i]
            l = Swift.min(l, v)
            h = Swift.max(h, v)
            let d = Double(v) - c, d2 = d * d
            a1 += d; a2 += d2; a3 += d2 * d; a4 += d2 * d2
        }
        n += count
        s1 += a1; s2 += a2; s3 += a3; s4 += a4
        lo = Swift.min(lo, Double(l))
        hi = Swift.max(hi, Double(h))
    }

    var mean: Double { (shift ?? 0) + s1 / Double(Swift.max(n, 1)) }
    var std: Double {
        let m = s1 / Double(Swift.max(n, 1))
        return Swift.max(s2 / Double(Swift.max(n, 1)) - m * m, 0).squareRoot()
    }

    /// Central fourth moment over variance squared, minus 3.
    var kurtosis: Double {
        let nn = Double(Swift.max(n, 1)), m = s1 / nn
        let m2 = s2 / nn - m * m
        guard m2 > 0 else { return 0 }
        let m4 = s4 / nn - 4 * m * s3 / nn + 6 * m * m * s2 / nn - 3 * m * m * m * m
        return m4 / (m2 * m2) - 3
    }

    func summary(beyond3Sigma: Double) -> DistributionSummary {
        DistributionSummary(count: n, min: lo, max: hi, mean: mean, std: std, kurtosis: kurtosis, beyond3Sigma: beyond3Sigma)
    }
}

/// A histogram over a fixed range [lo, hi] (for plots).
public struct RangeHistogram: Codable, Equatable, Sendable {
    public var lo: Double
    public var hi: Double
    public var counts: [Int]

    public init(lo: Double, hi: Double, bins: Int) {
        self.lo = lo
        self.hi = hi > lo ? hi : lo + 1
        counts = [Int](repeating: 0, count: bins)
    }

    mutating func add(_ p: UnsafePointer<Float>, _ n: Int) {
        let bins = counts.count, scale = Double(bins) / (hi - lo)
        for i in 0..<n {
            let b = Int((Double(p[i]) - lo) * scale)
            counts[Swift.min(Swift.max(b, 0), bins - 1)] += 1
        }
    }
}

/// Everything the analysis reports for one quantizable layer.
public struct LayerAnalysis: Codable, Sendable {
    public var name: String
    public var kind: String
    public var weightShape: [Int]
    public var weight: DistributionSummary
    /// INT8 weight quantization quality, dB (per output channel, TensorRT's choice, and per tensor).
    public var weightSQNRPerChannel: Double
    public var weightSQNRPerTensor: Double
    public var activation: DistributionSummary
    /// Input-activation amax under each calibrator, by method name.
    public var activationAmax: [String: Double]
    public var weightHistogram: RangeHistogram
    public var activationHistogram: RangeHistogram
}

/// Runs the analysis on `batches` (two FP32 passes: moments and calibrator statistics, then
/// tail shares and plot histograms). The model is used as it is: call `convertToDeployForm()`
/// first to analyse what an INT8 engine would quantize. Besides every weighted layer, the
/// operands of products of two activations (tap points of role `matmulOperand`: attention's
/// Q, K^T, A, V) are analysed as layers of kind "matmul" without a weight.
public func analyzeQuantization(_ model: Module, batches: [Tensor], forward: (Tensor) -> Void,
                                methods: [CalibrationMethod] = CalibrationMethod.standard + [.movingAverage(rate: 0.9)],
                                plotBins: Int = 120) throws -> [LayerAnalysis] {
    let layers: [(String, LayerHooks, (any WeightedLayer)?)] = model.namedModules().compactMap { name, m in
        if let w = m as? any WeightedLayer { return (name, w.hooks, w) }
        if let t = m as? TapPoint, t.role == .matmulOperand { return (name, t.hooks, nil) }
        return nil
    }
    guard !layers.isEmpty else { throw QuantizationError("the model has no conv, transposed conv or linear layer to analyse") }
    let wasTraining = model.isTraining
    model.eval()
    // Statistics collectors are installed in the layers' input hooks, owned by this pass: a
    // model with quantizers installed is refused (remove the simulator first), and the defer
    // removes only what this pass installed.
    final class Pass {}
    let pass = Pass()
    func collect(_ layer: (String, LayerHooks, (any WeightedLayer)?), _ hook: @escaping TensorHook) throws {
        try layer.1.install(input: hook, owner: pass, ownerName: "analyzeQuantization", layer: layer.0)
    }
    defer {
        model.train(wasTraining)
        for (_, hooks, _) in layers { hooks.remove(owner: pass) }
    }
    // pass 1: moments and calibrator statistics of every layer input
    final class Slot { var moments = MomentAccumulator(); var stats = ActivationStatistics(histogram: true); var beyond = 0; var plot: RangeHistogram? }
    let slots = layers.map { _ in Slot() }
    for (layer, s) in zip(layers, slots) {
        try collect(layer) { x in s.moments.add(x.data, x.count); s.stats.collect(x); return x }
    }
    withNoGrad { for b in batches { forward(b) } }
    // pass 2: values beyond 3 sigma, and a plot histogram over the observed range
    for (layer, s) in zip(layers, slots) {
        let (m, sd) = (s.moments.mean, s.moments.std)
        s.plot = RangeHistogram(lo: s.moments.lo, hi: s.moments.hi, bins: plotBins)
        try collect(layer) { x in
            let p = x.data
            var k = 0
            for i in 0..<x.count where abs(Double(p[i]) - m) > 3 * sd { k += 1 }
            s.beyond += k
            s.plot!.add(p, x.count)
            return x
        }
    }
    withNoGrad { for b in batches { forward(b) } }

    var out: [LayerAnalysis] = []
    for ((name, _, weighted), s) in zip(layers, slots) {
        var amax: [String: Double] = [:]
        for method in methods { amax[method.description] = Double(try s.stats.amax(method)) }
        let activation = s.moments.summary(beyond3Sigma: Double(s.beyond) / Double(Swift.max(s.moments.n, 1)))
        guard let l = weighted else {
            out.append(LayerAnalysis(name: name, kind: QuantizedLayer.Kind.matmul.rawValue, weightShape: [],
                                     weight: DistributionSummary(count: 0, min: 0, max: 0, mean: 0, std: 0, kurtosis: 0, beyond3Sigma: 0),
                                     weightSQNRPerChannel: .nan, weightSQNRPerTensor: .nan, activation: activation, activationAmax: amax,
                                     weightHistogram: RangeHistogram(lo: 0, hi: 1, bins: 1), activationHistogram: s.plot!))
            continue
        }
        let w = l.weight
        var wm = MomentAccumulator()
        wm.add(w.data, w.count)
        var wBeyond = 0
        for i in 0..<w.count where abs(Double(w.data[i]) - wm.mean) > 3 * wm.std { wBeyond += 1 }
        let wAbs = Swift.max(abs(wm.lo), abs(wm.hi))
        var wPlot = RangeHistogram(lo: -wAbs, hi: wAbs, bins: plotBins)
        wPlot.add(w.data, w.count)
        let axis = l.outputChannelAxis
        let perChannel = withNoGrad { fakeQuantize(w, amax: channelAbsMax(w, axis: axis), spec: .int8PerChannel(axis: axis)) }
        let perTensor = withNoGrad { fakeQuantize(w, amax: [Float(wAbs)], spec: .int8PerTensor) }
        out.append(LayerAnalysis(name: name, kind: QuantizedLayer.Kind(l).rawValue, weightShape: w.shape,
                                 weight: wm.summary(beyond3Sigma: Double(wBeyond) / Double(Swift.max(w.count, 1))),
                                 weightSQNRPerChannel: sqnr(w, perChannel), weightSQNRPerTensor: sqnr(w, perTensor),
                                 activation: activation, activationAmax: amax, weightHistogram: wPlot, activationHistogram: s.plot!))
    }
    return out
}

/// The median of some values (nan for none).
public func median(_ v: [Double]) -> Double {
    let s = v.filter { !$0.isNaN }.sorted()
    guard !s.isEmpty else { return .nan }
    return s.count % 2 == 1 ? s[s.count / 2] : (s[s.count / 2 - 1] + s[s.count / 2]) / 2
}

extension LayerAnalysis {
    /// A file name for this layer's figure (dots kept, other odd characters replaced).
    public var figureFileName: String {
        String(name.map { $0.isLetter || $0.isNumber || $0 == "." || $0 == "_" || $0 == "-" ? $0 : "_" }) + ".svg"
    }
}
