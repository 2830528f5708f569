/// An axis-aligned box in corner form (x1, y1) - (x2, y2), pixels, x2 >= x1 and y2 >= y1 for
/// a valid box. COCO files use [x, y, w, h]; detectors regress (cx, cy, w, h) or distances.
import QuantLabCore

public struct Box: Equatable, Sendable, CustomStringConvertible {
    public var x1: Double, y1: Double, x2: Double, y2: Double

    public init(x1: Double, y1: Double, x2: Double, y2: Double) {
        self.x1 = x1
        self.y1 = y1
        self.x2 = x2
        self.y2 = y2
    }

    /// From COCO's [x, y, width, height].
    public init(xywh b: [Double]) {
        require(b.count == 4, "a box needs 4 numbers, got \(b.count)")
        self.init(x1: b[0], y1: b[1], x2: b[0] + b[2], y2: b[1] + b[3])
    }

    public init(cx: Double, cy: Double, w: Double, h: Double) {
        self.init(x1: cx - w / 2, y1: cy - h / 2, x2: cx + w / 2, y2: cy + h / 2)
    }

    public var width: Double { x2 - x1 }
    public var height: Double { y2 - y1 }
    public var area: Double { max(width, 0) * max(height, 0) }
    public var center: (x: Double, y: Double) { ((x1 + x2) / 2, (y1 + y2) / 2) }
    public var xywh: [Double] { [x1, y1, width, height] }
    public var cxcywh: [Double] { [(x1 + x2) / 2, (y1 + y2) / 2, width, height] }
    public var description: String { "Box(\(x1), \(y1), \(x2), \(y2))" }

    public func intersection(_ o: Box) -> Double {
        max(0, min(x2, o.x2) - max(x1, o.x1)) * max(0, min(y2, o.y2) - max(y1, o.y1))
    }

    /// Intersection over union; 0 when both are empty.
    public func iou(_ o: Box) -> Double {
        let i = intersection(o), u = area + o.area - i
        return u > 0 ? i / u : 0
    }

    /// Generalised IoU (Rezatofighi et al. 2019): IoU - (C - U) / C, C the enclosing box area.
    /// In [-1, 1]; 1 - GIoU is the box loss of YOLOv6 and RT-DETR.
    public func giou(_ o: Box) -> Double {
        let i = intersection(o), u = area + o.area - i
        let c = (max(x2, o.x2) - min(x1, o.x1)) * (max(y2, o.y2) - min(y1, o.y1))
        guard u > 0, c > 0 else { return 0 }
        return i / u - (c - u) / c
    }

    /// Scaled by (sx, sy) then shifted by (dx, dy): how a box follows a resize + pad.
    public func transformed(scaleX sx: Double, scaleY sy: Double, dx: Double = 0, dy: Double = 0) -> Box {
        Box(x1: x1 * sx + dx, y1: y1 * sy + dy, x2: x2 * sx + dx, y2: y2 * sy + dy)
    }

    /// Clipped to [0, width] x [0, height].
    public func clipped(width: Double, height: Double) -> Box {
        Box(x1: min(max(x1, 0), width), y1: min(max(y1, 0), height), x2: min(max(x2, 0), width), y2: min(max(y2, 0), height))
    }
}

/// One detection: a box, a class index (0-based, contiguous) and a confidence.
public struct Detection: Equatable, Sendable {
    public var box: Box
    public var classIndex: Int
    public var score: Double

    public init(box: Box, classIndex: Int, score: Double) {
        self.box = box
        self.classIndex = classIndex
        self.score = score
    }
}

/// Class-aware greedy non-maximum suppression: within each class, in order of decreasing
/// score (ties keep input order), a box is kept unless it overlaps an already kept box by
/// IoU > `iouThreshold`. Boxes scoring below `scoreThreshold` are dropped first; at most
/// `maxDetections` survive, highest scores first.
public func nonMaximumSuppression(_ detections: [Detection], iouThreshold: Double = 0.65, scoreThreshold: Double = 0.001,
                                  maxDetections: Int = 300) -> [Detection] {
    let candidates = detections.enumerated()
        .filter { $0.element.score >= scoreThreshold }
        .sorted { $0.element.score != $1.element.score ? $0.element.score > $1.element.score : $0.offset < $1.offset }
        .map(\.element)
    var keptByClass: [Int: [Box]] = [:]
    var kept: [Detection] = []
    for d in candidates {
        if kept.count >= maxDetections { break }
        let same = keptByClass[d.classIndex, default: []]
        if same.contains(where: { $0.iou(d.box) > iouThreshold }) { continue }
        keptByClass[d.classIndex, default: []].append(d.box)
        kept.append(d)
    }
    return kept
}
