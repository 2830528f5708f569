import Foundation
import QuantLab

/// results/exp02b.md from the numbers.
struct Exp02bReport {
    var results: Exp02bResults
    var primary: CalibrationMethod
    var seeds: Int
    var provenance: Provenance

    private func pct(_ x: Double) -> String { x.isNaN ? "—" : signedPercent(x) }
    /// Percentage points, signed like `signedPercent`: "+2.4", "−0.3".
    private func points(_ x: Double) -> String {
        x.isNaN ? "—" : String(signedPercent(x).dropLast())
    }
    private func top1(_ x: Double) -> String { String(format: "%.1f", 100 * x) }
    private func opt(_ x: Double?, _ format: String) -> String { x.map { String(format: format, $0) } ?? "—" }

    private var gridTable: String {
        let header = ["factor", "level", "weights", "RepVGG FP32", "RepVGG INT8", "RepOpt FP32", "RepOpt INT8", "gap (points)", "noise", "reading"]
        let rows = results.rows.map { r in
            [r.factor, r.level, r.granularity, top1(r.repvggFP32), pct(r.repvggChange), top1(r.repoptFP32), pct(r.repoptChange),
             points(r.gap), String(format: "±%.1f", 100 * r.noise), r.reading]
        }
        return markdownTable(header, rows)
    }

    private var factorTable: String {
        markdownTable(["factor", "weights", "gap at each level (points)", "range (points)", "2 x noise (points)", "effect"], results.factors.map { f in
            [f.factor, f.granularity, zip(f.levels, f.gaps).map { "\($0): \(points($1))" }.joined(separator: "; "),
             f.range.isNaN ? "— (fewer than 2 learned levels)" : String(format: "%.1f", 100 * f.range),
             f.threshold.isNaN ? "—" : String(format: "%.1f", 100 * f.threshold),
             f.range.isNaN ? "—" : f.range > f.threshold ? "beyond the noise" : "within the noise"]
        })
    }

    private func modelRows(_ models: [ModelResult], scale: Double) -> [[String]] {
        models.map { m in
            let fmt = scale == 100 ? "%.1f" : "%.3f"
            return [m.model, m.recipe.map(\.description) ?? "exp00 baseline", String(format: "%.2f M", Double(m.parameters) / 1e6), String(format: fmt, scale * m.fp32)]
                + Granularity.allCases.flatMap { g in CalibrationMethodList.all.map { m.values(g, $0).isEmpty ? "—" : pct(m.change(g, $0)) } }
                + [opt(m.identityScaleMax, "%.2f"), opt(m.identityShare, "%.2f"), String(format: "%.1f", m.medianSpread), String(format: "%.1f", m.maxSpread),
                   String(format: "%.0f s", m.trainSeconds)]
        }
    }

    private var modelHeader: [String] {
        ["model", "recipe", "params (deploy)", "FP32"] + Granularity.allCases.flatMap { g in CalibrationMethodList.all.map { "\(g.rawValue) \($0)" } }
            + ["identity γ/σ max", "identity share of centre tap", "channel spread median", "channel spread max", "training"]
    }

    private var correlations: String {
        let ms = results.classifiers.filter { $0.fp32 >= LearnedFloor.classifierTop1 }
        guard ms.count >= 3 else { return "Too few learned classifiers for a correlation." }
        func line(_ name: String, _ x: [Double], _ y: [Double]) -> String {
            String(format: "- %@: Spearman %.2f over %d models", name, Statistics.spearman(x, y), x.count)
        }
        var lines = [
            line("median channel spread vs per-tensor drop (entropy)", ms.map(\.medianSpread), ms.map { -$0.change(.perTensor, primary) }),
            line("median channel spread vs per-channel drop (entropy)", ms.map(\.medianSpread), ms.map { -$0.change(.perChannel, primary) }),
        ]
        let rv = ms.filter { $0.identityScaleMax != nil }
        if rv.count >= 3 {
            lines.append(line("RepVGG's largest identity γ/σ vs its per-tensor drop", rv.map { $0.identityScaleMax! }, rv.map { -$0.change(.perTensor, primary) }))
            lines.append(line("RepVGG's largest identity γ/σ vs its per-channel drop", rv.map { $0.identityScaleMax! }, rv.map { -$0.change(.perChannel, primary) }))
        }
        return lines.joined(separator: "\n")
    }

