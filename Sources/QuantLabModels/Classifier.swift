import Foundation
import QuantLabCore
import QuantLabData

/// A small RepVGG-style classifier (RepVGG-A proportions, narrower): stage0 (one stride-2
/// block), stage1...stage4 (first block stride 2), global average pooling, `linear`.
/// Names follow DingXiaoH/RepVGG: stage0, stage1.0, ..., linear.
public final class RepClassifier: Module, Layer {
    public struct Config: Codable, Equatable, Sendable {
        public var block: BlockKind
        public var numClasses: Int
        public var inputSize: Int
        public var widths: [Int]
        public var depths: [Int]

        public init(block: BlockKind, numClasses: Int, inputSize: Int = 64, widths: [Int] = [16, 24, 48, 96, 192], depths: [Int] = [1, 2, 4, 6, 1]) {
            require(widths.count == 5 && depths.count == 5 && depths[0] == 1, "classifier: 5 stages, stage0 has one block")
            self.block = block
            self.numClasses = numClasses
            self.inputSize = inputSize
            self.widths = widths
            self.depths = depths
        }

        /// Checks every field against sane ranges before anything is allocated (a model file's
        /// metadata is input); throws a message naming the field, its value and the range.
        public func validate() throws {
            try checkField((1...10_000).contains(numClasses), "numClasses", numClasses, "1...10000")
            try checkField((32...1024).contains(inputSize) && inputSize % 32 == 0, "inputSize", inputSize, "a multiple of 32 in 32...1024")
            try checkField(widths.count == 5 && widths.allSatisfy { (1...2048).contains($0) }, "widths", widths, "5 values in 1...2048")
            try checkField(depths.count == 5 && depths[0] == 1 && depths.allSatisfy { (1...64).contains($0) }, "depths", depths, "5 values in 1...64, the first 1")
        }

        /// A smaller variant for QUICK=1 runs and tests.
        public static func tiny(block: BlockKind, numClasses: Int, inputSize: Int = 64) -> Config {
            Config(block: block, numClasses: numClasses, inputSize: inputSize, widths: [8, 16, 16, 32, 32], depths: [1, 1, 1, 2, 1])
        }
    }

    public let config: Config
    public let stages: [Sequential]
    public let linear: Linear

    public init(_ config: Config, rng: inout SeededGenerator) {
        self.config = config
        var stages: [Sequential] = []
        var cin = 3
        for (i, (w, d)) in zip(config.widths, config.depths).enumerated() {
            // RepOpt's hyper-search initialises branch scales to 1 in the first block, sqrt(2/l) later
            let blocks: [any Layer] = (0..<d).map { j in
                let layerIndex = stages.reduce(0) { $0 + $1.layers.count } + j + 1
                let scaleInit: Float = layerIndex == 1 ? 1 : (2 / Float(layerIndex)).squareRoot()
                return makeRepBlock(config.block, j == 0 ? cin : w, w, stride: j == 0 ? 2 : 1, scaleInit: scaleInit, rng: &rng)
            }
            stages.append(Sequential(blocks))
            cin = w
            _ = i
        }
        self.stages = stages
        linear = Linear(config.widths[4], config.numClasses, rng: &rng)
        super.init()
        registerModule("stage0", stages[0].layers[0])
        for i in 1..<5 { registerModule("stage\(i)", stages[i]) }
        registerModule("linear", linear)
    }

    public func callAsFunction(_ x: Tensor) -> Tensor {
        linear(globalAvgPool2d(stages.reduce(x) { $1($0) }))
    }
}

/// Images and labels of a classification dataset stored in COCO layout with one object per
/// image (the synthetic `shapes-cls`): the label is the category of the image's largest
/// annotation. An image without annotations is an error that names it.
public struct ClassificationDataset: Sendable {
    public let detection: DetectionDataset
    public let labels: [Int]

    public init(root: URL, split: String) throws {
        detection = try DetectionDataset(root: root, split: split)
        var labels: [Int] = []
        for i in 0..<detection.count {
            guard let best = detection.labels(i).max(by: { $0.box.area < $1.box.area }) else {
                throw COCOFormatError("\(detection.imageURL(i).path): no annotation, so no class label")
            }
            labels.append(best.classIndex)
        }
        self.labels = labels
    }

    public var count: Int { labels.count }
    public var classCount: Int { detection.classCount }

