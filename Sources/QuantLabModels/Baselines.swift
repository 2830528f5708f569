import Foundation
import QuantLabCore
import QuantLabData

/// The FP32 baselines every later experiment quantizes, trained once and cached:
///   <models>/det-<block>[-quick]/model.safetensors + train.json
///   <models>/cls-<block>[-quick]/model.safetensors + train.json
/// A cached model is reused only if its recorded configuration equals the requested one.
public enum Baselines {
    /// How a baseline was trained: what the results tables report next to its accuracy.
    public struct TrainingRecord: Codable, Equatable, Sendable {
        public var block: String
        public var epochs: Int
        public var searchEpochs: Int?
        public var seed: UInt64
        public var trainImages: Int
        public var wallSeconds: Double
        public var imagesPerSecond: Double
        public var modelConfig: String // JSON of the architecture config
        /// JSON of the synthetic dataset's configuration: a cache trained on other data is stale.
        public var dataset: String?
        /// JSON of the training hyper-parameters where they are not implied by the rest (RT-DETR).
        public var training: String? = nil
    }

    public struct Plan: Sendable {
        public var quick: Bool
        public var dataRoot: URL
        public var modelsRoot: URL
        public var seed: UInt64 = 0
        /// Detector and classifier epochs (RepOpt's hyper-search stage gets `searchEpochs`).
        public var detectorEpochs: Int
        public var detectorSearchEpochs: Int
        public var classifierEpochs: Int
        public var classifierSearchEpochs: Int

        public init(quick: Bool, dataRoot: URL = URL(fileURLWithPath: "data"), modelsRoot: URL = URL(fileURLWithPath: "data/models")) {
            self.quick = quick
            self.dataRoot = dataRoot
            self.modelsRoot = modelsRoot
            // QUICK: tiny models on 160 / 1024 images, long enough to learn something (10-25 s each)
            detectorEpochs = quick ? 30 : 10
            detectorSearchEpochs = quick ? 10 : 4
            classifierEpochs = quick ? 20 : 15
            classifierSearchEpochs = quick ? 5 : 5
        }

        public var detectionPreset: SyntheticShapes.Config { quick ? .shapesTiny : .shapes }
        public var classificationPreset: SyntheticShapes.Config {
            var c = SyntheticShapes.Config.shapesClassification
            if quick { c.name = "shapes-cls-tiny"; c.trainImages = 1024; c.valImages = 256 }
            return c
        }

        public func detectorConfig(_ block: BlockKind, classes: Int) -> YOLOv6Config {
            quick ? .tiny(block: block, numClasses: classes) : .nano(block: block, numClasses: classes)
        }

        public func classifierConfig(_ block: BlockKind, classes: Int) -> RepClassifier.Config {
            quick ? .tiny(block: block, numClasses: classes) : RepClassifier.Config(block: block, numClasses: classes)
        }

        func folder(_ kind: String, _ block: BlockKind) -> URL {
            modelsRoot.appendingPathComponent("\(kind)-\(block.rawValue)\(quick ? "-quick" : "")")
        }
    }

    static func json<T: Encodable>(_ value: T) -> String {
        let e = JSONEncoder()
        e.outputFormatting = [.sortedKeys]
        return String(decoding: (try? e.encode(value)) ?? Data(), as: UTF8.self)
    }

    static func cached(_ dir: URL, expecting record: TrainingRecord) -> TrainingRecord? {
        guard let data = try? Data(contentsOf: dir.appendingPathComponent("train.json")),
              let saved = try? JSONDecoder().decode(TrainingRecord.self, from: data),
              saved.block == record.block, saved.epochs == record.epochs, saved.searchEpochs == record.searchEpochs,
              saved.seed == record.seed, saved.modelConfig == record.modelConfig, saved.trainImages == record.trainImages,
              saved.dataset == record.dataset, saved.training == record.training,
              FileManager.default.fileExists(atPath: dir.appendingPathComponent("model.safetensors").path) else { return nil }
        return saved
    }

