import Foundation
import QuantLabCore

/// A detection dataset in COCO layout: `<root>/<split>/<file_name>` images and
/// `<root>/annotations/instances_<split>.json`. Works for the synthetic sets and for real
/// COCO 2017 unchanged. Class indices are the category ids in increasing order.
public struct DetectionDataset: Sendable {
    public let root: URL
    public let split: String
    public let coco: COCODataset
    public let categoryIds: [Int]
    public let images: [COCOImage] // sorted by id
    private let labelsByImage: [Int: [ObjectLabel]]

    /// - Parameter split: "train2017" or "val2017" (the image folder name).
    public init(root: URL, split: String) throws {
        let name = split.hasSuffix("2017") ? String(split.dropLast(4)) : split
        let annotations = root.appendingPathComponent("annotations/instances_\(name)2017.json")
        self.init(root: root, split: split, coco: try COCODataset.load(annotations))
    }

    init(root: URL, split: String, coco: COCODataset) {
        self.root = root
        self.split = split
        self.coco = coco
        categoryIds = coco.categoryIds
        images = coco.images.sorted { $0.id < $1.id }
        let index = Dictionary(uniqueKeysWithValues: categoryIds.enumerated().map { ($0.element, $0.offset) })
        var labels: [Int: [ObjectLabel]] = [:]
        for a in coco.annotations {
            labels[a.image_id, default: []].append(ObjectLabel(box: Box(xywh: a.bbox), classIndex: index[a.category_id]!, crowd: a.iscrowd == 1))
        }
        labelsByImage = labels
    }

    /// The images at `indices` (positions in `images`) with their annotations, all categories
    /// kept: a held-out slice for ranking layers, say, that evaluates like a dataset of its own.
    public func subset(_ indices: [Int]) -> DetectionDataset {
        let keep = Set(indices.map { images[$0].id })
        let sub = COCODataset(images: coco.images.filter { keep.contains($0.id) }, annotations: coco.annotations.filter { keep.contains($0.image_id) },
                              categories: coco.categories)
        return DetectionDataset(root: root, split: split, coco: sub)
    }

    public var count: Int { images.count }
    public var classCount: Int { categoryIds.count }
    public var classNames: [String] {
        let names = Dictionary(uniqueKeysWithValues: coco.categories.map { ($0.id, $0.name) })
        return categoryIds.map { names[$0] ?? String($0) }
    }

    public func imageURL(_ i: Int) -> URL { root.appendingPathComponent(split).appendingPathComponent(images[i].file_name) }

    public func labels(_ i: Int) -> [ObjectLabel] { labelsByImage[images[i].id] ?? [] }

    /// The decoded image and its labels; a missing or corrupt image is an error naming the file.
    public func sample(_ i: Int) throws -> (RGBImage, [ObjectLabel]) {
        let image = try JPEG.read(imageURL(i))
        let meta = images[i]
        guard image.width == meta.width, image.height == meta.height else {
            throw ImageError("\(imageURL(i).path): image is \(image.width)x\(image.height), annotations say \(meta.width)x\(meta.height)")
        }
        return (image, labels(i))
    }
}

/// A batch of network inputs with their labels.
public struct DetectionBatch {
    public var images: Tensor              // [B, 3, S, S]
    public var labels: [[ObjectLabel]]     // per image, in input pixels
    public var imageIds: [Int]
    public var geometry: [InputGeometry]   // input -> original image

    public init(images: Tensor, labels: [[ObjectLabel]], imageIds: [Int], geometry: [InputGeometry]) {
        (self.images, self.labels, self.imageIds, self.geometry) = (images, labels, imageIds, geometry)
    }
}

/// Batches from worker threads with prefetching.
///
/// Order and augmentation are a function of (seed, epoch) only: the permutation comes from a
/// generator seeded by (seed, epoch), and sample k of the epoch is transformed with a
/// generator seeded by (seed, epoch, k). So the batches are identical whatever the number of
/// workers or the timing of the threads. With `skipBadSamples`, an unreadable image is
/// counted (`skipped`) and left out of its batch instead of ending the run.
public final class DetectionLoader: @unchecked Sendable {
    public let dataset: DetectionDataset
    public let batchSize: Int, shuffle: Bool, dropLast: Bool, seed: UInt64, workers: Int
    public let transform: DetectionTransform
    public let skipBadSamples: Bool
    private let lock = NSLock()
    private var skippedFiles: [String] = []

