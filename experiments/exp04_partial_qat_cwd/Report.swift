import Foundation
import QuantLab

/// results/exp04.md and its training-curve figure, from the numbers.
struct Exp04Report {
    var results: Exp04Results
    var calibrationMethod: CalibrationMethod
    var topK: Int
    var valImages: Int
    var quick: Bool
    var provenance: Provenance

    private var r: Exp04Results { results }
    private func f4(_ x: Double) -> String { x.isFinite ? String(format: "%.4f", x) : "—" }
    private func meanSD(_ arm: QATArm) -> String {
        let n = r.finals(arm).count
        return n > 1 ? String(format: "%.4f ± %.4f (n = %d)", r.mean(arm), r.sd(arm), n) : f4(r.mean(arm))
    }

    /// Val mAP per epoch, the mean over seeds, per arm (and the RepVGG arm).
    func writeFigures() throws {
        let dir = resultsDirectory(quick: quick).appendingPathComponent("exp04")
        let epochs = r.qat.epochs
        var series = QATArm.allCases.map { arm -> (name: String, values: [Double]) in
            let runs = r.arms[arm.rawValue] ?? []
            return (arm.label, (0..<epochs).map { e in Statistics.mean(runs.compactMap { e < $0.mAPPerEpoch.count ? $0.mAPPerEpoch[e] : nil }) })
        }
        series.append(("PTQ start (RepOpt)", Array(repeating: r.ptqmAP, count: epochs)))
        if let v = r.repvgg { series.append(("RepVGG QAT", v.qatmAPPerEpoch)) }
        try SVG.write(SVG.lines(series, xLabels: (1...epochs).map { "epoch \($0)" }, title: "QAT: val mAP of the EMA weights (quantizers on), mean over seeds",
                                yLabel: "mAP", width: 640, height: 320), to: dir.appendingPathComponent("qat_curves.svg"))
    }

    var markdown: String {
        let a3 = Paper.A3.self, a4 = Paper.A4.self, a5 = Paper.A5.self
        let rows: [[String]] = [
            ["FP32", a3.yolov6sFP32.description, f4(r.fp32mAP)],
            ["PTQ (\(calibrationMethod))", a3.repoptPTQ.description, f4(r.ptqmAP)],
            ["partial PTQ (top \(topK) in FP32)", a4.partialPTQ.description, f4(r.partialPTQmAP)],
            ["QAT (all layers)", "—", meanSD(.qat)],
            ["partial QAT", a5.partialQAT.description, meanSD(.partial)],
            ["partial QAT + CWD", "\(a5.partialQATCWD.description); CWD +\(a5.cwdGain.text)", meanSD(.partialCWD)],
            ["partial QAT + CWD + LSQ", "— (not in YOLOv6)", meanSD(.partialCWDLSQ)],
        ]
        let seedRows = QATArm.allCases.map { arm in
            [arm.label] + (r.arms[arm.rawValue] ?? []).map { run in "seed \(run.seed): " + run.mAPPerEpoch.map(f4).joined(separator: " → ") }
        }.map { [$0[0], $0.dropFirst().joined(separator: "<br>")] }
        let repvggRows = r.repvgg.map { v in [[f4(v.fp32mAP), f4(v.ptqmAP), v.qatmAPPerEpoch.map(f4).joined(separator: " → ")]] } ?? []
        return """
        # exp04 — Partial QAT with channel-wise distillation

        **Claim ([CLAIMS.md](../CLAIMS.md) A5, A11):** partial QAT of YOLOv6s RepOpt with channel-wise distillation from the FP32 model on the three neck outputs adds \(a5.cwdGain.text) mAP over partial QAT alone; the stack ends at about \(a5.partialQAT.text) / \(a5.partialQATCWD.text) (FP32 \(a3.yolov6sFP32.text), PTQ \(a3.repoptPTQ.text), partial PTQ \(a4.partialPTQ.text)).
        **Scale:** our RepOpt detector (\(quick ? "tiny variant, smoke run" : "YOLOv6-N proportions, 160 px")) on synthetic shapes, QAT for \(r.qat.epochs) epochs of \(r.qat.imagesPerEpoch.map(String.init) ?? "all") training images at batch \(r.qat.batchSize) — not YOLOv6s on COCO for 10 epochs.
        **Protocol:** deploy form (BN folded: see the header of main.swift); \(calibrationMethod) calibration on 4 × 32 training images, the start of every QAT arm; partial arms leave the top \(topK) layers of the mAP-method sensitivity ranking in FP32: \(r.skipped.map { "`\($0)`" }.joined(separator: ", ")). QAT: straight-through gradients, amax frozen (LSQ arm: learned), Nesterov SGD (momentum \(r.qat.momentum)), lr \(r.qat.learningRate) with cosine decay to ×\(r.qat.finalLRFactor), no warm-up, EMA; CWD weight 10 with YOLOv6's decay, teacher = the FP32 model. mAP on the \(valImages)-image val split with the EMA weights and the quantizers on.

        ## Paper vs ours

        \(markdownTable(["", "paper (YOLOv6s RepOpt, COCO)", "ours: val mAP (mean ± sd over seeds)"], rows))
        **Verdict:** \(r.verdict)

        ## Every run (val mAP after each epoch)

        \(markdownTable(["arm", "runs"], seedRows))
        ![QAT curves](exp04/qat_curves.svg)

        ## RepVGG: does QAT rescue what PTQ hurt?

        \(markdownTable(["FP32", "PTQ", "QAT (all layers, seed 0), per epoch"], repvggRows))
        \(provenance.markdown)

        """
    }
}
