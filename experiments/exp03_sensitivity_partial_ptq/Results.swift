import Foundation
import QuantLab

/// What exp03 measured, as written to results/exp03.json.
struct Exp03Results: Codable {
    /// How a cheap metric's ranking agrees with the mAP method's, over all layers.
    struct Agreement: Codable {
        var spearman: Double
        var kendall: Double
        var topKOverlap: Int
        enum CodingKeys: String, CodingKey { case spearman, kendall, topKOverlap = "top_k_overlap" }
    }

    /// MSE computed over one definition of the detector's outputs, against the mAP method.
    struct OutputComparison: Codable {
        var spearmanVsMAP: Double
        var topKOverlap: Int
        var partialPTQmAP: Double
        var topK: [String]
        enum CodingKeys: String, CodingKey {
            case spearmanVsMAP = "spearman_vs_map", topKOverlap = "top_k_overlap", partialPTQmAP = "partial_ptq_map", topK = "top_k"
        }
    }

    struct Seconds: Codable {
        var outputMetrics: Double
        var mapMethod: Double
        enum CodingKeys: String, CodingKey { case outputMetrics = "output_metrics", mapMethod = "map_method" }
    }

    var fp32mAP: Double
    var fullPTQmAP: Double
    /// Val mAP with the top-k layers of each ranking left in FP32: metric -> "k" -> mAP.
    var partialPTQ: [String: [String: Double]] = [:]
    var agreement: [String: Agreement] = [:]
    var seconds = Seconds(outputMetrics: 0, mapMethod: 0)
    /// By DetectorOutputs raw value (inference, raw, scores).
    var mseByOutputs: [String: OutputComparison] = [:]
    var sensitivity: SensitivityReport
    var verdict = ""
    var mseStandsIn = ""
    /// A4 as exp08 and the README index show it.
    var claims: [ClaimResult] = []
    var provenance: ProvenanceSummary?

    enum CodingKeys: String, CodingKey {
        case agreement, seconds, sensitivity, verdict, claims, provenance
        case fp32mAP = "fp32_map", fullPTQmAP = "full_ptq_map", partialPTQ = "partial_ptq", mseByOutputs = "mse_by_outputs", mseStandsIn = "mse_stands_in"
    }

    func partial(_ m: SensitivityMetric, k: Int) -> Double { partialPTQ[m.rawValue]?[String(k)] ?? .nan }

    /// Share of the PTQ loss recovered: (partial − full) / (FP32 − full).
    func recovered(_ mAP: Double) -> Double { fp32mAP - fullPTQmAP > 0 ? (mAP - fullPTQmAP) / (fp32mAP - fullPTQmAP) : .nan }

    /// Each metric's sensitivity of every layer, in the report's layer order.
    func values(_ m: SensitivityMetric) -> [Double] { sensitivity.layers.map { m.sensitivity($0, fp32mAP: sensitivity.fp32mAP) ?? .nan } }
}

/// Verdict on A4: does leaving the top-k layers in FP32 recover a good share (>= 30%) of the loss?
func exp03Verdict(_ r: Exp03Results, topK: Int, quick: Bool) -> Verdict {
    if quick || r.fp32mAP < LearnedFloor.detectorMAP {
        return Verdict(.inconclusive, String(format: "Inconclusive: the FP32 model has not learned enough (mAP %.3f)%@.", r.fp32mAP, quick ? "; expected for the QUICK smoke run" : ""))
    }
    let gap = r.fp32mAP - r.fullPTQmAP
    if gap <= 0.002 {
        return Verdict(.inconclusive, String(format: "Nothing to recover: full PTQ loses only %.4f mAP here (FP32 %.4f, PTQ %.4f), so partial PTQ cannot show its effect.", gap, r.fp32mAP, r.fullPTQmAP))
    }
    func recovered(_ m: SensitivityMetric) -> Double { r.recovered(r.partial(m, k: topK)) }
    let best = SensitivityMetric.allCases.max { recovered($0) < recovered($1) }!
    let paper = Paper.A4.self
    let s = String(format: "Skipping the top %d layers recovers %.0f%% (MSE) / %.0f%% (mAP method) / %.0f%% (SNR) / %.0f%% (cosine) of the PTQ loss (FP32 %.4f, full PTQ %.4f; best: %@ → %.4f). Article: %@ → %@ of %@, %.0f%% recovered.",
                   topK, 100 * recovered(.mse), 100 * recovered(.map), 100 * recovered(.snr), 100 * recovered(.cosine), r.fp32mAP, r.fullPTQmAP,
                   best.label, r.partial(best, k: topK), paper.fullPTQ.text, paper.partialPTQ.text, paper.fp32.text,
                   100 * Paper.recovered(fp32: paper.fp32, full: paper.fullPTQ, partial: paper.partialPTQ))
    return recovered(best) >= 0.3 ? Verdict(.reproduced, "Reproduced in direction: " + s) : Verdict(.notReproduced, "Not reproduced (little recovered): " + s)
}