    static func writeRecord(_ r: TrainingRecord, _ dir: URL) throws {
        let e = JSONEncoder()
        e.outputFormatting = [.prettyPrinted, .sortedKeys]
        try AtomicFile.write(e.encode(r), to: dir.appendingPathComponent("train.json"))
    }

    /// Loads `model` from `dir` when the cache holds exactly `record`'s configuration;
    /// otherwise runs `train` (the trained weights and the number of images it processed),
    /// saves them with the record (wall time and throughput filled in) and returns them.
    static func trainOrLoad<M: Module>(_ name: String, dir: URL, record: TrainingRecord, model: M, metadata: [String: String], trainIfMissing: Bool = true,
                                       log: (String) -> Void, train: () throws -> (M, Int)) throws -> (M, TrainingRecord) {
        if let saved = cached(dir, expecting: record) {
            try model.load(from: dir.appendingPathComponent("model.safetensors"))
            log("\(name): loaded cached baseline from \(dir.path)")
            return (model, saved)
        }
        guard trainIfMissing else { throw MissingBaseline(name: name, folder: dir.path) }
        // Checkpoints in `dir` resume an interrupted run of THIS configuration; those of another
        // configuration (the plan changed) are stale and are removed before training starts.
        let pending = dir.appendingPathComponent("pending.json")
        let wanted = Data(json(record).utf8)
        // (no pending.json but a train.json: a finished run of a configuration that is not this one)
        let previous = try? Data(contentsOf: pending)
        let stale = previous.map { $0 != wanted } ?? FileManager.default.fileExists(atPath: dir.appendingPathComponent("train.json").path)
        if stale {
            for sub in ["checkpoint", "search"] where FileManager.default.fileExists(atPath: dir.appendingPathComponent(sub).path) {
                try FileManager.default.removeItem(at: dir.appendingPathComponent(sub))
                log("\(name): removed \(sub)/ of an earlier configuration in \(dir.path)")
            }
        }
        try AtomicFile.write(wanted, to: pending)
        let start = Date()
        let (trained, images) = try train()
        try trained.save(to: dir.appendingPathComponent("model.safetensors"), metadata: metadata)
        var r = record
        r.wallSeconds = Date().timeIntervalSince(start)
        r.imagesPerSecond = Double(images) / max(r.wallSeconds, 1e-9)
        try writeRecord(r, dir)
        return (trained, r)
    }

    /// The plan's detection data (generated on first use): train and val splits.
    public static func detectionData(plan: Plan) throws -> (train: DetectionDataset, val: DetectionDataset) {
        let root = try SyntheticShapes(plan.detectionPreset).write(root: plan.dataRoot)
        return (try DetectionDataset(root: root, split: "train2017"), try DetectionDataset(root: root, split: "val2017"))
    }

    /// The plan's classification data (generated on first use): train and val splits.
    public static func classificationData(plan: Plan) throws -> (train: ClassificationDataset, val: ClassificationDataset) {
        let root = try SyntheticShapes(plan.classificationPreset).write(root: plan.dataRoot)
        return (try ClassificationDataset(root: root, split: "train2017"), try ClassificationDataset(root: root, split: "val2017"))
    }

