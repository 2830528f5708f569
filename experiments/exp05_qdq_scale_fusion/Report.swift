import Foundation
import QuantLab

/// results/exp05.md, from the numbers.
struct Exp05Report {
    var results: Exp05Results
    var block: String
    var calibrationMethod: CalibrationMethod
    var valImages: Int
    var quick: Bool
    var timing: Timing
    var kernels: String
    var provenance: Provenance

    private var r: Exp05Results { results }
    private func f4(_ x: Double) -> String { x.isFinite ? String(format: "%.4f", x) : "—" }
    private func pct(_ x: Double) -> String { String(format: "%.1f%%", 100 * x) }
    private func ratio(_ x: Double) -> String { String(format: "%.2f", x) }
    private func kinds(_ w: Exp05Results.Way) -> String {
        w.reformats.isEmpty ? "0" : "\(w.reformatSteps) (" + w.reformats.sorted { $0.key < $1.key }.map { "\($0.key) \($0.value)" }.joined(separator: ", ") + ")"
    }
    private func short(_ name: String) -> String { "`" + (name.hasSuffix(".input") ? String(name.dropLast(".input".count)) : name) + "`" }

    /// Whether every group the list misses had equal amaxes already.
    private var unlistedEqual: Bool {
        r.unlisted.allSatisfy { members in r.groups.first { $0.members == members }.map { $0.spread == 1 } ?? false }
    }

