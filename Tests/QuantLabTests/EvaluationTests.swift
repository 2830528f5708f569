import Foundation
import Testing
@testable import QuantLabCore
@testable import QuantLabData
@testable import QuantLabModels
@testable import QuantLabQuant
@testable import QuantLabReport

@Suite("Boxes, NMS and the COCO evaluator on hand-computed cases")
struct EvaluationTests {
    @Test("IoU, GIoU and box formats")
    func boxes() {
        let a = Box(x1: 0, y1: 0, x2: 10, y2: 10), b = Box(x1: 5, y1: 5, x2: 15, y2: 15)
        #expect(a.iou(b) == 25.0 / 175.0)
        #expect(abs(a.giou(b) - (25.0 / 175.0 - (225.0 - 175.0) / 225.0)) < 1e-12)
        let far = Box(x1: 20, y1: 0, x2: 30, y2: 10)
        #expect(a.iou(far) == 0 && abs(a.giou(far) - (0 - (300.0 - 200.0) / 300.0)) < 1e-12)
        #expect(a.giou(a) == 1 && a.iou(a) == 1)
        #expect(Box(xywh: [1, 2, 3, 4]) == Box(x1: 1, y1: 2, x2: 4, y2: 6))
        #expect(Box(cx: 5, cy: 5, w: 4, h: 2).xywh == [3, 4, 4, 2])
        #expect(Box(x1: -5, y1: 2, x2: 50, y2: 8).clipped(width: 20, height: 5) == Box(x1: 0, y1: 2, x2: 20, y2: 5))
    }

    @Test("NMS is per class, keeps the higher score, honours the score threshold and the cap")
    func nms() {
        let d = [
            Detection(box: Box(x1: 0, y1: 0, x2: 10, y2: 10), classIndex: 0, score: 0.9),
            Detection(box: Box(x1: 1, y1: 1, x2: 11, y2: 11), classIndex: 0, score: 0.8), // IoU 0.68 with the first
            Detection(box: Box(x1: 1, y1: 1, x2: 11, y2: 11), classIndex: 1, score: 0.7), // other class: kept
            Detection(box: Box(x1: 30, y1: 30, x2: 40, y2: 40), classIndex: 0, score: 0.6),
            Detection(box: Box(x1: 50, y1: 50, x2: 60, y2: 60), classIndex: 0, score: 0.0005),
        ]
        let kept = nonMaximumSuppression(d, iouThreshold: 0.5)
        #expect(kept.map(\.score) == [0.9, 0.7, 0.6])
        #expect(nonMaximumSuppression(d, iouThreshold: 0.7).map(\.score) == [0.9, 0.8, 0.7, 0.6])
        #expect(nonMaximumSuppression(d, iouThreshold: 0.5, maxDetections: 2).map(\.score) == [0.9, 0.7])
    }

    private func dataset(_ boxes: [[Double]], crowd: [Bool]? = nil, images: Int = 1) -> COCODataset {
        COCODataset(images: (1...images).map { COCOImage(id: $0, file_name: "\($0).jpg", width: 100, height: 100) },
                    annotations: boxes.enumerated().map { i, b in
                        COCOAnnotation(id: i + 1, image_id: 1, category_id: 1, bbox: b, area: b[2] * b[3], iscrowd: (crowd?[i] ?? false) ? 1 : 0)
                    },
                    categories: [COCOCategory(id: 1, name: "thing")])
    }

    @Test("perfect detections give 1 everywhere they are defined")
    func perfect() throws {
        let gt = dataset([[10, 10, 20, 20], [50, 50, 40, 45]])
        let dt = gt.annotations.map { COCOResult(image_id: 1, category_id: 1, bbox: $0.bbox, score: 0.9) }
        let r = try COCOEvaluator().evaluate(groundTruth: gt, detections: dt)
        // no large objects (area > 96^2): APl and ARl are -1, like pycocotools. Precision is
        // tp / (tp + fp + eps) there, so "1" is 1 - 2e-16.
        #expect(firstMismatch(r.stats.map(Float.init), [1, 1, 1, 1, 1, -1, 0.5, 1, 1, 1, 1, -1], atol: 1e-12, rtol: 0) == nil, "\(r.stats)")
    }

    @Test("one detection at IoU 0.62 counts for thresholds .50, .55, .60 only")
    func partialOverlap() throws {
        let gt = dataset([[0, 0, 50, 50]])
        // 50 x 50 gt, detection shifted: IoU = 50*w / (2500 + 50*50 - 50*w); w = 38.27 gives 0.62
        let w = 2 * 2500 * 0.62 / (50 * (1 + 0.62))
        let dt = [COCOResult(image_id: 1, category_id: 1, bbox: [50 - w, 0, 50, 50], score: 0.5)]
        #expect(abs(COCOEvaluator.iou(dt[0].bbox, gt.annotations[0].bbox, crowd: false) - 0.62) < 1e-9)
        let r = try COCOEvaluator().evaluate(groundTruth: gt, detections: dt)
        #expect(abs(r.stats[0] - 0.3) < 1e-12 && abs(r.stats[1] - 1) < 1e-12 && r.stats[2] == 0)
        #expect(abs(r.stats[8] - 0.3) < 1e-12)
    }

