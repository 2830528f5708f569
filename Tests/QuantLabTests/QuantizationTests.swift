import Foundation
import Testing
@testable import QuantLabCore
@testable import QuantLabData
@testable import QuantLabModels
@testable import QuantLabQuant
@testable import QuantLabReport

@Suite("Quantization: fake quantizers, calibrators, Q/DQ placement")
struct QuantizationTests {
    // MARK: fake quantization

    @Test("symmetric INT8: round half to even, clamp to [-127, 127] (scale 1)")
    func roundingAndClamping() throws {
        let x = try Tensor(shape: [10], values: [0.5, 1.5, 2.5, -2.5, -0.5, 3.49, 126.6, 200, -300, 127.5])
        let y = fakeQuantize(x, amax: [127], spec: .int8PerTensor)
        #expect(y.values == [0, 2, 2, -2, 0, 3, 127, 127, -127, 127])
        // amax 0 quantizes everything to 0 instead of dividing by zero
        #expect(fakeQuantize(x, amax: [0], spec: .int8PerTensor).values.allSatisfy { $0 == 0 })
        // 4 bits: qmax 7, scale amax / 7
        let y4 = fakeQuantize(try Tensor(shape: [3], values: [1.0, 10, -0.49]), amax: [7], spec: QuantSpec(bits: 4))
        #expect(y4.values == [1, 7, 0])
    }

    @Test("per-channel scales: axis 0 (conv weight) and axis 1 (transposed-conv weight)")
    func perChannel() throws {
        // [2 channels, 2 values]: channel 0 scale 1, channel 1 scale 2
        let w = try Tensor(shape: [2, 1, 1, 2], values: [0.5, 2.0, 5.0, 300])
        let y = fakeQuantize(w, amax: [127, 254], spec: .int8PerChannel(axis: 0))
        #expect(y.values == [0, 2, 4, 254])
        // axis 1 of [2, 2, 1, 1]: element (i, c) uses amax[c]
        let wt = try Tensor(shape: [2, 2, 1, 1], values: [0.5, 5.0, 2.0, 300])
        let yt = fakeQuantize(wt, amax: [127, 254], spec: .int8PerChannel(axis: 1))
        #expect(yt.values == [0, 4, 2, 254])
        #expect(channelAbsMax(wt, axis: 1) == [2.0, 300])
        #expect(channelAbsMax(w, axis: 0) == [2.0, 300])
    }

    @Test("straight-through gradient: 1 inside |x| <= amax (boundary included), 0 outside")
    func steGradient() throws {
        let x = try Tensor(shape: [6], values: [-3, -2, -0.3, 0.7, 2, 2.5])
        x.requiresGrad = true
        fakeQuantize(x, amax: [2], spec: .int8PerTensor).sum().backward()
        #expect(x.grad!.values == [0, 1, 1, 1, 1, 0])
        let w = try Tensor(shape: [2, 2], values: [1.5, -0.5, 1.5, -0.5])
        w.requiresGrad = true
        (fakeQuantize(w, amax: [1, 2], spec: .int8PerChannel(axis: 0)) * Tensor.full([2, 2], 3)).sum().backward()
        #expect(w.grad!.values == [0, 3, 3, 3])
    }

    @Test("asymmetric UINT8: zero point, clamp to [0, 255], gradient inside the range")
    func affine() throws {
        let p = affineParameters(min: -1, max: 24.5, levels: 255)
        #expect(abs(p.scale - 0.1) < 1e-7 && p.zeroPoint == 10)
        // a range that does not contain 0 is widened to contain it
        #expect(affineParameters(min: 2, max: 4, levels: 255).zeroPoint == 0)
        let x = try Tensor(shape: [5], values: [-1.0, -1.5, 0, 24.5, 30])
        x.requiresGrad = true
        let y = fakeQuantizeAffine(x, scale: 0.5, zeroPoint: 2, levels: 255)
        // codes: -2+2=0, -3+2 -> 0, 2, 49+2=51, 60+2=62
        #expect(y.values == [-1.0, -1.0, 0, 24.5, 30])
        y.sum().backward()
        #expect(x.grad!.values == [1, 0, 1, 1, 1])
    }

    @Test("SQNR: infinite when exact, 10 log10(signal / noise) otherwise")
    func sqnrValues() throws {
        let x = try Tensor(shape: [2], values: [3, 4])
        #expect(sqnr(x, x) == .infinity)
        let q = try Tensor(shape: [2], values: [3, 3.5]) // noise 0.25, signal 25
        #expect(abs(sqnr(x, q) - 20) < 1e-9)
    }

