import Foundation
import QuantLab

/// results/exp03.md and its two figures, from the numbers.
struct Exp03Report {
    var results: Exp03Results
    var block: String
    var calibrationMethod: CalibrationMethod
    var outputs: DetectorOutputs
    var topK: Int
    var ks: [Int]
    var rankingImages: Int
    var valImages: Int
    var quick: Bool
    var provenance: Provenance

    private var r: Exp03Results { results }
    private var layerCount: Int { r.sensitivity.allLayers.count }
    private func f4(_ x: Double) -> String { String(format: "%.4f", x) }

    /// Figures: normalised sensitivity per layer (the article's Fig. 5) and the k sweep.
    func writeFigures() throws {
        let dir = resultsDirectory(quick: quick).appendingPathComponent("exp03")
        let normalised = SensitivityMetric.allCases.map { m -> (name: String, values: [Double]) in
            let v = r.values(m).map { max($0, 0) }
            let top = v.filter { $0.isFinite }.max() ?? 1
            return (name: m.label, values: v.map { top > 0 ? $0 / top : 0 })
        }
        try SVG.write(SVG.lines(normalised, xLabels: r.sensitivity.layers.map(\.name), title: "Per-layer sensitivity, normalised to the most sensitive layer",
                                yLabel: "sensitivity / max"), to: dir.appendingPathComponent("sensitivity_per_layer.svg"))
        try SVG.write(SVG.lines(SensitivityMetric.allCases.map { m in (name: m.label, values: ks.map { r.partial(m, k: $0) }) }, xLabels: ks.map { "k = \($0)" },
                                title: "Partial PTQ: val mAP with the top-k layers left in FP32", yLabel: "mAP", width: 640, height: 320),
                      to: dir.appendingPathComponent("partial_ptq_sweep.svg"))
    }

    var markdown: String {
        let paper = Paper.A4.self
        let headline = [["FP32", "—", paper.fp32.text, f4(r.fp32mAP)], ["full PTQ (\(calibrationMethod))", "—", paper.fullPTQ.text, f4(r.fullPTQmAP)]]
            + SensitivityMetric.allCases.map { m in
                [m.label, r.sensitivity.ranking(by: m).prefix(topK).map { "`\($0)`" }.joined(separator: ", "),
                 m == .map ? paper.partialPTQ.with(paper.partialPTQReadme) : "— (article's table lost)", f4(r.partial(m, k: topK))]
            }
        let cheap: [SensitivityMetric] = [.mse, .snr, .cosine]
        let agreementRows = cheap.compactMap { m in r.agreement[m.rawValue].map { a in
            [m.label, String(format: "%.2f", a.spearman), String(format: "%.2f", a.kendall), "\(a.topKOverlap) / \(topK)"]
        } }
        let timingRows = [["MSE, SNR, cosine (one shared forward of 32 images per layer)", String(format: "%.1f s", r.seconds.outputMetrics), String(format: "%.2f s", r.seconds.outputMetrics / Double(max(layerCount, 1)))],
                          ["mAP method (\(rankingImages) ranking images per layer)", String(format: "%.0f s", r.seconds.mapMethod), String(format: "%.1f s", r.seconds.mapMethod / Double(max(layerCount, 1)))]]
        let outputRows = DetectorOutputs.allCases.compactMap { kind in r.mseByOutputs[kind.rawValue].map { c in
            [kind.label, String(format: "%.2f", c.spearmanVsMAP), "\(c.topKOverlap) / \(topK)", f4(c.partialPTQmAP),
             r.fp32mAP - r.fullPTQmAP > 0 ? String(format: "%.0f%%", 100 * r.recovered(c.partialPTQmAP)) : "—"]
        } }
        let sweepRows = ks.map { k in ["\(k)"] + SensitivityMetric.allCases.map { f4(r.partial($0, k: k)) } }
        let ranking = { (v: Double?) in v.map(self.f4) ?? "—" }
        return """
        # exp03 — Per-layer sensitivity and partial PTQ

        **Claim ([CLAIMS.md](../CLAIMS.md) A4):** ranking layers by quantization sensitivity and leaving the top \(paper.skippedLayers.text) in FP32 recovers most of the PTQ loss (YOLOv6s RepOpt: \(paper.fullPTQ.text) → \(paper.partialPTQ.text), FP32 \(paper.fp32.text)); the mAP method ranks best but is slow and can overfit the validation set, so MSE is recommended.
        **Scale:** our \(block) detector (\(quick ? "tiny variant, smoke run" : "YOLOv6-N proportions, 160 px")) trained on synthetic shapes — not YOLOv6s on COCO. Read the recovered share and the agreement between metrics, not absolute mAP.
        **Protocol:** deploy form; \(calibrationMethod) calibration on 4 × 32 training images; one layer quantized at a time; output metrics (on \(outputs.label)) on one other batch of 32 training images; mAP method on \(rankingImages) training images (the ranking split), never on val; all reported mAP on the \(valImages)-image val split.

        ## Partial PTQ, paper vs ours (top \(topK) layers left in FP32)

        \(markdownTable(["ranking by", "top-\(topK) layers", "paper mAP (YOLOv6s RepOpt)", "ours: val mAP"], headline))
        **Verdict (partial PTQ):** \(r.verdict)

        **Does MSE stand in for the mAP method?** \(r.mseStandsIn)

        ## Agreement with the mAP method (over all \(layerCount) layers)

        \(markdownTable(["metric", "Spearman ρ", "Kendall τ-b", "top-\(topK) overlap"], agreementRows))
        ## Cost of each method

        \(markdownTable(["method", "wall time, all layers", "per layer"], timingRows))
        ## What the output metrics compare

        MSE ranks layers by how far the outputs move; which outputs decides what it sees. Same calibration, same batch, MSE over each output definition; partial PTQ leaves its top \(topK) in FP32 (val mAP):

        \(markdownTable(["MSE over", "Spearman ρ vs mAP method", "top-\(topK) overlap", "partial PTQ mAP", "PTQ loss recovered"], outputRows))
        ## Sweep over k (val mAP)

        \(markdownTable(["k"] + SensitivityMetric.allCases.map(\.label), sweepRows))
        ![sweep](exp03/partial_ptq_sweep.svg)

        ## Per-layer sensitivity

        ![sensitivity](exp03/sensitivity_per_layer.svg)

        Ranking-split mAP: FP32 \(ranking(r.sensitivity.fp32mAP)), full PTQ \(ranking(r.sensitivity.fullPTQmAP)).

        \(r.sensitivity.markdown)
        \(provenance.markdown)

        """
    }
}