    /// The detector baseline for `block` (trained now if no matching cache exists; with
    /// `trainIfMissing: false`, a missing cache is a `MissingBaseline` error instead).
    public static func detector(_ block: BlockKind, plan: Plan, trainIfMissing: Bool = true,
                                log: @escaping (String) -> Void = { print($0) }) throws -> (YOLOv6, TrainingRecord, DetectionDataset) {
        let (train, val) = try detectionData(plan: plan)
        let config = plan.detectorConfig(block, classes: train.classCount)
        let dir = plan.folder("det", block)
        let record = TrainingRecord(block: block.rawValue, epochs: plan.detectorEpochs, searchEpochs: block == .repopt ? plan.detectorSearchEpochs : nil,
                                    seed: plan.seed, trainImages: train.count, wallSeconds: 0, imagesPerSecond: 0, modelConfig: json(config),
                                    dataset: json(plan.detectionPreset))
        var rng = SeededGenerator(seed: plan.seed)
        let model = YOLOv6(config, rng: &rng)
        let (trained, saved) = try trainOrLoad("det-\(block.rawValue)", dir: dir, record: record, model: model, metadata: SavedModel.metadata(for: model),
                                               trainIfMissing: trainIfMissing, log: log) {
            var cfg = DetectorTrainingConfig()
            cfg.epochs = plan.detectorEpochs
            cfg.seed = plan.seed
            cfg.batchSize = plan.quick ? 16 : 32
            cfg.evaluateEvery = max(plan.detectorEpochs, 1)
            var images = 0
            var masks: [(Tensor, Tensor)] = []
            if block == .repopt {
                var searchRng = SeededGenerator(seed: plan.seed &+ 1)
                let search = YOLOv6(plan.detectorConfig(.repoptSearch, classes: train.classCount), rng: &searchRng)
                var searchCfg = cfg
                searchCfg.epochs = plan.detectorSearchEpochs
                log("det-repopt: stage 1, hyper-search (\(plan.detectorSearchEpochs) epochs)")
                let stage1 = DetectorTrainer(model: search, train: train, val: nil, config: searchCfg, checkpointDir: dir.appendingPathComponent("search"), log: log)
                try stage1.run()
                images += stage1.totalSteps * cfg.batchSize
                masks = try model.initializeRepOpt(from: stage1.emaModel().repOptScales(), rng: &rng)
            }
            let trainer = DetectorTrainer(model: model, train: train, val: nil, config: cfg, checkpointDir: dir.appendingPathComponent("checkpoint"), masks: masks, log: log)
            try trainer.run()
            return (try trainer.emaModel(), images + trainer.totalSteps * cfg.batchSize)
        }
        return (trained, saved, val)
    }

    /// How a classifier is trained, where exp02b varies it: length, width, weight decay and its
    /// form. The default is the baseline's (the plan's epochs, the widths of
    /// `RepClassifier.Config`, SGD decay 1e-4); a baseline-equal recipe shares its cache.
    public struct ClassifierRecipe: Codable, Equatable, Hashable, Sendable, CustomStringConvertible {
        /// nil: the plan's `classifierEpochs`.
        public var epochs: Int?
        /// Every stage's width times this.
        public var widthMultiplier: Int
        public var weightDecay: Float
        public var decayForm: WeightDecayForm

        public init(epochs: Int? = nil, widthMultiplier: Int = 1, weightDecay: Float = 1e-4, decayForm: WeightDecayForm = .plain) {
            self.epochs = epochs
            self.widthMultiplier = widthMultiplier
            self.weightDecay = weightDecay
            self.decayForm = decayForm
        }

        public static let baseline = ClassifierRecipe()

        /// The recipe as it acts on `block`: the custom L2 only changes RepVGG blocks, so for
        /// RepOpt and QARepVGG it is the plain decay (and shares that model's cache).
        public func normalized(for block: BlockKind) -> ClassifierRecipe {
            var r = self
            if block != .repvgg { r.decayForm = .plain }
            return r
        }

        /// Short, file-name-safe: "e30-w2-wd0.0005-custom-l2".
        public var description: String {
            var parts = [epochs.map { "e\($0)" } ?? "e-plan", "w\(widthMultiplier)", "wd\(weightDecay)"]
            if decayForm != .plain { parts.append(decayForm == .repvggCustomL2 ? "custom-l2" : decayForm.rawValue) }
            return parts.joined(separator: "-")
        }

        public func validate() throws {
            try checkField(epochs.map { (1...1000).contains($0) } ?? true, "epochs", epochs ?? 0, "1...1000")
            try checkField((1...8).contains(widthMultiplier), "widthMultiplier", widthMultiplier, "1...8")
            try checkField(weightDecay >= 0 && weightDecay < 1, "weightDecay", weightDecay, "0 <= wd < 1")
        }
    }