    @Test("precision envelope and 101-point interpolation, by hand")
    func interpolation() throws {
        let gt = dataset([[0, 0, 20, 20], [50, 50, 20, 20]])
        let dt = [COCOResult(image_id: 1, category_id: 1, bbox: [0, 0, 20, 20], score: 0.9),
                  COCOResult(image_id: 1, category_id: 1, bbox: [80, 0, 10, 10], score: 0.8), // false positive
                  COCOResult(image_id: 1, category_id: 1, bbox: [50, 50, 20, 20], score: 0.7)]
        let r = try COCOEvaluator().evaluate(groundTruth: gt, detections: dt)
        // precision [1, 1/2, 2/3] -> envelope [1, 2/3, 2/3] at recall [1/2, 1/2, 1]:
        // recall points 0...0.50 read 1, points 0.51...1 read 2/3
        let expected = (51.0 + 50.0 * 2 / 3) / 101
        #expect(abs(r.stats[0] - expected) < 1e-12)
        #expect(r.stats[6] == 0.5 && r.stats[8] == 1) // AR@1: only the top detection counts
    }

    @Test("a detection on a crowd region is ignored, not a false positive; crowd IoU uses the detection's area")
    func crowd() throws {
        let gt = dataset([[0, 0, 20, 20], [40, 40, 50, 50]], crowd: [false, true])
        let tp = COCOResult(image_id: 1, category_id: 1, bbox: [0, 0, 20, 20], score: 0.5)
        let onCrowd = COCOResult(image_id: 1, category_id: 1, bbox: [45, 45, 10, 10], score: 0.9)
        #expect(COCOEvaluator.iou(onCrowd.bbox, gt.annotations[1].bbox, crowd: true) == 1)
        let r = try COCOEvaluator().evaluate(groundTruth: gt, detections: [tp, onCrowd])
        #expect(abs(r.stats[0] - 1) < 1e-12)
        let withoutCrowd = dataset([[0, 0, 20, 20]])
        let r2 = try COCOEvaluator().evaluate(groundTruth: withoutCrowd, detections: [tp, onCrowd])
        #expect(r2.stats[0] < 0.6) // now a confident false positive ranks first
    }

    @Test("detections on an image without ground truth are false positives")
    func emptyImage() throws {
        let gt = dataset([[0, 0, 20, 20]], images: 2)
        let r = try COCOEvaluator().evaluate(groundTruth: gt, detections: [
            COCOResult(image_id: 2, category_id: 1, bbox: [0, 0, 20, 20], score: 0.9),
            COCOResult(image_id: 1, category_id: 1, bbox: [0, 0, 20, 20], score: 0.8),
        ])
        // ranked: FP (0.9), TP (0.8): precision [0, 1/2] -> envelope [1/2, 1/2], so 0.5 at every recall point
        #expect(abs(r.stats[0] - 0.5) < 1e-12 && abs(r.stats[1] - 0.5) < 1e-12)
    }

    @Test("unknown image or category in detections is an error")
    func unknownIds() {
        let gt = dataset([[0, 0, 20, 20]])
        #expect(throws: COCOFormatError.self) { try COCOEvaluator().evaluate(groundTruth: gt, detections: [COCOResult(image_id: 9, category_id: 1, bbox: [0, 0, 1, 1], score: 1)]) }
        #expect(throws: COCOFormatError.self) { try COCOEvaluator().evaluate(groundTruth: gt, detections: [COCOResult(image_id: 1, category_id: 4, bbox: [0, 0, 1, 1], score: 1)]) }
    }

    @Test("summary lines use pycocotools' layout")
    func summaryLayout() throws {
        let gt = dataset([[10, 10, 20, 20]])
        let r = try COCOEvaluator().evaluate(groundTruth: gt, detections: [COCOResult(image_id: 1, category_id: 1, bbox: [10, 10, 20, 20], score: 1)])
        let lines = r.summary.split(separator: "\n").map(String.init)
        #expect(lines.count == 12)
        #expect(lines[0] == " Average Precision  (AP) @[ IoU=0.50:0.95 | area=   all | maxDets=100 ] = 1.000")
        #expect(lines[1] == " Average Precision  (AP) @[ IoU=0.50      | area=   all | maxDets=100 ] = 1.000")
        #expect(lines[5] == " Average Precision  (AP) @[ IoU=0.50:0.95 | area= large | maxDets=100 ] = -1.000")
        #expect(lines[6] == " Average Recall     (AR) @[ IoU=0.50:0.95 | area=   all | maxDets=  1 ] = 1.000")
    }
}

