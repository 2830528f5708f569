import Foundation
import QuantLabCore
import QuantLabData
import QuantLabModels

/// How QAT runs (YOLOv6's recipe, QAT.md, scaled to our detector and batch).
public struct QATConfig: Codable, Equatable, Sendable {
    public var epochs = 1
    public var batchSize = 32
    /// YOLOv6 fine-tunes at 1e-5 for ~9200 steps (10 COCO epochs at batch 128), a budget
    /// lr x steps of ~0.09; our runs are ~100 steps, so the same budget asks ~1e-3: 5e-4.
    public var learningRate: Float = 5e-4
    public var momentum: Float = 0.937
    public var weightDecay: Float = 5e-5
    /// Cosine decay to learningRate * finalLRFactor, no warm-up (YOLOv6's QAT config: lrf 0.001).
    public var finalLRFactor: Float = 0.001
    public var emaDecay: Float = 0.9999
    public var emaTau: Float = 2000
    public var gradientClip: Float? = 10
    /// Weight of the channel-wise distillation loss (YOLOv6: 10; 0 = no distillation).
    public var cwdWeight: Float = 0
    public var temperature: Float = 1
    /// Learn the quantizers' steps (LSQ) instead of keeping the calibrated amax frozen.
    public var lsq = false
    /// Train on this many training images per epoch (a seeded subset; nil = all).
    public var imagesPerEpoch: Int?
    public var seed: UInt64 = 0
    public var workers = 2

    public init() {}
}

/// Quantization-aware training of a deploy-form detector whose quantizers are installed and
/// calibrated (a `QuantizationSimulator` on it): straight-through gradients through the fake
/// quantizers (FakeQuant.swift), amax frozen or learned (LSQ), SGD with Nesterov momentum,
/// cosine decay without warm-up, an EMA of the weights, and optionally YOLOv6's channel-wise
/// distillation from a frozen FP32 teacher on the three neck outputs, weighted and decayed as
/// YOLOv6 does. Evaluation uses the EMA weights with the quantizers on.
public final class QATTrainer {
    public let model: YOLOv6
    public let simulator: QuantizationSimulator
    public let teacher: YOLOv6?
    public let config: QATConfig
    public private(set) var step = 0
    /// Val metric of the EMA weights after each epoch (when an evaluation is given).
    public private(set) var history: [Double] = []
    let loader: DetectionLoader
    let optimizer: SGD
    let ema: ModelEMA
    let schedule: WarmupCosineSchedule
    let lossFunction = DetectionLoss()
    let log: (String) -> Void

    public init(model: YOLOv6, simulator: QuantizationSimulator, teacher: YOLOv6?, train: DetectionDataset, config: QATConfig,
                log: @escaping (String) -> Void = { print($0) }) throws {
        guard simulator.model === model else { throw QuantizationError("QAT: the simulator is installed on another model") }
        guard config.cwdWeight == 0 || teacher != nil else { throw QuantizationError("QAT: distillation (cwdWeight \(config.cwdWeight)) needs a teacher") }
        guard config.epochs >= 1, config.batchSize >= 1, config.learningRate >= 0 else { throw QuantizationError("QAT: epochs and batch size must be positive, the learning rate not negative") }
        self.model = model
        self.simulator = simulator
        self.teacher = teacher
        self.config = config
        self.log = log
        var data = train
        if let n = config.imagesPerEpoch {
            guard n >= config.batchSize, n <= train.count else { throw QuantizationError("QAT: \(n) images per epoch with batch \(config.batchSize) of \(train.count)") }
            data = train.subset(Array(seededPermutation(train.count, seed: config.seed &+ 0x9A7).prefix(n)))
        }
        loader = DetectionLoader(dataset: data, batchSize: config.batchSize, transform: DetectorTrainer.augmentation(inputSize: model.config.inputSize),
                                 shuffle: true, seed: config.seed, dropLast: true, workers: config.workers)
        var groups = model.parameterGroups(weightDecay: config.weightDecay)
        if config.lsq {
            for l in simulator.layers where l.isEnabled {
                try l.input.enableLearnedStep()
                try l.weight?.enableLearnedStep()
            }
            let steps = simulator.layers.flatMap { [$0.input.learnedStep, $0.weight?.learnedStep].compactMap { $0 } }
            groups.append(ParameterGroup(steps, weightDecay: 0))
        }
        optimizer = SGD(groups, learningRate: config.learningRate, momentum: config.momentum, nesterov: true)
        ema = ModelEMA(model, decay: config.emaDecay, tau: config.emaTau)
        let total = max(config.epochs * max(loader.batchCount(), 1), 1)
        schedule = WarmupCosineSchedule(base: config.learningRate, warmupSteps: 0, totalSteps: total, finalFactor: config.finalLRFactor)
    }

