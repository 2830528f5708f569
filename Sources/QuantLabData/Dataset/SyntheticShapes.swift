import Foundation
import QuantLabCore

/// A deterministic synthetic detection dataset written in COCO layout:
///
///     <root>/<name>/train2017/000000000001.jpg ...
///     <root>/<name>/val2017/...
///     <root>/<name>/annotations/instances_{train,val}2017.json
///
/// Ten classes of flat shapes with random colour, size (small objects included), aspect,
/// rotation and stripe texture, on backgrounds with gradients, waves and clutter (lines,
/// dots, faint blobs), then sensor noise and JPEG compression at a random quality. Objects may
/// overlap; one that is less than a quarter visible becomes an `iscrowd` region (ignored by
/// the evaluator, as COCO does with crowds) instead of an unannotated distractor.
///
/// Every image is drawn from its own generator seeded by (dataset seed, split, index), so the
/// same seed gives byte-identical files regardless of thread count or order.
public struct SyntheticShapes: Sendable {
    public static let classNames = ["circle", "rectangle", "triangle", "cross", "ring",
                                    "star", "hexagon", "crescent", "half-disc", "L-shape"]

    public struct Config: Codable, Equatable, Sendable {
        public var name: String
        public var imageSize: Int
        public var trainImages: Int
        public var valImages: Int
        public var seed: UInt64
        public var maxObjects: Int
        /// Object size (longer side) range in pixels, sampled log-uniformly.
        public var minObjectSize: Double
        public var maxObjectSize: Double
        /// One centred object per image, for classification (the category is the label).
        public var singleObject: Bool
        public var noiseStd: ClosedRange<Double>
        public var jpegQuality: ClosedRange<Int>
        /// Images are imageSize wide and this high (the top rows of a square scene; nil: square).
        public var imageHeight: Int? = nil
        public var height: Int { imageHeight ?? imageSize }

        /// The default detection set: 160 px, 4000 train / 500 val images, up to 8 objects.
        public static let shapes = Config(name: "shapes", imageSize: 160, trainImages: 4000, valImages: 500, seed: 0,
                                          maxObjects: 8, minObjectSize: 8, maxObjectSize: 72, singleObject: false,
                                          noiseStd: 2...10, jpegQuality: 60...95)
        /// A tiny variant for QUICK=1 runs and tests.
        public static let shapesTiny = Config(name: "shapes-tiny", imageSize: 96, trainImages: 160, valImages: 40, seed: 0,
                                              maxObjects: 5, minObjectSize: 8, maxObjectSize: 44, singleObject: false,
                                              noiseStd: 2...10, jpegQuality: 60...95)
        /// Classification: one object, 64 px, 10 classes, 5000 / 1000 images.
        /// Objects of 24-48 px dominate the image, as in ImageNet (with 10-40 px objects small
        /// classifiers stayed near chance for 15 epochs: 20% top-1; at 24-48 px they reach 40% in 5).
        public static let shapesClassification = Config(name: "shapes-cls", imageSize: 64, trainImages: 5000, valImages: 1000, seed: 0,
                                                        maxObjects: 1, minObjectSize: 24, maxObjectSize: 48, singleObject: true,
                                                        noiseStd: 4...16, jpegQuality: 50...90)
        /// Serving images (exp06): COCO-like 640 x 480 JPEGs at quality 90 with labels, whose
        /// objects, letterboxed to 160 px, have the sizes of `shapes` (8-72 px); val split only.
        public static let serving = Config(name: "shapes-serving", imageSize: 640, trainImages: 0, valImages: 200, seed: 1,
                                           maxObjects: 8, minObjectSize: 32, maxObjectSize: 288, singleObject: false,
                                           noiseStd: 2...10, jpegQuality: 90...90, imageHeight: 480)
        public static let presets = ["shapes": shapes, "shapes-tiny": shapesTiny, "shapes-cls": shapesClassification, "shapes-serving": serving]
    }