@Suite("COCO files: loading and bad input")
struct COCOFileTests {
    private func write(_ text: String) throws -> URL {
        let url = FileManager.default.temporaryDirectory.appendingPathComponent("ql-coco-\(UUID().uuidString).json")
        try text.write(to: url, atomically: true, encoding: .utf8)
        return url
    }

    private func expectFailure(_ json: String, _ fragment: String, sourceLocation: SourceLocation = #_sourceLocation) throws {
        let url = try write(json)
        defer { try? FileManager.default.removeItem(at: url) }
        do {
            _ = try COCODataset.load(url)
            Issue.record("no error, expected '\(fragment)'", sourceLocation: sourceLocation)
        } catch let e as COCOFormatError {
            #expect(e.message.contains(fragment) && e.message.contains(url.lastPathComponent), "\(e.message)", sourceLocation: sourceLocation)
        }
    }

    static let images = #""images": [{"id": 1, "file_name": "a.jpg", "width": 10, "height": 10}]"#
    static let categories = #""categories": [{"id": 3, "name": "x"}]"#

    @Test("a valid file loads; iscrowd defaults to 0; unknown fields are ignored")
    func valid() throws {
        let url = try write("{\(Self.images), \(Self.categories), \"licenses\": [], \"annotations\": [{\"id\": 7, \"image_id\": 1, \"category_id\": 3, \"bbox\": [1, 2, 3, 4], \"area\": 12, \"segmentation\": [[1, 2]]}]}")
        defer { try? FileManager.default.removeItem(at: url) }
        let ds = try COCODataset.load(url)
        #expect(ds.annotations == [COCOAnnotation(id: 7, image_id: 1, category_id: 3, bbox: [1, 2, 3, 4], area: 12, iscrowd: 0)])
    }

    @Test("bad files name the file, the entry and the field")
    func badFiles() throws {
        func ann(_ body: String) -> String { "{\(Self.images), \(Self.categories), \"annotations\": [\(body)]}" }
        try expectFailure("{not json", "not valid JSON")
        try expectFailure(ann(#"{"id": 1, "image_id": 1, "category_id": 3, "bbox": [1, 2, 3, 4]}"#), "missing field annotations[0].area")
        try expectFailure(ann(#"{"id": 1, "image_id": 1, "category_id": 3, "bbox": "x", "area": 1}"#), "annotations[0].bbox")
        try expectFailure(ann(#"{"id": 1, "image_id": 1, "category_id": 3, "bbox": [1, 2, -3, 4], "area": 1}"#), "negative size")
        try expectFailure(ann(#"{"id": 1, "image_id": 1, "category_id": 3, "bbox": [1, 2, 3], "area": 1}"#), "bbox has 3 numbers")
        try expectFailure(ann(#"{"id": 1, "image_id": 1, "category_id": 9, "bbox": [1, 2, 3, 4], "area": 1}"#), "unknown category_id 9")
        try expectFailure(ann(#"{"id": 1, "image_id": 5, "category_id": 3, "bbox": [1, 2, 3, 4], "area": 1}"#), "image_id 5 is not in images")
        try expectFailure(ann(#"{"id": 1, "image_id": 1, "category_id": 3, "bbox": [1, 2, 3, 4], "area": 1, "iscrowd": 2}"#), "iscrowd must be 0 or 1")
        try expectFailure(ann(#"{"id": 1, "image_id": 1, "category_id": 3, "bbox": [1, 2, 3, 4], "area": 1}, {"id": 1, "image_id": 1, "category_id": 3, "bbox": [1, 2, 3, 4], "area": 1}"#), "duplicate annotation id")
        try expectFailure(ann(#"{"id": 1, "image_id": 1, "category_id": 3, "bbox": [1, 2, 3, 4], "area": -1}"#), "area -1.0")
    }

    @Test("results files: round trip and bad input")
    func results() throws {
        let url = FileManager.default.temporaryDirectory.appendingPathComponent("ql-res-\(UUID().uuidString).json")
        defer { try? FileManager.default.removeItem(at: url) }
        let r = [COCOResult(image_id: 1, category_id: 2, bbox: [1, 2, 3, 4], score: 0.5)]
        try COCOResult.write(r, to: url)
        #expect(try COCOResult.load(url) == r)
        let bad = try write(#"[{"image_id": 1, "category_id": 2, "bbox": [1, 2, 3, 4]}]"#)
        defer { try? FileManager.default.removeItem(at: bad) }
        #expect(throws: COCOFormatError.self) { try COCOResult.load(bad) }
        #expect(throws: COCOFormatError.self) { try COCOResult.load(URL(fileURLWithPath: "/nonexistent/dt.json")) }
    }
}
