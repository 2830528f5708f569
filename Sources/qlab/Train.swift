import ArgumentParser
import Foundation
import QuantLab

struct Train: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Train a YOLOv6-style detector or an RT-DETR-lite (FP32) on a COCO-layout dataset.",
        discussion: """
        --model rtdetr trains RT-DETR-lite (--size lite or tiny; AdamW, Hungarian-matched set loss; \
        images stretched to the input size). For YOLOv6, --block repopt runs RepOpt's two stages: a hyper-search model of LinearAddBlocks first \
        (--search-epochs, saved under OUT/search), then the plain RealVGG model initialised from \
        the learned scales and trained with RepOptSGD. Training resumes from OUT if a checkpoint is there.
        """)

    @Option(help: "Dataset folder in COCO layout.") var data = "data/shapes"
    @Option(help: "Model: yolov6 or rtdetr.") var model = "yolov6"
    @Option(help: "Block: repvgg, qarepvgg, repopt (RT-DETR: the CSPRep layers' block).") var block = "repvgg"
    @Option(help: "Model size: nano (YOLOv6-N proportions) or tiny; for rtdetr, lite or tiny.") var size: String?
    @Option(help: "Input size (multiple of 32).") var inputSize: Int?
    @Option(help: "Epochs.") var epochs = 30
    @Option(help: "Epochs of RepOpt's hyper-search stage.") var searchEpochs = 10
    @Option(help: "Batch size.") var batch = 32
    @Option(help: "Base learning rate (default: SGD 0.02 for yolov6, AdamW 5e-4 for rtdetr).") var lr: Float?
    @Option(help: "Evaluate every N epochs.") var evalEvery = 5
    @Option(help: "Checkpoint every N steps (and at every epoch's end).") var checkpointEvery = 200
    @Option(help: "Seed for initialisation, data order and augmentation.") var seed: UInt64 = 0
    @Option(help: "Output folder (checkpoints, final weights, history).") var out: String

    func validate() throws {
        guard let kind = BlockKind(rawValue: block), kind != .repoptSearch else { throw ValidationError("--block must be repvgg, qarepvgg or repopt, got '\(block)'") }
        guard ["yolov6", "rtdetr"].contains(model) else { throw ValidationError("--model must be yolov6 or rtdetr, got '\(model)'") }
        if model == "rtdetr" {
            guard BlockKind(rawValue: block) != .repopt else { throw ValidationError("--block repopt needs RepOpt's two-stage training, which qlab train runs for yolov6 only") }
            guard ["lite", "tiny"].contains(size ?? "lite") else { throw ValidationError("--size for rtdetr must be lite or tiny, got '\(size!)'") }
        } else {
            guard ["nano", "tiny"].contains(size ?? "nano") else { throw ValidationError("--size must be nano or tiny, got '\(size!)'") }
        }
        if let s = inputSize, s <= 0 || s % 32 != 0 { throw ValidationError("--input-size must be a positive multiple of 32, got \(s)") }
        guard (1...10_000).contains(epochs), (1...10_000).contains(searchEpochs) else { throw ValidationError("--epochs and --search-epochs must be in 1...10000, got \(epochs) and \(searchEpochs)") }
        guard (1...4096).contains(batch) else { throw ValidationError("--batch must be in 1...4096, got \(batch)") }
        if let lr { guard lr.isFinite, lr > 0, lr <= 10 else { throw ValidationError("--lr must be in (0, 10], got \(lr)") } }
        guard checkpointEvery >= 1 else { throw ValidationError("--checkpoint-every must be at least 1 (steps), got \(checkpointEvery)") }
        guard evalEvery >= 1 else { throw ValidationError("--eval-every must be at least 1 (epochs), got \(evalEvery)") }
    }

    func run() throws {
        try requireWritableFolder(out, flag: "--out")
        let root = URL(fileURLWithPath: data)
        let trainSet = try DetectionDataset(root: root, split: "train2017")
        let valSet = try DetectionDataset(root: root, split: "val2017")
        let kind = BlockKind(rawValue: block)!
        let outDir = URL(fileURLWithPath: out)
        if model == "rtdetr" { return try trainRTDETR(trainSet, valSet, kind, outDir) }
        let size = self.size ?? "nano"
        var cfg = DetectorTrainingConfig()
        cfg.checkpointEverySteps = checkpointEvery
        cfg.epochs = epochs
        cfg.batchSize = batch
        cfg.learningRate = lr ?? cfg.learningRate
        cfg.seed = seed
        cfg.evaluateEvery = evalEvery
        func modelConfig(_ k: BlockKind) -> YOLOv6Config {
            let s = inputSize ?? (size == "nano" ? 160 : 96)
            return size == "nano" ? .nano(block: k, numClasses: trainSet.classCount, inputSize: s) : .tiny(block: k, numClasses: trainSet.classCount, inputSize: s)
        }
        var rng = SeededGenerator(seed: seed)
        var masks: [(Tensor, Tensor)] = []
        let model = YOLOv6(modelConfig(kind), rng: &rng)
        let epochs = self.epochs
        if kind == .repopt {
            var searchRng = SeededGenerator(seed: seed &+ 1)
            let search = YOLOv6(modelConfig(.repoptSearch), rng: &searchRng)
            var searchCfg = cfg
            searchCfg.epochs = searchEpochs
            searchCfg.evaluateEvery = searchEpochs
            print("RepOpt stage 1: hyper-search (\(searchEpochs) epochs)")
            let stage1 = DetectorTrainer(model: search, train: trainSet, val: valSet, config: searchCfg, checkpointDir: outDir.appendingPathComponent("search"))
            try stage1.run()
            let scales = try stage1.emaModel().repOptScales()
            let encoder = JSONEncoder()
            encoder.outputFormatting = [.prettyPrinted, .sortedKeys]
            try AtomicFile.write(encoder.encode(scales), to: outDir.appendingPathComponent("repopt_scales.json"))
            masks = try model.initializeRepOpt(from: scales, rng: &rng)
            print("RepOpt stage 2: RealVGG model with RepOptSGD (\(masks.count) masked kernels)")
        }
        print("\(model.config.block.rawValue) detector: \(model.parameterCount) parameters, input \(model.config.inputSize), \(trainSet.count) training images")
        let trainer = DetectorTrainer(model: model, train: trainSet, val: valSet, config: cfg, checkpointDir: outDir.appendingPathComponent("checkpoint"), masks: masks)
        let result = try trainer.run()
        let final = try trainer.emaModel()
        try final.save(to: outDir.appendingPathComponent("model.safetensors"), metadata: SavedModel.metadata(for: final).merging(["epochs": String(epochs)]) { $1 })
        if let result { print(result.summary) }
    }

    /// RT-DETR-lite: AdamW, the set loss, EMA; evaluation of the EMA model at the end. No
    /// mid-run checkpoints (a run is minutes to tens of minutes).
    func trainRTDETR(_ trainSet: DetectionDataset, _ valSet: DetectionDataset, _ kind: BlockKind, _ outDir: URL) throws {
        let s = inputSize ?? (size == "tiny" ? 96 : 160)
        var config = size == "tiny" ? RTDETRConfig.tiny(numClasses: trainSet.classCount, inputSize: s) : RTDETRConfig.lite(numClasses: trainSet.classCount, inputSize: s)
        config.block = kind
        try config.validate()
        var cfg = RTDETRTrainingConfig()
        cfg.epochs = epochs
        cfg.batchSize = batch
        cfg.learningRate = lr ?? cfg.learningRate
        cfg.seed = seed
        var rng = SeededGenerator(seed: seed)
        let detr = RTDETR(config, rng: &rng)
        print("RT-DETR-lite: \(detr.parameterCount) parameters, input \(s), \(config.queries) queries, \(trainSet.count) training images")
        let trainer = RTDETRTrainer(model: detr, train: trainSet, config: cfg)
        try trainer.run()
        let final = try trainer.emaModel()
        try final.save(to: outDir.appendingPathComponent("model.safetensors"), metadata: SavedModel.metadata(for: final).merging(["epochs": String(epochs)]) { $1 })
        let (result, _) = try evaluateRTDETR(final, on: valSet, progressLabel: "eval")
        print(result.summary)
    }
}
