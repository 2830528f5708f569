import Foundation
import Testing
@testable import QuantLabCore
@testable import QuantLabData
@testable import QuantLabModels
@testable import QuantLabQuant

/// 8 training images of 64 px with up to 3 objects, in a fresh temporary folder.
private func tinyShapes(_ tag: String, seed: UInt64) throws -> (URL, DetectionDataset) {
    let root = FileManager.default.temporaryDirectory.appendingPathComponent("ql-\(tag)-\(UUID().uuidString)")
    let cfg = SyntheticShapes.Config(name: "d", imageSize: 64, trainImages: 8, valImages: 4, seed: seed, maxObjects: 3,
                                     minObjectSize: 10, maxObjectSize: 30, singleObject: false, noiseStd: 2...4, jpegQuality: 90...95)
    try SyntheticShapes(cfg).write(root: root, threads: 2)
    return (root, try DetectionDataset(root: root.appendingPathComponent("d"), split: "train2017"))
}

@Suite("Bad input: model metadata, non-finite weights and losses")
struct ReliabilityTests {
    /// Writes `model` with its metadata's config edited by `edit`, and returns the file.
    private func mutatedFile(_ dir: URL, _ name: String, kind: String, config: [String: Any], edit: (inout [String: Any]) -> Void,
                             model: Module) throws -> URL {
        var c = config
        edit(&c)
        let url = dir.appendingPathComponent("\(name).safetensors")
        let json = String(decoding: try JSONSerialization.data(withJSONObject: c), as: UTF8.self)
        try model.save(to: url, metadata: ["model": kind, "config": json])
        return url
    }

    @Test("a model file whose config is out of range is an error naming the file and the field, before anything is allocated")
    func metadataRanges() throws {
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent("ql-meta-\(UUID().uuidString)")
        try FileManager.default.createDirectory(at: dir, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(at: dir) }
        var rng = SeededGenerator(seed: 1)
        let det = YOLOv6(.tiny(block: .repvgg, numClasses: 3, inputSize: 64), rng: &rng)
        let detConfig = try JSONSerialization.jsonObject(with: JSONEncoder().encode(det.config)) as! [String: Any]
        let cases: [(String, String, (inout [String: Any]) -> Void)] = [
            ("input100", "inputSize", { $0["inputSize"] = 100 }),
            ("input0", "inputSize", { $0["inputSize"] = 0 }),
            ("classes", "numClasses", { $0["numClasses"] = -3 }),
            ("width", "widthMultiple", { $0["widthMultiple"] = 1e9 }),
            ("depth", "depthMultiple", { $0["depthMultiple"] = 1e6 }),
            ("depth0", "depthMultiple", { $0["depthMultiple"] = 0 }),
            ("channels", "backboneChannels", { $0["backboneChannels"] = [Int]() }),
            ("repeats", "neckRepeats", { $0["neckRepeats"] = [1, 2, -4, 1] }),
        ]
        for (name, field, edit) in cases {
            let url = try mutatedFile(dir, name, kind: "yolov6", config: detConfig, edit: edit, model: det)
            expectError(ModelFileError.self, mentioning: url.path, "'\(field)'", "expected") { _ = try SavedModel.load(url) }
        }
        let cls = RepClassifier(.tiny(block: .repvgg, numClasses: 4), rng: &rng)
        let clsConfig = try JSONSerialization.jsonObject(with: JSONEncoder().encode(cls.config)) as! [String: Any]
        for (name, field, edit): (String, String, (inout [String: Any]) -> Void) in [
            ("cls-widths", "widths", { $0["widths"] = [8, 16] }), ("cls-depths", "depths", { $0["depths"] = [2, 1, 1, 1, 1] }),
            ("cls-input", "inputSize", { $0["inputSize"] = 33 }),
        ] {
            let url = try mutatedFile(dir, name, kind: "rep_classifier", config: clsConfig, edit: edit, model: cls)
            expectError(ModelFileError.self, mentioning: url.path, "'\(field)'") { _ = try SavedModel.load(url) }
        }
        // the untouched configurations load
        let good = try mutatedFile(dir, "good", kind: "yolov6", config: detConfig, edit: { _ in }, model: det)
        guard case .detector = try SavedModel.load(good) else { Issue.record("not a detector"); return }
    }

