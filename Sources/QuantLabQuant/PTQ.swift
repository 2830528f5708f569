import Foundation
import QuantLabCore
import QuantLabData
import QuantLabModels

// Post-training quantization, the article's pipeline (TensorRT PTQ via pytorch-quantization):
//   1. deploy form: Rep blocks fused to one 3x3 conv, BN folded into convs;
//   2. quantizers at every conv / transposed conv / linear (input per tensor, weight per channel);
//   3. calibration: N training batches (4 x 32 as the article) through the FP32 model,
//      collecting max |x|, |x| histograms and the moving average per activation quantizer;
//   4. amax per quantizer by a calibration method; weights by per-channel max;
//   5. evaluation with fake quantization (the values an INT8 engine computes with).

/// How calibration images are drawn.
public struct CalibrationPlan: Codable, Equatable, Sendable {
    public var batches: Int
    public var batchSize: Int
    /// Which training images are drawn: calibration sampling noise is part of a PTQ result.
    public var seed: UInt64

    public init(batches: Int = 4, batchSize: Int = 32, seed: UInt64 = 0) {
        require(batches > 0 && batchSize > 0, "calibration needs at least one batch of one image")
        self.batches = batches
        self.batchSize = batchSize
        self.seed = seed
    }

    public var images: Int { batches * batchSize }
}

/// Calibration batches [B, 3, S, S] of training images for a detector: a seeded random
/// sample without replacement, letterboxed, no augmentation (what the deployed model sees).
public func detectionCalibrationBatches(_ dataset: DetectionDataset, inputSize: Int, plan: CalibrationPlan,
                                        resize: DetectionTransform.Resize = .letterbox) throws -> [Tensor] {
    guard dataset.count >= plan.images else {
        throw QuantizationError("calibration wants \(plan.images) images, dataset \(dataset.root.path) [\(dataset.split)] has \(dataset.count)")
    }
    let loader = DetectionLoader(dataset: dataset, batchSize: plan.batchSize, transform: DetectionTransform(size: inputSize, resize: resize),
                                 shuffle: true, seed: plan.seed &+ 0xCA11)
    let order = loader.order(epoch: 0)
    return try (0..<plan.batches).map { try loader.batch($0, epoch: 0, order: order).images }
}

/// 0..<count in a random order fixed by `seed`.
func seededPermutation(_ count: Int, seed: UInt64) -> [Int] {
    var rng = SeededGenerator(seed: seed)
    var order = Array(0..<count)
    order.shuffle(using: &rng)
    return order
}

/// Calibration batches for a classifier (seeded sample, no augmentation).
public func classificationCalibrationBatches(_ dataset: ClassificationDataset, inputSize: Int, plan: CalibrationPlan) throws -> [Tensor] {
    guard dataset.count >= plan.images else {
        throw QuantizationError("calibration wants \(plan.images) images, the classification set has \(dataset.count)")
    }
    let order = seededPermutation(dataset.count, seed: plan.seed &+ 0xCA11)
    return try (0..<plan.batches).map { b in
        try dataset.batch(Array(order[(b * plan.batchSize)..<((b + 1) * plan.batchSize)]), size: inputSize, augment: false, seed: 0).0
    }
}

extension QuantizationSimulator {
    /// Pushes `batches` through the model (eval mode, FP32) collecting statistics; earlier
    /// statistics are discarded first.
    public func calibrate(on batches: [Tensor], forward: (Tensor) -> Void) {
        resetStatistics()
        let wasTraining = model.isTraining
        model.eval()
        defer { model.train(wasTraining) }
        calibrate { for b in batches { forward(b) } }
    }
}

/// A trained model with its data, as PTQ needs it: how to draw calibration images, how to run
/// it, and how to score it. One value instead of three closures at every call site.
public struct PTQSubject {
    public let label: String
    public let module: Module
    /// "mAP" for a detector, "top-1" for a classifier.
    public let metric: String
    /// Calibration images for a plan (a seeded draw of training images, no augmentation).
    public let calibrationImages: (CalibrationPlan) throws -> [Tensor]
    /// One image's shape [C, H, W] (what an engine traces the model at).
    public let inputShape: [Int]
    /// The model's outputs as a list (what a traced graph returns).
    public let outputs: (Tensor) -> [Tensor]
    /// The metric on the validation split with `forward` giving the outputs (an engine's), or
    /// the model itself when nil; the label names a progress bar, if any.
    public let score: (_ forward: ((Tensor) throws -> [Tensor])?, _ progressLabel: String?) throws -> Double

    public init(label: String, module: Module, metric: String, calibrationImages: @escaping (CalibrationPlan) throws -> [Tensor],
                inputShape: [Int], outputs: @escaping (Tensor) -> [Tensor],
                score: @escaping (_ forward: ((Tensor) throws -> [Tensor])?, _ progressLabel: String?) throws -> Double) {
        self.label = label
        self.module = module
        self.metric = metric
        self.calibrationImages = calibrationImages
        self.inputShape = inputShape
        self.outputs = outputs
        self.score = score
    }

    /// One forward pass, outputs discarded (calibration only watches the quantizers).
    public func forward(_ x: Tensor) { _ = outputs(x) }

    /// The metric of the model itself on the validation split.
    public func evaluate(_ progressLabel: String?) throws -> Double { try score(nil, progressLabel) }