/// Does MSE stand in for the mAP method (the article's recommendation)? Yes when its ranking
/// correlates (Spearman >= 0.5) and its partial PTQ recovers within 20 points of the mAP method's.
func exp03MSEStandsIn(_ r: Exp03Results, topK: Int, quick: Bool) -> Verdict {
    guard let a = r.agreement[SensitivityMetric.mse.rawValue] else { return Verdict(.inconclusive, "—") }
    let close = r.recovered(r.partial(.mse, k: topK)) >= r.recovered(r.partial(.map, k: topK)) - 0.2
    let s = String(format: "Spearman ρ(MSE, mAP method) = %.2f, Kendall τ = %.2f, top-%d overlap %d/%d; partial PTQ with MSE's top %d: %.4f vs the mAP method's %.4f; MSE took %.1f s for all layers, the mAP method %.0f s (×%.0f).",
                   a.spearman, a.kendall, topK, a.topKOverlap, topK, topK, r.partial(.mse, k: topK), r.partial(.map, k: topK),
                   r.seconds.outputMetrics, r.seconds.mapMethod, r.seconds.mapMethod / max(r.seconds.outputMetrics, 1e-9))
    if quick || r.fp32mAP < LearnedFloor.detectorMAP { return Verdict(.inconclusive, "Inconclusive (untrained model). " + s) }
    return a.spearman >= 0.5 && close ? Verdict(.reproduced, "Yes, MSE stands in well for the mAP method here: " + s)
        : Verdict(.notReproduced, "No, MSE is not a good stand-in here: " + s)
}

/// A4 has two parts, partial PTQ recovers the loss and MSE ranks as well as the mAP method:
/// reproduced when both hold, partly when one does.
func exp03Claim(_ r: Exp03Results, topK: Int, partial: Verdict, mse: Verdict) -> ClaimResult {
    let outcome: Outcome = [partial.outcome, mse.outcome].contains(.inconclusive) && partial.outcome != .reproduced ? .inconclusive
        : partial.outcome == .reproduced && mse.outcome == .reproduced ? .reproduced
        : partial.outcome == .reproduced || mse.outcome == .reproduced ? .partly : .notReproduced
    let paper = Paper.A4.self
    return ClaimResult("A4", paper: String(format: "%@ → %@ of %@ (%.0f%% recovered), top %@ in FP32; MSE recommended",
                                           paper.fullPTQ.text, paper.partialPTQ.text, paper.fp32.text,
                                           100 * Paper.recovered(fp32: paper.fp32, full: paper.fullPTQ, partial: paper.partialPTQ), paper.skippedLayers.text),
                       ours: String(format: "%.3f → %.3f of %.3f with the mAP method's top %d (%.0f%%); MSE's top %d: %.0f%% (ρ = %.2f)",
                                    r.fullPTQmAP, r.partial(.map, k: topK), r.fp32mAP, topK, 100 * r.recovered(r.partial(.map, k: topK)),
                                    topK, 100 * r.recovered(r.partial(.mse, k: topK)), r.agreement[SensitivityMetric.mse.rawValue]?.spearman ?? .nan),
                       verdict: Verdict(outcome, partial.text + " " + mse.text))
}
