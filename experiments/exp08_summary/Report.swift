import Foundation
import QuantLab

/// results/exp08.md and results/exp08/pareto.svg.
struct Exp08Report {
    var results: Exp08Results
    var index: [IndexEntry]
    var steps: [StackStep]
    var quick: Bool
    var provenance: Provenance

    func writeFigure(directory: URL) throws {
        guard let study = results.study, !study.points.isEmpty else { return }
        func series(_ ranking: String) -> [(x: Double, y: Double)] {
            study.points.filter { $0.ranking == ranking }.sorted { $0.k < $1.k }.map { ($0.latencyMs, 100 * $0.mAP) }
        }
        let front = study.points.filter(\.pareto).map { (x: $0.latencyMs, y: 100 * $0.mAP) }
        let svg = SVG.scatter([("by sensitivity (k = 0..)", series("sensitivity"), true),
                               ("latency-aware greedy (k = 0..)", series("latency-aware"), true),
                               ("FP32 graph", series(Exp08Results.Study.fp32GraphName), false)],
                              front: front, title: "Partial quantization: val mAP against engine latency (batch 1, \(study.model))",
                              xLabel: "latency per image, ms (batch 1, \(study.kernels))", yLabel: "val mAP x 100")
        try SVG.write(svg, to: directory.appendingPathComponent("exp08/pareto.svg"))
    }

    var markdown: String {
        let smoke = quick ? "\n> QUICK smoke run: tiny models trained for seconds; the numbers show the machinery, not results.\n" : ""
        let summary = ExperimentEntry.summary
        var md = """
        # exp08 — Every claim, the article's stack, and latency-aware partial quantization
        \(smoke)
        Nothing here is trained or typed: the claim rows are the `claims` each experiment wrote to its results JSON (its outcome computed from its numbers), the stack's mAPs are read from the experiments that measured them, and the engine speeds and the study are measured by this run. **Scale:** small models trained here on synthetic shapes, on a CPU — compare directions and sizes, not COCO numbers.

        ## Every claim

        \(claimTable(index, extra: [(summary, results.claims[0])]))
        """
        md += "\n" + stackSection + "\n" + studySection + "\n" + provenance.markdown + "\n"
        return md
    }

    private func f(_ v: Double?, _ format: String) -> String { v.map { $0.isFinite ? String(format: format, $0) : "—" } ?? "—" }

    private var stackSection: String {
        let rows = results.stack.map { r in
            [r.method, r.paper, f(r.mAP, "%.4f"), r.source, r.engine, f(r.imagesPerSecondBatch1, "%.0f"), f(r.imagesPerSecondBatch32, "%.0f"),
             f(r.servingBaseline, "%.1f"), f(r.servingFused, "%.1f")]
        }
        let stepRows = steps.map { s in [s.name, String(format: "%+.3g", s.paper), s.ours.isFinite ? String(format: "%+.3g", s.ours) : "—", s.call] }
        return """
        ## The stack (A11)

        The article's lost Table 10, on our RepOpt detector (RepVGG for the first row). mAP on our val split (0-1; the paper's COCO mAP in points); engine speed of the INT8 plan that runs the method, measured here (\(results.study?.kernels ?? "no study yet")); serving = exp06's end-to-end img/s of one preprocessing worker and one engine instance, baseline vs fused preprocessing.

        \(markdownTable(["method", "paper mAP", "ours mAP", "from", "engine", "img/s batch 1", "img/s batch 32", "serving, baseline preprocessing", "serving, fused"], rows))
        Each step in the article's direction (mAP steps in points, ours ×100; speed steps as ratio − 1); within 0.5 points or 5% a step is "flat":

        \(markdownTable(["step", "paper", "ours", "here"], stepRows))
        **Verdict (A11):** \(results.claims[0].verdict)

        """
    }

