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
        do { _ = try CalibrationMethod.parseList(methods) } catch { throw ValidationError("--methods: \(error)") }
    }

    struct Summary: Encodable {
        var metric: String
        var fp32: Double
        var int8: [String: [Double]]
    }

    func run() throws {
        let (_, saved) = try loadSavedModel(model)
        let methodList = try CalibrationMethod.parseList(methods)
        let defaultData = { if case .detector = saved { return "data/shapes" } else { return "data/shapes-cls" } }()
        let subject = try PTQSubject.saved(saved, data: URL(fileURLWithPath: data ?? defaultData), label: saved.kindName)

        let fp32 = try subject.evaluate(nil)
        saved.module.convertToDeployForm()
        print(String(format: "%@: FP32 %@ %.4f", saved.kindName, subject.metric, fp32))
        let sweep = try ptqSweep(subject, methods: methodList, seeds: (0..<UInt64(seeds)).map { $0 }, batches: batches, batchSize: batchSize) { seed, method, v in
            print(String(format: "seed %llu %@: INT8 %@ %.4f (%+.1f%%)", seed, method.description, subject.metric, v, 100 * (v - fp32) / max(fp32, 1e-12)))
        }
        if json {
            let summary = Summary(metric: subject.metric, fp32: fp32, int8: Dictionary(uniqueKeysWithValues: sweep.map { ($0.key.description, $0.value) }))
            let encoder = JSONEncoder()
            encoder.outputFormatting = [.sortedKeys]
            print(String(decoding: try encoder.encode(summary), as: UTF8.self))
        }
    }
}
