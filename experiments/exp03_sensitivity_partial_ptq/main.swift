// exp03 — Per-layer sensitivity and partial PTQ, with the article's metric comparison.
//
// Claim (CLAIMS.md A4): rank the quantizable layers by how much quantizing each one alone
// hurts, leave the most sensitive ones (top 6) in FP32, and PTQ recovers most of its loss:
// YOLOv6s RepOpt 40.9 (full PTQ) -> 42.0 (partial PTQ; YOLOv6 README 42.1) with FP32 at 42.4.
// Sensitivity by MSE, SNR, cosine of the model outputs (one batch of 32 after calibration on
// 4 x 32) or by the "mAP method" (mAP with one layer quantized). The mAP method ranks best
// but is slow and can overfit the validation set, so the article recommends MSE.
//
// What we expect: a few layers (the first conv on raw pixels, the head's predictors, layers
// after concats) dominate; skipping them recovers a good share of the PTQ loss; MSE's ranking
// correlates with the mAP method's at a small fraction of its cost.
//
// Protocol: the RepOpt detector of exp00 (the article's model for this step; --block picks
// another), deploy form, entropy calibration on 4 x 32 training images. Output metrics on one
// other batch of 32 training images. mAP method on a ranking split of training images (NOT
// the validation split the final mAP is reported on). Partial PTQ: the top-k layers of each
// ranking left in FP32, mAP on the validation split, k = 6 and a sweep.
//
// Files: main.swift (the pipeline), Results.swift (what is measured, the verdicts),
// Report.swift (results/exp03.md and its figures).
//
// Run: `make exp03` (~6 minutes once the baselines exist), `make exp03 QUICK=1` (tiny model,
// under 2 minutes). The layer sweep can be sharded across machines: `qlab sensitivity --shard i/n`
// then `qlab sensitivity merge` (see README).
import ArgumentParser
import Foundation
import QuantLab

struct Exp03: ParsableCommand {
    static let configuration = CommandConfiguration(commandName: "exp03_sensitivity_partial_ptq",
                                                    abstract: "Per-layer sensitivity (MSE, SNR, cosine, mAP method) and partial PTQ.")

    @Flag(help: "Tiny model and data, results to results/quick/.") var quick = false
    @Option(help: "Detector block: repvgg, qarepvgg or repopt.") var block = "repopt"
    @Option(help: "Calibrator for activations.") var method = "entropy"
    @Option(help: "Layers left in FP32 for the headline partial PTQ (the article: 6).") var topK = 6
    @Option(help: "Images in the ranking split of the mAP method (training images).") var rankingImages: Int?
    @Option(help: "Seed for calibration, sensitivity batch and ranking split.") var seed: UInt64 = 0
    @Option(help: "Outputs the MSE/SNR/cosine compare: inference (decoded boxes + sigmoid scores, what the deployed model returns) raw (class logits + distances) or scores (sigmoid class scores only).") var outputs = "inference"
    @Option(help: "Where datasets live.") var dataRoot = "data"
    @Option(help: "Where trained baselines are cached.") var modelsRoot = "data/models"

    func validate() throws {
        guard let b = BlockKind(rawValue: block), b != .repoptSearch else { throw ValidationError("--block must be repvgg, qarepvgg or repopt, got '\(block)'") }
        do { _ = try CalibrationMethod(parsing: method) } catch { throw ValidationError("--method: \(error)") }
        guard topK >= 1 else { throw ValidationError("--top-k must be at least 1") }
        if let r = rankingImages, r < 1 { throw ValidationError("--ranking-images must be at least 1") }
        do { _ = try DetectorOutputs(parsing: outputs) } catch { throw ValidationError("--outputs: \(error)") }
    }

