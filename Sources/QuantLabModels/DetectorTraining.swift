import Foundation
import QuantLabCore
import QuantLabData

/// Validation of a detector: COCO mAP (all 12 numbers) of its detections mapped back to
/// original-image pixels. `forward` replaces the model's own forward pass (an engine running
/// the model's compiled graph, say); the model still decodes the boxes.
///
/// `preprocessor`: instead of the training code's transform, each image file goes through this
/// serving pipeline (exp06: does the fused pipeline change accuracy?).
public func evaluateDetector(_ model: YOLOv6, on dataset: DetectionDataset, batchSize: Int = 32, resize: DetectionTransform.Resize = .letterbox,
                             progressLabel: String? = nil, preprocessor: ServingPreprocessor? = nil,
                             forward: ((Tensor) throws -> (classLogits: Tensor, distances: Tensor))? = nil) throws -> (COCOEvaluator.Result, [COCOResult]) {
    if let bad = model.firstNonFiniteValue() {
        throw NonFiniteError("the detector's \(bad.name)[\(bad.index)] is not finite: its evaluation would mean nothing (was it trained with too large a learning rate?)")
    }
    let wasTraining = model.isTraining
    model.eval()
    defer { model.train(wasTraining) }
    return try evaluateDetections(on: dataset, inputSize: model.config.inputSize, resize: resize, batchSize: batchSize,
                                  progressLabel: progressLabel, preprocessor: preprocessor) { images in
        let (logits, dist) = try forward?(images) ?? withNoGrad { model(images) }
        return model.detections(classLogits: logits, distances: dist)
    }
}

/// COCO evaluation of any detector: the val images through the evaluation transform (or a
/// serving `preprocessor`), `detect` on each batch (detections in input pixels), boxes mapped
/// back to original-image pixels, then the 12 COCO numbers.
public func evaluateDetections(on dataset: DetectionDataset, inputSize: Int, resize: DetectionTransform.Resize, batchSize: Int,
                               progressLabel: String?, preprocessor: ServingPreprocessor? = nil,
                               detect: (Tensor) throws -> [[Detection]]) throws -> (COCOEvaluator.Result, [COCOResult]) {
    let loader = DetectionLoader(dataset: dataset, batchSize: batchSize, transform: DetectionTransform(size: inputSize, resize: resize),
                                 shuffle: false, seed: 0)
    let progress = progressLabel.map { Progress(total: dataset.count, label: $0, unit: "img") }
    var results: [COCOResult] = [], seen = 0
    let sequence = loader.epoch(0)
    func served(_ start: Int) throws -> DetectionBatch? {
        guard let preprocessor, start < dataset.count else { return nil }
        require(preprocessor.size == inputSize, "preprocessor size \(preprocessor.size) != model input \(inputSize)")
        let indices = Array(start..<min(start + batchSize, dataset.count))
        let per = 3 * preprocessor.size * preprocessor.size
        let images = Tensor(zeros: [indices.count, 3, preprocessor.size, preprocessor.size])
        var timing = ServingPreprocessor.Timing()
        let geometry = try indices.enumerated().map { k, i in
            let url = dataset.imageURL(i)
            return try preprocessor.prepare(try Data(contentsOf: url), source: url.path, into: images.data + k * per, timing: &timing)
        }
        return DetectionBatch(images: images, labels: [], imageIds: indices.map { dataset.images[$0].id }, geometry: geometry)
    }
    let iterator = sequence.makeIterator()
    while let batch = preprocessor == nil ? iterator.next() : try served(seen) {
        for (b, dets) in try detect(batch.images).enumerated() {
            for d in dets {
                let box = batch.geometry[b].toOriginal(d.box)
                guard box.width > 0, box.height > 0 else { continue }
                results.append(COCOResult(image_id: batch.imageIds[b], category_id: dataset.categoryIds[d.classIndex],
                                          bbox: box.xywh, score: (d.score * 1e5).rounded() / 1e5))
            }
        }
        seen += batch.imageIds.count
        progress?.update(seen)
    }
    if let e = sequence.error { throw e }
    progress?.finish()
    return (try COCOEvaluator().evaluate(groundTruth: dataset.coco, detections: results), results)
}