    public enum Split: String, CaseIterable, Sendable {
        case train = "train2017", val = "val2017"
        var salt: UInt64 { self == .train ? 0x7472_6169_6E00 : 0x7661_6C00 }
    }

    public let config: Config
    public init(_ config: Config) { self.config = config }

    // MARK: - Shapes

    /// Membership of a point (u, v) in [-1, 1]^2 of the object's own frame.
    static func contains(_ cls: Int, _ u: Double, _ v: Double) -> Bool {
        switch cls {
        case 0: return u * u + v * v <= 1
        case 1: return abs(u) <= 0.9 && abs(v) <= 0.9
        case 2: return v >= -0.8 && v <= 0.9 && abs(u) <= (0.9 - v) * 0.6 // apex up
        case 3: return (abs(u) <= 0.3 && abs(v) <= 1) || (abs(v) <= 0.3 && abs(u) <= 1)
        case 4: let r = u * u + v * v; return r <= 1 && r >= 0.36
        case 5:
            let r = (u * u + v * v).squareRoot(), a = Foundation.atan2(v, u) + Double.pi / 2
            let k = (a / (2 * Double.pi / 5)).truncatingRemainder(dividingBy: 1)
            let t = abs(k - 0.5) * 2 // 1 at a point, 0 between points
            return r <= 0.42 + 0.58 * t * t
        case 6:
            let (x, y) = (abs(u), abs(v))
            return y <= 0.866 && 0.866 * x + 0.5 * y <= 0.866
        case 7: return u * u + v * v <= 1 && (u - 0.45) * (u - 0.45) + v * v > 0.72
        case 8: return u * u + v * v <= 1 && v >= 0
        default: return abs(u) <= 0.9 && abs(v) <= 0.9 && !(u > -0.3 && v < 0.3)
        }
    }

    struct Placed {
        var cls: Int
        var cx, cy, halfW, halfH, angle: Double
        var color: (Double, Double, Double)
        var stripes: Double? // stripe period in object units, or nil
    }

    // MARK: - Rendering

    /// Renders one image and its objects' visible boxes. Pure function of (config, split, index).
    public func render(split: Split, index: Int) -> (image: RGBImage, annotations: [(cls: Int, bbox: [Double], area: Double, crowd: Bool)]) {
        var rng = SeededGenerator(seed: config.seed &* 0x9E37_79B9_7F4A_7C15 ^ split.salt ^ UInt64(index) &* 0xD1B5_4A32_D192_ED03)
        let s = config.imageSize
        var canvas = [Double](repeating: 0, count: s * s * 3)
        drawBackground(&canvas, size: s, rng: &rng)

        var objects: [Placed] = []
        let count = config.singleObject ? 1 : Int(rng.next() % UInt64(config.maxObjects + 1))
        for _ in 0..<count {
            if let p = place(existing: objects, size: s, rng: &rng) { objects.append(p) }
        }
        var owner = [Int16](repeating: -1, count: s * s)
        var fullArea = [Int](repeating: 0, count: objects.count)
        for (k, o) in objects.enumerated() { fullArea[k] = drawObject(o, index: k, canvas: &canvas, owner: &owner, size: s) }

        // sensor noise, then quantise
        let noise = config.noiseStd.lowerBound + (config.noiseStd.upperBound - config.noiseStd.lowerBound) * Double(rng.nextFloat())
        let h = config.height // the top h rows of the square scene
        var pixels = [UInt8](repeating: 0, count: s * h * 3)
        for i in 0..<pixels.count {
            let v = canvas[i] + noise * Double(rng.nextGaussian())
            pixels[i] = UInt8(max(0, min(255, v.rounded())))
        }
        // visible extents from the owner map
        var minX = [Int](repeating: s, count: objects.count), minY = minX
        var maxX = [Int](repeating: -1, count: objects.count), maxY = maxX, visible = [Int](repeating: 0, count: objects.count)
        for y in 0..<h {
            for x in 0..<s {
                let k = Int(owner[y * s + x])
                if k < 0 { continue }
                visible[k] += 1
                minX[k] = min(minX[k], x); maxX[k] = max(maxX[k], x)
                minY[k] = min(minY[k], y); maxY[k] = max(maxY[k], y)
            }
        }
        var anns: [(Int, [Double], Double, Bool)] = []
        for (k, o) in objects.enumerated() where visible[k] >= 4 {
            let bbox = [Double(minX[k]), Double(minY[k]), Double(maxX[k] - minX[k] + 1), Double(maxY[k] - minY[k] + 1)]
            let crowd = Double(visible[k]) < 0.25 * Double(max(fullArea[k], 1))
            anns.append((o.cls, bbox, Double(visible[k]), crowd))
        }
        return (RGBImage(width: s, height: h, pixels: pixels), anns.map { (cls: $0.0, bbox: $0.1, area: $0.2, crowd: $0.3) })
    }