    var markdown: String {
        let paperDrop = Paper.relativeDrop(Paper.A1.repvggB1FP32, Paper.A1.repvggB1PTQ)
        let paperRepOpt = Paper.relativeDrop(Paper.A3.repoptB1FP32, Paper.A3.repoptB1PTQ)
        var md = """
        # exp02b — When does RepVGG lose more than RepOpt under PTQ?

        **Claims ([CLAIMS.md](../CLAIMS.md) A1, A3):** plain PTQ of a re-parameterised RepVGG network collapses (RepVGG-B1 on ImageNet: \(Paper.A1.repvggB1FP32.text) → \(Paper.A1.repvggB1PTQ.text), \(signedPercent(-paperDrop))); RepOpt does not (RepOpt-VGG-B1 \(signedPercent(-paperRepOpt))). [exp02](exp02.md) does not reproduce it on our models; this study asks under which conditions, if any, RepVGG's PTQ drop exceeds RepOpt's here.
        **Grid:** classifiers on shapes-cls, one factor at a time around the baseline recipe of exp00 (\(results.grid.first?.level ?? "")): training length, width, weight decay, and RepVGG's custom L2 on the equivalent kernel; RepVGG and RepOpt at every point (QARepVGG at the base). Every model is measured before fusion (identity BN scale, its share of the centre tap, channel-range spread of the fused kernels) and after PTQ with weights **per channel** (exp02's protocol, TensorRT's default) and **per tensor**.
        **Protocol:** deploy form; INT8 symmetric; activations per tensor by entropy (primary) and max on 4 × 32 training images; \(seeds) calibration seeds; top-1 on the val split. Changes are (INT8 − FP32) / FP32 (− a loss), mean over seeds; the gap is RepVGG's drop minus RepOpt's in percentage points (+ means RepVGG loses more), and it counts when it exceeds twice its seed noise and 1 point, as in exp02. A point whose classifiers are below \(Int(100 * LearnedFloor.classifierTop1))% top-1 is "not learned" and reads nothing.\(results.quick ? "\n**QUICK smoke run:** tiny models; nothing here is a result." : "")

        ## The answer

        **Verdict:** \(results.verdict)

        ## RepVGG vs RepOpt at every grid point (calibrator: \(primary))

        \(gridTable)
        ## How far each factor moves the gap

        \(factorTable)
        ## Every model (changes under PTQ, mean over seeds; block statistics before fusion)

        \(markdownTable(modelHeader, modelRows(results.classifiers, scale: 100)))
        "identity γ/σ max": the largest gamma / sqrt(var + eps) of any identity-branch BN (RepVGG only; RepOpt and QARepVGG have no identity BN). "identity share": the identity's part of the fused diagonal centre tap, |a| / (|t3 K3| + |t1 K1| + |a|), mean over channels and blocks. "channel spread": max over output channels of a fused kernel's max|w| divided by the median channel's — with one scale per tensor the median channel keeps about 127 / spread levels.

        \(correlations)

        """
        if !results.detectors.isEmpty {
            let dets = results.detectors
            md += """

            ## The detectors of exp02: per-channel vs per-tensor weights

            \(markdownTable(modelHeader, modelRows(dets, scale: 1)))
            """
            if let v = dets.first(where: { $0.block == "repvgg" }), let o = dets.first(where: { $0.block == "repopt" }) {
                let lines = Granularity.allCases.map { g in
                    String(format: "- %@ weights: RepVGG %@, RepOpt %@; gap %@ points (noise ±%.1f)", g.rawValue, pct(v.change(g, primary)), pct(o.change(g, primary)),
                           points(o.change(g, primary) - v.change(g, primary)),
                           100 * (pow(v.noise(g, primary), 2) + pow(o.noise(g, primary), 2)).squareRoot())
                }
                md += "\nDetector gap (\(primary); + means RepVGG loses more):\n\n" + lines.joined(separator: "\n") + "\n"
            }
        }
        md += """

        **How to read it.** The grid varies one factor at a time, so an effect is measured around our baseline, not in every combination. A factor's range is the spread of the gap over its levels (the base included); a range within the gaps' noise is no effect. The detectors are exp02's baselines, not retrained: their arm varies only the weight granularity.

        \(provenance.markdown)

        """
        return md
    }
}

/// The calibrators in the order the tables show them.
enum CalibrationMethodList {
    static let all: [CalibrationMethod] = Exp02b.methods
}
