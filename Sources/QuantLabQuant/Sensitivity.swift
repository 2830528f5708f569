import Foundation
import QuantLabCore
import QuantLabData
import QuantLabModels

// Per-layer quantization sensitivity (the article's section on partial PTQ): quantize ONE
// layer, keep every other layer in FP32, and measure how far the model moves.
//   output metrics, on one batch of 32 images after calibration on 4 batches (the article):
//     MSE    = mean over all outputs of (q - f)^2
//     SNR    = mean over samples of sum (q - f)^2 / sum f^2        (PPQ's definition; lower is better)
//     cosine = mean over samples of <q, f> / (|q| |f|)             (higher is better)
//   the "mAP method" (YOLOv6's tools/partial_quantization): mAP with only that layer quantized,
//     on a split that is NOT the one the final mAP is reported on (the article warns that
//     ranking on the evaluation split overfits it).
// Partial PTQ then leaves the k most sensitive layers in FP32.

/// How sensitive one layer is.
public struct LayerSensitivity: Codable, Equatable, Sendable {
    public var name: String
    public var kind: String
    public var mse: Double
    public var snr: Double
    public var cosine: Double
    /// mAP on the ranking split with only this layer quantized (nil when the mAP method did not run).
    public var mAP: Double?
    /// Seconds spent on this layer by the output metrics (one shared forward pass) and by the mAP method.
    public var outputSeconds: Double
    public var mapSeconds: Double?
}

/// Ways to rank layers; larger sensitivity = rank first.
public enum SensitivityMetric: String, Codable, CaseIterable, Sendable {
    case mse, snr, cosine, map

    public var label: String {
        switch self {
        case .mse: return "MSE"
        case .snr: return "SNR"
        case .cosine: return "cosine"
        case .map: return "mAP method"
        }
    }

    /// The layer's sensitivity under this metric (larger = more sensitive): MSE, SNR,
    /// 1 - cosine, and the mAP lost against `fp32mAP`.
    public func sensitivity(_ l: LayerSensitivity, fp32mAP: Double?) -> Double? {
        switch self {
        case .mse: return l.mse
        case .snr: return l.snr
        case .cosine: return 1 - l.cosine
        case .map: return l.mAP.flatMap { m in fp32mAP.map { $0 - m } }
        }
    }
}

/// MSE, SNR (PPQ) and cosine between quantized outputs `q` and FP32 outputs `f`, both [B, N].
public func outputDistances(_ q: Tensor, _ f: Tensor) -> (mse: Double, snr: Double, cosine: Double) {
    require(q.shape == f.shape && q.rank == 2, "outputDistances: expected two [B, N] tensors, got \(q.shape) and \(f.shape)")
    let (b, n) = (f.shape[0], f.shape[1])
    var squared = 0.0, snr = 0.0, cosine = 0.0
    for i in 0..<b {
        var e = 0.0, ff = 0.0, qq = 0.0, qf = 0.0
        let (pq, pf) = (q.data + i * n, f.data + i * n)
        for j in 0..<n {
            let (x, y) = (Double(pq[j]), Double(pf[j]))
            e += (x - y) * (x - y); ff += y * y; qq += x * x; qf += x * y
        }
        squared += e
        snr += ff > 0 ? e / ff : (e > 0 ? .infinity : 0)
        cosine += qq > 0 && ff > 0 ? qf / (qq * ff).squareRoot() : (qq == ff ? 1 : 0)
    }
    return (squared / Double(max(b * n, 1)), snr / Double(max(b, 1)), cosine / Double(max(b, 1)))
}

/// A slice of the layer sweep: layer i belongs to shard `index` when i % count == index.
public struct Shard: Codable, Equatable, Sendable, CustomStringConvertible {
    public var index: Int
    public var count: Int

    public init(index: Int, count: Int) throws {
        guard count >= 1, index >= 0, index < count else { throw QuantizationError("shard \(index)/\(count): need 0 <= i < n") }
        self.index = index
        self.count = count
    }

    /// Parses "i/n" (0-based i).
    public init(parsing text: String) throws {
        let parts = text.split(separator: "/")
        guard parts.count == 2, let i = Int(parts[0]), let n = Int(parts[1]) else {
            throw QuantizationError("shard '\(text)': expected i/n, e.g. 0/4")
        }
        try self.init(index: i, count: n)
    }

    private init(unchecked index: Int, count: Int) {
        self.index = index
        self.count = count
    }

    /// Every layer: the whole sweep.
    public static let all = Shard(unchecked: 0, count: 1)
    public var description: String { "\(index)/\(count)" }
    public func contains(_ layerIndex: Int) -> Bool { layerIndex % count == index }
}

