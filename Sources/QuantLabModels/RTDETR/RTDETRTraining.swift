import Foundation
import QuantLabCore
import QuantLabData

/// Validation of an RT-DETR: COCO mAP of its top-100 (query, class) pairs, boxes mapped back to
/// original pixels. Images are stretched to the input size and scaled to [0, 1], RT-DETR's
/// reader (claim B4). `forward` replaces the model's forward pass (an engine, a quantized copy).
public func evaluateRTDETR(_ model: RTDETR, on dataset: DetectionDataset, batchSize: Int = 32, progressLabel: String? = nil,
                           forward: ((Tensor) throws -> (logits: Tensor, boxes: Tensor))? = nil) throws -> (COCOEvaluator.Result, [COCOResult]) {
    if let bad = model.firstNonFiniteValue() {
        throw NonFiniteError("the RT-DETR's \(bad.name)[\(bad.index)] is not finite: its evaluation would mean nothing")
    }
    let wasTraining = model.isTraining
    model.eval()
    defer { model.train(wasTraining) }
    return try evaluateDetections(on: dataset, inputSize: model.config.inputSize, resize: .stretch, batchSize: batchSize,
                                  progressLabel: progressLabel) { images in
        let (logits, boxes) = try forward?(images) ?? withNoGrad { model(images) }
        return model.detections(logits: logits, boxes: boxes)
    }
}

/// RT-DETR's training recipe (AdamW, lr 1e-4, weight decay 1e-4, gradient clipping at 0.1,
/// EMA) adapted to training from scratch on a CPU: no pretrained backbone, so the backbone
/// trains at the full rate (RT-DETR gives its ImageNet backbone 0.1x), and a larger base rate
/// with warm-up and cosine decay over a short schedule.
public struct RTDETRTrainingConfig: Codable, Equatable, Sendable {
    public var epochs = 24
    public var batchSize = 16
    public var learningRate: Float = 5e-4
    public var weightDecay: Float = 1e-4
    public var warmupSteps = 200
    public var finalLRFactor: Float = 0.05
    public var gradientClip: Float = 0.1
    public var emaDecay: Float = 0.9999
    public var emaTau: Float = 500
    public var seed: UInt64 = 0
    public var workers = 2

    public init() {}
}

/// Trains an RT-DETR on a detection dataset (stretch resize, flips, colour and zoom jitter).
public final class RTDETRTrainer {
    public let model: RTDETR
    public let config: RTDETRTrainingConfig
    public let loss = RTDETRLoss()
    public private(set) var step = 0
    let optimizer: AdamW
    let ema: ModelEMA
    let loader: DetectionLoader
    let schedule: WarmupCosineSchedule
    let log: (String) -> Void

    public init(model: RTDETR, train: DetectionDataset, config: RTDETRTrainingConfig, log: @escaping (String) -> Void = { print($0) }) {
        self.model = model
        self.config = config
        self.log = log
        loader = DetectionLoader(dataset: train, batchSize: config.batchSize, transform: Self.augmentation(inputSize: model.config.inputSize),
                                 shuffle: true, seed: config.seed, dropLast: true, workers: config.workers)
        // no decay on norms and biases (rank < 2), as RT-DETR's optimizer groups
        optimizer = AdamW(model.parameterGroups(weightDecay: config.weightDecay), learningRate: config.learningRate)
        ema = ModelEMA(model, decay: config.emaDecay, tau: config.emaTau)
        let total = max(config.epochs * max(loader.batchCount(), 1), 1)
        schedule = WarmupCosineSchedule(base: config.learningRate, warmupSteps: min(config.warmupSteps, total), totalSteps: total,
                                        warmupStartFactor: 0.01, finalFactor: config.finalLRFactor)
    }

    /// Stretch to the input size (RT-DETR's reader), zoom 0.75-1.25, flips, colour.
    public static func augmentation(inputSize: Int) -> DetectionTransform {
        var t = DetectionTransform(size: inputSize, resize: .stretch, augment: true)
        t.scaleRange = 0.75...1.25
        return t
    }

