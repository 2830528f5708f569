import Foundation
import Testing
@testable import QuantLabCore
@testable import QuantLabData
@testable import QuantLabModels
@testable import QuantLabQuant
@testable import QuantLabReport

@Suite("Sensitivity: output metrics, rank correlations, shard and merge")
struct SensitivityTests {
    @Test("MSE, SNR (PPQ) and cosine on a hand case")
    func outputMetrics() throws {
        let q = try Tensor(shape: [2, 2], values: [1, 2, 0, 0])
        let f = try Tensor(shape: [2, 2], values: [1, 1, 2, 0])
        let d = outputDistances(q, f)
        // errors 1 and 4 over 4 outputs; SNR per sample 1/2 and 4/4; cosine 3/sqrt(10) and 0
        #expect(abs(d.mse - 1.25) < 1e-12)
        #expect(abs(d.snr - 0.75) < 1e-12)
        #expect(abs(d.cosine - 3 / 10.0.squareRoot() / 2) < 1e-12)
        let same = outputDistances(f, f)
        #expect(same.mse == 0 && same.snr == 0 && abs(same.cosine - 1) < 1e-12)
    }

    @Test("Spearman and Kendall tau-b: hand cases, ties, reversal")
    func rankCorrelation() {
        let x: [Double] = [1, 2, 3, 4, 5], y: [Double] = [2, 1, 4, 3, 5]
        // sum d^2 = 4: 1 - 6*4 / (5*24) = 0.8; concordant 8, discordant 2: (8 - 2) / 10
        #expect(abs(Statistics.spearman(x, y) - 0.8) < 1e-12)
        #expect(abs(Statistics.kendallTau(x, y) - 0.6) < 1e-12)
        #expect(abs(Statistics.spearman(x, x.reversed()) + 1) < 1e-12)
        #expect(abs(Statistics.kendallTau(x, x.reversed()) + 1) < 1e-12)
        #expect(Statistics.ranks([10, 20, 20, 5]) == [2, 3.5, 3.5, 1])
        // tau-b with one tie in b: pairs 6, concordant 5, tie 1 -> 5 / sqrt(6 * 5)
        #expect(abs(Statistics.kendallTau([1, 2, 3, 4], [1, 2, 3, 3]) - 5 / 30.0.squareRoot()) < 1e-12)
    }

    @Test("shard strings parse; bad ones are errors naming them")
    func shardParsing() throws {
        let s = try Shard(parsing: "1/4")
        #expect(s.index == 1 && s.count == 4 && s.contains(5) && !s.contains(4))
        for bad in ["4/4", "-1/2", "a/b", "3", "1/0"] {
            expectError(QuantizationError.self, mentioning: bad) { _ = try Shard(parsing: bad) }
        }
    }

    private func calibratedDetector() throws -> (YOLOv6, QuantizationSimulator, Tensor) {
        var rng = SeededGenerator(seed: 21)
        let model = YOLOv6(.tiny(block: .repvgg, numClasses: 2, inputSize: 64), rng: &rng)
        model.train()
        _ = withNoGrad { model(Tensor.randn([2, 3, 64, 64], rng: &rng)) }
        model.eval()
        model.convertToDeployForm()
        for (name, p) in model.namedParameters() where name.hasPrefix("detect.cls_preds") || name.hasPrefix("detect.reg_preds") {
            try p.copyValues(from: Tensor.uniform(p.shape, low: -0.3, high: 0.3, rng: &rng))
        }
        let sim = try QuantizationSimulator(model)
        sim.calibrate(on: [Tensor.uniform([2, 3, 64, 64], low: 0, high: 1, rng: &rng)]) { _ = model($0) }
        try sim.applyCalibration(.max)
        return (model, sim, Tensor.uniform([2, 3, 64, 64], low: 0, high: 1, rng: &rng))
    }

