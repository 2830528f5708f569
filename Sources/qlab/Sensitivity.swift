import ArgumentParser
import Foundation
import QuantLab

struct SensitivityCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "sensitivity",
        abstract: "Per-layer quantization sensitivity of a detector (MSE, SNR, cosine, mAP method), shardable.",
        subcommands: [SensitivityRun.self, SensitivityMerge.self],
        defaultSubcommand: SensitivityRun.self)
}

struct SensitivityRun: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "run",
        abstract: "Measure every quantizable layer (or one shard of them) and write the table.",
        discussion: """
        Quantizes one layer at a time (all others FP32) after PTQ calibration, and compares the model's outputs on one batch \
        with FP32 (MSE, SNR, cosine) and, unless --no-map, its mAP on a ranking split drawn from the training images. \
        With --shard i/n only layers i, i+n, i+2n, ... are measured and OUT/sensitivity-shard-i-of-n.json is written; \
        `qlab sensitivity merge` joins the shards into the same table one run would give.
        """)

    @Option(help: "The detector (model.safetensors).") var model: String
    @Option(help: "Dataset folder in COCO layout (training images for calibration, the sensitivity batch and the ranking split).") var data = "data/shapes"
    @Option(help: "Calibrator for activations.") var method = "entropy"
    @Option(help: "Calibration batches.") var calibrationBatches = 4
    @Option(help: "Batch size (calibration and the sensitivity batch).") var batchSize = 32
    @Option(help: "Images in the ranking split of the mAP method.") var rankingImages = 250
    @Flag(help: "Skip the mAP method (output metrics only: much faster).") var noMap = false
    @Option(help: "Seed for calibration, sensitivity batch and ranking split.") var seed: UInt64 = 0
    @Option(help: "Measure only shard i of n (0-based), e.g. 0/4.") var shard: String?
    @Option(help: "Outputs compared: inference (decoded boxes + sigmoid scores) raw (class logits + distances) or scores (sigmoid class scores only).") var outputs = "inference"
    @Option(help: "Output folder.") var out = "runs/sensitivity"

    func validate() throws {
        guard calibrationBatches >= 1, batchSize >= 1, rankingImages >= 1 else {
            throw ValidationError("--calibration-batches, --batch-size and --ranking-images must be at least 1")
        }
        do { _ = try CalibrationMethod(parsing: method) } catch { throw ValidationError("--method: \(error)") }
        if let shard { do { _ = try Shard(parsing: shard) } catch { throw ValidationError("--shard: \(error)") } }
        do { _ = try DetectorOutputs(parsing: outputs) } catch { throw ValidationError("--outputs: \(error)") }
    }

    func run() throws {
        let (url, saved) = try loadSavedModel(model)
        guard case .detector(let detector) = saved else { throw ValidationError("--model: \(url.path) is not a detector") }
        let train = try DetectionDataset(root: URL(fileURLWithPath: data), split: "train2017")
        let calibrationMethod = try CalibrationMethod(parsing: method)
        let outputKind = try DetectorOutputs(parsing: outputs)
        let part = try shard.map { try Shard(parsing: $0) } ?? .all
        let calibration = CalibrationPlan(batches: calibrationBatches, batchSize: batchSize, seed: seed)
        let sim = try prepareDetectorPTQ(detector, train: train, method: calibrationMethod, calibration: calibration)
        let batch = try detectionCalibrationBatches(train, inputSize: detector.config.inputSize,
                                                    plan: CalibrationPlan(batches: 1, batchSize: batchSize, seed: seed &+ 1))[0]
        let ranking = noMap ? nil : try rankingSplit(train, images: rankingImages, seed: seed)
        let report = try measureSensitivity(sim, model: url.path, calibration: "\(calibrationMethod), \(calibration.batches) x \(calibration.batchSize), seed \(seed), \(outputs) outputs",
                                            shard: part, batch: batch, outputs: { detector.outputs(outputKind, $0) },
                                            mAP: ranking.map { r in { try evaluateDetector(detector, on: r).0.mAP } })
        let outDir = URL(fileURLWithPath: out)
        let name = part.count == 1 ? "sensitivity" : "sensitivity-shard-\(part.index)-of-\(part.count)"
        try report.write(to: outDir.appendingPathComponent("\(name).json"))
        try AtomicFile.write(Data(("# Layer sensitivity (\(part.count == 1 ? "all layers" : "shard \(part)"))\n\n" + report.markdown).utf8),
                             to: outDir.appendingPathComponent("\(name).md"))
        print("\(report.layers.count) of \(report.allLayers.count) layers; wrote \(outDir.path)/\(name).json and .md")
    }
}

struct SensitivityMerge: ParsableCommand {
    static let configuration = CommandConfiguration(commandName: "merge", abstract: "Join shard files into one sensitivity table.")

    @Argument(help: "Shard files (sensitivity-shard-*.json).") var shards: [String]
    @Option(help: "Output folder.") var out = "runs/sensitivity"

    func validate() throws {
        guard !shards.isEmpty else { throw ValidationError("give at least one shard file") }
    }

    func run() throws {
        let merged = try SensitivityReport.merge(shards.map { try SensitivityReport.read(URL(fileURLWithPath: $0)) })
        let outDir = URL(fileURLWithPath: out)
        try merged.write(to: outDir.appendingPathComponent("sensitivity.json"))
        try AtomicFile.write(Data(("# Layer sensitivity (merged from \(shards.count) shards)\n\n" + merged.markdown).utf8),
                             to: outDir.appendingPathComponent("sensitivity.md"))
        print("merged \(shards.count) shards, \(merged.layers.count) layers; wrote \(outDir.path)/sensitivity.json and .md")
    }
}