    // MARK: calibrators

    @Test("max collector and PaddleSlim's moving average (rate 0.9) on hand cases")
    func maxAndMovingAverage() throws {
        var m = MaxCollector()
        m.collect(try Tensor(shape: [3], values: [-4, 1, 2]))
        m.collect(try Tensor(shape: [2], values: [3, 0.5]))
        #expect(m.amax == 4 && m.min == -4 && m.max == 3)
        var ma = MovingAverageAbsMax(rate: 0.9)
        #expect(ma.amax == nil)
        for v: Float in [1, 2, 3] { ma.update(batchAbsMax: v) }
        // state 1, 1.9, 2.71; accum 1, 2.9, 5.61
        #expect(abs(Double(ma.amax!) - 5.61 / 2.71) < 1e-6)
    }

    @Test("histogram: fixed bin width, grows by appending bins, merges pairs past maxBins")
    func histogramGrowth() throws {
        var h = AbsHistogram(bins: 4, maxBins: 8)
        h.collect(try Tensor(shape: [1], values: [2.0]))            // width 0.5, 2.0 lands in the last bin
        #expect(h.binWidth == 0.5 && h.counts == [0, 0, 0, 1])
        h.collect(try Tensor(shape: [2], values: [-3.0, 0.1]))      // 6 bins of 0.5
        #expect(h.counts == [1, 0, 0, 1, 0, 1])
        // 10 needs 20 bins > 8: merge to width 1 ([1, 1, 1]), then 2 ([2, 1]); 5 bins, 10 in the last
        h.collect(try Tensor(shape: [1], values: [10.0]))
        #expect(h.binWidth == 2 && h.counts == [2, 1, 0, 0, 1])
        #expect(h.total == 4)
    }

    @Test("percentile: left edge of the bin where the cumulative share reaches p")
    func percentile() {
        let h = AbsHistogram(counts: [64, 32, 16, 8, 8], binWidth: 1) // shares 1/2, 1/4, 1/8, 1/16, 1/16
        #expect(h.percentileAmax(50) == 0)
        #expect(h.percentileAmax(87.5) == 2)
        #expect(h.percentileAmax(90) == 3)
        #expect(h.percentileAmax(100) == 4)
    }

    @Test("MSE: all mass in one bin gives that bin's centre (the only grid that hits it exactly)")
    func mse() {
        var counts = [Int64](repeating: 0, count: 2048)
        counts[200] = 1000
        let h = AbsHistogram(counts: counts, binWidth: 0.01)
        #expect(h.mseAmax()! == h.centre(200))
        // a bulk near 0 plus a far outlier: MSE clips the outlier
        var c2 = [Int64](repeating: 0, count: 2048)
        for j in 0..<300 { c2[j] = Int64(100_000 * Foundation.exp(-Double(j * j) / 20000)) + 1 }
        c2[2047] = 1
        let a = AbsHistogram(counts: c2, binWidth: 1).mseAmax()!
        #expect(a > 128 && a < 1000, "mse amax \(a)")
    }

    @Test("entropy (TensorRT KL): exact at 128 bins, clips a lone outlier, picks the last minimum")
    func entropy() {
        // everything within the first 128 bins with uneven counts: quantizing 128 bins to 128
        // levels is lossless (KL 0); 129 bins merge only bins 0 and 1, which the reference
        // makes equal, so KL is 0 there too and the last minimum wins; from 130 on pairs of
        // unequal bins merge and KL > 0.
        var counts = [Int64](repeating: 0, count: 2048)
        for j in 0..<128 { counts[j] = Int64(1 + j % 3) }
        let h = AbsHistogram(counts: counts, binWidth: 0.5)
        #expect(h.entropyAmax() == h.edge(129))
        // a bell with a single far outlier: the outlier is clipped
        var c2 = [Int64](repeating: 0, count: 2048)
        for j in 0..<400 { c2[j] = Int64(1000 * Foundation.exp(-Double(j * j) / 20000)) + 1 }
        c2[2047] = 1
        let a = AbsHistogram(counts: c2, binWidth: 1).entropyAmax()!
        #expect(a >= 128 && a < 1000, "entropy amax \(a)")
    }