/// The result of a sensitivity sweep (or one shard of it), self-describing so that shards
/// run on different machines can be checked and merged.
public struct SensitivityReport: Codable, Sendable {
    /// What was analysed; shards must agree on it to be merged.
    public var model: String
    public var calibration: String
    /// Every quantizable layer of the model, in model order (the full sweep).
    public var allLayers: [String]
    public var shards: [Shard]
    /// mAP of the FP32 model on the ranking split (nil without the mAP method).
    public var fp32mAP: Double?
    /// mAP of the fully quantized model on the ranking split.
    public var fullPTQmAP: Double?
    public var layers: [LayerSensitivity]

    public var isComplete: Bool { Set(layers.map(\.name)) == Set(allLayers) }

    /// Layer names from most to least sensitive by `metric` (ties keep model order).
    public func ranking(by metric: SensitivityMetric) -> [String] {
        let order = Dictionary(uniqueKeysWithValues: allLayers.enumerated().map { ($0.element, $0.offset) })
        return layers.compactMap { l in metric.sensitivity(l, fp32mAP: fp32mAP).map { (l.name, $0) } }
            .sorted { $0.1 != $1.1 ? $0.1 > $1.1 : order[$0.0, default: 0] < order[$1.0, default: 0] }
            .map(\.0)
    }

    /// Joins shards of one sweep. They must describe the same model and calibration, not
    /// overlap, and together cover every layer.
    public static func merge(_ parts: [SensitivityReport]) throws -> SensitivityReport {
        guard var merged = parts.first else { throw QuantizationError("merge: no shards given") }
        for p in parts.dropFirst() {
            guard p.model == merged.model, p.calibration == merged.calibration, p.allLayers == merged.allLayers else {
                throw QuantizationError("merge: shard \(p.shards.map(\.description).joined(separator: ",")) is from a different model or calibration (\(p.model), \(p.calibration))")
            }
            let overlap = Set(p.layers.map(\.name)).intersection(merged.layers.map(\.name))
            guard overlap.isEmpty else { throw QuantizationError("merge: layers measured twice: \(overlap.sorted().prefix(5).joined(separator: ", "))") }
            merged.layers += p.layers
            merged.shards += p.shards
            merged.fp32mAP = merged.fp32mAP ?? p.fp32mAP
            merged.fullPTQmAP = merged.fullPTQmAP ?? p.fullPTQmAP
        }
        let missing = Set(merged.allLayers).subtracting(merged.layers.map(\.name))
        guard missing.isEmpty else {
            throw QuantizationError("merge: \(missing.count) layer(s) missing (a shard not given?): \(missing.sorted().prefix(5).joined(separator: ", "))")
        }
        let order = Dictionary(uniqueKeysWithValues: merged.allLayers.enumerated().map { ($0.element, $0.offset) })
        merged.layers.sort { order[$0.name]! < order[$1.name]! }
        merged.shards.sort { $0.index < $1.index }
        return merged
    }

    public func write(to url: URL) throws {
        let e = JSONEncoder()
        e.outputFormatting = [.prettyPrinted, .sortedKeys]
        e.nonConformingFloatEncodingStrategy = .convertToString(positiveInfinity: "inf", negativeInfinity: "-inf", nan: "nan")
        try AtomicFile.write(e.encode(self), to: url)
    }

    public static func read(_ url: URL) throws -> SensitivityReport {
        let data: Data
        do { data = try Data(contentsOf: url) } catch { throw QuantizationError("\(url.path): cannot read (\(error.localizedDescription))") }
        let d = JSONDecoder()
        d.nonConformingFloatDecodingStrategy = .convertFromString(positiveInfinity: "inf", negativeInfinity: "-inf", nan: "nan")
        do { return try d.decode(SensitivityReport.self, from: data) } catch {
            throw QuantizationError("\(url.path): not a sensitivity report (\(error))")
        }
    }

}

