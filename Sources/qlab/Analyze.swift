import ArgumentParser
import Foundation
import QuantLab

struct Analyze: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "analyze",
        abstract: "Quantization analysis of a trained model: per-layer weight and activation statistics, calibrator amax, weight SQNR, histograms.",
        discussion: """
        Reads a model.safetensors written by `qlab train`, `qlab train-cls` or `make models`, converts it to its deploy form \
        (blocks fused, BN folded: what an INT8 engine quantizes, use --train-form to skip), runs calibration batches of \
        training images through it and writes OUT/analysis.md, OUT/analysis.json and one SVG per layer in OUT/histograms/.
        """)

    @Option(help: "The model file (model.safetensors).") var model: String
    @Option(help: "Dataset folder in COCO layout (default: data/shapes for detectors, data/shapes-cls for classifiers).") var data: String?
    @Option(help: "Calibration batches.") var batches = 4
    @Option(help: "Calibration batch size.") var batchSize = 32
    @Option(help: "Seed for drawing calibration images.") var seed: UInt64 = 0
    @Flag(help: "Analyse the train-time form instead of the deploy form.") var trainForm = false
    @Option(help: "Output folder (default: runs/analysis/<model folder name>).") var out: String?

    func validate() throws {
        guard batches >= 1, batchSize >= 1 else { throw ValidationError("--batches and --batch-size must be at least 1") }
    }

    func run() throws {
        let (url, saved) = try loadSavedModel(model)
        let module = saved.module
        if !trainForm { module.convertToDeployForm() }
        let plan = CalibrationPlan(batches: batches, batchSize: batchSize, seed: seed)
        let calibration: [Tensor]
        switch saved {
        case .detector(let m):
            let train = try DetectionDataset(root: URL(fileURLWithPath: data ?? "data/shapes"), split: "train2017")
            calibration = try detectionCalibrationBatches(train, inputSize: m.config.inputSize, plan: plan)
        case .classifier(let m):
            let train = try ClassificationDataset(root: URL(fileURLWithPath: data ?? "data/shapes-cls"), split: "train2017")
            calibration = try classificationCalibrationBatches(train, inputSize: m.config.inputSize, plan: plan)
        case .rtdetr(let m):
            let train = try DetectionDataset(root: URL(fileURLWithPath: data ?? "data/shapes"), split: "train2017")
            calibration = try detectionCalibrationBatches(train, inputSize: m.config.inputSize, plan: plan, resize: .stretch)
        }
        print("analysing \(saved.kindName), \(trainForm ? "train-time" : "deploy") form, on \(plan.images) images")
        let layers = try analyzeQuantization(module, batches: calibration) { x in
            switch saved {
            case .detector(let m): _ = m(x)
            case .classifier(let m): _ = m(x)
            case .rtdetr(let m): _ = m(x)
            }
        }
        let outDir = URL(fileURLWithPath: out ?? "runs/analysis/\(url.deletingLastPathComponent().lastPathComponent)")
        for l in layers { try SVG.write(l.figure, to: outDir.appendingPathComponent("histograms").appendingPathComponent(l.figureFileName)) }
        let md = """
        # Quantization analysis: \(saved.kindName)

        Model `\(url.path)`, \(trainForm ? "train-time" : "deploy") form; statistics of each layer's weight and of its input activation over \(plan.images) training images (seed \(seed)). Kurtosis is excess kurtosis (0 for a normal distribution); ">3σ" is the share of values more than 3 standard deviations from the mean (0.27% for a normal distribution); SQNR is the signal-to-noise ratio of INT8 weight quantization. Histograms: `histograms/<layer>.svg`.

        \(LayerAnalysis.markdownTable(layers))
        """
        try AtomicFile.write(Data(md.utf8), to: outDir.appendingPathComponent("analysis.md"))
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.prettyPrinted, .sortedKeys]
        encoder.nonConformingFloatEncodingStrategy = .convertToString(positiveInfinity: "inf", negativeInfinity: "-inf", nan: "nan")
        try AtomicFile.write(encoder.encode(layers), to: outDir.appendingPathComponent("analysis.json"))
        print("\(layers.count) layers; wrote \(outDir.path)/analysis.md, analysis.json and histograms/")
    }
}
