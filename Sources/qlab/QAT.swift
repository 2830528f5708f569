import ArgumentParser
import Foundation
import QuantLab

struct QATCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "qat",
        abstract: "Quantization-aware training of a saved detector: PTQ start, QAT (optionally partial, with CWD or LSQ), val mAP before and after.",
        discussion: """
        Converts the detector to its deploy form, calibrates its Q/DQ (--calibrator on 4 x 32 training images of --data), \
        leaves the layers of --skip in FP32, and fine-tunes with straight-through gradients (QATTrainer; exp04 runs the \
        same). --cwd distils from the FP32 model on the three neck outputs (YOLOv6's weight 10); --lsq learns the steps. \
        --out writes the QAT'd model as a Q/DQ ONNX file (the amaxes in its scales), which `qlab engine --onnx` runs.
        """)

    @Option(help: "The detector file (model.safetensors).") var model: String
    @Option(help: "Dataset folder in COCO layout (default: data/shapes).") var data = "data/shapes"
    @Option(help: "Calibrator for the PTQ start.") var calibrator = "entropy"
    @Option(help: "Layers left in FP32, comma-separated (e.g. the top of `qlab sensitivity`).") var skip: String?
    @Option(help: "Epochs.") var epochs = 2
    @Option(help: "Training images per epoch (a seeded subset; default all).") var imagesPerEpoch: Int?
    @Option(help: "Batch size.") var batchSize = 32
    @Option(help: "Learning rate (QATConfig's default: YOLOv6's lr x steps budget over our ~100 steps).") var lr: Float = QATConfig().learningRate
    @Option(help: "Seed (data order, augmentation, subset).") var seed: UInt64 = 0
    @Flag(help: "Channel-wise distillation from the FP32 model (weight 10, YOLOv6's decay).") var cwd = false
    @Flag(help: "Learn the quantizers' steps (LSQ) instead of keeping the calibrated amax.") var lsq = false
    @Option(help: "Write the QAT'd model here as a Q/DQ ONNX file.") var out: String?

    func validate() throws {
        do { _ = try CalibrationMethod(parsing: calibrator) } catch { throw ValidationError("--calibrator: \(error)") }
        guard epochs >= 1, batchSize >= 1 else { throw ValidationError("--epochs and --batch-size must be at least 1") }
        guard lr >= 0, lr < 1 else { throw ValidationError("--lr must be in [0, 1)") }
    }

    func run() throws {
        let (url, saved) = try loadSavedModel(model)
        guard case .detector(let student) = saved else { throw ValidationError("--model: qat runs detectors; \(url.path) is a classifier") }
        let root = URL(fileURLWithPath: data)
        let (train, val) = (try DetectionDataset(root: root, split: "train2017"), try DetectionDataset(root: root, split: "val2017"))
        let fp32 = try evaluateDetector(student, on: val, progressLabel: "FP32").0.mAP
        let sim = try prepareDetectorPTQ(student, train: train, method: try CalibrationMethod(parsing: calibrator), calibration: CalibrationPlan(batches: 4, batchSize: 32, seed: 0))
        defer { sim.remove() }
        if let skip { try sim.setEnabled(false, layers: skip.split(separator: ",").map { $0.trimmingCharacters(in: .whitespaces) }) }
        let ptq = try evaluateDetector(student, on: val, progressLabel: "PTQ").0.mAP
        // the teacher: a second, FP32 copy of the same model (read only when distilling)
        var teacher: YOLOv6?
        if cwd, case .detector(let t) = try SavedModel.load(url) {
            t.eval()
            t.convertToDeployForm()
            teacher = t
        }
        var config = QATConfig()
        config.epochs = epochs
        config.batchSize = batchSize
        config.imagesPerEpoch = imagesPerEpoch
        config.learningRate = lr
        config.seed = seed
        config.cwdWeight = cwd ? 10 : 0
        config.lsq = lsq
        let trainer = try QATTrainer(model: student, simulator: sim, teacher: teacher, train: train, config: config)
        try trainer.run { try evaluateDetector($0, on: val).0.mAP }
        let after = try evaluateDetector(student, on: val, progressLabel: "QAT").0.mAP
        print(String(format: "val mAP: FP32 %.4f, PTQ %.4f, QAT %.4f (%d layers in FP32)", fp32, ptq, after, sim.layers.count - sim.enabledLayerNames.count))
        if let out {
            try ONNXExport.write(try Graph.trace(student, batch: 1), to: URL(fileURLWithPath: out), name: "qat-detector")
            print("wrote \(out) (Q/DQ ONNX; `qlab engine --onnx \(out)` runs it)")
        }
    }
}