    /// The classifier baseline for `block` (or, with a recipe other than the baseline's, a
    /// variant cached in <models>/study/cls-<block>-<recipe>[-quick]).
    public static func classifier(_ block: BlockKind, plan: Plan, recipe: ClassifierRecipe = .baseline, trainIfMissing: Bool = true,
                                  log: @escaping (String) -> Void = { print($0) }) throws -> (RepClassifier, TrainingRecord, ClassificationDataset) {
        var recipe = recipe.normalized(for: block)
        try recipe.validate()
        let epochs = recipe.epochs ?? plan.classifierEpochs
        recipe.epochs = epochs
        let isBaseline = recipe == ClassifierRecipe(epochs: plan.classifierEpochs)
        let (train, val) = try classificationData(plan: plan)
        var config = plan.classifierConfig(block, classes: train.classCount)
        config.widths = config.widths.map { $0 * recipe.widthMultiplier }
        let dir = isBaseline ? plan.folder("cls", block)
            : plan.modelsRoot.appendingPathComponent("study").appendingPathComponent("cls-\(block.rawValue)-\(recipe)\(plan.quick ? "-quick" : "")")
        var record = TrainingRecord(block: block.rawValue, epochs: epochs, searchEpochs: block == .repopt ? plan.classifierSearchEpochs : nil,
                                    seed: plan.seed, trainImages: train.count, wallSeconds: 0, imagesPerSecond: 0, modelConfig: json(config),
                                    dataset: json(plan.classificationPreset))
        if !isBaseline { record.training = json(recipe) }
        var rng = SeededGenerator(seed: plan.seed)
        let model = RepClassifier(config, rng: &rng)
        let name = "cls-\(block.rawValue)\(isBaseline ? "" : " (\(recipe))")"
        let (trained, saved) = try trainOrLoad(name, dir: dir, record: record, model: model, metadata: SavedModel.metadata(for: model),
                                               trainIfMissing: trainIfMissing, log: log) {
            let batch = plan.quick ? 32 : 64, perEpoch = train.count / batch * batch
            var masks: [(Tensor, Tensor)] = []
            if block == .repopt {
                // stage 1 at the same width and decay: the branch scales it learns set stage 2's prior
                var searchConfig = plan.classifierConfig(.repoptSearch, classes: train.classCount)
                searchConfig.widths = searchConfig.widths.map { $0 * recipe.widthMultiplier }
                var searchRng = SeededGenerator(seed: plan.seed &+ 1)
                let search = RepClassifier(searchConfig, rng: &searchRng)
                log("\(name): stage 1, hyper-search (\(plan.classifierSearchEpochs) epochs)")
                let (_, averaged) = try trainClassifier(search, train: train, val: val, epochs: plan.classifierSearchEpochs, batchSize: batch,
                                                        weightDecay: recipe.weightDecay, seed: plan.seed &+ 1, log: log)
                masks = try model.initializeRepOpt(from: averaged.repOptScales(), rng: &rng)
            }
            let (_, averaged) = try trainClassifier(model, train: train, val: val, epochs: epochs, batchSize: batch, weightDecay: recipe.weightDecay,
                                                    decayForm: recipe.decayForm, seed: plan.seed, masks: masks, log: log)
            let searchImages = block == .repopt ? plan.classifierSearchEpochs * perEpoch : 0
            return (averaged, searchImages + epochs * perEpoch)
        }
        return (trained, saved, val)
    }

    public static let detectorBlocks: [BlockKind] = [.repvgg, .qarepvgg, .repopt]
    public static let classifierBlocks: [BlockKind] = [.repvgg, .qarepvgg, .repopt]
}

/// A baseline a caller wanted loaded, not trained, is not cached (or was trained with another
/// configuration).
public struct MissingBaseline: Error, CustomStringConvertible, Equatable {
    public var name: String
    public var folder: String
    public var description: String {
        "\(name) is not trained here with the current configuration (no matching model in \(folder)): run `make models` or `make exp00` first"
    }
}