    /// Histograms of every kind for the fast calibrators against their references: exact ties,
    /// flat, gaps, infinite-divergence candidates, sparse spikes, huge counts, and 12 seeded
    /// shapes (ReLU'd normals, heavy tails, grown non-2048 bin counts).
    private static func calibrationHistograms(binWidth: Float) -> [(String, AbsHistogram)] {
        var rng = SeededGenerator(seed: 23)
        func histogram(_ n: Int, _ count: (Int) -> Double) -> AbsHistogram {
            AbsHistogram(counts: (0..<n).map { Int64(Swift.max(0, count($0)).rounded()) }, binWidth: binWidth)
        }
        var cases: [(String, AbsHistogram)] = [
            // KL exactly 0 at 128 and 129 bins: a tie the last candidate must win
            ("exact at 128 bins", histogram(600) { $0 < 128 ? Double(1 + $0 % 3) : 0 }),
            ("flat", histogram(700) { _ in 5 }),
            ("flat then empty", histogram(900) { $0 < 400 ? 7 : 0 }),
            ("bell with a far outlier", histogram(2048) { $0 == 2047 ? 1 : 1000 * Foundation.exp(-Double($0 * $0) / 20000) + 1 }),
            // MSE: every candidate rounds both bins to level 0, the same error: the first must win
            ("bin 0 and 1 only", histogram(300) { $0 < 2 ? 1000 : 0 }),
            // the last bin empty with mass beyond it: infinite divergence for those candidates
            ("gaps", histogram(800) { $0 % 5 == 0 ? 0 : Double(900 - $0) }),
            ("sparse spikes", histogram(1000) { $0 % 37 == 3 ? Double(50 + $0) : 0 }),
            ("one large count", histogram(400) { $0 == 10 ? 3e9 : ($0 < 300 ? 1 : 0) }),
        ]
        for shape in 0..<12 {
            let n = [300, 513, 1024, 1500][shape % 4]
            let width = 1 + Double(shape % 3) * 40, tail = Double(shape % 4 + 1) * 0.001
            let noise = (0..<n).map { _ in Double(Float.random(in: 0..<1, using: &rng)) }
            cases.append(("seeded \(shape)", histogram(n) {
                1e5 * Foundation.exp(-Double($0 * $0) / (2 * width * width)) + 1e5 * tail * Foundation.exp(-Double($0) / 200) * noise[$0]
            }))
        }
        return cases
    }

    @Test("entropy: the O(levels) candidates pick the reference's bin, bit for bit, on histograms of every kind (ties included)")
    func entropyMatchesReference() {
        for (name, h) in Self.calibrationHistograms(binWidth: 0.25) {
            #expect(h.entropyAmax() == h.entropyAmaxReference(), "\(name): \(h.entropyAmax()!) vs \(h.entropyAmaxReference()!)")
            #expect(h.entropyAmax(bits: 6, startBin: 64, stride: 3) == h.entropyAmaxReference(bits: 6, startBin: 64, stride: 3), "\(name), 6 bits")
        }
        // fewer bins than the first candidate, and an empty histogram
        #expect(AbsHistogram(counts: [Int64](repeating: 1, count: 100), binWidth: 0.25).entropyAmax() == 25)
        #expect(AbsHistogram().entropyAmax() == nil)
    }

    @Test("MSE: each candidate's O(levels) error is within its stated bound of the bin-by-bin one, and the choice is the reference's, bit for bit (ties: the first)")
    func mseMatchesReference() throws {
        var differed = 0
        for (binWidth, bits, startBin, stride) in [(Float(0.25), 8, 128, 1), (0.0037, 8, 128, 1), (3.1e-6, 4, 7, 3)] {
            for (name, h) in Self.calibrationHistograms(binWidth: binWidth) {
                let k = try #require(MSECandidates(h, bits: bits, startBin: startBin, stride: stride))
                var best = (error: Double.infinity, bin: startBin)
                for i in Swift.stride(from: startBin, to: h.counts.count, by: stride) {
                    let fast = k.prefixError(i), reference = k.referenceError(i)
                    if fast.error != reference { differed += 1 }
                    #expect(Swift.abs(fast.error - reference) <= k.bound(fast), "\(name), width \(binWidth), bin \(i): \(fast.error) vs \(reference)")
                    if reference < best.error { best = (reference, i) }
                }
                #expect(h.mseAmax(bits: bits, startBin: startBin, stride: stride) == h.centre(best.bin), "\(name), width \(binWidth)")
                #expect(h.mseAmaxReference(bits: bits, startBin: startBin, stride: stride) == h.centre(best.bin), "\(name), width \(binWidth)")
            }
        }
        #expect(differed > 1000) // the rounding the bound covers is there: the check above is not vacuous
        // 65536 bins: the exact ratio c / s comes within the Float rounding of a level's
        // half-way point, where only the quantizer's own arithmetic decides the level
        let wide = AbsHistogram(counts: [Int64](repeating: 1, count: 65536), binWidth: 0.0037)
        let k = try #require(MSECandidates(wide, bits: 8, startBin: 128, stride: 1))
        for i in Swift.stride(from: 32768, to: 65536, by: 677) {
            let s = wide.centre(i) / 127
            var lo = 0
            for q in 0...127 {
                let hi = k.runEnd(level: q, from: lo, step: s)
                #expect((lo..<hi).allSatisfy { k.level($0, s) == Float(q) } && (hi == 65536 || k.level(hi, s) > Float(q)), "candidate \(i), level \(q)")
                lo = hi
            }
        }
        let few = AbsHistogram(counts: [Int64](repeating: 1, count: 100), binWidth: 0.25)
        #expect(few.mseAmax() == few.centre(99))
        #expect(AbsHistogram().mseAmax() == nil)
    }