/// Training hyper-parameters (YOLOv6's, scaled to small batches and short schedules).
public struct DetectorTrainingConfig: Codable, Equatable, Sendable {
    public var epochs = 30
    public var batchSize = 32
    public var learningRate: Float = 0.02
    public var momentum: Float = 0.937
    public var weightDecay: Float = 5e-4
    public var warmupEpochs = 2.0
    public var finalLRFactor: Float = 0.01
    public var emaDecay: Float = 0.9999
    public var emaTau: Float = 500
    /// Clip the global gradient norm to this value (nil: no clipping).
    public var gradientClip: Float? = 10
    public var seed: UInt64 = 0
    public var evaluateEvery = 5
    public var checkpointEverySteps = 200
    public var workers = 2

    public init() {}
}

/// Trains a YOLOv6-style detector with checkpoints that resume exactly: the data order and
/// augmentation depend only on (seed, epoch, index), and a checkpoint holds the model, its
/// EMA, the optimizer's momentum buffers and the step, so a resumed run takes the same steps.
public final class DetectorTrainer {
    public let model: YOLOv6
    public let config: DetectorTrainingConfig
    public let train: DetectionDataset, val: DetectionDataset?
    public let checkpointDir: URL?
    public let loss = DetectionLoss()
    public private(set) var step = 0
    public private(set) var history: [[String: Double]] = []
    let optimizer: any Optimizer
    let ema: ModelEMA
    let loader: DetectionLoader
    let schedule: WarmupCosineSchedule
    let log: (String) -> Void

    /// - Parameter masks: RepOptSGD gradient masks (parameter, mask) for RepOpt models.
    public init(model: YOLOv6, train: DetectionDataset, val: DetectionDataset?, config: DetectorTrainingConfig, checkpointDir: URL?,
                masks: [(Tensor, Tensor)] = [], log: @escaping (String) -> Void = { print($0) }) {
        self.model = model
        self.train = train
        self.val = val
        self.config = config
        self.checkpointDir = checkpointDir
        self.log = log
        loader = DetectionLoader(dataset: train, batchSize: config.batchSize, transform: Self.augmentation(inputSize: model.config.inputSize), shuffle: true, seed: config.seed,
                                 dropLast: true, workers: config.workers)
        let groups = model.parameterGroups(weightDecay: config.weightDecay)
        optimizer = masks.isEmpty
            ? SGD(groups, learningRate: config.learningRate, momentum: config.momentum, nesterov: true)
            : RepOptSGD(groups, masks: masks, learningRate: config.learningRate, momentum: config.momentum, nesterov: true)
        ema = ModelEMA(model, decay: config.emaDecay, tau: config.emaTau)
        let perEpoch = max(loader.batchCount(), 1), total = max(config.epochs * perEpoch, 1)
        // a run shorter than the warm-up warms up over the whole run
        schedule = WarmupCosineSchedule(base: config.learningRate, warmupSteps: min(Int(config.warmupEpochs * Double(perEpoch)), total),
                                        totalSteps: total, warmupStartFactor: 0.1, finalFactor: config.finalLRFactor)
    }

    public var stepsPerEpoch: Int { max(loader.batchCount(), 1) }
    public var totalSteps: Int { config.epochs * stepsPerEpoch }

    /// The training augmentation of the detectors (and of their QAT): flips, colour, scale 0.75-1.25.
    public static func augmentation(inputSize: Int) -> DetectionTransform {
        var t = DetectionTransform(size: inputSize, augment: true)
        t.scaleRange = 0.75...1.25
        return t
    }

    /// A model holding the EMA weights (what is evaluated and saved as the result).
    public func emaModel() throws -> YOLOv6 {
        var rng = SeededGenerator(seed: 0)
        let m = YOLOv6(model.config, rng: &rng)
        try ema.copy(into: m)
        return m
    }

