import ArgumentParser
import Foundation
import QuantLab

struct TrainClassifier: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "train-cls",
        abstract: "Train the RepVGG-style classifier (FP32) on a one-object-per-image COCO-layout dataset.",
        discussion: "--block repopt runs the hyper-search stage first (--search-epochs), as `qlab train` does.")

    @Option(help: "Dataset folder.") var data = "data/shapes-cls"
    @Option(help: "Block: repvgg, qarepvgg, repopt.") var block = "repvgg"
    @Option(help: "Model size: small or tiny.") var size = "small"
    @Option(help: "Epochs.") var epochs = 20
    @Option(help: "Epochs of RepOpt's hyper-search stage.") var searchEpochs = 5
    @Option(help: "Batch size.") var batch = 64
    @Option(help: "Base learning rate.") var lr: Float = 0.1
    @Option(help: "Seed.") var seed: UInt64 = 0
    @Option(help: "Output folder.") var out: String

    func validate() throws {
        guard let kind = BlockKind(rawValue: block), kind != .repoptSearch else { throw ValidationError("--block must be repvgg, qarepvgg or repopt, got '\(block)'") }
        guard ["small", "tiny"].contains(size) else { throw ValidationError("--size must be small or tiny, got '\(size)'") }
        guard (1...10_000).contains(epochs), (1...10_000).contains(searchEpochs) else { throw ValidationError("--epochs and --search-epochs must be in 1...10000, got \(epochs) and \(searchEpochs)") }
        guard (1...4096).contains(batch) else { throw ValidationError("--batch must be in 1...4096, got \(batch)") }
        guard lr.isFinite, lr > 0, lr <= 10 else { throw ValidationError("--lr must be in (0, 10], got \(lr)") }
    }

    func run() throws {
        try requireWritableFolder(out, flag: "--out")
        let root = URL(fileURLWithPath: data)
        let train = try ClassificationDataset(root: root, split: "train2017"), val = try ClassificationDataset(root: root, split: "val2017")
        let kind = BlockKind(rawValue: block)!
        func config(_ k: BlockKind) -> RepClassifier.Config {
            size == "small" ? RepClassifier.Config(block: k, numClasses: train.classCount) : .tiny(block: k, numClasses: train.classCount)
        }
        var rng = SeededGenerator(seed: seed)
        let model = RepClassifier(config(kind), rng: &rng)
        var masks: [(Tensor, Tensor)] = []
        if kind == .repopt {
            var searchRng = SeededGenerator(seed: seed &+ 1)
            let search = RepClassifier(config(.repoptSearch), rng: &searchRng)
            print("RepOpt stage 1: hyper-search (\(searchEpochs) epochs)")
            let (acc, averaged) = try trainClassifier(search, train: train, val: val, epochs: searchEpochs, batchSize: batch, learningRate: lr, seed: seed &+ 1)
            print(String(format: "hyper-search model top-1 %.2f%%", 100 * acc))
            masks = try model.initializeRepOpt(from: averaged.repOptScales(), rng: &rng)
        }
        print("\(block) classifier: \(model.parameterCount) parameters, \(train.count) training images")
        let (accuracy, averaged) = try trainClassifier(model, train: train, val: val, epochs: epochs, batchSize: batch, learningRate: lr, seed: seed, masks: masks)
        let outDir = URL(fileURLWithPath: out)
        try averaged.save(to: outDir.appendingPathComponent("model.safetensors"), metadata: SavedModel.metadata(for: averaged).merging(["top1": String(accuracy)]) { $1 })
        // train top-1 without augmentation: tells under-fitting (both low) from over-fitting (train high)
        print(String(format: "val top-1 %.2f%%, train top-1 %.2f%% (EMA weights, no augmentation)", 100 * accuracy, 100 * (try top1(averaged, on: train))))
    }
}