    public init(dataset: DetectionDataset, batchSize: Int, transform: DetectionTransform, shuffle: Bool, seed: UInt64,
                dropLast: Bool = false, workers: Int = 2, skipBadSamples: Bool = false) {
        require(batchSize > 0 && workers > 0, "batch size \(batchSize), workers \(workers)")
        self.dataset = dataset
        self.batchSize = batchSize
        self.transform = transform
        self.shuffle = shuffle
        self.seed = seed
        self.dropLast = dropLast
        self.workers = workers
        self.skipBadSamples = skipBadSamples
    }

    public var skipped: [String] { lock.lock(); defer { lock.unlock() }; return skippedFiles }

    public func batchCount() -> Int {
        dropLast ? dataset.count / batchSize : (dataset.count + batchSize - 1) / batchSize
    }

    /// The sample order of an epoch.
    public func order(epoch: Int) -> [Int] {
        var idx = Array(0..<dataset.count)
        if shuffle {
            var rng = SeededGenerator(seed: seed ^ (UInt64(epoch) &* 0x9E37_79B9_7F4A_7C15))
            idx.shuffle(using: &rng)
        }
        return idx
    }

    /// Builds batch `b` of `epoch` (its samples in parallel on `workers` threads).
    public func batch(_ b: Int, epoch: Int, order: [Int]) throws -> DetectionBatch {
        let lo = b * batchSize, hi = min(order.count, lo + batchSize)
        require(lo < hi, "batch \(b) out of range")
        final class Slots: @unchecked Sendable { // each slot written by exactly one worker
            var items: [(Tensor, [ObjectLabel], InputGeometry)?]
            var errors: [Error?]
            init(_ n: Int) { items = Array(repeating: nil, count: n); errors = Array(repeating: nil, count: n) }
        }
        let slots = Slots(hi - lo)
        let work: @Sendable (Int) -> Void = { k in
            let i = order[lo + k]
            var rng = SeededGenerator(seed: self.seed ^ (UInt64(epoch) << 32) ^ UInt64(lo + k) &* 0xD1B5_4A32_D192_ED03)
            do {
                let (image, labels) = try self.dataset.sample(i)
                slots.items[k] = self.transform.apply(image, labels: labels, rng: &rng)
            } catch { slots.errors[k] = error }
        }
        if workers > 1 { DispatchQueue.concurrentPerform(iterations: hi - lo, execute: work) } else { (0..<(hi - lo)).forEach(work) }
        var kept: [Int] = []
        for k in 0..<(hi - lo) {
            if let e = slots.errors[k] {
                guard skipBadSamples else { throw e }
                lock.lock(); skippedFiles.append("\(e)"); lock.unlock()
            } else { kept.append(k) }
        }
        let s = transform.size
        let images = Tensor(zeros: [kept.count, 3, s, s])
        var labels: [[ObjectLabel]] = [], ids: [Int] = [], geometry: [InputGeometry] = []
        for (j, k) in kept.enumerated() {
            let (t, l, g) = slots.items[k]!
            (images.data + j * 3 * s * s).update(from: t.data, count: 3 * s * s)
            labels.append(l)
            ids.append(dataset.images[order[lo + k]].id)
            geometry.append(g)
        }
        return DetectionBatch(images: images, labels: labels, imageIds: ids, geometry: geometry)
    }

    /// All batches of an epoch; batch b+1 is prepared on a background thread while the
    /// caller works on batch b.
    public func epoch(_ epoch: Int) -> PrefetchingSequence {
        let order = self.order(epoch: epoch)
        return PrefetchingSequence(count: batchCount()) { b in try self.batch(b, epoch: epoch, order: order) }
    }
}

/// A sequence whose next element is produced in the background while the current one is used.
/// Iteration stops at the first error; `error` then holds it.
public final class PrefetchingSequence: Sequence, IteratorProtocol, @unchecked Sendable {
    private let count: Int
    private let make: @Sendable (Int) throws -> DetectionBatch
    private var nextIndex = 0
    private var pending: (DispatchSemaphore, Box)?
    public private(set) var error: Error?

    private final class Box: @unchecked Sendable { var result: Result<DetectionBatch, Error>? }

    init(count: Int, make: @escaping @Sendable (Int) throws -> DetectionBatch) {
        self.count = count
        self.make = make
        prefetch()
    }

    private func prefetch() {
        guard nextIndex < count else { pending = nil; return }
        let index = nextIndex, box = Box(), done = DispatchSemaphore(value: 0), make = self.make
        Thread.detachNewThread {
            box.result = Result { try make(index) }
            done.signal()
        }
        pending = (done, box)
        nextIndex += 1
    }

    public func next() -> DetectionBatch? {
        guard error == nil, let (done, box) = pending else { return nil }
        done.wait()
        switch box.result! {
        case .success(let batch):
            prefetch()
            return batch
        case .failure(let e):
            error = e
            pending = nil
            return nil
        }
    }
}
