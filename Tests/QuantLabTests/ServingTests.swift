import CKernels
import Foundation
import Testing
@testable import QuantLabCore
@testable import QuantLabData
@testable import QuantLabEngine
@testable import QuantLabModels
@testable import QuantLabQuant

// exp06's pieces (issue #15): the fused preprocessing kernels against the baseline's passes,
// DCT-scaled decode, int8 codes straight into the plan, and the serving loop.

@Suite("Serving: fused preprocessing, codes in, the serving loop")
struct ServingTests {
    /// A serving-like JPEG (the shapes-serving generator, scaled down for speed) and its bytes.
    private func servingJPEG(width: Int = 320, height: Int = 240, index: Int = 0) throws -> Data {
        var config = SyntheticShapes.Config.serving
        (config.imageSize, config.imageHeight, config.minObjectSize, config.maxObjectSize) = (width, height, 16, 144)
        return try JPEG.encode(SyntheticShapes(config).render(split: .val, index: index).image, quality: 90)
    }

    private func prepare(_ p: ServingPreprocessor, _ data: Data) throws -> ([Float], InputGeometry) {
        var out = [Float](repeating: .nan, count: 3 * p.size * p.size)
        var timing = ServingPreprocessor.Timing()
        let g = try out.withUnsafeMutableBufferPointer { try p.prepare(data, source: "test", into: $0.baseAddress!, timing: &timing) }
        return (out, g)
    }

    @Test("without DCT scaling the fused pass equals the baseline's decode, resize, paste and normalise value for value",
          arguments: [(96, DetectionTransform.Resize.letterbox), (77, .letterbox), (320, .letterbox), (500, .letterbox), (96, .stretch), (64, .stretch)])
    func fusedEqualsBaseline(size: Int, resize: DetectionTransform.Resize) throws {
        let data = try servingJPEG()
        var fused = ServingPreprocessor(.fused, size: size, resize: resize)
        fused.maxScaleDenominator = 1
        let (a, ga) = try prepare(ServingPreprocessor(.baseline, size: size, resize: resize), data)
        let (b, gb) = try prepare(fused, data)
        #expect(a == b)
        #expect(ga == gb)
        // and the baseline is exactly the evaluation transform
        var rng = SeededGenerator(seed: 0)
        let (t, _, g) = DetectionTransform(size: size, resize: resize).apply(try JPEG.decode(data), labels: [], rng: &rng)
        #expect(t.values == a)
        #expect(g == ga)
    }

    @Test("the int8 letterbox writes the float letterbox's values quantized, NHWC")
    func codesMatchFloats() throws {
        let data = try servingJPEG()
        var p = ServingPreprocessor(.fused, size: 96)
        p.transform.normalizeShift = [-0.5, -0.4, -0.3]
        let (floats, _) = try prepare(p, data)
        let amax: Float = 0.6 // some values clip
        var codes = [Int8](repeating: 0, count: floats.count)
        var timing = ServingPreprocessor.Timing()
        _ = try codes.withUnsafeMutableBufferPointer { try p.prepareCodes(data, source: "test", table: p.codeTable(amax: amax), into: $0.baseAddress!, timing: &timing) }
        var expected = [Int8](repeating: 0, count: floats.count)
        ql_quantize_nchw_to_nhwc_s8(&expected, floats, 1, 3, Int32(96 * 96), amax, 127)
        #expect(codes == expected)
    }

    @Test("DCT-scaled decode: ceil(size / d), and the fused input stays within a stated distance of the baseline's")
    func scaledDecode() throws {
        let data = try servingJPEG(width: 643, height: 481)
        for d in [1, 2, 4, 8] {
            let image = try JPEG.decode(data, source: "test", scaleDenominator: d)
            #expect(image.width == (643 + d - 1) / d && image.height == (481 + d - 1) / d)
        }
        let size = 160
        #expect(ServingPreprocessor(.fused, size: size).scaleDenominator(width: 643, height: 481) == 4)
        #expect(ServingPreprocessor(.fused, size: 162).scaleDenominator(width: 643, height: 481) == 2) // 1/4 gives 161 wide < 162: no
        let (a, _) = try prepare(ServingPreprocessor(.baseline, size: size), data)
        let (b, _) = try prepare(ServingPreprocessor(.fused, size: size), data)
        let diff = zip(a, b).map { abs($0 - $1) }
        let mean = diff.reduce(0, +) / Float(diff.count)
        // The DCT downscale is a box-like low-pass, bilinear 4x downsampling samples 2 of every 4
        // pixels: they differ at edges and in noise, not in level. Measured on these images: mean
        // 0.004-0.006 (1-1.5 grey levels of 255). Bound: 3 levels.
        #expect(mean < 3 / 255, "mean |fused - baseline| \(mean)")
        #expect(diff.max()! < 1)
    }

    @Test("a geometry outside the canvas is refused, nothing written")
    func badGeometry() {
        var out = [Float](repeating: 7, count: 3 * 8 * 8)
        let image = [UInt8](repeating: 9, count: 4 * 4 * 3), lut = [Float](repeating: 0, count: 768)
        #expect(ql_letterbox_f32chw(&out, 8, 8, image, 4, 4, 8, 8, 1, 0, 114, lut) == -1)
        #expect(ql_letterbox_f32chw(&out, 8, 8, image, 4, 4, 0, 8, 0, 0, 114, lut) == -1)
        #expect(out.allSatisfy { $0 == 7 })
    }