    public var stepsPerEpoch: Int { max(loader.batchCount(), 1) }
    public var totalSteps: Int { config.epochs * stepsPerEpoch }

    /// A model holding the EMA weights (what is evaluated and saved).
    public func emaModel() throws -> RTDETR {
        var rng = SeededGenerator(seed: 0)
        let m = RTDETR(model.config, rng: &rng)
        try ema.copy(into: m)
        return m
    }

    /// Trains to the end (or `stopAfter` steps); returns images processed.
    @discardableResult
    public func run(stopAfter: Int? = nil) throws -> Int {
        model.train()
        let progress = Progress(total: totalSteps, label: "train rtdetr", unit: "step")
        let start = Date()
        while step < totalSteps {
            let epoch = step / stepsPerEpoch
            let order = loader.order(epoch: epoch)
            for b in (step % stepsPerEpoch)..<stepsPerEpoch {
                let batch = try loader.batch(b, epoch: epoch, order: order)
                optimizer.learningRate = schedule.learningRate(at: step)
                let (encoderSet, decoderSets) = model.predictions(batch.images)
                let (total, parts) = loss(model, encoder: encoderSet, decoder: decoderSets, labels: batch.labels)
                guard parts.total.isFinite else {
                    throw NonFiniteError("RT-DETR step \(step + 1) (epoch \(epoch + 1)): the loss is \(parts.total); training stopped (lower the learning rate, now \(optimizer.learningRate))")
                }
                optimizer.zeroGrad()
                total.backward()
                clipGradientNorm(model.parameters, maxNorm: config.gradientClip)
                optimizer.step()
                ema.update(from: model)
                step += 1
                let rate = Double(step) * Double(config.batchSize) / max(Date().timeIntervalSince(start), 1e-9)
                progress.update(step, String(format: "loss %.3f (last layer: vfl %.3f l1 %.3f giou %.3f) %.1f img/s",
                                             parts.total, parts.vfl, parts.l1, parts.giou, rate))
                if let stop = stopAfter, step >= stop { return step * config.batchSize }
            }
        }
        progress.finish()
        return step * config.batchSize
    }
}

extension Baselines {
    /// The RT-DETR-lite baseline (`det-rtdetr[-quick]`), trained on the plan's detection data
    /// now if no cache of this configuration exists.
    public static func rtdetr(plan: Plan, epochs: Int? = nil, log: @escaping (String) -> Void = { print($0) }) throws -> (RTDETR, TrainingRecord, DetectionDataset) {
        let (train, val) = try detectionData(plan: plan)
        let config = plan.quick ? RTDETRConfig.tiny(numClasses: train.classCount, inputSize: plan.detectionPreset.imageSize)
                                : RTDETRConfig.lite(numClasses: train.classCount, inputSize: plan.detectionPreset.imageSize)
        var training = RTDETRTrainingConfig()
        training.epochs = epochs ?? (plan.quick ? 40 : 24)
        training.seed = plan.seed
        training.batchSize = plan.quick ? 8 : 16
        training.warmupSteps = plan.quick ? 50 : 200
        let record = TrainingRecord(block: "rtdetr", epochs: training.epochs, searchEpochs: nil, seed: plan.seed, trainImages: train.count,
                                    wallSeconds: 0, imagesPerSecond: 0, modelConfig: json(config),
                                    dataset: json(plan.detectionPreset), training: json(training))
        var rng = SeededGenerator(seed: plan.seed)
        let model = RTDETR(config, rng: &rng)
        let dir = plan.modelsRoot.appendingPathComponent("det-rtdetr\(plan.quick ? "-quick" : "")")
        let (trained, saved) = try trainOrLoad("det-rtdetr", dir: dir, record: record, model: model, metadata: SavedModel.metadata(for: model), log: log) {
            let trainer = RTDETRTrainer(model: model, train: train, config: training, log: log)
            let images = try trainer.run()
            return (try trainer.emaModel(), images)
        }
        return (trained, saved, val)
    }
}