    /// A detector: calibration on letterboxed training images, COCO mAP@[.5:.95] on `val`.
    public static func detector(_ model: YOLOv6, train: DetectionDataset, val: DetectionDataset, label: String) -> PTQSubject {
        PTQSubject(label: label, module: model, metric: "mAP",
                   calibrationImages: { try detectionCalibrationBatches(train, inputSize: model.config.inputSize, plan: $0) },
                   inputShape: [3, model.config.inputSize, model.config.inputSize],
                   outputs: { let o = model($0); return [o.classLogits, o.distances] },
                   score: { forward, label in
                       try evaluateDetector(model, on: val, progressLabel: label, forward: forward.map { f in { let o = try f($0); return (o[0], o[1]) } }).0.mAP
                   })
    }

    /// An RT-DETR: calibration on stretched training images (its reader), COCO mAP on `val`.
    public static func rtdetr(_ model: RTDETR, train: DetectionDataset, val: DetectionDataset, label: String) -> PTQSubject {
        PTQSubject(label: label, module: model, metric: "mAP",
                   calibrationImages: { try detectionCalibrationBatches(train, inputSize: model.config.inputSize, plan: $0, resize: .stretch) },
                   inputShape: [3, model.config.inputSize, model.config.inputSize],
                   outputs: { let o = model($0); return [o.logits, o.boxes] },
                   score: { forward, label in
                       try evaluateRTDETR(model, on: val, progressLabel: label, forward: forward.map { f in { let o = try f($0); return (o[0], o[1]) } }).0.mAP
                   })
    }

    /// A classifier: calibration on training images, top-1 accuracy (a fraction) on `val`.
    public static func classifier(_ model: RepClassifier, train: ClassificationDataset, val: ClassificationDataset, label: String) -> PTQSubject {
        PTQSubject(label: label, module: model, metric: "top-1",
                   calibrationImages: { try classificationCalibrationBatches(train, inputSize: model.config.inputSize, plan: $0) },
                   inputShape: [3, model.config.inputSize, model.config.inputSize],
                   outputs: { [model($0)] },
                   score: { forward, _ in try top1(model, on: val, forward: forward.map { f in { try f($0)[0] } }) })
    }

    /// A saved model with the dataset folder it was trained on (COCO layout, train2017 / val2017).
    public static func saved(_ saved: SavedModel, data root: URL, label: String) throws -> PTQSubject {
        switch saved {
        case .detector(let m):
            return .detector(m, train: try DetectionDataset(root: root, split: "train2017"), val: try DetectionDataset(root: root, split: "val2017"), label: label)
        case .classifier(let m):
            return .classifier(m, train: try ClassificationDataset(root: root, split: "train2017"), val: try ClassificationDataset(root: root, split: "val2017"), label: label)
        case .rtdetr(let m):
            return .rtdetr(m, train: try DetectionDataset(root: root, split: "train2017"), val: try DetectionDataset(root: root, split: "val2017"), label: label)
        }
    }
}

/// PTQ of a deploy-form model for every (calibration seed, method): quantizers installed,
/// calibrated once per seed on `subject.calibrationImages(plan)`, amax set per method, then the
/// metric measured; `onResult` sees each (seed, method, metric) as it comes. Quantizers are
/// removed at the end. Returns each method's metric per seed, in seed order.
public func ptqSweep(_ subject: PTQSubject, methods: [CalibrationMethod], seeds: [UInt64], batches: Int = 4, batchSize: Int = 32,
                     options: QuantizationOptions = QuantizationOptions(),
                     onResult: (_ seed: UInt64, _ method: CalibrationMethod, _ metric: Double) -> Void = { _, _, _ in }) throws -> [CalibrationMethod: [Double]] {
    let sim = try QuantizationSimulator(subject.module, options: options)
    defer { sim.remove() }
    var results: [CalibrationMethod: [Double]] = [:]
    for seed in seeds {
        sim.calibrate(on: try subject.calibrationImages(CalibrationPlan(batches: batches, batchSize: batchSize, seed: seed)), forward: subject.forward)
        for method in methods {
            try sim.applyCalibration(method)
            let metric = try subject.evaluate("PTQ \(subject.label) \(method) seed \(seed)")
            onResult(seed, method, metric)
            results[method, default: []].append(metric)
        }
    }
    return results
}

/// PTQ of a detector in one call: deploy form, quantizers everywhere, calibration on
/// `calibration` training batches, amax by `method`. Returns the simulator (all layers on).
public func prepareDetectorPTQ(_ model: YOLOv6, train: DetectionDataset, method: CalibrationMethod, calibration: CalibrationPlan,
                               options: QuantizationOptions = QuantizationOptions()) throws -> QuantizationSimulator {
    model.eval()
    model.convertToDeployForm()
    let sim = try QuantizationSimulator(model, options: options)
    let batches = try detectionCalibrationBatches(train, inputSize: model.config.inputSize, plan: calibration)
    sim.calibrate(on: batches) { _ = model($0) }
    try sim.applyCalibration(method)
    return sim
}

/// A seeded random subset of `images` training images: the split layers are ranked on by
/// the mAP method, so that the final mAP (on val) is not measured on the data that chose
/// the layers.
public func rankingSplit(_ train: DetectionDataset, images: Int, seed: UInt64) throws -> DetectionDataset {
    guard images >= 1 && images <= train.count else {
        throw QuantizationError("ranking split of \(images) images asked from \(train.count) training images")
    }
    return train.subset(Array(seededPermutation(train.count, seed: seed &+ 0x5A11).prefix(images)))
}
