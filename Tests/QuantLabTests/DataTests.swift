import CKernels
import Foundation
import Testing
@testable import QuantLabCore
@testable import QuantLabData
@testable import QuantLabModels
@testable import QuantLabQuant
@testable import QuantLabReport

private func tempDir(_ tag: String) -> URL {
    let url = FileManager.default.temporaryDirectory.appendingPathComponent("ql-\(tag)-\(UUID().uuidString)")
    try? FileManager.default.createDirectory(at: url, withIntermediateDirectories: true)
    return url
}

@Suite("JPEG and image kernels")
struct ImageTests {
    @Test("JPEG round trip keeps size and is close at high quality")
    func roundTrip() throws {
        var rng = SeededGenerator(seed: 1)
        var img = RGBImage(width: 37, height: 21)
        for y in 0..<21 { for x in 0..<37 { for c in 0..<3 { img.pixels[(y * 37 + x) * 3 + c] = UInt8((x * 5 + y * 3 + c * 40) % 256) } } }
        _ = rng.next()
        let data = try JPEG.encode(img, quality: 98)
        let back = try JPEG.decode(data)
        #expect(back.width == 37 && back.height == 21)
        let meanError = zip(img.pixels, back.pixels).map { abs(Int($0) - Int($1)) }.reduce(0, +) / img.pixels.count
        #expect(meanError <= 6) // 4:2:0 chroma subsampling on sharp colour steps
        // 4:4:4 keeps chroma at full resolution: much closer on the same sharp colour steps
        let full = try JPEG.decode(try JPEG.encode(img, quality: 98, chroma: .full444))
        let fullError = zip(img.pixels, full.pixels).map { abs(Int($0) - Int($1)) }.reduce(0, +) / img.pixels.count
        #expect(fullError <= 1 && fullError < meanError, "4:4:4 mean error \(fullError), 4:2:0 \(meanError)")
        // the two chroma upsamplings of a 4:2:0 file agree on luma-only content, differ at colour edges
        let replicated = try JPEG.decode(data, source: "test", chromaUpsampling: .replicate)
        #expect(replicated.width == 37 && replicated.pixels != back.pixels)
        let grey = RGBImage(width: 16, height: 16, fill: (90, 90, 90))
        let greyData = try JPEG.encode(grey, quality: 90)
        #expect(try JPEG.decode(greyData).pixels == JPEG.decode(greyData, source: "grey", chromaUpsampling: .replicate).pixels)
    }

    @Test("corrupt, truncated and missing JPEGs are errors that name the file")
    func badJPEG() throws {
        let good = try JPEG.encode(RGBImage(width: 16, height: 16, fill: (10, 200, 30)))
        #expect(throws: ImageError.self) { try JPEG.decode(Data([0xFF, 0xD8, 0xFF, 0x00, 1, 2, 3]), source: "x.jpg") }
        #expect(throws: ImageError.self) { try JPEG.decode(Data("hello, not an image".utf8)) }
        #expect(throws: ImageError.self) { try JPEG.decode(good.prefix(good.count / 2)) }
        #expect(throws: ImageError.self) { try JPEG.decode(Data()) }
        do { _ = try JPEG.read(URL(fileURLWithPath: "/nonexistent/img.jpg")); Issue.record("no error") } catch let e as ImageError {
            #expect(e.message.contains("/nonexistent/img.jpg"))
        }
    }

    @Test("bilinear resize uses half-pixel centres (hand-computed)")
    func resize() {
        var out = [UInt8](repeating: 0, count: 4)
        ql_resize_bilinear_u8(&out, 1, 4, [0, 100], 1, 2, 1)
        #expect(out == [0, 25, 75, 100])
        let flat = RGBImage(width: 9, height: 5, fill: (7, 8, 9)).resized(width: 4, height: 13)
        #expect(flat.pixels.enumerated().allSatisfy { $0.element == [7, 8, 9][$0.offset % 3] })
    }

