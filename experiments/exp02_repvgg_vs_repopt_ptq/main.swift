// exp02 — RepVGG vs RepOpt (and QARepVGG) under post-training quantization.
//
// Claims (CLAIMS.md):
//   A1  plain TensorRT PTQ of a re-parameterised net collapses: RepVGG-B1 ImageNet top-1
//       78.42% -> 54.55% (article); RepVGG-A0 72.4 -> 52.2 (QARepVGG paper).
//   A3  RepOpt keeps FP32 accuracy and fixes PTQ: YOLOv6s 42.4 mAP for both; PTQ RepVGG 35.0
//       (article; the YOLOv6 README says 35.6), RepOpt 40.9 (article; the YOLOv6 tutorial says
//       40.5). RepOpt-VGG-B1 78.47 -> 75.89 PTQ (RepOpt paper).
//   The report reads these numbers from Paper (Sources/QuantLabReport/PaperNumbers.swift).
//
// What we expect: fusing a RepVGG block's three branches adds their kernels (and BN scales)
// into one, widening the fused weight and activation distributions (exp01 measures that), so
// one INT8 scale per tensor wastes more of its 255 levels on RepVGG than on RepOpt, whose
// trained weights are already the deployed ones. The RepVGG detector should lose clearly more
// mAP under PTQ than the RepOpt one; QARepVGG, designed for quantization, should sit near
// RepOpt. On our small models the drops are smaller than the article's (fewer layers
// accumulate error), so the comparison is in relative terms.
//
// Protocol, as the article and pytorch-quantization: deploy form (blocks fused, BN folded),
// weights per-channel max, activations per tensor by each of four calibrators (max, entropy,
// percentile 99.99, MSE) on 4 batches x 32 training images; evaluation with fake quantization
// on the full validation split. Each calibration is repeated with 3 different seeds (which
// training images are drawn): mean and spread are reported. The primary calibrator's first
// seed is also run on the INT8 engine (integer kernels), which must give the simulator's metric.
//
// Files: main.swift (the pipeline), Results.swift (what is measured, the verdict),
// Report.swift (results/exp02.md).
//
// Run: `make exp02` (~5 minutes once the baselines exist; trains them first otherwise, ~1 h),
// `make exp02 QUICK=1` (tiny models, under 2 minutes; results/quick/).
import ArgumentParser
import Foundation
import QuantLab

struct Exp02: ParsableCommand {
    static let configuration = CommandConfiguration(commandName: "exp02_repvgg_vs_repopt_ptq",
                                                    abstract: "FP32 vs INT8 PTQ for RepVGG, QARepVGG and RepOpt detectors and classifiers, four calibrators, several calibration seeds.")

    @Flag(help: "Tiny models and data, results to results/quick/.") var quick = false
    @Option(help: "Calibration seeds (which training images are drawn).") var seeds = 3
    @Option(help: "Calibration batches.") var calibrationBatches = 4
    @Option(help: "Calibration batch size.") var calibrationBatchSize = 32
    @Option(help: "Calibrators, comma-separated (max, entropy, mse, percentile-<p>, moving-average).") var methods = "max,entropy,percentile-99.99,mse"
    @Flag(help: "Skip the classifier arm.") var skipClassifiers = false
    @Option(help: "Where datasets live.") var dataRoot = "data"
    @Option(help: "Where trained baselines are cached.") var modelsRoot = "data/models"

    func validate() throws {
        guard seeds >= 1, calibrationBatches >= 1, calibrationBatchSize >= 1 else {
            throw ValidationError("--seeds, --calibration-batches and --calibration-batch-size must be at least 1")
        }
        do { _ = try CalibrationMethod.parseList(methods) } catch { throw ValidationError("--methods: \(error)") }
    }