    /// A batch [B, 3, S, S] with labels; with `augment`, random flip and a small zoom/shift.
    public func batch(_ indices: [Int], size: Int, augment: Bool, seed: UInt64) throws -> (Tensor, [Int]) {
        var t = DetectionTransform(size: size, resize: .stretch, augment: augment)
        t.scaleRange = 0.9...1.1
        t.translate = 0.05
        t.hsvGains = (0.01, 0.3, 0.2)
        let images = Tensor(zeros: [indices.count, 3, size, size])
        for (k, i) in indices.enumerated() {
            var rng = SeededGenerator(seed: seed ^ UInt64(i) &* 0x9E37_79B9_7F4A_7C15)
            let (image, _) = try detection.sample(i)
            let (x, _, _) = t.apply(image, labels: [], rng: &rng)
            (images.data + k * 3 * size * size).update(from: x.data, count: 3 * size * size)
        }
        return (images, indices.map { labels[$0] })
    }
}

/// Trains a classifier with SGD + Nesterov momentum, warm-up + cosine, EMA; returns the
/// top-1 accuracy of the EMA weights on `val`. `decayForm` .repvggCustomL2 decays each
/// RepVGG block's equivalent kernel instead of its branch kernels (RepVGGRegularization.swift).
public func trainClassifier(_ model: RepClassifier, train: ClassificationDataset, val: ClassificationDataset, epochs: Int, batchSize: Int = 64,
                            learningRate: Float = 0.1, weightDecay: Float = 1e-4, decayForm: WeightDecayForm = .plain, seed: UInt64,
                            masks: [(Tensor, Tensor)] = [], log: (String) -> Void = { print($0) }) throws -> (accuracy: Double, ema: RepClassifier) {
    let groups = model.parameterGroups(weightDecay: weightDecay, form: decayForm)
    let optimizer: any Optimizer = masks.isEmpty
        ? SGD(groups, learningRate: learningRate, momentum: 0.9, nesterov: true)
        : RepOptSGD(groups, masks: masks, learningRate: learningRate, momentum: 0.9, nesterov: true)
    let steps = max(train.count / batchSize, 1)
    let schedule = WarmupCosineSchedule(base: learningRate, warmupSteps: min(steps, epochs * steps), totalSteps: epochs * steps)
    let ema = ModelEMA(model, decay: 0.999, tau: 200)
    let progress = Progress(total: epochs * steps, label: "train classifier \(model.config.block.rawValue)", unit: "step")
    model.train()
    var step = 0
    for epoch in 0..<epochs {
        var rng = SeededGenerator(seed: seed ^ UInt64(epoch) &* 0xD1B5_4A32_D192_ED03)
        var order = Array(0..<train.count)
        order.shuffle(using: &rng)
        for b in 0..<steps {
            let (x, y) = try train.batch(Array(order[(b * batchSize)..<((b + 1) * batchSize)]), size: model.config.inputSize, augment: true,
                                         seed: seed ^ UInt64(epoch) << 32)
            optimizer.learningRate = schedule.learningRate(at: step)
            let loss = crossEntropy(logits: model(x), targets: y)
            guard loss.item().isFinite else {
                throw NonFiniteError("step \(step + 1) (epoch \(epoch + 1)): the loss is \(loss.item()); training stopped (lower the learning rate, now \(optimizer.learningRate))")
            }
            optimizer.zeroGrad()
            loss.backward()
            if decayForm == .repvggCustomL2 { model.addCustomL2Gradients(weightDecay: weightDecay) }
            optimizer.step()
            ema.update(from: model)
            step += 1
            progress.update(step, String(format: "loss %.3f", loss.item()))
        }
    }
    progress.finish()
    var rng = SeededGenerator(seed: 0)
    let averaged = RepClassifier(model.config, rng: &rng)
    try ema.copy(into: averaged)
    return (try top1(averaged, on: val), averaged)
}

/// Top-1 accuracy over a dataset (eval mode, no augmentation).
/// `forward` replaces the model's own forward pass (an engine running its compiled graph).
public func top1(_ model: RepClassifier, on data: ClassificationDataset, batchSize: Int = 100,
                 forward: ((Tensor) throws -> Tensor)? = nil) throws -> Double {
    if let bad = model.firstNonFiniteValue() {
        throw NonFiniteError("the classifier's \(bad.name)[\(bad.index)] is not finite: its top-1 would mean nothing (was it trained with too large a learning rate?)")
    }
    let wasTraining = model.isTraining
    model.eval()
    defer { model.train(wasTraining) }
    var correct = 0
    for start in stride(from: 0, to: data.count, by: batchSize) {
        let idx = Array(start..<min(start + batchSize, data.count))
        let (x, y) = try data.batch(idx, size: model.config.inputSize, augment: false, seed: 0)
        let logits = try forward?(x) ?? withNoGrad { model(x) }
        let c = logits.shape[1]
        for (k, label) in y.enumerated() {
            let row = logits.data + k * c
            var best = 0
            for j in 1..<c where row[j] > row[best] { best = j }
            if best == label { correct += 1 }
        }
    }
    return Double(correct) / Double(max(data.count, 1))
}