    @Test("HWC -> CHW with scale and shift, and mirrored")
    func toCHW() {
        let px: [UInt8] = [1, 2, 3, 4, 5, 6] // 1 x 2 image
        var out = [Float](repeating: 0, count: 6)
        ql_u8hwc_to_f32chw(&out, px, 1, 2, [1, 2, 3], [0, 0, -1], 0)
        #expect(out == [1, 4, 4, 10, 8, 17])
        ql_u8hwc_to_f32chw(&out, px, 1, 2, [1, 1, 1], [0, 0, 0], 1)
        #expect(out == [4, 1, 5, 2, 6, 3])
    }

    @Test("HSV jitter with unit gains is the identity up to rounding")
    func hsvIdentity() {
        var rng = SeededGenerator(seed: 3)
        let px = (0..<300).map { _ in UInt8(truncatingIfNeeded: rng.next()) }
        var out = px
        ql_hsv_jitter_u8(&out, 100, 1, 1, 1)
        #expect(zip(px, out).allSatisfy { abs(Int($0) - Int($1)) <= 1 })
        ql_hsv_jitter_u8(&out, 100, 1, 0, 1) // no saturation: grey
        let grey = (0..<100).allSatisfy { (p: Int) -> Bool in
            let (r, g, b) = (out[3 * p], out[3 * p + 1], out[3 * p + 2])
            return r == g && g == b
        }
        #expect(grey)
    }
}

@Suite("Synthetic dataset, transforms and loader")
struct DataPipelineTests {
    static let config = SyntheticShapes.Config(name: "t", imageSize: 64, trainImages: 12, valImages: 6, seed: 5, maxObjects: 4,
                                               minObjectSize: 6, maxObjectSize: 30, singleObject: false, noiseStd: 2...6, jpegQuality: 70...90)

    @Test("same seed, same bytes; another seed, other images; boxes inside the image and valid COCO")
    func deterministic() throws {
        let a = tempDir("syn-a"), b = tempDir("syn-b")
        defer { try? FileManager.default.removeItem(at: a); try? FileManager.default.removeItem(at: b) }
        try SyntheticShapes(Self.config).write(root: a, threads: 2)
        try SyntheticShapes(Self.config).write(root: b, threads: 1)
        for rel in ["annotations/instances_train2017.json", "annotations/instances_val2017.json", "train2017/000000000003.jpg", "val2017/000000000006.jpg"] {
            let x = try Data(contentsOf: a.appendingPathComponent("t/\(rel)")), y = try Data(contentsOf: b.appendingPathComponent("t/\(rel)"))
            #expect(x == y, "\(rel) differs between runs")
        }
        var other = Self.config
        other.seed = 6
        #expect(SyntheticShapes(other).render(split: .train, index: 0).image != SyntheticShapes(Self.config).render(split: .train, index: 0).image)
        let ds = try DetectionDataset(root: a.appendingPathComponent("t"), split: "train2017")
        #expect(ds.count == 12 && ds.classCount == 10)
        var objects = 0
        for i in 0..<ds.count {
            for l in ds.labels(i) {
                objects += 1
                #expect(l.box.x1 >= 0 && l.box.y1 >= 0 && l.box.x2 <= 64 && l.box.y2 <= 64 && l.box.width >= 1)
            }
            _ = try ds.sample(i)
        }
        #expect(objects > 0)
    }

    @Test("letterbox maps boxes and inverts exactly; stretch resizes without padding")
    func letterbox() {
        let img = RGBImage(width: 200, height: 100, fill: (50, 50, 50))
        let label = ObjectLabel(box: Box(x1: 20, y1: 10, x2: 120, y2: 60), classIndex: 3)
        var rng = SeededGenerator(seed: 0)
        let (t, labels, g) = DetectionTransform(size: 64).apply(img, labels: [label], rng: &rng)
        #expect(t.shape == [3, 64, 64])
        #expect(g.scaleX == 0.32 && g.padX == 0 && g.padY == 16)
        #expect(labels == [ObjectLabel(box: Box(x1: 6.4, y1: 19.2, x2: 38.4, y2: 35.2), classIndex: 3)])
        let back = g.toOriginal(labels[0].box)
        #expect(abs(back.x1 - 20) < 1e-9 && abs(back.y2 - 60) < 1e-9)
        #expect(abs(t.data[0] - 114.0 / 255) < 1e-6 && abs(t.data[32 * 64 + 10] - 50.0 / 255) < 1e-6) // pad row, image row
        let (_, l2, g2) = DetectionTransform(size: 64, resize: .stretch).apply(img, labels: [label], rng: &rng)
        #expect(g2.scaleX == 0.32 && g2.scaleY == 0.64 && g2.padY == 0)
        #expect(l2[0].box == Box(x1: 6.4, y1: 6.4, x2: 38.4, y2: 38.4))
    }

