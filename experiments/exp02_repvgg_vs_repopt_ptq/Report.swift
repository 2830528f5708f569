import Foundation
import QuantLab

/// results/exp02.md from the numbers: the claim, paper vs ours, the verdicts, every calibrator.
struct Exp02Report {
    var results: Exp02Results
    var methods: [CalibrationMethod]
    var primary: CalibrationMethod
    var seeds: Int
    var calibration: CalibrationPlan
    var quick: Bool
    var provenance: Provenance

    private func f(_ x: Double, _ scale: Double) -> String { String(format: scale == 100 ? "%.1f" : "%.3f", x * scale) }

    private func cell(_ arm: Exp02Results.Arm, _ m: CalibrationMethod, _ scale: Double) -> String {
        arm.values(m).count > 1 ? "\(f(arm.mean(m), scale)) ± \(f(arm.spread(m), scale))" : f(arm.mean(m), scale)
    }

    /// "FP32" and "INT8 (−drop%)" of one block, or dashes when the arm was not run.
    private func ours(_ arms: [String: Exp02Results.Arm], _ b: BlockKind, _ scale: Double) -> (fp32: String, int8: String) {
        guard let a = arms[b.rawValue] else { return ("—", "—") }
        let d = a.relativeDrop(primary)
        return (f(a.fp32, scale), "\(cell(a, primary, scale)) (\(signedPercent(-d)))")
    }

    /// Every calibrator, one row per block.
    private func calibratorTable(_ arms: [String: Exp02Results.Arm], blocks: [BlockKind], scale: Double) -> String {
        let header = ["block", "FP32", "FP32 deploy form"] + methods.map { "INT8 \($0)" } + ["INT8 \(primary) vs FP32"]
        let rows = blocks.compactMap { b in arms[b.rawValue].map { (b, $0) } }.map { b, a in
            [b.rawValue, f(a.fp32, scale), f(a.fp32Deploy, scale)] + methods.map { cell(a, $0, scale) }
                + [signedPercent(-a.relativeDrop(primary))]
        }
        return markdownTable(header, rows)
    }