    private func drawBackground(_ c: inout [Double], size s: Int, rng: inout SeededGenerator) {
        func color() -> (Double, Double, Double) { (Double(rng.nextFloat()) * 255, Double(rng.nextFloat()) * 255, Double(rng.nextFloat()) * 255) }
        let (a, b) = (color(), color())
        let angle = Double(rng.nextFloat()) * 2 * Double.pi, (ca, sa) = (Foundation.cos(angle), Foundation.sin(angle))
        // a few low-frequency waves as texture
        let waves = (0..<3).map { _ in (fx: Double(rng.nextFloat()) * 0.3, fy: Double(rng.nextFloat()) * 0.3,
                                        phase: Double(rng.nextFloat()) * 6.28, amp: 8 + 20 * Double(rng.nextFloat())) }
        for y in 0..<s {
            for x in 0..<s {
                let t = 0.5 + 0.5 * ((Double(x) / Double(s) - 0.5) * ca + (Double(y) / Double(s) - 0.5) * sa)
                var w = 0.0
                for wave in waves { w += wave.amp * Foundation.sin(wave.fx * Double(x) + wave.fy * Double(y) + wave.phase) }
                let i = (y * s + x) * 3
                c[i] = a.0 + (b.0 - a.0) * t + w
                c[i + 1] = a.1 + (b.1 - a.1) * t + w
                c[i + 2] = a.2 + (b.2 - a.2) * t + w
            }
        }
        // clutter: thin lines, dots, faint blobs (distractors, not objects)
        let clutter = Int(rng.next() % 12)
        for _ in 0..<clutter {
            let col = color(), kind = rng.next() % 3
            let x0 = Double(rng.nextFloat()) * Double(s), y0 = Double(rng.nextFloat()) * Double(s)
            switch kind {
            case 0:
                let ang = Double(rng.nextFloat()) * Double.pi, len = Double(s) * (0.2 + 0.6 * Double(rng.nextFloat()))
                for step in 0..<Int(len) {
                    let x = Int(x0 + Double(step) * Foundation.cos(ang)), y = Int(y0 + Double(step) * Foundation.sin(ang))
                    if x >= 0 && x < s && y >= 0 && y < s { blend(&c, s, x, y, col, 0.6) }
                }
            case 1:
                let r = 1 + Int(rng.next() % 2)
                for dy in -r...r { for dx in -r...r where dx * dx + dy * dy <= r * r {
                    let x = Int(x0) + dx, y = Int(y0) + dy
                    if x >= 0 && x < s && y >= 0 && y < s { blend(&c, s, x, y, col, 0.8) }
                } }
            default:
                let r = Double(s) * (0.05 + 0.15 * Double(rng.nextFloat()))
                let lo = max(0, Int(x0 - r)), hi = min(s - 1, Int(x0 + r)), top = max(0, Int(y0 - r)), bottom = min(s - 1, Int(y0 + r))
                if lo > hi || top > bottom { continue }
                for y in top...bottom { for x in lo...hi {
                    let d = ((Double(x) - x0) * (Double(x) - x0) + (Double(y) - y0) * (Double(y) - y0)).squareRoot() / r
                    if d < 1 { blend(&c, s, x, y, col, 0.25 * (1 - d)) }
                } }
            }
        }
    }