    @Test("calibration method names parse back; a bad one is an error naming it")
    func methodNames() throws {
        for m: CalibrationMethod in [.max, .entropy, .mse, .percentile(99.99), .percentile(99.9), .movingAverage(rate: 0.9), .movingAverage(rate: 0.95)] {
            #expect(try CalibrationMethod(parsing: m.description) == m)
        }
        #expect(throws: QuantizationError.self) { try CalibrationMethod(parsing: "kl") }
        expectError(QuantizationError.self, mentioning: "percentile-101") { _ = try CalibrationMethod(parsing: "percentile-101") }
    }

    // MARK: Q/DQ placement on a detector

    private func deployedDetector(_ kind: BlockKind = .repvgg) -> (YOLOv6, [Tensor]) {
        var rng = SeededGenerator(seed: 11)
        let model = YOLOv6(.tiny(block: kind, numClasses: 2, inputSize: 64), rng: &rng)
        model.train()
        for _ in 0..<2 { _ = withNoGrad { model(Tensor.randn([2, 3, 64, 64], rng: &rng)) } }
        model.eval()
        model.convertToDeployForm()
        // YOLOv6 starts its predictors at zero weights (constant outputs); give them some
        for (name, p) in model.namedParameters() where name.hasPrefix("detect.cls_preds") || name.hasPrefix("detect.reg_preds") {
            try! p.copyValues(from: Tensor.uniform(p.shape, low: -0.3, high: 0.3, rng: &rng))
        }
        return (model, (0..<2).map { _ in Tensor.uniform([2, 3, 64, 64], low: -1, high: 1, rng: &rng) })
    }

    @Test("quantizers sit at every conv / transposed conv / linear by dotted name; concat optional")
    func placement() throws {
        let (model, _) = deployedDetector()
        let sim = try QuantizationSimulator(model)
        let names = Set(sim.layerNames)
        for n in ["backbone.stem.rbr_reparam", "neck.reduce_layer1.conv", "neck.upsample1.upsample_transpose",
                  "neck.Rep_p4.conv1.rbr_reparam", "detect.cls_preds.0", "detect.reg_convs.2.conv"] {
            #expect(names.contains(n), "missing \(n)")
        }
        let convCount = model.namedModules().filter { $0.1 is Conv2d || $0.1 is ConvTranspose2d }.count
        #expect(sim.layers.count == convCount)
        #expect(try sim.layer("neck.upsample1.upsample_transpose").weight!.spec.axis == 1)
        #expect(try sim.layer("neck.reduce_layer1.conv").weight!.spec.axis == 0)
        expectError(QuantizationError.self, mentioning: "neck.reduce_layer9.conv") { _ = try sim.layer("neck.reduce_layer9.conv") }
        sim.remove()
        var opts = QuantizationOptions()
        opts.quantizeConcat = true
        opts.quantizeUpsample = false
        let sim2 = try QuantizationSimulator(model, options: opts)
        #expect(sim2.layers.filter { $0.kind == .concat }.map(\.name) == ["neck.concat_p4", "neck.concat_p3", "neck.concat_n3", "neck.concat_n4"])
        #expect(!sim2.layers.contains { $0.kind == .convTranspose })
        sim2.remove()
    }

