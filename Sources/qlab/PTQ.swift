import ArgumentParser
import Foundation
import QuantLab

struct PTQCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "ptq",
        abstract: "Post-training INT8 quantization of a trained model: FP32 vs INT8 accuracy for each calibrator.",
        discussion: """
        Converts the model to its deploy form (blocks fused, BN folded), installs Q/DQ at every conv / transposed conv / \
        linear (activations per tensor, weights per output channel), calibrates on --batches x --batch-size training images \
        and evaluates on the validation split: COCO mAP for a detector, top-1 for a classifier. Prints one line per \
        (seed, calibrator) and a JSON summary with --json.
        """)

    @Option(help: "The model file (model.safetensors).") var model: String
    @Option(help: "Dataset folder in COCO layout (default: data/shapes for detectors, data/shapes-cls for classifiers).") var data: String?
    @Option(help: "Calibrators, comma-separated (max, entropy, mse, percentile-<p>, moving-average).") var methods = "max,entropy,percentile-99.99,mse"
    @Option(help: "Calibration batches.") var batches = 4
    @Option(help: "Calibration batch size.") var batchSize = 32
    @Option(help: "Calibration seeds (which training images are drawn).") var seeds = 1
    @Flag(help: "Print a JSON summary at the end.") var json = false

    func validate() throws {
        guard batches >= 1, batchSize >= 1, seeds >= 1 else { throw ValidationError("--batches, --batch-size and --seeds must be at least 1") }
        for m in methods.split(separator: ",") {
            do { _ = try CalibrationMethod(parsing: String(m).trimmingCharacters(in: .whitespaces)) } catch { throw ValidationError("--methods: \(error)") }
        }
    }

    func run() throws {
        let url = URL(fileURLWithPath: model)
        guard FileManager.default.fileExists(atPath: url.path) else { throw ValidationError("--model: no file at \(url.path)") }
        let saved = try SavedModel.load(url)
        let methodList = try methods.split(separator: ",").map { try CalibrationMethod(parsing: String($0).trimmingCharacters(in: .whitespaces)) }
        let evaluate: () throws -> Double
        let calibration: (CalibrationPlan) throws -> [Tensor]
        let forward: (Tensor) -> Void
        switch saved {
        case .detector(let m):
            let root = URL(fileURLWithPath: data ?? "data/shapes")
            let train = try DetectionDataset(root: root, split: "train2017"), val = try DetectionDataset(root: root, split: "val2017")
            evaluate = { try evaluateDetector(m, on: val).0.mAP }
            calibration = { try detectionCalibrationBatches(train, inputSize: m.config.inputSize, plan: $0) }
            forward = { _ = m($0) }
        case .classifier(let m):
            let root = URL(fileURLWithPath: data ?? "data/shapes-cls")
            let train = try ClassificationDataset(root: root, split: "train2017"), val = try ClassificationDataset(root: root, split: "val2017")
            evaluate = { try top1(m, on: val) }
            calibration = { try classificationCalibrationBatches(train, inputSize: m.config.inputSize, plan: $0) }
            forward = { _ = m($0) }
        }
        let metric = { () -> String in if case .detector = saved { return "mAP" } else { return "top-1" } }()
        let fp32 = try evaluate()
        saved.module.convertToDeployForm()
        print(String(format: "%@: FP32 %@ %.4f", saved.kindName, metric, fp32))
        let sweep = try ptqSweep(saved.module, methods: methodList, seeds: (0..<UInt64(seeds)).map { $0 }, batches: batches, batchSize: batchSize,
                                 calibrationImages: calibration, forward: forward) { seed, method in
            let v = try evaluate()
            print(String(format: "seed %llu %@: INT8 %@ %.4f (%+.1f%%)", seed, method.description, metric, v, 100 * (v - fp32) / max(fp32, 1e-12)))
            return v
        }
        let results = Dictionary(uniqueKeysWithValues: sweep.map { ($0.key.description, $0.value) })
        if json {
            let data = try JSONSerialization.data(withJSONObject: ["fp32": fp32, "int8": results, "metric": metric], options: [.sortedKeys])
            print(String(decoding: data, as: UTF8.self))
        }
    }
}
