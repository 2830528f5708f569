import Foundation
import Testing
@testable import QuantLabCore
@testable import QuantLabData
@testable import QuantLabModels
@testable import QuantLabQuant

@Suite("PTQ pipeline: calibration draws, ranking split, the sweep, hook ownership")
struct PTQPipelineTests {
    /// 12 training images of 64 px with one object each (so the classification view works too).
    private static func tinyData(_ tag: String) throws -> (URL, URL) {
        let root = FileManager.default.temporaryDirectory.appendingPathComponent("ql-ptq-\(tag)-\(UUID().uuidString)")
        let cfg = SyntheticShapes.Config(name: "d", imageSize: 64, trainImages: 12, valImages: 2, seed: 3, maxObjects: 1,
                                         minObjectSize: 16, maxObjectSize: 40, singleObject: true, noiseStd: 2...4, jpegQuality: 90...95)
        try SyntheticShapes(cfg).write(root: root, threads: 2)
        return (root, root.appendingPathComponent("d"))
    }

    @Test("calibration batches: [B, 3, S, S], fixed by the seed, another seed draws other images, too few images is an error")
    func calibrationBatches() throws {
        let (root, data) = try Self.tinyData("cal")
        defer { try? FileManager.default.removeItem(at: root) }
        let det = try DetectionDataset(root: data, split: "train2017")
        let cls = try ClassificationDataset(root: data, split: "train2017")
        let plan = CalibrationPlan(batches: 2, batchSize: 3, seed: 0)
        let draws: [(CalibrationPlan) throws -> [Tensor]] = [
            { try detectionCalibrationBatches(det, inputSize: 32, plan: $0) },
            { try classificationCalibrationBatches(cls, inputSize: 32, plan: $0) },
        ]
        for draw in draws {
            let a = try draw(plan), again = try draw(plan)
            #expect(a.count == 2 && a.allSatisfy { $0.shape == [3, 3, 32, 32] })
            #expect(a.map(\.values) == again.map(\.values), "the same seed must draw the same images")
            let other = try draw(CalibrationPlan(batches: 2, batchSize: 3, seed: 1))
            #expect(other.map(\.values) != a.map(\.values), "another seed drew the same images")
            // the two batches of one draw hold different images (a sample without replacement)
            #expect(a[0].values != a[1].values)
            expectError(QuantizationError.self, mentioning: "15", "12") { _ = try draw(CalibrationPlan(batches: 5, batchSize: 3, seed: 0)) }
        }
    }

    @Test("ranking split: the requested number of distinct training images, fixed by the seed; out of range is an error")
    func rankingSplitDraw() throws {
        let (root, data) = try Self.tinyData("rank")
        defer { try? FileManager.default.removeItem(at: root) }
        let train = try DetectionDataset(root: data, split: "train2017")
        let split = try rankingSplit(train, images: 5, seed: 0)
        let ids = split.images.map(\.id)
        #expect(ids.count == 5 && Set(ids).count == 5 && Set(ids).isSubset(of: Set(train.images.map(\.id))))
        #expect(try rankingSplit(train, images: 5, seed: 0).images.map(\.id) == ids)
        #expect(Set(try rankingSplit(train, images: 5, seed: 1).images.map(\.id)) != Set(ids))
        for bad in [0, 13] {
            expectError(QuantizationError.self, mentioning: "\(bad) images", "12") { _ = try rankingSplit(train, images: bad, seed: 0) }
        }
    }

    /// A conv + linear classifier head: small, but with every kind of quantized layer but ConvTranspose.
    private func smallNet(_ rng: inout SeededGenerator) -> Sequential {
        Sequential([Conv2d(3, 4, kernel: 3, rng: &rng), Lambda.relu(), Lambda.globalAvgPool(), Linear(4, 3, rng: &rng)])
    }