    @Test("shards measured separately and merged equal one full sweep; files round-trip; bad merges are refused")
    func shardMergeRoundTrip() throws {
        let (model, sim, batch) = try calibratedDetector()
        let reference = withNoGrad { model.flatOutputs(batch) }
        // a deterministic stand-in for the mAP method (cheap): 1 - output MSE
        let score: () throws -> Double = { 1 - outputDistances(withNoGrad { model.flatOutputs(batch) }, reference).mse }
        func sweep(_ shard: Shard) throws -> SensitivityReport {
            try measureSensitivity(sim, model: "tiny", calibration: "max", shard: shard, batch: batch, outputs: { model.flatOutputs($0) }, mAP: score)
        }
        let full = try sweep(.all)
        #expect(full.isComplete && full.layers.count == sim.layers.count)
        // quantizing any single layer moves the outputs, and leaves the simulator as it was
        #expect(full.layers.allSatisfy { $0.mse > 0 && $0.cosine < 1 && $0.cosine > 0.5 })
        let allStillEnabled = sim.layers.allSatisfy { $0.isEnabled }
        #expect(allStillEnabled)
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent("ql-sens-\(UUID().uuidString)")
        defer { try? FileManager.default.removeItem(at: dir) }
        var files: [URL] = []
        for i in 0..<3 {
            let part = try sweep(try Shard(index: i, count: 3))
            #expect(!part.isComplete)
            let url = dir.appendingPathComponent("shard-\(i).json")
            try part.write(to: url)
            files.append(url)
        }
        let merged = try SensitivityReport.merge(try files.reversed().map { try SensitivityReport.read($0) })
        #expect(merged.layers.map(\.name) == full.layers.map(\.name))
        let sameValues = zip(merged.layers, full.layers).allSatisfy { $0.mse == $1.mse && $0.snr == $1.snr && $0.cosine == $1.cosine && $0.mAP == $1.mAP }
        #expect(sameValues)
        for metric in SensitivityMetric.allCases { #expect(merged.ranking(by: metric) == full.ranking(by: metric)) }
        // a missing shard, a shard given twice, a shard from another model
        #expect(throws: QuantizationError.self) { try SensitivityReport.merge(try Array(files.prefix(2)).map { try SensitivityReport.read($0) }) }
        #expect(throws: QuantizationError.self) { try SensitivityReport.merge(try (files + [files[0]]).map { try SensitivityReport.read($0) }) }
        var other = try SensitivityReport.read(files[0])
        other.model = "another"
        #expect(throws: QuantizationError.self) { try SensitivityReport.merge([other] + (try files.dropFirst().map { try SensitivityReport.read($0) })) }
        // a corrupt file names itself
        let bad = dir.appendingPathComponent("bad.json")
        try Data("{\"model\": 3".utf8).write(to: bad)
        expectError(QuantizationError.self, mentioning: "bad.json") { _ = try SensitivityReport.read(bad) }
    }

    @Test("ranking: larger sensitivity first; cosine ranks by 1 - cosine; mAP by the drop")
    func rankingOrder() {
        let layers = [LayerSensitivity(name: "a", kind: "conv", mse: 1, snr: 0.1, cosine: 0.99, mAP: 0.30, outputSeconds: 0, mapSeconds: 0),
                      LayerSensitivity(name: "b", kind: "conv", mse: 3, snr: 0.05, cosine: 0.90, mAP: 0.35, outputSeconds: 0, mapSeconds: 0),
                      LayerSensitivity(name: "c", kind: "conv", mse: 2, snr: 0.2, cosine: 0.95, mAP: 0.20, outputSeconds: 0, mapSeconds: 0)]
        let r = SensitivityReport(model: "m", calibration: "c", allLayers: ["a", "b", "c"], shards: [.all], fp32mAP: 0.4, fullPTQmAP: 0.1, layers: layers)
        #expect(r.ranking(by: .mse) == ["b", "c", "a"])
        #expect(r.ranking(by: .snr) == ["c", "a", "b"])
        #expect(r.ranking(by: .cosine) == ["b", "c", "a"])
        #expect(r.ranking(by: .map) == ["c", "a", "b"])
    }
}

@Suite("Detector outputs for sensitivity")
struct InferenceOutputTests {
    @Test("inferenceOutputs: per anchor the decoded box (cx, cy, w, h) and sigmoid scores")
    func decodedOutputs() throws {
        var rng = SeededGenerator(seed: 31)
        let model = YOLOv6(.tiny(block: .repvgg, numClasses: 3, inputSize: 64), rng: &rng)
        model.eval()
        for (name, p) in model.namedParameters() where name.hasPrefix("detect.cls_preds") || name.hasPrefix("detect.reg_preds") {
            try p.copyValues(from: Tensor.uniform(p.shape, low: -0.3, high: 0.3, rng: &rng))
        }
        let x = Tensor.uniform([2, 3, 64, 64], low: 0, high: 1, rng: &rng)
        let out = withNoGrad { model.inferenceOutputs(x) }
        let (logits, distances) = withNoGrad { model(x) }
        let a = model.anchors.count
        #expect(out.shape == [2, a * 7])
        for (i, j) in [(0, 0), (1, a - 1), (1, a / 2)] {
            let box = model.decode(distances, image: i, anchor: j)
            let row = Array(out.values[((i * a + j) * 7)..<((i * a + j) * 7 + 7)])
            let expected = [Float((box.x1 + box.x2) / 2), Float((box.y1 + box.y2) / 2), Float(box.x2 - box.x1), Float(box.y2 - box.y1)]
                + (0..<3).map { 1 / (1 + Foundation.exp(-logits.data[(i * a + j) * 3 + $0])) }
            #expect(firstMismatch(row, expected, atol: 1e-5, rtol: 1e-5) == nil)
        }
        // scoreOutputs: the sigmoid scores alone, in the same anchor order
        let scores = withNoGrad { model.scoreOutputs(x) }
        #expect(scores.shape == [2, a * 3])
        let sameScores = (0..<(2 * a)).allSatisfy { k in (0..<3).allSatisfy { c in abs(scores.data[k * 3 + c] - out.data[k * 7 + 4 + c]) < 1e-6 } }
        #expect(sameScores)
    }
}
