import Foundation
import QuantLabCore

/// Errors about annotation and detection files: file, entry and field are named.
public struct COCOFormatError: Error, CustomStringConvertible, Equatable {
    public let message: String
    public init(_ message: String) { self.message = message }
    public var description: String { message }
}

public struct COCOImage: Codable, Equatable, Sendable {
    public var id: Int
    public var file_name: String
    public var width: Int
    public var height: Int

    public init(id: Int, file_name: String, width: Int, height: Int) {
        self.id = id
        self.file_name = file_name
        self.width = width
        self.height = height
    }
}

public struct COCOAnnotation: Codable, Equatable, Sendable {
    public var id: Int
    public var image_id: Int
    public var category_id: Int
    /// [x, y, width, height] in pixels, top-left origin.
    public var bbox: [Double]
    /// Object area in pixels (of the segmentation in real COCO). The evaluator's small /
    /// medium / large split uses this field, not the box, as pycocotools does.
    public var area: Double
    public var iscrowd: Int

    public init(id: Int, image_id: Int, category_id: Int, bbox: [Double], area: Double, iscrowd: Int = 0) {
        self.id = id
        self.image_id = image_id
        self.category_id = category_id
        self.bbox = bbox
        self.area = area
        self.iscrowd = iscrowd
    }

    public init(from decoder: Decoder) throws {
        let c = try decoder.container(keyedBy: CodingKeys.self)
        id = try c.decode(Int.self, forKey: .id)
        image_id = try c.decode(Int.self, forKey: .image_id)
        category_id = try c.decode(Int.self, forKey: .category_id)
        bbox = try c.decode([Double].self, forKey: .bbox)
        area = try c.decode(Double.self, forKey: .area)
        iscrowd = try c.decodeIfPresent(Int.self, forKey: .iscrowd) ?? 0
    }
}

public struct COCOCategory: Codable, Equatable, Sendable {
    public var id: Int
    public var name: String
    public var supercategory: String?

    public init(id: Int, name: String, supercategory: String? = nil) {
        self.id = id
        self.name = name
        self.supercategory = supercategory
    }
}

/// An `instances_*.json` file: the subset of the COCO format that detection uses. Unknown
/// fields (segmentation, licenses, ...) are ignored, so real COCO files load unchanged.
public struct COCODataset: Codable, Equatable, Sendable {
    public var images: [COCOImage]
    public var annotations: [COCOAnnotation]
    public var categories: [COCOCategory]

    public init(images: [COCOImage], annotations: [COCOAnnotation], categories: [COCOCategory]) {
        self.images = images
        self.annotations = annotations
        self.categories = categories
    }

    /// Category ids in increasing order; a detector's class index i stands for `categoryIds[i]`.
    public var categoryIds: [Int] { categories.map(\.id).sorted() }

    public func annotationsByImage() -> [Int: [COCOAnnotation]] {
        Dictionary(grouping: annotations, by: \.image_id)
    }

    /// Loads and validates; every problem names the file, the entry and the field.
    public static func load(_ url: URL) throws -> COCODataset {
        let data: Data
        do { data = try Data(contentsOf: url) } catch {
            throw COCOFormatError("\(url.path): cannot read annotations (\(error.localizedDescription))")
        }
        return try decode(data, source: url.path)
    }

    /// Decodes and validates annotations held in memory; `source` names them in errors.
    public static func decode(_ data: Data, source: String = "<memory>") throws -> COCODataset {
        let ds: COCODataset
        do { ds = try JSONDecoder().decode(COCODataset.self, from: data) } catch let e as DecodingError {
            throw COCOFormatError("\(source): \(describe(e))")
        }
        try ds.validate(source: source)
        return ds
    }

    public func validate(source: String) throws {
        func fail(_ m: String) -> COCOFormatError { COCOFormatError("\(source): \(m)") }
        var imageIds = Set<Int>(), categoryIds = Set<Int>(), annotationIds = Set<Int>()
        for (i, im) in images.enumerated() {
            guard imageIds.insert(im.id).inserted else { throw fail("images[\(i)]: duplicate image id \(im.id)") }
            guard im.width > 0, im.height > 0 else { throw fail("images[\(i)] (id \(im.id)): size \(im.width)x\(im.height) is not positive") }
            guard !im.file_name.isEmpty, !im.file_name.contains("..") else { throw fail("images[\(i)] (id \(im.id)): bad file_name '\(im.file_name)'") }
        }
        for (i, c) in categories.enumerated() {
            guard categoryIds.insert(c.id).inserted else { throw fail("categories[\(i)]: duplicate category id \(c.id)") }
        }
        for (i, a) in annotations.enumerated() {
            let at = "annotations[\(i)] (id \(a.id))"
            guard annotationIds.insert(a.id).inserted else { throw fail("\(at): duplicate annotation id") }
            guard imageIds.contains(a.image_id) else { throw fail("\(at): image_id \(a.image_id) is not in images") }
            guard categoryIds.contains(a.category_id) else { throw fail("\(at): unknown category_id \(a.category_id)") }
            try Self.checkBox(a.bbox, at: at, source: source)
            guard a.area.isFinite, a.area >= 0 else { throw fail("\(at): area \(a.area) is not a non-negative number") }
            guard a.iscrowd == 0 || a.iscrowd == 1 else { throw fail("\(at): iscrowd must be 0 or 1, got \(a.iscrowd)") }
        }
    }

    static func checkBox(_ b: [Double], at: String, source: String) throws {
        guard b.count == 4 else { throw COCOFormatError("\(source): \(at): bbox has \(b.count) numbers, expected [x, y, w, h]") }
        guard b.allSatisfy(\.isFinite) else { throw COCOFormatError("\(source): \(at): bbox \(b) is not finite") }
        guard b[2] >= 0, b[3] >= 0 else { throw COCOFormatError("\(source): \(at): bbox \(b) has negative size") }
    }

    /// Writes the file atomically (sorted keys, so equal datasets give equal bytes).
    public func write(to url: URL) throws {
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.sortedKeys]
        try AtomicFile.write(encoder.encode(self), to: url)
    }
}

/// One line of a COCO detection-results file, the format pycocotools' `loadRes` reads.
public struct COCOResult: Codable, Equatable, Sendable {
    public var image_id: Int
    public var category_id: Int
    public var bbox: [Double]
    public var score: Double

    public init(image_id: Int, category_id: Int, bbox: [Double], score: Double) {
        self.image_id = image_id
        self.category_id = category_id
        self.bbox = bbox
        self.score = score
    }

    public static func load(_ url: URL) throws -> [COCOResult] {
        let data: Data
        do { data = try Data(contentsOf: url) } catch {
            throw COCOFormatError("\(url.path): cannot read detections (\(error.localizedDescription))")
        }
        return try decode(data, source: url.path)
    }

    /// Decodes and validates detections held in memory; `source` names them in errors.
    public static func decode(_ data: Data, source: String = "<memory>") throws -> [COCOResult] {
        let results: [COCOResult]
        do { results = try JSONDecoder().decode([COCOResult].self, from: data) } catch let e as DecodingError {
            throw COCOFormatError("\(source): \(describe(e))")
        }
        for (i, r) in results.enumerated() {
            try COCODataset.checkBox(r.bbox, at: "[\(i)]", source: source)
            guard r.score.isFinite else { throw COCOFormatError("\(source): [\(i)]: score \(r.score) is not finite") }
        }
        return results
    }

    public static func write(_ results: [COCOResult], to url: URL) throws {
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.sortedKeys]
        try AtomicFile.write(encoder.encode(results), to: url)
    }
}