    /// Runs (or resumes) training to the end; returns the final validation result of the EMA
    /// model. `stopAfter` ends the run after that many steps in total, as an interruption would
    /// (the last checkpoint is then the one written at the last save point).
    @discardableResult
    public func run(stopAfter: Int? = nil) throws -> COCOEvaluator.Result? {
        if let dir = checkpointDir, let saved = try Self.latestCheckpoint(in: dir) {
            Self.removeStale(in: dir, keeping: saved)
            try resume(from: saved)
            log("resumed at step \(step)/\(totalSteps)")
        }
        model.train()
        let progress = Progress(total: totalSteps, label: "train \(model.config.block.rawValue)", unit: "step")
        let start = Date(), startStep = step
        var last: COCOEvaluator.Result?
        while step < totalSteps {
            let epoch = step / stepsPerEpoch, first = step % stepsPerEpoch
            let order = loader.order(epoch: epoch)
            for b in first..<stepsPerEpoch {
                let batch = try loader.batch(b, epoch: epoch, order: order)
                optimizer.learningRate = schedule.learningRate(at: step)
                let (logits, dist) = model(batch.images)
                let (total, parts) = loss(model, classLogits: logits, distances: dist, labels: batch.labels)
                guard parts.total.isFinite else {
                    throw NonFiniteError("step \(step + 1) (epoch \(epoch + 1)): the loss is \(parts.total); training stopped (lower the learning rate, now \(optimizer.learningRate))\(checkpointDir.map { "; the last checkpoint in \($0.path) is kept" } ?? "")")
                }
                optimizer.zeroGrad()
                total.backward()
                if let clip = config.gradientClip { clipGradientNorm(model.parameters, maxNorm: clip) }
                optimizer.step()
                ema.update(from: model)
                step += 1
                let rate = Double(step - startStep) * Double(config.batchSize) / max(Date().timeIntervalSince(start), 1e-9)
                progress.update(step, String(format: "loss %.3f (cls %.3f box %.3f) pos %d  %.1f img/s", parts.total, parts.classification, parts.box, parts.positives, rate))
                if let dir = checkpointDir, step % config.checkpointEverySteps == 0 { try saveIfFinite(to: dir) }
                if let stop = stopAfter, step >= stop { return nil }
            }
            let finished = epoch + 1
            if let val, finished % config.evaluateEvery == 0 || finished == config.epochs {
                let (result, _) = try evaluateDetector(try emaModel(), on: val)
                last = result
                history.append(["epoch": Double(finished), "step": Double(step), "mAP": result.mAP, "mAP50": result.mAP50])
                log(String(format: "epoch %d: val mAP %.4f, mAP50 %.4f", finished, result.mAP, result.mAP50))
            }
            if let dir = checkpointDir { try saveIfFinite(to: dir) }
        }
        progress.finish()
        return last
    }

    struct State: Codable {
        var step: Int
        var emaUpdates: Int
        var model: YOLOv6Config
        var training: DetectorTrainingConfig
        var history: [[String: Double]]
    }

    /// Saves a checkpoint unless a weight is not finite: then the run stops and the last good
    /// checkpoint stays.
    func saveIfFinite(to dir: URL) throws {
        if let bad = model.firstNonFiniteValue() {
            throw NonFiniteError("step \(step): \(bad.name)[\(bad.index)] is not finite; training stopped before saving, the last checkpoint in \(dir.path) is kept (lower the learning rate)")
        }
        try save(to: dir)
    }

    /// Called between the stages of a save (test hook: throwing there is a run killed at that
    /// point). Stages: 0 step folder made, 1-4 after each file, 5 after `latest` moved on.
    var saveInterruption: ((Int) throws -> Void)?

    /// A checkpoint is committed as a unit: its four files (model.safetensors, ema.safetensors,
    /// optimizer.safetensors with the momentum buffers by parameter name, state.json) go into a
    /// new folder `step-<n>`, and only then does the file `latest` (written atomically) name
    /// it; older step folders are removed after that. A run killed at any point leaves `latest`
    /// naming a complete checkpoint (the old or the new), never a mix.
    public func save(to dir: URL) throws {
        let name = String(format: "step-%08d", step)
        let stepDir = dir.appendingPathComponent(name)
        try? FileManager.default.removeItem(at: stepDir) // a leftover of a run killed at this very step
        try AtomicFile.createFolder(stepDir)
        try saveInterruption?(0)
        try writeCheckpointFiles(to: stepDir)
        try AtomicFile.write(Data(name.utf8), to: dir.appendingPathComponent("latest"))
        try saveInterruption?(5)
        Self.removeStale(in: dir, keeping: stepDir)
    }