    @Test("augmented boxes stay on the object they label", arguments: Array(0..<8))
    func augmentationConsistency(seed: Int) {
        // a white rectangle on black; after augmentation the box must frame the bright pixels
        var img = RGBImage(width: 120, height: 90)
        for y in 30..<60 { for x in 20..<80 { for c in 0..<3 { img.pixels[(y * 120 + x) * 3 + c] = 255 } } }
        var t = DetectionTransform(size: 96, augment: true)
        t.hsvGains = (0, 0, 0)
        var rng = SeededGenerator(seed: UInt64(seed))
        let (x, labels, g) = t.apply(img, labels: [ObjectLabel(box: Box(x1: 20, y1: 30, x2: 80, y2: 60), classIndex: 0)], rng: &rng)
        var minX = 96, minY = 96, maxX = -1, maxY = -1
        for yy in 0..<96 { for xx in 0..<96 where x.data[yy * 96 + xx] > 0.9 {
            minX = min(minX, xx); maxX = max(maxX, xx); minY = min(minY, yy); maxY = max(maxY, yy)
        } }
        if maxX < 0 { #expect(labels.isEmpty); return }
        #expect(labels.count == 1)
        let b = labels[0].box
        #expect(abs(b.x1 - Double(minX)) <= 1.5 && abs(b.x2 - Double(maxX + 1)) <= 1.5, "x: box \(b), pixels \(minX)...\(maxX)")
        #expect(abs(b.y1 - Double(minY)) <= 1.5 && abs(b.y2 - Double(maxY + 1)) <= 1.5, "y: box \(b), pixels \(minY)...\(maxY)")
        let back = g.toOriginal(b)
        #expect(back.x1 >= 18 && back.x2 <= 82 && back.y1 >= 28 && back.y2 <= 62)
    }

    @Test("loader: same batches whatever the worker count; epochs reshuffle; bad samples fail or are skipped")
    func loader() throws {
        let root = tempDir("loader")
        defer { try? FileManager.default.removeItem(at: root) }
        try SyntheticShapes(Self.config).write(root: root, threads: 2)
        let ds = try DetectionDataset(root: root.appendingPathComponent("t"), split: "train2017")
        let t = DetectionTransform(size: 48, augment: true)
        let a = DetectionLoader(dataset: ds, batchSize: 5, transform: t, shuffle: true, seed: 9, workers: 2)
        let b = DetectionLoader(dataset: ds, batchSize: 5, transform: t, shuffle: true, seed: 9, workers: 1)
        let ea = Array(a.epoch(0)), eb = Array(b.epoch(0))
        #expect(ea.count == 3 && eb.count == 3 && ea.last!.imageIds.count == 2)
        for (x, y) in zip(ea, eb) {
            #expect(x.imageIds == y.imageIds && x.images.values == y.images.values && x.labels == y.labels)
        }
        #expect(a.order(epoch: 0) != a.order(epoch: 1))
        // corrupt one image
        try Data("garbage".utf8).write(to: ds.imageURL(2))
        let strict = DetectionLoader(dataset: ds, batchSize: 4, transform: t, shuffle: false, seed: 1)
        let seq = strict.epoch(0)
        let batches = Array(seq)
        #expect(batches.isEmpty && "\(seq.error!)".contains(ds.imageURL(2).lastPathComponent))
        let lenient = DetectionLoader(dataset: ds, batchSize: 4, transform: t, shuffle: false, seed: 1, skipBadSamples: true)
        let all = Array(lenient.epoch(0))
        #expect(all.map(\.imageIds.count).reduce(0, +) == 11 && lenient.skipped.count == 1)
    }
}