    @Test("ptqSweep: one calibration per seed, each method evaluated on the quantized model, results in seed order, FP32 afterwards")
    func sweep() throws {
        var rng = SeededGenerator(seed: 4)
        let model = smallNet(&rng)
        model.eval()
        let x = Tensor.uniform([2, 3, 8, 8], low: -1, high: 2, rng: &rng)
        let fp32 = withNoGrad { model(x) }.values
        var calibratedWith: [UInt64] = []
        let methods: [CalibrationMethod] = [.max, .entropy]
        var evaluations: [String] = []
        let subject = PTQSubject(label: "net", module: model, metric: "score",
                                 calibrationImages: { plan in
                                     calibratedWith.append(plan.seed)
                                     #expect(plan.batches == 2 && plan.batchSize == 2)
                                     var r = SeededGenerator(seed: plan.seed)
                                     return (0..<plan.batches).map { _ in Tensor.uniform([2, 3, 8, 8], low: -1, high: 2, rng: &r) }
                                 },
                                 inputShape: [3, 8, 8], outputs: { [model($0)] },
                                 score: { _, label in
                                     let q = withNoGrad { model(x) }.values
                                     #expect(q != fp32, "evaluated an unquantized model (\(label ?? ""))")
                                     return Double(evaluations.count)
                                 })
        let result = try ptqSweep(subject, methods: methods, seeds: [7, 3], batches: 2, batchSize: 2) { seed, method, metric in
            #expect(metric == Double(evaluations.count))
            evaluations.append("\(seed) \(method)")
        }
        #expect(evaluations == ["7 max", "7 entropy", "3 max", "3 entropy"])
        #expect(calibratedWith == [7, 3])
        #expect(result[.max] == [0, 2] && result[.entropy] == [1, 3])
        #expect(withNoGrad { model(x) }.values == fp32, "quantizers left installed after the sweep")
        #expect(!model.namedModules().contains { ($0.1 as? any WeightedLayer)?.hooks.isInstalled == true })
    }

    @Test("prepareDetectorPTQ: deploy form, every conv quantized and calibrated, outputs move but stay close")
    func prepareDetector() throws {
        let (root, data) = try Self.tinyData("prep")
        defer { try? FileManager.default.removeItem(at: root) }
        let train = try DetectionDataset(root: data, split: "train2017")
        var rng = SeededGenerator(seed: 9)
        let model = YOLOv6(.tiny(block: .repvgg, numClasses: train.classCount, inputSize: 64), rng: &rng)
        for (name, p) in model.namedParameters() where name.hasPrefix("detect.cls_preds") || name.hasPrefix("detect.reg_preds") {
            try p.copyValues(from: Tensor.uniform(p.shape, low: -0.3, high: 0.3, rng: &rng))
        }
        let sim = try prepareDetectorPTQ(model, train: train, method: .max, calibration: CalibrationPlan(batches: 2, batchSize: 2, seed: 0))
        defer { sim.remove() }
        #expect(!model.isTraining)
        #expect(!model.namedModules().contains { $0.1 is BatchNorm2d || ($0.1 as? any RepBlock)?.isDeployed == false })
        #expect(sim.enabledLayerNames == sim.layerNames)
        #expect(sim.activationAmax.count == sim.layers.count && sim.activationAmax.values.allSatisfy { $0 > 0 })
        let x = try detectionCalibrationBatches(train, inputSize: 64, plan: CalibrationPlan(batches: 1, batchSize: 2, seed: 5))[0]
        let q = withNoGrad { model(x) }.classLogits.values
        try sim.setEnabled(false)
        let f = withNoGrad { model(x) }.classLogits.values
        #expect(q != f)
        #expect(cosineSimilarity(q, f) > 0.95)
    }

    @Test("hooks have one owner: analysis and a second simulator are refused while a simulator holds them, and leave its quantizers alone")
    func hookOwnership() throws {
        var rng = SeededGenerator(seed: 12)
        let model = smallNet(&rng)
        model.eval()
        let x = Tensor.uniform([2, 3, 8, 8], low: -1, high: 2, rng: &rng)
        let sim = try QuantizationSimulator(model)
        sim.calibrate(on: [x]) { _ = model($0) }
        try sim.applyCalibration(.max)
        let quantized = withNoGrad { model(x) }.values

        expectError(ModuleError.self, mentioning: "layer 0", "QuantizationSimulator", "analyzeQuantization") {
            _ = try analyzeQuantization(model, batches: [x]) { _ = model($0) }
        }
        expectError(ModuleError.self, mentioning: "layer 0", "QuantizationSimulator") { _ = try QuantizationSimulator(model) }
        #expect(withNoGrad { model(x) }.values == quantized, "a refused install changed the simulator's quantizers")

        // someone else's remove leaves the hooks; the owner's remove frees them
        let conv = model.namedModules().compactMap { $0.1 as? Conv2d }.first!
        conv.hooks.remove(owner: NSObject())
        #expect(conv.hooks.isInstalled && conv.hooks.owner == "QuantizationSimulator")
        sim.remove()
        #expect(!conv.hooks.isInstalled)
        let layers = try analyzeQuantization(model, batches: [x]) { _ = model($0) }
        #expect(layers.count == 2 && !conv.hooks.isInstalled)
    }
}