    public var stepsPerEpoch: Int { max(loader.batchCount(), 1) }
    public var totalSteps: Int { config.epochs * stepsPerEpoch }

    /// Trains all epochs; after each, `evaluate` (if given) scores the EMA weights with the
    /// quantizers on. Leaves the model holding the EMA weights (what QAT delivers) and, with
    /// LSQ, the learned steps written back as amax.
    public func run(evaluate: ((YOLOv6) throws -> Double)? = nil) throws {
        let progress = Progress(total: totalSteps, label: "QAT", unit: "step")
        let start = Date()
        for epoch in 0..<config.epochs {
            let order = loader.order(epoch: epoch)
            let decay = distillationDecay(epoch: epoch, epochs: config.epochs)
            model.train()
            for b in 0..<stepsPerEpoch {
                let batch = try loader.batch(b, epoch: epoch, order: order)
                optimizer.learningRate = schedule.learningRate(at: step)
                let features = model.neck(model.backbone(batch.images))
                let (logits, distances) = model.detect(features)
                var (total, parts) = lossFunction(model, classLogits: logits, distances: distances, labels: batch.labels)
                var cwd: Float = 0
                if config.cwdWeight > 0, let teacher {
                    let target = withNoGrad { teacher.neck(teacher.backbone(batch.images)) }
                    let term = channelWiseDistillationLoss(student: features, teacher: target, temperature: config.temperature)
                    cwd = term.item()
                    total = total + term * (config.cwdWeight * decay)
                }
                guard parts.total.isFinite, cwd.isFinite else {
                    throw NonFiniteError("QAT step \(step + 1): the loss is \(parts.total) (CWD \(cwd)); lower the learning rate (now \(optimizer.learningRate))")
                }
                optimizer.zeroGrad()
                total.backward()
                if let clip = config.gradientClip { clipGradientNorm(optimizer.groups.flatMap(\.parameters), maxNorm: clip) }
                optimizer.step()
                ema.update(from: model)
                step += 1
                let rate = Double(step) * Double(config.batchSize) / max(Date().timeIntervalSince(start), 1e-9)
                progress.update(step, String(format: "loss %.3f (cls %.3f box %.3f cwd %.4f)  %.1f img/s", parts.total, parts.classification, parts.box, cwd, rate))
            }
            if let evaluate {
                let score = try withEMAWeights { try evaluate(model) }
                history.append(score)
                log(String(format: "QAT epoch %d: %.4f", epoch + 1, score))
            }
        }
        progress.finish()
        try ema.copy(into: model)
        model.eval()
        if config.lsq { for l in simulator.layers { l.input.freezeLearnedStep(); l.weight?.freezeLearnedStep() } }
    }

    /// Runs `body` with the EMA weights in the model, then puts the trained weights back.
    private func withEMAWeights<T>(_ body: () throws -> T) throws -> T {
        let trained = model.stateDict().map { ($0.0, $0.1.detached()) }
        try ema.copy(into: model)
        defer { try? model.loadStateDict(Dictionary(uniqueKeysWithValues: trained)) }
        return try body()
    }
}