    @Test("PTQ round trip: calibrate, quantize (close to FP32, not equal), disable or remove (equal to FP32)")
    func ptqRoundTrip() throws {
        let (model, batches) = deployedDetector()
        let x = batches[0]
        let fp32 = withNoGrad { model(x) }.classLogits.values
        let sim = try QuantizationSimulator(model)
        // an enabled but uncalibrated quantizer is refused: calibrate first
        #expect(throws: QuantizationError.self) { try sim.applyCalibration(.max) }
        sim.calibrate(on: batches) { _ = model($0) }
        // the calibration pass itself computed in FP32: outputs it saw equal FP32
        var seen: [Float] = []
        sim.calibrate { seen = model(x).classLogits.values }
        let calibrationPassIsFP32 = seen == fp32
        #expect(calibrationPassIsFP32)
        for method in CalibrationMethod.standard + [.movingAverage(rate: 0.9)] {
            try sim.applyCalibration(method)
            let q = withNoGrad { model(x) }.classLogits.values
            let changed = q != fp32
            #expect(changed, "\(method): fake quantization changed nothing")
            let cos = cosineSimilarity(q, fp32)
            #expect(cos > 0.98, "\(method): cosine to FP32 \(cos)")
        }
        // weights: per-channel max |w|
        let l = try sim.layer("neck.reduce_layer1.conv")
        let weightAmaxIsChannelMax = l.weight!.amax! == channelAbsMax(l.weightTensor!, axis: 0)
        #expect(weightAmaxIsChannelMax)
        // activations: max calibrator = max |input| seen
        try sim.applyCalibration(.max)
        #expect(l.input.amax![0] == l.input.statistics.max.amax && l.input.amax![0] > 0)
        // all off: FP32 exactly; one layer alone: different
        try sim.setEnabled(false)
        let offIsFP32 = withNoGrad { model(x) }.classLogits.values == fp32
        #expect(offIsFP32)
        try sim.setEnabled(true, layers: ["detect.cls_preds.0"])
        #expect(sim.enabledLayerNames == ["detect.cls_preds.0"])
        let oneLayerChanges = withNoGrad { model(x) }.classLogits.values != fp32
        #expect(oneLayerChanges)
        sim.remove()
        let removedIsFP32 = withNoGrad { model(x) }.classLogits.values == fp32
        #expect(removedIsFP32)
    }

}

@Suite("Quantization analysis")
struct AnalysisTests {
    @Test("moments: mean, std, excess kurtosis on a hand case, stable under a large offset")
    func moments() throws {
        var m = MomentAccumulator()
        let v: [Float] = [1, 2, 3, 4, 5]
        v.withUnsafeBufferPointer { m.add($0.baseAddress!, 5) }
        // population variance 2; fourth central moment (16 + 1 + 0 + 1 + 16) / 5 = 6.8; 6.8 / 4 - 3
        #expect(abs(m.mean - 3) < 1e-12 && abs(m.std - 2.0.squareRoot()) < 1e-12 && abs(m.kurtosis + 1.3) < 1e-9)
        var shifted = MomentAccumulator()
        let w = v.map { $0 + 10_000 }
        w.withUnsafeBufferPointer { shifted.add($0.baseAddress!, 2) }
        w.withUnsafeBufferPointer { shifted.add($0.baseAddress! + 2, 3) } // two chunks, one shift
        #expect(abs(shifted.std - 2.0.squareRoot()) < 1e-9 && abs(shifted.kurtosis + 1.3) < 1e-6)
        #expect(shifted.lo == 10_001 && shifted.hi == 10_005)
    }

    @Test("per-layer analysis of a small model: every weighted layer, input range, SQNR, amax per calibrator")
    func analyzeModel() throws {
        var rng = SeededGenerator(seed: 5)
        let conv = Conv2d(3, 4, kernel: 3, rng: &rng), linear = Linear(4, 2, rng: &rng)
        let model = Sequential([conv, Lambda.relu(), Lambda.globalAvgPool(), linear])
        let x = Tensor.uniform([2, 3, 8, 8], low: -1, high: 2, rng: &rng)
        let layers = try analyzeQuantization(model, batches: [x]) { _ = model($0) }
        #expect(layers.map(\.name) == ["0", "3"])
        let first = layers[0]
        let xs = x.values
        #expect(first.activation.min == Double(xs.min()!) && first.activation.max == Double(xs.max()!))
        #expect(first.activation.count == x.count)
        #expect(Float(first.activationAmax["max"]!) == xs.map(abs).max()!)
        // uniform weights: INT8 gives about 6.02 * 8 + 4.77 - 20 log10(amax / rms) = 48 dB
        #expect(first.weightSQNRPerChannel > 40 && first.weightSQNRPerTensor > 40, "\(first.weightSQNRPerChannel) \(first.weightSQNRPerTensor)")
        #expect(first.weightHistogram.counts.reduce(0, +) == conv.weight.count)
        #expect(first.activationHistogram.counts.reduce(0, +) == x.count)
        // hooks are removed afterwards
        #expect(!conv.hooks.isInstalled && !linear.hooks.isInstalled)
        // the figure is an SVG naming the layer
        #expect(first.figure.hasPrefix("<svg") && first.figure.contains(">0<"))
    }
}