    @Test("a learning rate that blows training up stops it with an error naming the step; the last good checkpoint stays; a non-finite model is not evaluated")
    func nonFinite() throws {
        let (root, train) = try tinyShapes("nan", seed: 1)
        defer { try? FileManager.default.removeItem(at: root) }
        var config = DetectorTrainingConfig()
        config.epochs = 3
        config.batchSize = 4
        config.learningRate = 1e30
        config.warmupEpochs = 0
        config.gradientClip = nil
        config.checkpointEverySteps = 1
        let model = tinyDetector(seed: 2, classes: train.classCount)
        let dir = root.appendingPathComponent("ckpt")
        let trainer = DetectorTrainer(model: model, train: train, val: nil, config: config, checkpointDir: dir, log: { _ in })
        expectError(NonFiniteError.self, mentioning: "step", "learning rate") { try trainer.run() }
        // every checkpoint written holds finite weights
        if FileManager.default.fileExists(atPath: dir.appendingPathComponent("model.safetensors").path) {
            let saved = tinyDetector(seed: 3, classes: train.classCount) // its weights are replaced by the checkpoint's
            try saved.load(from: dir.appendingPathComponent("model.safetensors"))
            #expect(saved.firstNonFiniteValue() == nil, "a checkpoint with non-finite weights was written")
        }
        // evaluating the blown-up model is refused, naming the tensor
        if let bad = model.firstNonFiniteValue() {
            expectError(NonFiniteError.self, mentioning: bad.name) { _ = try evaluateDetector(model, on: train) }
        } else {
            Issue.record("the weights stayed finite: the test did not blow training up")
        }
    }

    struct Killed: Error {}

    @Test("a run killed at any point of a checkpoint save resumes from a complete checkpoint and ends bit-identical to an uninterrupted run; stale temporaries go")
    func crashSafeCheckpoints() throws {
        let (root, train) = try tinyShapes("kill", seed: 3)
        defer { try? FileManager.default.removeItem(at: root) }
        var cfg = DetectorTrainingConfig()
        cfg.epochs = 2
        cfg.batchSize = 4
        cfg.warmupEpochs = 1
        cfg.checkpointEverySteps = 1
        func fresh(_ seed: UInt64) -> YOLOv6 { tinyDetector(seed: seed, classes: train.classCount) }
        let straight = DetectorTrainer(model: fresh(7), train: train, val: nil, config: cfg, checkpointDir: nil, log: { _ in })
        try straight.run()
        let want = straight.model.stateDict()
        for stage in 0...5 {
            let dir = root.appendingPathComponent("ckpt-\(stage)")
            let killed = DetectorTrainer(model: fresh(7), train: train, val: nil, config: cfg, checkpointDir: dir, log: { _ in })
            killed.saveInterruption = { s in if killed.step == 3 && s == stage { throw Killed() } }
            #expect(throws: Killed.self) { try killed.run() }
            // what else a kill can leave: a half-written temporary, a stray folder
            try Data("partial".utf8).write(to: dir.appendingPathComponent(".latest.999.tmp"))
            try FileManager.default.createDirectory(at: dir.appendingPathComponent("step-00000099"), withIntermediateDirectories: true)
            let resumed = DetectorTrainer(model: fresh(99), train: train, val: nil, config: cfg, checkpointDir: dir, log: { _ in })
            try resumed.run()
            let got = resumed.model.stateDict()
            #expect(zip(want, got).allSatisfy { $0.1.values == $1.1.values }, "killed at save stage \(stage): the resumed run ended elsewhere")
            let left = try FileManager.default.contentsOfDirectory(atPath: dir.path).sorted()
            #expect(left == ["latest", String(format: "step-%08d", resumed.step)], "stage \(stage): left \(left)")
        }
        // a pointer naming no complete checkpoint is an error naming it
        let dir = root.appendingPathComponent("ckpt-bad")
        try FileManager.default.createDirectory(at: dir, withIntermediateDirectories: true)
        try Data("step-00000042".utf8).write(to: dir.appendingPathComponent("latest"))
        let trainer = DetectorTrainer(model: fresh(1), train: train, val: nil, config: cfg, checkpointDir: dir, log: { _ in })
        expectError(CheckpointError.self, mentioning: "step-00000042") { try trainer.run() }
    }
}