    private func blend(_ c: inout [Double], _ s: Int, _ x: Int, _ y: Int, _ col: (Double, Double, Double), _ alpha: Double) {
        let i = (y * s + x) * 3
        c[i] += alpha * (col.0 - c[i])
        c[i + 1] += alpha * (col.1 - c[i + 1])
        c[i + 2] += alpha * (col.2 - c[i + 2])
    }

    private func place(existing: [Placed], size s: Int, rng: inout SeededGenerator) -> Placed? {
        for _ in 0..<20 {
            let cls = Int(rng.next() % UInt64(Self.classNames.count))
            let logSize = Foundation.log(config.minObjectSize) + (Foundation.log(config.maxObjectSize) - Foundation.log(config.minObjectSize)) * Double(rng.nextFloat())
            let size = Foundation.exp(logSize), aspect = Foundation.exp((Double(rng.nextFloat()) - 0.5) * 0.9)
            let halfW = size * aspect.squareRoot() / 2, halfH = size / aspect.squareRoot() / 2
            let margin = config.singleObject ? max(halfW, halfH) : 0.3 * max(halfW, halfH)
            let span = Double(s) - 2 * margin
            if span <= 0 { continue }
            let jitter = config.singleObject ? 0.3 : 1.0
            let cx = Double(s) / 2 + (Double(rng.nextFloat()) - 0.5) * span * jitter
            let cy = Double(s) / 2 + (Double(rng.nextFloat()) - 0.5) * span * jitter
            let angle = Double(rng.nextFloat()) * 2 * Double.pi
            let color = (Double(rng.nextFloat()) * 255, Double(rng.nextFloat()) * 255, Double(rng.nextFloat()) * 255)
            let stripes: Double? = rng.nextFloat() < 0.3 ? 0.25 + 0.3 * Double(rng.nextFloat()) : nil
            let p = Placed(cls: cls, cx: cx, cy: cy, halfW: halfW, halfH: halfH, angle: angle, color: color, stripes: stripes)
            let r = max(halfW, halfH)
            let box = Box(x1: cx - r, y1: cy - r, x2: cx + r, y2: cy + r)
            if existing.contains(where: { Box(x1: $0.cx - max($0.halfW, $0.halfH), y1: $0.cy - max($0.halfW, $0.halfH),
                                              x2: $0.cx + max($0.halfW, $0.halfH), y2: $0.cy + max($0.halfW, $0.halfH)).iou(box) > 0.35 }) { continue }
            return p
        }
        return nil
    }

    /// Draws with 2x2 supersampling; marks pixels with >= 50% coverage as owned by `index`.
    /// Returns the object's full (unoccluded) pixel area.
    private func drawObject(_ o: Placed, index: Int, canvas: inout [Double], owner: inout [Int16], size s: Int) -> Int {
        let (ca, sa) = (Foundation.cos(o.angle), Foundation.sin(o.angle))
        let r = (o.halfW * o.halfW + o.halfH * o.halfH).squareRoot()
        let x0 = max(0, Int(o.cx - r)), x1 = min(s - 1, Int(o.cx + r) + 1)
        let y0 = max(0, Int(o.cy - r)), y1 = min(s - 1, Int(o.cy + r) + 1)
        guard x0 <= x1, y0 <= y1 else { return 0 }
        var area = 0
        for y in y0...y1 {
            for x in x0...x1 {
                var hits = 0, striped = 0
                for sub in 0..<4 {
                    let px = Double(x) + 0.25 + 0.5 * Double(sub & 1) - o.cx, py = Double(y) + 0.25 + 0.5 * Double(sub >> 1) - o.cy
                    let u = (px * ca + py * sa) / o.halfW, v = (-px * sa + py * ca) / o.halfH
                    if Self.contains(o.cls, u, v) {
                        hits += 1
                        if let period = o.stripes, Int(((u + 2) / period).rounded(.down)) % 2 == 0 { striped += 1 }
                    }
                }
                if hits == 0 { continue }
                let alpha = Double(hits) / 4, shade = 1 - 0.35 * Double(striped) / Double(hits)
                blend(&canvas, s, x, y, (o.color.0 * shade, o.color.1 * shade, o.color.2 * shade), alpha)
                if hits >= 2 {
                    owner[y * s + x] = Int16(index)
                    area += 1
                }
            }
        }
        return area
    }