/// Runs the sweep over the layers of `shard`. The simulator must be calibrated (amax set).
/// - Parameters:
///   - outputs: the model's outputs for a batch, flattened per sample to [B, N].
///   - batch: the sensitivity batch (the article: one batch of 32).
///   - mAP: evaluates the current model on the ranking split; nil skips the mAP method.
public func measureSensitivity(_ sim: QuantizationSimulator, model: String, calibration: String, shard: Shard = .all,
                               batch: Tensor, outputs: (Tensor) -> Tensor, mAP: (() throws -> Double)? = nil) throws -> SensitivityReport {
    let wasEnabled = sim.layers.map(\.isEnabled)
    defer { for (l, on) in zip(sim.layers, wasEnabled) { l.isEnabled = on } }
    try sim.setEnabled(false)
    let reference = withNoGrad { outputs(batch) }
    var fp32mAP: Double?, fullmAP: Double?
    if let mAP {
        fp32mAP = try mAP()
        try sim.setEnabled(true)
        fullmAP = try mAP()
        try sim.setEnabled(false)
    }
    let mine = sim.layers.enumerated().filter { shard.contains($0.offset) }.map(\.element)
    let progress = Progress(total: mine.count, label: "sensitivity \(shard)", unit: "layer")
    var results: [LayerSensitivity] = []
    for (k, layer) in mine.enumerated() {
        layer.isEnabled = true
        var t = Date()
        let d = outputDistances(withNoGrad { outputs(batch) }, reference)
        let outputSeconds = Date().timeIntervalSince(t)
        var m: Double?, mapSeconds: Double?
        if let mAP {
            t = Date()
            m = try mAP()
            mapSeconds = Date().timeIntervalSince(t)
        }
        layer.isEnabled = false
        results.append(LayerSensitivity(name: layer.name, kind: layer.kind.rawValue, mse: d.mse, snr: d.snr, cosine: d.cosine,
                                        mAP: m, outputSeconds: outputSeconds, mapSeconds: mapSeconds))
        progress.update(k + 1, layer.name)
    }
    progress.finish()
    return SensitivityReport(model: model, calibration: calibration, allLayers: sim.layerNames, shards: [shard],
                             fp32mAP: fp32mAP, fullPTQmAP: fullmAP, layers: results)
}

/// Which detector outputs the output metrics compare.
public enum DetectorOutputs: String, CaseIterable, Sendable {
    /// What the deployed model returns: decoded boxes (pixels) and sigmoid class scores.
    case inference
    /// The head's raw class logits and box distances.
    case raw
    /// The sigmoid class scores alone.
    case scores

    public var label: String {
        switch self {
        case .inference: return "deployed outputs: boxes (px) + sigmoid scores"
        case .raw: return "raw head: class logits + distances"
        case .scores: return "sigmoid class scores only"
        }
    }

    public init(parsing text: String) throws {
        guard let v = DetectorOutputs(rawValue: text) else {
            throw QuantizationError("outputs '\(text)': expected \(DetectorOutputs.allCases.map(\.rawValue).joined(separator: ", "))")
        }
        self = v
    }
}

extension YOLOv6 {
    /// The outputs of `kind` for a batch, flattened per image.
    public func outputs(_ kind: DetectorOutputs, _ images: Tensor) -> Tensor {
        switch kind {
        case .inference: return inferenceOutputs(images)
        case .raw: return flatOutputs(images)
        case .scores: return scoreOutputs(images)
        }
    }

    /// Raw head outputs flattened per image: [B, A*C + A*4] (class logits, then distances).
    public func flatOutputs(_ images: Tensor) -> Tensor {
        let (c, d) = self(images)
        let b = images.shape[0]
        return concat([c.reshaped([b, c.count / b]), d.reshaped([b, d.count / b])], dim: 1)
    }

    /// The sigmoid class scores alone, [B, A*C] (no boxes): where a detector's mAP is decided
    /// when boxes are easy.
    public func scoreOutputs(_ images: Tensor) -> Tensor {
        let logits = self(images).classLogits
        let b = images.shape[0]
        return logits.sigmoid().reshaped([b, logits.count / b])
    }

    /// What YOLOv6's model returns at inference, flattened per image: for every anchor the
    /// decoded box (cx, cy, w, h in input pixels) and the sigmoid class scores, [B, A*(4+C)].
    /// The output metrics of the sensitivity analysis compare these, as the article's tool
    /// compares the deployed model's outputs (raw logits would let the thousands of confident
    /// background anchors dominate the distances).
    public func inferenceOutputs(_ images: Tensor) -> Tensor {
        let (logits, distances) = self(images)
        let (b, a, c) = (logits.shape[0], logits.shape[1], logits.shape[2])
        let out = Tensor(zeros: [b, a * (4 + c)])
        for i in 0..<b {
            for j in 0..<a {
                let box = decode(distances, image: i, anchor: j)
                let row = out.data + (i * a + j) * (4 + c)
                row[0] = Float((box.x1 + box.x2) / 2); row[1] = Float((box.y1 + box.y2) / 2)
                row[2] = Float(box.x2 - box.x1); row[3] = Float(box.y2 - box.y1)
                let l = logits.data + (i * a + j) * c
                for k in 0..<c { row[4 + k] = 1 / (1 + Foundation.exp(-l[k])) }
            }
        }
        return out
    }
}
