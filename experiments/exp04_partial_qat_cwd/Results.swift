import Foundation
import QuantLab

/// What exp04 measured, as written to results/exp04.json.
struct Exp04Results: Codable {
    /// One QAT run: val mAP of the EMA weights (quantizers on) after each epoch.
    struct Run: Codable {
        var seed: UInt64
        var mAPPerEpoch: [Double]
        var final: Double { mAPPerEpoch.last ?? .nan }
        enum CodingKeys: String, CodingKey { case seed, mAPPerEpoch = "map_per_epoch" }
    }

    struct RepVGGArm: Codable {
        var fp32mAP: Double
        var ptqmAP: Double
        var qatmAPPerEpoch: [Double]
        enum CodingKeys: String, CodingKey { case fp32mAP = "fp32_map", ptqmAP = "ptq_map", qatmAPPerEpoch = "qat_map_per_epoch" }
    }

    var fp32mAP: Double
    var ptqmAP: Double
    var partialPTQmAP: Double
    /// The layers left in FP32 by the partial arms (top-k of the mAP-method ranking).
    var skipped: [String]
    var qat: QATConfig
    /// By QATArm raw value.
    var arms: [String: [Run]] = [:]
    var repvgg: RepVGGArm?
    var verdict = ""
    /// A5 as exp08 and the README index show it.
    var claims: [ClaimResult] = []
    var provenance: ProvenanceSummary?

    enum CodingKeys: String, CodingKey {
        case skipped, qat, arms, repvgg, verdict, claims, provenance
        case fp32mAP = "fp32_map", ptqmAP = "ptq_map", partialPTQmAP = "partial_ptq_map"
    }

    func finals(_ arm: QATArm) -> [Double] { (arms[arm.rawValue] ?? []).map(\.final) }
    func mean(_ arm: QATArm) -> Double { Statistics.mean(finals(arm)) }
    func sd(_ arm: QATArm) -> Double { finals(arm).count > 1 ? Statistics.standardDeviation(finals(arm)) : .nan }
}

/// Verdict on A5: is CWD's gain over partial QAT larger than the seed noise (two standard errors
/// of the difference of the two means)?
func exp04Verdict(_ r: Exp04Results, quick: Bool) -> Verdict {
    let prefix = quick ? "(smoke run, tiny model: not a result) " : ""
    let a = r.finals(.partial), b = r.finals(.partialCWD)
    guard !a.isEmpty, !b.isEmpty else { return Verdict(.inconclusive, prefix + "no QAT runs") }
    let gain = Statistics.mean(b) - Statistics.mean(a)
    let variance = { (v: [Double]) in v.count > 1 ? pow(Statistics.standardDeviation(v), 2) / Double(v.count) : .nan }
    let noise = 2 * (variance(a) + variance(b)).squareRoot()
    let paper = Paper.A5.cwdGain
    let recovered = r.fp32mAP - r.ptqmAP > 0 ? String(format: " Partial QAT + CWD ends at %.4f against FP32 %.4f and PTQ %.4f.", Statistics.mean(b), r.fp32mAP, r.ptqmAP) : ""
    guard noise.isFinite else {
        return Verdict(.inconclusive, prefix + String(format: "CWD changes partial QAT's mAP by %+.4f (paper +%@ points); one seed, so no noise estimate.", gain, paper.text) + recovered)
    }
    let call = gain > noise ? "larger than the seed noise: reproduced in direction" : (gain > 0 ? "positive but within the seed noise: not shown" : "not positive: not reproduced")
    let outcome: Outcome = quick ? .inconclusive : gain > noise ? .reproduced : gain > 0 ? .inconclusive : .notReproduced
    return Verdict(outcome, prefix + String(format: "CWD's gain over partial QAT: %+.4f mAP (%d seeds each; two standard errors %.4f) — %@ (paper +%@ points on COCO).",
                           gain, min(a.count, b.count), noise, call, paper.text) + recovered)
}

/// A5 as a claim row: the article's gain beside ours, the arms' means and spreads.
func exp04Claim(_ r: Exp04Results, verdict: Verdict) -> ClaimResult {
    func arm(_ a: QATArm) -> String { String(format: "%.4f ± %.4f", r.mean(a), r.sd(a)) }
    return ClaimResult("A5", paper: "partial QAT ~\(Paper.A5.partialQAT.text), + CWD \(Paper.A5.partialQATCWD.text) (+\(Paper.A5.cwdGain.text))",
                       ours: String(format: "partial QAT %@, + CWD %@ (%+.4f; %d seeds); partial PTQ %.4f of FP32 %.4f",
                                    arm(.partial), arm(.partialCWD), r.mean(.partialCWD) - r.mean(.partial), r.finals(.partial).count, r.partialPTQmAP, r.fp32mAP),
                       verdict: verdict)
}