    // MARK: - Writing

    public func directory(root: URL) -> URL { root.appendingPathComponent(config.name) }

    public func annotationsURL(root: URL, split: Split) -> URL {
        directory(root: root).appendingPathComponent("annotations/instances_\(split == .train ? "train" : "val")2017.json")
    }

    /// Writes both splits (skipped when a complete copy with the same config exists), using
    /// all kernel threads; `progress` gets (done, total) now and then.
    @discardableResult
    public func write(root: URL, threads: Int = 2, progress: ((Int, Int) -> Void)? = nil) throws -> URL {
        let dir = directory(root: root)
        let stamp = dir.appendingPathComponent("config.json")
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.sortedKeys]
        let configData = try encoder.encode(config)
        if let existing = try? Data(contentsOf: stamp), existing == configData,
           Split.allCases.allSatisfy({ FileManager.default.fileExists(atPath: annotationsURL(root: root, split: $0).path) }) {
            return dir
        }
        let total = config.trainImages + config.valImages
        var done = 0
        for split in Split.allCases {
            let n = split == .train ? config.trainImages : config.valImages
            let folder = dir.appendingPathComponent(split.rawValue)
            try AtomicFile.createFolder(folder)
            let results = try renderAll(count: n, split: split, folder: folder, threads: threads) { k in progress?(done + k, total) }
            done += n
            var images: [COCOImage] = [], anns: [COCOAnnotation] = []
            for (i, objects) in results.enumerated() {
                let id = i + 1
                images.append(COCOImage(id: id, file_name: String(format: "%012d.jpg", id), width: config.imageSize, height: config.height))
                for o in objects {
                    anns.append(COCOAnnotation(id: anns.count + 1, image_id: id, category_id: o.cls + 1, bbox: o.bbox, area: o.area, iscrowd: o.crowd ? 1 : 0))
                }
            }
            let categories = Self.classNames.enumerated().map { COCOCategory(id: $0.offset + 1, name: $0.element, supercategory: "shape") }
            try COCODataset(images: images, annotations: anns, categories: categories).write(to: annotationsURL(root: root, split: split))
        }
        try AtomicFile.write(configData, to: stamp)
        return dir
    }

    private func renderAll(count n: Int, split: Split, folder: URL, threads: Int, tick: (Int) -> Void) throws
        -> [[(cls: Int, bbox: [Double], area: Double, crowd: Bool)]] {
        final class Results: @unchecked Sendable { // each index written by exactly one worker
            var objects: [[(cls: Int, bbox: [Double], area: Double, crowd: Bool)]]
            var errors: [String?]
            init(_ n: Int) { objects = Array(repeating: [], count: n); errors = Array(repeating: nil, count: n) }
        }
        let results = Results(n)
        let chunk = 64
        var start = 0
        while start < n {
            let end = min(n, start + chunk * max(threads, 1))
            let lo = start
            DispatchQueue.concurrentPerform(iterations: end - lo) { k in
                let i = lo + k
                let (image, objects) = render(split: split, index: i)
                var quality = SeededGenerator(seed: config.seed ^ UInt64(i) ^ split.salt &* 31)
                let q = config.jpegQuality.lowerBound + Int(quality.next() % UInt64(config.jpegQuality.count))
                do { try JPEG.write(image, to: folder.appendingPathComponent(String(format: "%012d.jpg", i + 1)), quality: q) } catch {
                    results.errors[i] = "\(error)"
                }
                results.objects[i] = objects
            }
            if let e = results.errors[lo..<end].compactMap({ $0 }).first { throw ImageError(e) }
            start = end
            tick(start)
        }
        return results.objects
    }
}