    /// The folder `latest` names, or a checkpoint in the folder itself (the layout before step
    /// folders), or nil when there is none. A `latest` that names no complete checkpoint is an
    /// error naming it.
    public static func latestCheckpoint(in dir: URL) throws -> URL? {
        let pointer = dir.appendingPathComponent("latest")
        if let data = try? Data(contentsOf: pointer) {
            let name = String(decoding: data, as: UTF8.self).trimmingCharacters(in: .whitespacesAndNewlines)
            let folder = dir.appendingPathComponent(name)
            guard name.hasPrefix("step-"), !name.contains("/"),
                  FileManager.default.fileExists(atPath: folder.appendingPathComponent("state.json").path) else {
                throw CheckpointError("\(pointer.path) names '\(name)', which is not a complete checkpoint in \(dir.path)")
            }
            return folder
        }
        return FileManager.default.fileExists(atPath: dir.appendingPathComponent("state.json").path) ? dir : nil
    }

    /// Removes step folders other than `keeping` and temporaries a killed run left behind.
    static func removeStale(in dir: URL, keeping: URL) {
        guard let entries = try? FileManager.default.contentsOfDirectory(atPath: dir.path) else { return }
        for e in entries where (e.hasPrefix("step-") && e != keeping.lastPathComponent) || AtomicFile.isTemporary(e) {
            try? FileManager.default.removeItem(at: dir.appendingPathComponent(e))
        }
    }

    private func writeCheckpointFiles(to dir: URL) throws {
        try model.save(to: dir.appendingPathComponent("model.safetensors"), metadata: ["step": String(step)])
        try saveInterruption?(1)
        try SafeTensors.save(ema.shadow, metadata: ["updates": String(ema.updates)], to: dir.appendingPathComponent("ema.safetensors"))
        try saveInterruption?(2)
        var buffers: [(String, Tensor)] = []
        if let sgd = optimizerSGD {
            for (name, p) in model.namedParameters() { if let b = sgd.momentumBuffer(for: p) { buffers.append((name, b)) } }
        }
        try SafeTensors.save(buffers, to: dir.appendingPathComponent("optimizer.safetensors"))
        try saveInterruption?(3)
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.prettyPrinted, .sortedKeys]
        let state = State(step: step, emaUpdates: ema.updates, model: model.config, training: config, history: history)
        try AtomicFile.write(encoder.encode(state), to: dir.appendingPathComponent("state.json"))
        try saveInterruption?(4)
    }

    var optimizerSGD: SGD? {
        if let s = optimizer as? SGD { return s }
        return (optimizer as? RepOptSGD)?.inner
    }

    public func resume(from dir: URL) throws {
        let stateURL = dir.appendingPathComponent("state.json")
        let state: State
        do { state = try JSONDecoder().decode(State.self, from: Data(contentsOf: stateURL)) } catch let e as DecodingError {
            throw CheckpointError("\(stateURL.path): not a valid checkpoint state (\(describe(e)))")
        } catch {
            throw CheckpointError("\(stateURL.path): cannot read checkpoint state (\(error.localizedDescription))")
        }
        guard state.model == model.config else { throw CheckpointError("\(dir.path): checkpoint is for another model configuration") }
        guard state.training == config else { throw CheckpointError("\(dir.path): checkpoint was made with other training settings") }
        try model.load(from: dir.appendingPathComponent("model.safetensors"))
        let (emaTensors, emaMeta) = try SafeTensors.load(from: dir.appendingPathComponent("ema.safetensors"))
        try ema.restore(emaTensors, updates: Int(emaMeta["updates"] ?? "") ?? state.emaUpdates)
        let (buffers, _) = try SafeTensors.load(from: dir.appendingPathComponent("optimizer.safetensors"))
        if let sgd = optimizerSGD {
            for (name, p) in model.namedParameters() { if let b = buffers[name] { sgd.setMomentumBuffer(b, for: p) } }
        }
        step = state.step
        history = state.history
    }
}
