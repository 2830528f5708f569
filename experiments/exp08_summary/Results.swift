import Foundation
import QuantLab

/// What exp08 wrote to results/exp08.json.
struct Exp08Results: Codable {
    /// One method of the article's stack (its lost Table 10), with our numbers.
    struct StackRow: Codable {
        var method: String
        var paper: String
        var mAP: Double?
        /// Where the mAP comes from ("exp02, entropy, mean of 3 seeds").
        var source: String
        /// The engine configuration that runs the method (its timing is the study's point of it).
        var engine: String
        var imagesPerSecondBatch1: Double?
        var imagesPerSecondBatch32: Double?
        /// exp06's end-to-end serving img/s with the baseline and the fused preprocessing.
        var servingBaseline: Double?
        var servingFused: Double?
        enum CodingKeys: String, CodingKey {
            case method, paper, source, engine
            case mAP = "map", imagesPerSecondBatch1 = "images_per_second_batch1", imagesPerSecondBatch32 = "images_per_second_batch32",
                 servingBaseline = "serving_baseline", servingFused = "serving_fused"
        }
    }

    /// One engine configuration of the study: the layers left in FP32, measured.
    struct Point: Codable {
        /// "sensitivity", "latency-aware", or "FP32 graph".
        var ranking: String
        var k: Int
        var fp32Layers: [String]
        var latencyMs: Double
        var imagesPerSecondBatch32: Double
        var mAP: Double
        var reformatSteps: Int
        var pareto = false
        enum CodingKeys: String, CodingKey {
            case ranking, k, pareto
            case fp32Layers = "fp32_layers", latencyMs = "latency_ms", imagesPerSecondBatch32 = "images_per_second_batch32", mAP = "map",
                 reformatSteps = "reformat_steps"
        }
    }

    /// One choice of the latency-aware greedy: the layer, the mAP its FP32 island is expected to
    /// recover (the mAP method's sensitivity), and the latency it was measured to cost.
    struct GreedyStep: Codable {
        var layer: String
        var gain: Double
        var costMs: Double
        enum CodingKeys: String, CodingKey { case layer, gain, costMs = "cost_ms" }
    }

    struct Study: Codable {
        var model: String
        var calibration: String
        var candidates: Int
        var points: [Point] = []
        var greedy: [GreedyStep] = []
        /// The largest drift between the halves of the batch-1 timing runs: latency differences
        /// smaller than this share are noise.
        var timingNoise: Double = .nan
        var kernels: String
        var seconds: Double = .nan
        var provenance: ProvenanceSummary?
        enum CodingKeys: String, CodingKey {
            case model, calibration, candidates, points, greedy, kernels, seconds, provenance
            case timingNoise = "timing_noise"
        }

        func point(_ ranking: String, k: Int) -> Point? { points.first { $0.ranking == ranking && $0.k == k } }
        var fp32Graph: Point? { points.first { $0.ranking == Study.fp32GraphName } }
        static let fp32GraphName = "FP32 graph"
    }

    var stack: [StackRow] = []
    var study: Study?
    var claims: [ClaimResult] = []
    /// Results files that were missing, unreadable or lacked what the summary needs.
    var problems: [String] = []
    var provenance: ProvenanceSummary?
}

// MARK: - The parts of other experiments' results that the stack reads

/// exp02: each detector's FP32 and PTQ mAPs per calibrator and seed.
struct Exp02Numbers: Decodable {
    struct Arm: Decodable {
        var fp32: Double
        var ptq: [String: [Double]]
    }
    var detectors: [String: Arm]
    var primaryCalibrator: String
    enum CodingKeys: String, CodingKey { case detectors, primaryCalibrator = "primary_calibrator" }

    func ptq(_ block: BlockKind) -> Double? { detectors[block.rawValue]?.ptq[primaryCalibrator].map(Statistics.mean) }
    func seeds(_ block: BlockKind) -> Int { detectors[block.rawValue]?.ptq[primaryCalibrator]?.count ?? 0 }
}

/// exp03: FP32, full and partial PTQ of the RepOpt detector, and the per-layer sensitivities.
struct Exp03Numbers: Decodable {
    var fp32mAP: Double
    var fullPTQmAP: Double
    var partialPTQ: [String: [String: Double]]
    var sensitivity: SensitivityReport
    enum CodingKeys: String, CodingKey {
        case sensitivity
        case fp32mAP = "fp32_map", fullPTQmAP = "full_ptq_map", partialPTQ = "partial_ptq"
    }
}

/// exp04: each QAT arm's runs (val mAP after each epoch) and the layers left in FP32.
struct Exp04Numbers: Decodable {
    struct Run: Decodable {
        var mAPPerEpoch: [Double]
        enum CodingKeys: String, CodingKey { case mAPPerEpoch = "map_per_epoch" }
    }
    var arms: [String: [Run]]
    var skipped: [String]

    /// Mean final mAP of an arm ("partial_qat", "partial_qat_cwd") and its number of seeds.
    func final(_ arm: String) -> (mean: Double, seeds: Int)? {
        guard let runs = arms[arm], !runs.isEmpty else { return nil }
        return (Statistics.mean(runs.compactMap(\.mAPPerEpoch.last)), runs.count)
    }
}

/// exp06: the serving runs (engine, pipeline, images served, wall time, batching).
struct Exp06Numbers: Decodable {
    struct Run: Decodable {
        struct Report: Decodable {
            struct Config: Decodable { var maxBatch: Int }
            var served: Int
            var wallSeconds: Double
            var config: Config
        }
        var engine: String
        var pipeline: String
        var report: Report
    }
    var runs: [Run]

    /// End-to-end img/s of one engine with the baseline or a fused pipeline, batch-1 instances:
    /// the median over exp06's rounds (the lower middle one for an even count, as exp06 shows).
    func imagesPerSecond(engine: String, fused: Bool) -> Double? {
        let rates = runs.filter { $0.engine == engine && $0.report.config.maxBatch == 1 && $0.pipeline.hasPrefix(fused ? "fused" : "baseline") }
            .map { Double($0.report.served) / $0.report.wallSeconds }
        return Statistics.lowerMedian(rates) { $0 }
    }
}

/// The steps of the article's stack, each compared in the article's direction: "holds" when
/// ours moves the same way by more than the noise, "flat" within it, "reversed" against it.
struct StackStep {
    var name: String
    var paper: Double
    var ours: Double
    var noise: Double
    var call: String {
        guard ours.isFinite else { return "not measured" }
        if abs(ours) <= noise { return "flat" }
        return (ours > 0) == (paper > 0) ? "holds" : "reversed"
    }
}

/// A11: the article's stack holds here when every step moves as the article's does.
func exp08Claim(_ steps: [StackStep], paper: String, quick: Bool) -> ClaimResult {
    let calls = steps.map(\.call)
    let measured = calls.filter { $0 != "not measured" }
    let holds = measured.filter { $0 == "holds" }.count
    let outcome: Outcome = quick || measured.isEmpty ? .inconclusive
        : holds == measured.count ? .reproduced : holds > 0 ? .partly : .notReproduced
    let ours = steps.map { "\($0.name) \($0.call)" }.joined(separator: "; ")
    let text = (quick ? "(smoke run, tiny models: not a result) " : "")
        + "Of the article's \(steps.count) steps, \(holds) hold here (\(measured.count) measured): "
        + steps.map { s in String(format: "%@ %@ (paper %+.3g, ours %+.3g)", s.name, s.call, s.paper, s.ours) }.joined(separator: "; ") + "."
    return ClaimResult("A11", paper: paper, ours: ours, verdict: Verdict(outcome, text))
}