    /// The study's reading, from its numbers: the two choices at the article's k, and how many
    /// greedy costs stand out of the timing noise.
    private func finding(_ s: Exp08Results.Study) -> String {
        let k = Int(Paper.A4.skippedLayers.value)
        let noiseMs = s.timingNoise * (s.point("sensitivity", k: 0)?.latencyMs ?? .nan)
        // The greedy timed its candidates one plan after another (profiled step medians), so the
        // machine's drift enters its costs; the interleaved timings in the table are the ones to compare.
        var text = String(format: "Timing noise of the interleaved runs is about %.3f ms per image. The greedy's costs were measured plan after plan, so drift enters them; compare the table's interleaved latencies instead.", noiseMs)
        if let base = s.point("sensitivity", k: 0) {
            let ks = s.points.filter { $0.ranking == "sensitivity" && $0.k > 0 }.sorted { $0.k < $1.k }
            let costly = ks.filter { $0.latencyMs - base.latencyMs > noiseMs }.map(\.k)
            text += costly.isEmpty ? " No sensitivity-chosen island set up to k = \(ks.last?.k ?? 0) is slower than full INT8 beyond that noise."
                : " By sensitivity, leaving layers in FP32 costs measurable latency from k = \(costly.map(String.init).joined(separator: ", ")) (beyond the noise over full INT8); below that the islands are free within the noise."
            let better = ks.compactMap { a -> Int? in
                guard let b = s.point("latency-aware", k: a.k) else { return nil }
                return (b.latencyMs < a.latencyMs - noiseMs && b.mAP >= a.mAP - 0.005) || (b.mAP > a.mAP + 0.005 && b.latencyMs <= a.latencyMs + noiseMs) ? a.k : nil
            }
            text += better.isEmpty ? " At no k is the latency-aware choice clearly better than the sensitivity choice (faster beyond the noise at mAP within 0.005, or more accurate by 0.005 at no more latency)."
                : " The latency-aware choice is clearly better at k = \(better.map(String.init).joined(separator: ", "))."
        }
        if let a = s.point("sensitivity", k: k), let b = s.point("latency-aware", k: k) {
            text += String(format: " At the article's k = %d: by sensitivity %.3f ms and mAP %.4f (%d Reformat steps), latency-aware %.3f ms and %.4f (%d).",
                           k, a.latencyMs, a.mAP, a.reformatSteps, b.latencyMs, b.mAP, b.reformatSteps)
        }
        if let g = s.fp32Graph, let q = s.point("sensitivity", k: 0) {
            text += String(format: " For scale: the whole FP32 graph takes %.3f ms (mAP %.4f), full INT8 %.3f ms (%.4f).", g.latencyMs, g.mAP, q.latencyMs, q.mAP)
        }
        return text
    }

    private var studySection: String {
        guard let s = results.study else {
            return "## Latency-aware partial quantization\n\nNot measured: \(results.problems.first { $0.hasPrefix("exp08") || $0.hasPrefix("exp03") } ?? "run `make exp08`").\n"
        }
        let rows = s.points.sorted { ($0.ranking, $0.k) < ($1.ranking, $1.k) }.map { p in
            [p.ranking, "\(p.k)", p.fp32Layers.last.map { "`\($0)`" } ?? "—", String(format: "%.3f", p.latencyMs), String(format: "%.0f", p.imagesPerSecondBatch32),
             "\(p.reformatSteps)", String(format: "%.4f", p.mAP), p.pareto ? "**yes**" : ""]
        }
        let greedyRows = s.greedy.enumerated().map { i, g in ["\(i + 1)", "`\(g.layer)`", String(format: "%.4f", g.gain), String(format: "%+.3f", g.costMs)] }
        let front = s.points.filter(\.pareto).sorted { $0.latencyMs < $1.latencyMs }
        let frontText = front.map { String(format: "%@ k=%d (%.3f ms, %.4f)", $0.ranking, $0.k, $0.latencyMs, $0.mAP) }.joined(separator: "; ")
        return """
        ## Beyond the article: latency-aware partial quantization

        The article picks the layers to leave in FP32 by accuracy alone. On an engine each FP32 island costs its own float conv and the Reformat steps at its borders (a Dequantize before, a Quantize after). For k = 0..\(s.points.filter { $0.ranking != Exp08Results.Study.fp32GraphName }.map(\.k).max() ?? 0) layers left in FP32 on \(s.model) (\(s.calibration)), chosen (a) **by sensitivity** — exp03's ranking by the mAP method, the article's choice — and (b) **latency-aware** — greedily among the top \(s.candidates) of that ranking, by the mAP a layer recovers (its mAP-method drop) per millisecond its island adds, measured on the engine with the islands already chosen (a layer that costs nothing is taken first) — each configuration is built, timed at batch 1 (median of interleaved runs; timing noise \(String(format: "%.1f%%", 100 * s.timingNoise))) and batch 32, and scored on val. The study took \(String(format: "%.0f", s.seconds)) s.

        ![Pareto](exp08/pareto.svg)

        \(markdownTable(["ranking", "k", "last layer added", "latency ms (batch 1)", "img/s (batch 32)", "Reformat steps", "val mAP", "Pareto"], rows))
        **Pareto front** (no other configuration is both faster and more accurate): \(frontText).

        \(finding(s))

        Greedy choices (gain: the layer's mAP-method drop; cost: measured latency change when its island is added):

        \(greedyRows.isEmpty ? "none (no candidate recovers mAP)\n" : markdownTable(["step", "layer", "gain", "cost ms"], greedyRows))
        """
    }
}