    func run() throws {
        let start = Date()
        let plan = Baselines.Plan(quick: quick, dataRoot: URL(fileURLWithPath: dataRoot), modelsRoot: URL(fileURLWithPath: modelsRoot))
        let calibrationMethod = try CalibrationMethod(parsing: method)
        let outputKind = try DetectorOutputs(parsing: outputs)

        // MARK: - 1 Data
        // train: calibration (4 x 32), the sensitivity batch (1 x 32), the ranking split;
        // val: every mAP reported in the tables.
        let (train, _) = try Baselines.detectionData(plan: plan)
        let ranking = try rankingSplit(train, images: rankingImages ?? (quick ? 40 : 250), seed: seed)

        // MARK: - 2 Model, 3 Train or load
        let (model, _, val) = try Baselines.detector(BlockKind(rawValue: block)!, plan: plan)
        let fp32 = try evaluateDetector(model, on: val, progressLabel: "FP32 val").0.mAP

        // MARK: - 4 Quantize
        // Deploy form, Q/DQ at every conv, activations calibrated by `method`, weights per-channel max.
        let sim = try prepareDetectorPTQ(model, train: train, method: calibrationMethod, calibration: CalibrationPlan(batches: 4, batchSize: 32, seed: seed))
        let fullPTQ = try evaluateDetector(model, on: val, progressLabel: "full PTQ val").0.mAP
        print(String(format: "FP32 %.4f, full PTQ (%@) %.4f on val", fp32, calibrationMethod.description, fullPTQ))

        // MARK: - 5 Evaluate: the sensitivity of every layer
        // Quantize layer l alone; outputs o_q = the deployed model's outputs on the batch (per
        // anchor: decoded box cx, cy, w, h in pixels and sigmoid class scores), [32, A*(4+C)], vs FP32 o_f:
        //   MSE = mean (o_q - o_f)^2, SNR = mean_b |o_q - o_f|^2 / |o_f|^2, cosine = mean_b <o_q, o_f> / |o_q||o_f|;
        // mAP method: mAP of the same model on the ranking split.
        let batch = try detectionCalibrationBatches(train, inputSize: model.config.inputSize, plan: CalibrationPlan(batches: 1, batchSize: 32, seed: seed &+ 1))[0]
        let sensitivity = try measureSensitivity(sim, model: "det-\(block)\(quick ? "-quick" : "")", calibration: "\(calibrationMethod), 4 x 32, seed \(seed)",
                                                 batch: batch, outputs: { model.outputs(outputKind, $0) },
                                                 mAP: { try evaluateDetector(model, on: ranking).0.mAP })
        var results = Exp03Results(fp32mAP: fp32, fullPTQmAP: fullPTQ, sensitivity: sensitivity)
        results.seconds = .init(outputMetrics: sensitivity.layers.reduce(0) { $0 + $1.outputSeconds },
                                mapMethod: sensitivity.layers.reduce(0) { $0 + ($1.mapSeconds ?? 0) })

        // Partial PTQ: every layer quantized except the top k of a ranking; val mAP.
        func partialPTQ(skipping layers: [String], label: String) throws -> Double {
            try sim.setEnabled(true)
            try sim.setEnabled(false, layers: layers)
            defer { try? sim.setEnabled(true) }
            return try evaluateDetector(model, on: val, progressLabel: label).0.mAP
        }
        let ks = Array(Set([1, 2, 4, topK, 8, 12, 16].filter { $0 <= sensitivity.allLayers.count })).sorted()
        for metric in SensitivityMetric.allCases {
            let order = sensitivity.ranking(by: metric)
            for k in ks {
                results.partialPTQ[metric.rawValue, default: [:]][String(k)] = try partialPTQ(skipping: Array(order.prefix(k)), label: "partial PTQ \(metric.label) k=\(k)")
            }
        }

        // Agreement of each cheap metric with the mAP method: Spearman ρ and Kendall τ-b of the
        // per-layer sensitivities, and how many of the mAP method's top k it also ranks top k.
        let topMAP = Set(sensitivity.ranking(by: .map).prefix(topK))
        for m in [SensitivityMetric.mse, .snr, .cosine] {
            results.agreement[m.rawValue] = .init(spearman: Statistics.spearman(results.values(m), results.values(.map)),
                                                  kendall: Statistics.kendallTau(results.values(m), results.values(.map)),
                                                  topKOverlap: topMAP.intersection(sensitivity.ranking(by: m).prefix(topK)).count)
        }

        // Which outputs MSE compares matters: the same sweep (output metrics only) over each
        // output definition, its MSE ranking against the mAP method's, partial PTQ with its top k.
        for kind in DetectorOutputs.allCases {
            let sweep = kind == outputKind ? sensitivity
                : try measureSensitivity(sim, model: sensitivity.model, calibration: sensitivity.calibration, batch: batch, outputs: { model.outputs(kind, $0) })
            let mseByName = Dictionary(uniqueKeysWithValues: sweep.layers.map { ($0.name, $0.mse) })
            let top = Array(sweep.ranking(by: .mse).prefix(topK))
            let mAP = kind == outputKind ? results.partial(.mse, k: topK) : try partialPTQ(skipping: top, label: "partial PTQ MSE(\(kind.rawValue)) k=\(topK)")
            results.mseByOutputs[kind.rawValue] = .init(spearmanVsMAP: Statistics.spearman(sensitivity.layers.map { mseByName[$0.name] ?? .nan }, results.values(.map)),
                                                        topKOverlap: topMAP.intersection(top).count, partialPTQmAP: mAP, topK: top)
        }

        // MARK: - 6 Report
        let partialVerdict = exp03Verdict(results, topK: topK, quick: quick), mseVerdict = exp03MSEStandsIn(results, topK: topK, quick: quick)
        (results.verdict, results.mseStandsIn) = (partialVerdict.text, mseVerdict.text)
        results.claims = [exp03Claim(results, topK: topK, partial: partialVerdict, mse: mseVerdict)]
        var provenance = Provenance.current()
        provenance.seeds = ["calibration, sensitivity batch, ranking split": seed]
        provenance.config = ["quick": String(quick), "block": block, "outputs": outputs, "calibrator": calibrationMethod.description, "top-k": String(topK),
                             "ranking images": String(ranking.count), "dataset": plan.detectionPreset.name]
        provenance.wallSeconds = Date().timeIntervalSince(start)
        results.provenance = provenance.summary
        let report = Exp03Report(results: results, block: block, calibrationMethod: calibrationMethod, outputs: outputKind, topK: topK, ks: ks,
                                 rankingImages: ranking.count, valImages: val.count, quick: quick, provenance: provenance)
        try report.writeFigures()
        let path = try writeResults(name: "exp03", quick: quick, markdown: report.markdown, results: results)
        print("\n\(results.verdict)\n\(results.mseStandsIn)\nwrote \(path.path)")
    }
}

lineBufferStandardOutput() // progress and results reach a log file as they happen
Exp03.main()
