import Foundation
import QuantLabCore
import QuantLabData

/// RT-DETR's set loss. Each prediction set (the encoder's top-K and every decoder layer) is
/// matched to the ground truth one-to-one by the Hungarian method with RT-DETR's costs
///   class 2 (focal: alpha 0.25, gamma 2), L1 5 (cx, cy, w, h normalised), GIoU 2,
/// and then scored with
///   VFL 1: BCE of the logits against the matched IoU at the matched class (0 elsewhere),
///          weighted by alpha p^gamma on negatives and by the IoU target on positives;
///   L1 5 and GIoU 2 on the matched boxes;
/// each summed over the set and divided by the number of ground-truth boxes in the batch.
public struct RTDETRLoss: Sendable {
    public var classCost = 2.0, l1Cost = 5.0, giouCost = 2.0
    public var vflWeight: Float = 1, l1Weight: Float = 5, giouWeight: Float = 2
    public var alpha: Float = 0.25, gamma: Float = 2

    public init() {}

    public struct Parts: Sendable {
        public var total: Float = 0, vfl: Float = 0, l1: Float = 0, giou: Float = 0
        public var boxes = 0
    }

    /// For one image: the query matched to each ground-truth object (labels in input pixels).
    public func match(logits: UnsafePointer<Float>, boxes: UnsafePointer<Float>, queries: Int, classes: Int,
                      labels: [ObjectLabel], inputSize: Int) -> [Int] {
        guard !labels.isEmpty else { return [] }
        let s = Double(inputSize)
        let targets = labels.map { l in l.box.transformed(scaleX: 1 / s, scaleY: 1 / s) }
        let cost: [[Double]] = zip(labels, targets).map { label, t in
            let tc = t.cxcywh
            return (0..<queries).map { q in
                let p = 1 / (1 + Foundation.exp(-Double(logits[q * classes + label.classIndex])))
                let a = Double(alpha), g = Double(gamma)
                let pos = a * Foundation.pow(1 - p, g) * -Foundation.log(p + 1e-8)
                let neg = (1 - a) * Foundation.pow(p, g) * -Foundation.log(1 - p + 1e-8)
                let b = boxes + q * 4
                let pb = (0..<4).map { Double(b[$0]) }
                let l1 = zip(pb, tc).reduce(0) { $0 + abs($1.0 - $1.1) }
                let giou = Box(cx: pb[0], cy: pb[1], w: pb[2], h: pb[3]).giou(t)
                return classCost * (pos - neg) + l1Cost * l1 + giouCost * -giou
            }
        }
        return minimumCostAssignment(cost)
    }

    /// The loss of one prediction set against the batch's labels (input pixels).
    public func setLoss(_ p: RTDETRPrediction, labels: [[ObjectLabel]], inputSize: Int) -> (Tensor, Parts) {
        let (b, k, c) = (p.logits.shape[0], p.logits.shape[1], p.logits.shape[2])
        require(labels.count == b && p.boxes.shape == [b, k, 4], "RT-DETR loss: \(labels.count) label sets for logits \(p.logits.shape), boxes \(p.boxes.shape)")
        let s = Double(inputSize)
        var rows: [Int] = [], targetBoxes: [Float] = [], positives: [Int] = []
        let target = Tensor(zeros: [b, k, c]), weight = Tensor(zeros: [b, k, c])
        for n in 0..<b {
            let valid = labels[n].filter { !$0.crowd && $0.box.width > 0 && $0.box.height > 0 }.prefix(k)
            let assigned = match(logits: p.logits.data + n * k * c, boxes: p.boxes.data + n * k * 4, queries: k, classes: c,
                                 labels: Array(valid), inputSize: inputSize)
            for (label, q) in zip(valid, assigned) {
                let t = label.box.transformed(scaleX: 1 / s, scaleY: 1 / s)
                let pb = p.boxes.data + (n * k + q) * 4
                let iou = Box(cx: Double(pb[0]), cy: Double(pb[1]), w: Double(pb[2]), h: Double(pb[3])).iou(t)
                target.data[(n * k + q) * c + label.classIndex] = Float(max(iou, 0))
                positives.append((n * k + q) * c + label.classIndex)
                rows.append(n * k + q)
                targetBoxes += t.cxcywh.map(Float.init)
            }
        }
        let count = max(rows.count, 1)
        // VFL weights: alpha p^gamma off the matched (query, class) pairs, the IoU target on them
        for i in 0..<(b * k * c) { weight.data[i] = alpha * Foundation.pow(1 / (1 + Foundation.exp(-p.logits.data[i])), gamma) }
        for i in positives { weight.data[i] = target.data[i] }
        let vfl = (binaryCrossEntropyWithLogits(p.logits, targets: target, reduction: .none) * weight).sum().scaled(by: 1 / Float(count))
        var parts = Parts(boxes: rows.count)
        parts.vfl = vfl.item()
        guard !rows.isEmpty else { return (vfl.scaled(by: vflWeight), parts) }
        let predicted = p.boxes.gatherRows(rows)                                  // [N, 4] cx, cy, w, h
        let truth = Tensor(targetBoxes, shape: [rows.count, 4])
        let l1 = l1Loss(predicted, truth, reduction: .sum).scaled(by: 1 / Float(count))
        let giou = (1 - generalizedIoU(cornerForm(predicted), cornerForm(truth))).sum().scaled(by: 1 / Float(count))
        parts.l1 = l1.item()
        parts.giou = giou.item()
        let total = vfl.scaled(by: vflWeight) + l1.scaled(by: l1Weight) + giou.scaled(by: giouWeight)
        parts.total = total.item()
        return (total, parts)
    }

    /// The full loss: the encoder's top-K set and every decoder layer's set, summed. Parts are
    /// those of the last decoder layer (what the model outputs), `total` of the sum.
    public func callAsFunction(_ model: RTDETR, encoder: RTDETRPrediction, decoder: [RTDETRPrediction],
                               labels: [[ObjectLabel]]) -> (Tensor, Parts) {
        var total: Tensor?
        var last = Parts()
        for set in [encoder] + decoder {
            let (l, parts) = setLoss(set, labels: labels, inputSize: model.config.inputSize)
            total = total.map { $0 + l } ?? l
            last = parts
        }
        last.total = total!.item()
        return (total!, last)
    }
}

/// (cx, cy, w, h) rows -> (x1, y1, x2, y2) rows, with gradients.
func cornerForm(_ b: Tensor) -> Tensor {
    let centre = b.slice(dim: 1, start: 0, end: 2), half = b.slice(dim: 1, start: 2, end: 4).scaled(by: 0.5)
    return concat([centre - half, centre + half], dim: 1)
}

/// 1 - x for a tensor.
private func - (a: Float, b: Tensor) -> Tensor { b.scaled(by: -1, plus: a) }