    var markdown: String {
        let scaleNote = "mAP@[.5:.95] on our val split, mean ± standard deviation over \(seeds) calibration seed\(seeds == 1 ? "" : "s")"
        let det = results.detectors
        let (rv, ro, rq) = (ours(det, .repvgg, 1), ours(det, .repopt, 1), ours(det, .qarepvgg, 1))
        var md = """
        # exp02 — RepVGG vs RepOpt under post-training quantization

        **Claims ([CLAIMS.md](../CLAIMS.md) A1, A3):** plain TensorRT PTQ of a re-parameterised RepVGG network collapses; RepOpt (the structural prior moved into the optimizer) keeps FP32 accuracy and survives PTQ.
        **Scale:** our models are YOLOv6-N-proportioned detectors (\(quick ? "tiny variant, smoke run" : "width 0.25, depth 0.33, 160 px")) and a small RepVGG-style classifier trained from scratch on synthetic shapes on a 2-core CPU — not YOLOv6s on COCO or RepVGG-B1 on ImageNet. Read directions and relative drops, not absolute numbers.
        **Protocol:** deploy form (blocks fused, BN folded); INT8 symmetric, weights per output channel (max), activations per tensor by each calibrator on \(calibration.batches) × \(calibration.batchSize) training images; fake quantization at every conv / transposed conv / linear; \(seeds) calibration seeds (which images are drawn).

        ## Detector, paper vs ours (calibrator: \(primary))

        \(markdownTable(["", "paper (YOLOv6s, COCO val)", "ours (\(scaleNote))"], [
            ["RepVGG FP32", Paper.A3.yolov6sFP32.description, rv.fp32],
            ["RepVGG INT8 PTQ", Paper.A3.repvggPTQ.with(Paper.A3.repvggPTQReadme), rv.int8],
            ["RepOpt FP32", Paper.A3.yolov6sFP32.description, ro.fp32],
            ["RepOpt INT8 PTQ", Paper.A3.repoptPTQ.with(Paper.A3.repoptPTQTutorial), ro.int8],
            ["QARepVGG FP32", "— (not in the article)", rq.fp32],
            ["QARepVGG INT8 PTQ", "—", rq.int8],
        ]))
        **Verdict:** \(results.verdict)

        Every calibrator (\(scaleNote)):

        \(calibratorTable(det, blocks: Baselines.detectorBlocks, scale: 1))
        """
        if let clsVerdict = results.classifierVerdict {
            let (cv, co) = (ours(results.classifiers, .repvgg, 100), ours(results.classifiers, .repopt, 100))
            md += """

            ## Classifier, paper vs ours (calibrator: \(primary))

            \(markdownTable(["", "paper (ImageNet top-1)", "ours (shapes-cls val top-1 %, mean ± sd over seeds)"], [
                ["RepVGG FP32", "\(Paper.A1.repvggB1FP32.text) (RepVGG-B1, \(Paper.A1.repvggB1FP32.source.rawValue))", cv.fp32],
                ["RepVGG INT8 PTQ", Paper.A1.repvggB1PTQ.description, cv.int8],
                ["RepOpt FP32", "\(Paper.A3.repoptB1FP32.text) (RepOpt-VGG-B1, \(Paper.A3.repoptB1FP32.source.rawValue))", co.fp32],
                ["RepOpt INT8 PTQ", Paper.A3.repoptB1PTQ.description, co.int8],
            ]))
            **Verdict:** \(clsVerdict)

            \(calibratorTable(results.classifiers, blocks: Baselines.classifierBlocks, scale: 100))
            """
        }
        let checks = Baselines.detectorBlocks.compactMap { b in results.detectors[b.rawValue]?.engine.map { ("det-\(b.rawValue)", $0, 1.0) } }
            + Baselines.classifierBlocks.compactMap { b in results.classifiers[b.rawValue]?.engine.map { ("cls-\(b.rawValue)", $0, 100.0) } }
        if !checks.isEmpty {
            let worst = checks.map { abs($0.1.difference) }.max() ?? 0
            md += """

            ## The same PTQ on the INT8 engine (\(primary), seed 0)

            The numbers above are fake-quantized FP32. The INT8 engine runs the same quantization on integer kernels (convs fused with their quantizers: int8 codes in, s32 accumulation, requantized int8 out; see README "INT8 engine"); it may round a value one code differently where the order of float operations differs.

            \(markdownTable(["model", "simulator", "INT8 engine", "difference", "integer convs", "Reformat steps"], checks.map { name, c, scale in
                [name, f(c.simulator, scale), f(c.engine, scale), String(format: "%+.4f", (c.engine - c.simulator) * scale), "\(c.integerConvs)", "\(c.reformatSteps)"]
            }))
            **Engine = simulator:** \(worst <= 0.001 ? "yes" : "no"), the largest difference is \(String(format: "%.4f", worst)) (detectors in mAP, classifiers in top-1 as a fraction; the target is 0.001).
            """
        }
        md += """

        **Why:** [exp02b](exp02b.md) trains classifiers over width, training length and weight decay (and RepVGG's custom L2), quantizes every model with per-channel and per-tensor weights, and tracks the identity branch's BN scales, to find where — if anywhere at our scale — RepVGG loses more than RepOpt.

        **How to read the table.** "FP32 deploy form" must equal FP32 (fusion is exact up to float rounding): it checks the conversion, not quantization. The last column is (INT8 − FP32) / FP32 with the \(primary) calibrator (− a loss, + a gain, as everywhere in these reports), the relative change that can be set beside the article's (RepVGG \(signedPercent(-PaperDrops.detector.repvgg)), RepOpt \(signedPercent(-PaperDrops.detector.repopt))). The spread over seeds is calibration sampling noise; a difference between blocks smaller than about twice the spread is not a finding.

        \(provenance.markdown)

        """
        return md
    }
}