@Suite("Saved models")
struct SavedModelTests {
    @Test("a model file describes itself: detector and classifier load back with equal outputs; no architecture is an error naming the file")
    func roundTrip() throws {
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent("ql-saved-\(UUID().uuidString)")
        defer { try? FileManager.default.removeItem(at: dir) }
        var rng = SeededGenerator(seed: 8)
        let det = YOLOv6(.tiny(block: .qarepvgg, numClasses: 3, inputSize: 64), rng: &rng)
        det.eval()
        let url = dir.appendingPathComponent("det/model.safetensors")
        try det.save(to: url, metadata: SavedModel.metadata(for: det))
        guard case .detector(let back) = try SavedModel.load(url) else { Issue.record("not a detector"); return }
        let x = Tensor.uniform([1, 3, 64, 64], low: 0, high: 1, rng: &rng)
        let same = withNoGrad { back.flatOutputs(x).values == det.flatOutputs(x).values }
        #expect(same && back.config == det.config)
        let cls = RepClassifier(.tiny(block: .repvgg, numClasses: 4), rng: &rng)
        let curl = dir.appendingPathComponent("cls/model.safetensors")
        try cls.save(to: curl, metadata: SavedModel.metadata(for: cls))
        guard case .classifier = try SavedModel.load(curl) else { Issue.record("not a classifier"); return }
        let bare = dir.appendingPathComponent("bare/model.safetensors")
        try cls.save(to: bare)
        expectError(ModelFileError.self, mentioning: bare.path, "train.json") { _ = try SavedModel.load(bare) }
    }
}

@Suite("Baseline cache")
struct BaselineCacheTests {
    @Test("a cache of another configuration is retrained and its checkpoints removed; a matching one is loaded")
    func staleCheckpoints() throws {
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent("ql-cache-\(UUID().uuidString)")
        defer { try? FileManager.default.removeItem(at: dir) }
        var rng = SeededGenerator(seed: 3)
        let model = Linear(2, 2, rng: &rng)
        func record(_ epochs: Int) -> Baselines.TrainingRecord {
            Baselines.TrainingRecord(block: "repvgg", epochs: epochs, searchEpochs: nil, seed: 0, trainImages: 10, wallSeconds: 0,
                                     imagesPerSecond: 0, modelConfig: "{}", dataset: "{}")
        }
        var trained = 0
        _ = try Baselines.trainOrLoad("m", dir: dir, record: record(1), model: model, metadata: [:], log: { _ in }) { trained += 1; return (model, 10) }
        // an interrupted later run of another configuration left a checkpoint
        try FileManager.default.createDirectory(at: dir.appendingPathComponent("checkpoint"), withIntermediateDirectories: true)
        var logs: [String] = []
        _ = try Baselines.trainOrLoad("m", dir: dir, record: record(2), model: model, metadata: [:], log: { logs.append($0) }) {
            #expect(!FileManager.default.fileExists(atPath: dir.appendingPathComponent("checkpoint").path), "stale checkpoint still there")
            trained += 1
            return (model, 10)
        }
        #expect(trained == 2 && logs.contains { $0.contains("removed checkpoint/") })
        // same configuration again: loaded, not trained
        let (_, saved) = try Baselines.trainOrLoad("m", dir: dir, record: record(2), model: model, metadata: [:], log: { _ in }) { trained += 1; return (model, 10) }
        #expect(trained == 2 && saved.epochs == 2)
        // a caller that must not train (exp08) gets an error naming the model, not a training run
        expectError(MissingBaseline.self, mentioning: "m2", "make models") {
            _ = try Baselines.trainOrLoad("m2", dir: dir, record: record(3), model: model, metadata: [:], trainIfMissing: false, log: { _ in }) { trained += 1; return (model, 10) }
        }
        #expect(trained == 2)
    }
}