    func run() throws {
        let start = Date()
        let methods = try CalibrationMethod.parseList(self.methods)
        let primary: CalibrationMethod = methods.contains(.entropy) ? .entropy : methods[0]
        let plan = Baselines.Plan(quick: quick, dataRoot: URL(fileURLWithPath: dataRoot), modelsRoot: URL(fileURLWithPath: modelsRoot))
        var results = Exp02Results(primaryCalibrator: primary.description)

        // MARK: - 1 Data
        // Synthetic shapes in COCO layout: training images for calibration, val for the metric.
        let (detectionTrain, _) = try Baselines.detectionData(plan: plan)

        // MARK: - 2 Model, 3 Train or load
        // The FP32 baselines of exp00 (cached in data/models; trained now if missing).
        for block in Baselines.detectorBlocks {
            let (model, _, val) = try Baselines.detector(block, plan: plan)
            results.detectors[block.rawValue] = try quantizeAndEvaluate(.detector(model, train: detectionTrain, val: val, label: "det-\(block.rawValue)"), methods, primary: primary)
        }
        if !skipClassifiers {
            let (classificationTrain, _) = try Baselines.classificationData(plan: plan)
            for block in Baselines.classifierBlocks {
                let (model, _, val) = try Baselines.classifier(block, plan: plan)
                // Q/DQ also at the final linear layer (its input and per-row weight)
                results.classifiers[block.rawValue] = try quantizeAndEvaluate(.classifier(model, train: classificationTrain, val: val, label: "cls-\(block.rawValue)"), methods, primary: primary)
            }
        }

        // MARK: - 6 Report
        // Verdict: RepVGG's relative drop (FP32 − INT8) / FP32 against RepOpt's, with the noise
        // of the difference over seeds, set beside the paper's drops.
        let detectorVerdict = exp02Verdict(results.detectors, primary: primary, metric: "mAP", quick: quick, paper: .detector)
        results.verdict = detectorVerdict.text
        results.claims = [exp02Claim("A3", arms: results.detectors, primary: primary, paper: .detector, what: "detector", verdict: detectorVerdict)]
        if !skipClassifiers {
            let classifierVerdict = exp02Verdict(results.classifiers, primary: primary, metric: "top-1", quick: quick, paper: .classifier)
            results.classifierVerdict = classifierVerdict.text
            results.claims.append(exp02Claim("A1", arms: results.classifiers, primary: primary, paper: .classifier, what: "classifier", verdict: classifierVerdict))
        }
        var provenance = Provenance.current()
        provenance.seeds = Dictionary(uniqueKeysWithValues: calibrationSeeds.map { ("calibration \($0)", $0) })
        provenance.config = ["quick": String(quick), "methods": methods.map(\.description).joined(separator: ", "),
                             "calibration": "\(calibrationBatches) x \(calibrationBatchSize) training images",
                             "dataset": plan.detectionPreset.name, "models": plan.modelsRoot.path]
        provenance.wallSeconds = Date().timeIntervalSince(start)
        results.provenance = provenance.summary
        let report = Exp02Report(results: results, methods: methods, primary: primary, seeds: seeds,
                                 calibration: CalibrationPlan(batches: calibrationBatches, batchSize: calibrationBatchSize), quick: quick,
                                 provenance: provenance)
        let path = try writeResults(name: "exp02", quick: quick, markdown: report.markdown, results: results)
        print("\n\(results.verdict)\(results.classifierVerdict.map { "\n\($0)" } ?? "")\nwrote \(path.path)")
    }

    var calibrationSeeds: [UInt64] { (0..<seeds).map { UInt64($0) } }

    /// Steps 4 and 5 for one trained model.
    func quantizeAndEvaluate(_ model: PTQSubject, _ methods: [CalibrationMethod], primary: CalibrationMethod) throws -> Exp02Results.Arm {
        let fp32 = try model.evaluate("FP32 \(model.label)")

        // MARK: - 4 Quantize
        // Deploy form: each Rep block -> one 3x3 conv with bias, each conv+BN -> conv with bias;
        // it computes the same function, so its metric must equal FP32.
        model.module.eval()
        model.module.convertToDeployForm()
        let deployFP32 = try model.evaluate("FP32 deploy \(model.label)")
        // Q/DQ at every conv / linear input (per tensor) and weight (per output channel). Per
        // seed: calibration batches [32, 3, S, S] of training images drawn with that seed, and
        // per quantizer max|x|, a |x| histogram and the moving average. Per method: amax per
        // activation quantizer from those statistics, s = amax / 127, q = clamp(round(x / s), ±127).

        // MARK: - 5 Evaluate
        // The metric on the whole validation split, every conv fake-quantized (x -> s·q).
        let ptq = try ptqSweep(model, methods: methods, seeds: calibrationSeeds, batches: calibrationBatches, batchSize: calibrationBatchSize) { seed, method, int8 in
            print(String(format: "%@ %@ seed %llu: FP32 %.4f -> INT8 %.4f", model.label, method.description, seed, fp32, int8))
        }
        // The same PTQ on integer kernels: the primary calibrator, the first seed, run by the INT8
        // engine (convs fused with their quantizers: int8 codes in, s32 accumulation, int8 out).
        let engine = try checkEngine(model, method: primary, calibration: CalibrationPlan(batches: calibrationBatches, batchSize: calibrationBatchSize, seed: 0))
        print(String(format: "%@ %@ seed 0: simulator %.4f, INT8 engine %.4f", model.label, primary.description, engine.simulator, engine.engine))
        return Exp02Results.Arm(fp32: fp32, fp32Deploy: deployFP32, ptq: Dictionary(uniqueKeysWithValues: ptq.map { ($0.key.description, $0.value) }),
                                engine: engine)
    }
}

lineBufferStandardOutput() // progress and results reach a log file as they happen
Exp02.main()