    /// A tiny detector at `size` px with its Q/DQ calibrated (max) and installed.
    private func calibratedDetector(size: Int) throws -> (YOLOv6, QuantizationSimulator) {
        let model = deployedDetector(seed: 5, inputSize: size)
        let sim = try QuantizationSimulator(model)
        var rng = SeededGenerator(seed: 6)
        sim.calibrate(on: [Tensor.uniform([2, 3, size, size], low: 0, high: 1, rng: &rng)]) { _ = model($0) }
        try sim.applyCalibration(.max)
        return (model, sim)
    }

    @Test("the INT8 plan on int8 codes from the fused pass equals the plan on the fused floats")
    func codesIntoPlan() throws {
        let (model, sim) = try calibratedDetector(size: 64)
        defer { sim.remove() }
        let plan = try Int8Plan(Graph.trace(model, batch: 1))
        let amax = try #require(plan.inputAmax)
        let p = ServingPreprocessor(.fused, size: 64), data = try servingJPEG()
        let (floats, _) = try prepare(p, data)
        var codes = [Int8](repeating: 0, count: floats.count)
        var timing = ServingPreprocessor.Timing()
        _ = try codes.withUnsafeMutableBufferPointer { try p.prepareCodes(data, source: "test", table: p.codeTable(amax: amax), into: $0.baseAddress!, timing: &timing) }
        let x = Tensor(zeros: [1, 3, 64, 64])
        x.data.update(from: floats, count: floats.count)
        let viaFloats = try plan.run([x]), viaCodes = try plan.run(inputCodes: codes)
        #expect(zip(viaFloats, viaCodes).allSatisfy { $0.values == $1.values })
        #expect(throws: EngineError.self) { try plan.run(inputCodes: [Int8](repeating: 0, count: 5)) }
        let fp32 = try Int8Plan(Graph.trace(model, batch: 1).withoutQuantizers())
        #expect(fp32.inputAmax == nil)
        #expect(throws: EngineError.self) { try fp32.run(inputCodes: codes) }
    }

    @Test("the serving loop serves every image, counts a corrupt or truncated file and goes on, batches dynamically")
    func servingLoop() throws {
        let (model, sim) = try calibratedDetector(size: 64)
        let good = try (0..<3).map { try servingJPEG(index: $0) }
        let files = [("a.jpg", good[0]), ("truncated.jpg", good[1].prefix(good[1].count / 2)), ("b.jpg", good[2]), ("garbage.jpg", Data("not a jpeg".utf8))]
        let instances = try servingInstances(model, count: 2, maxBatch: 4)
        sim.remove()
        var config = ServingConfig()
        (config.workers, config.instances, config.maxBatch, config.images, config.codesIn) = (2, 2, 4, 40, true)
        let report = try serve(files: files, preprocessor: ServingPreprocessor(.fused, size: 64), instances: instances, config: config)
        #expect(report.served == 20 && report.failed == 20)
        #expect(report.failures.contains { $0.contains("truncated.jpg") } || report.failures.contains { $0.contains("garbage.jpg") })
        #expect(report.meanBatch >= 1 && report.meanBatch <= 4)
        #expect(report.engineSeconds > 0 && report.decodeSeconds > 0 && report.cpuSeconds > 0)
        // preprocessing alone
        var alone = ServingConfig()
        (alone.workers, alone.instances, alone.images) = (1, 0, 10)
        let r = try serve(files: files, preprocessor: ServingPreprocessor(.baseline, size: 64), instances: [], config: alone)
        #expect(r.served == 5 && r.failed == 5 && r.bottleneck == "preprocessing") // images 0..9 over 4 files: 0, 2 (mod 4) decode
        // configuration errors are named
        var bad = config
        bad.codesIn = true
        #expect(throws: EngineError.self) { try serve(files: files, preprocessor: ServingPreprocessor(.baseline, size: 64), instances: instances, config: bad) }
        bad = config
        bad.maxBatch = 8
        #expect(throws: EngineError.self) { try serve(files: files, preprocessor: ServingPreprocessor(.fused, size: 64), instances: instances, config: bad) }
        #expect(throws: EngineError.self) { try serve(files: files, preprocessor: ServingPreprocessor(.fused, size: 96), instances: instances, config: config) }
    }

    /// The floor decodes the files that decode, at 1/8, skips the corrupt ones, and has
    /// nothing to report when none decodes (its speed is `qlab serve-bench`'s to report, not a
    /// test's).
    @Test("the JPEG decode floor: 1/8-scale decodes of the files that decode; nil when none decodes")
    func decodeFloor() throws {
        let good = try (0..<4).map { ("\($0).jpg", try servingJPEG(index: $0)) }
        let corrupt = [("garbage.jpg", Data("not a jpeg".utf8)), ("truncated.jpg", good[0].1.prefix(good[0].1.count / 2))]
        let floor = try #require(jpegDecodeFloor(files: good + corrupt, passes: 2))
        #expect(floor > 0 && floor.isFinite)
        #expect(jpegDecodeFloor(files: corrupt) == nil)
        #expect(try JPEG.decode(good[1].1, source: "1.jpg", scaleDenominator: 8).width == 40, "320 px at 1/8")
    }

    @Test("the bounded queue hands out items in order, at most n at a time, and drains after close")
    func queue() {
        let q = BoundedQueue<Int>(capacity: 3)
        for i in 0..<3 { q.push(i) }
        #expect(q.pop(upTo: 2).0 == [0, 1])
        q.push(3)
        q.close()
        #expect(q.pop(upTo: 5).0 == [2, 3])
        #expect(q.pop(upTo: 5).0 == nil)
    }
}