    var markdown: String {
        guard let a = r.implicit, let b = r.explicit, let c = r.unified else { return "# exp05 — no results\n" }
        let paperRatio = Paper.A8.fusedQATqps.value / Paper.A8.ptqQPS.value
        let articleScales = r.articleCase.map { String(format: "%.4g", $0 / 127) }.joined(separator: " vs ")
        let articleRatio = r.articleCase.count == 2 ? String(format: " (ratio %.2f)", Double(max(r.articleCase[0], r.articleCase[1]) / min(r.articleCase[0], r.articleCase[1]))) : ""
        let headline: [[String]] = [
            ["Reformat kernels in the explicit (QAT) graph", "\(Paper.A6.reformatShare.text)% of kernels (\(Paper.A6.reformatShare.source.rawValue))",
             "\(b.reformatSteps) of \(b.steps) steps (\(pct(b.reformatCountShare))), \(pct(b.reformatTimeShare)) of the time"],
            ["Reformat kernels after scale fusion", "none left (implied)", "\(c.reformatSteps) of \(c.steps) steps (\(pct(c.reformatCountShare))), \(pct(c.reformatTimeShare)) of the time"],
            ["explicit vs implicit PTQ speed", "slower (no number given)", "\(ratio(b.imagesPerSecondBatch1 / a.imagesPerSecondBatch1))x at batch 1, \(ratio(b.imagesPerSecondBatch32 / a.imagesPerSecondBatch32))x at batch 32"],
            ["fused QAT vs PTQ speed", "\(Paper.A8.fusedQATqps.text) / \(Paper.A8.ptqQPS.text) QPS = \(ratio(paperRatio))",
             "\(ratio(c.imagesPerSecondBatch1 / a.imagesPerSecondBatch1))x at batch 1, \(ratio(c.imagesPerSecondBatch32 / a.imagesPerSecondBatch32))x at batch 32"],
            ["mAP kept by fusion", "\(Paper.A8.fusedQATmAP.text) kept", "\(f4(b.mAP)) → \(f4(c.mAP))"],
            ["the article's case: scales of `upsample1` and `Rep_n3.conv1` inputs", "\(Paper.A7.upsampleScale.text) vs \(Paper.A7.concatScale.text)",
             articleScales + articleRatio],
        ]
        let ways: [(String, Exp05Results.Way)] = [("(a) implicit PTQ", a), ("(b) explicit Q/DQ", b), ("(c) explicit, unified", c)]
        let wayRows = ways.map { name, w in
            [name, kinds(w), "\(w.int8Convs)", pct(w.reformatCountShare), pct(w.reformatTimeShare),
             String(format: "%.1f", w.imagesPerSecondBatch1), String(format: "%.1f", w.imagesPerSecondBatch32), f4(w.mAP)]
        } + [["FP32 graph", "—", "0", "—", "—", String(format: "%.1f", r.fp32Graph.imagesPerSecondBatch1), "—", f4(r.fp32mAP)]]
        let groupRows = r.groups.map { g in
            [g.members.map(short).joined(separator: "<br>"), g.explicitAmax.map { String(format: "%.3f", $0) }.joined(separator: "<br>"),
             ratio(g.spread), String(format: "%.3f", g.unifiedAmax), String(format: "%.3f", g.implicitAmax),
             g.mergedAlonemAP.map { String(format: "%@ (%+.4f)", f4($0), $0 - b.mAP) } ?? "— (equal already)"]
        }
        let listRows = r.yolov6List.map { [$0.yolov6.map { "`\($0)`" }.joined(separator: "<br>"), $0.ours.map(short).joined(separator: "<br>"), $0.status] }
        let unlisted = r.unlisted.isEmpty ? "none." : r.unlisted.map { $0.map(short).joined(separator: " + ") }.joined(separator: "; ") + ". "
            + (unlistedEqual ? "Their explicit amaxes are equal (quantizers calibrated on the same tensor), so no Reformat arises from them in PTQ; a QAT that learns scales (LSQ) would split them, and the list would not catch it."
                             : "Some have unequal explicit amaxes: the list's Reformat steps remain there (see the groups table).")
        return """
        # exp05 — Q/DQ graph scale fusion

        **Claims ([CLAIMS.md](../CLAIMS.md) A6–A8):** YOLOv6s's explicit Q/DQ (QAT) graph ran slower than implicit PTQ in TensorRT, \(Paper.A6.reformatShare.text)% of its kernels being requantize/reformat kernels; the cause is one tensor read by quantizers of different scales (`\(Paper.A7.producer)` → `upsample1` at \(Paper.A7.upsampleScale.text) and, through a concat, `Rep_n3.conv1` at \(Paper.A7.concatScale.text)); giving each such group one amax (its max) removed them: \(Paper.A8.fusedQATqps.text) vs \(Paper.A8.ptqQPS.text) QPS, mAP \(Paper.A8.fusedQATmAP.text) kept.
        **Scale:** our \(block) detector (\(quick ? "tiny variant, smoke run" : "YOLOv6-N proportions, 160 px")) on synthetic shapes, run by QuantLab's CPU INT8 engine (\(kernels)) — not YOLOv6s on a T4 with TensorRT. The engine follows TensorRT's explicit-quantization rules (ARCHITECTURE.md), so the plan's structure is comparable; speeds are of our kernels.
        **Protocol:** deploy form; \(calibrationMethod) calibration on 4 × 32 training images. (a) implicit PTQ: one scale per group of quantizers that must share one, calibrated on everything the group reads together; (b) explicit Q/DQ at every conv and transposed-conv input, each quantizer with its own calibrated amax (no QAT model yet: these are the amaxes YOLOv6's QAT starts from and keeps frozen); (c) (b) after the scale-unification pass (groups found by union-find over the traced graph, amax = group max). Reformat share: per-step medians over \(timing.runs) batch-1 runs of each plan alone; speed: median of \(timing.runs) batch-1 and \(timing.batchRuns) batch-32 runs, the ways' plans timed in turn run by run (timing noise, the largest drift between the first and second half of any batch-1 plan's runs: \(String(format: "%.1f%%", 100 * r.timingNoise))); mAP on the \(valImages)-image val split, run on the engine.

        ## Paper vs ours

        \(markdownTable(["", "paper (YOLOv6s, TensorRT, T4)", "ours (engine, \(Kernels.isa))"], headline))
        **Verdicts:**
        - \(r.verdicts.slower)
        - \(r.verdicts.closed)
        - \(r.verdicts.mAPKept)
        - \(r.verdicts.ruleOfThumb)

        ## The three ways on the engine

        \(markdownTable(["way", "Reformat steps", "INT8 convs", "Reformat share (steps)", "Reformat share (time)", "img/s batch 1", "img/s batch 32", "val mAP"], wayRows))
        The explicit graph with fake quantization (the simulator) scores \(f4(r.simulatorExplicitmAP)) against the engine's \(f4(b.mAP)): the engine computes what the simulator models.

        ## The groups the pass found

        Quantizers that read one tensor, directly or through max pools and channel concats. "Merged alone": val mAP on the engine with only this group unified, from (b) — the article's rule of thumb that amaxes of one order of magnitude merge safely.

        \(markdownTable(["quantizers (layer inputs)", "explicit amax", "max / min", "unified amax", "implicit amax", "mAP, merged alone (vs explicit)"], groupRows))
        ## YOLOv6's hand-written list, in our names

        YOLOv6 lists the groups by module name (`op_concat_fusion_list` in tools/qat/qat_export.py); here is each listed group, its members that exist in our placement (quantizers at conv inputs only: no quantizer on the SPPF max-pool input or on the upsampled features), and whether the graph-derived pass found it.

        \(markdownTable(["YOLOv6 group", "ours", "pass"], listRows))
        Groups the pass finds that the list does not name: \(unlisted)

        ## The neck's plan, before and after unification

        (b) explicit Q/DQ:

        ```
        \(b.neckPlan.joined(separator: "\n"))
        ```

        (c) after unification:

        ```
        \(c.neckPlan.joined(separator: "\n"))
        ```

        ## How this differs from TensorRT

        - Our Reformat steps are the quantizers no compute step absorbed, in a plan that runs every conv and the neck's transposed convs as fused INT8 kernels and max pools and concats on int8 codes; TensorRT also chooses layouts and tactics, and its Reformat kernels include layout conversions we do not have. The input image's Quantize is a Reformat in every way (as in TensorRT).
        - The article's 10.8% is a share of kernels (count or time is not stated); we give both.
        - Our implicit PTQ is modelled on the Q/DQ graph (one amax per group, calibrated jointly), not a separate calibration of every tensor; TensorRT's implicit mode also decides precision per layer.
        \(provenance.markdown)

        """
    }
}
