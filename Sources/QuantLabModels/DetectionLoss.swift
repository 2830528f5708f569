import Foundation
import QuantLabCore
import QuantLabData

/// Which anchor learns which object, as YOLOv6's TaskAlignedAssigner (TOOD):
///  1. candidates: anchor points strictly inside the ground-truth box;
///  2. alignment t = score(gt class)^alpha * IoU(predicted box, gt)^beta, alpha 1, beta 6;
///  3. each gt takes its top-k (13) candidates by t; an anchor claimed by several gts keeps
///     the one its predicted box overlaps most;
///  4. the soft target of a positive is t normalised per gt: t / max t * max IoU.
/// Anchors inside a crowd region that are not positives are ignored by the class loss.
public struct TaskAlignedAssigner: Sendable {
    public var topK = 13
    public var alpha = 1.0
    public var beta = 6.0

    public init() {}

    public struct Assignment: Equatable, Sendable {
        /// Per anchor: index into the non-crowd labels, or -1.
        public var gtIndex: [Int]
        /// Per anchor: soft target in [0, 1] for the assigned class (0 for negatives).
        public var targetScore: [Double]
        /// Per anchor: excluded from the class loss (inside a crowd region, not positive).
        public var ignored: [Bool]
    }

    /// - Parameters:
    ///   - scores: per anchor, per class, predicted probabilities (detached), row-major [A, C].
    ///   - boxes: per anchor, the predicted box.
    public func assign(scores: [Float], classes: Int, boxes: [Box], anchors: AnchorGrid, labels: [ObjectLabel]) -> Assignment {
        let a = anchors.count
        var gtIndex = [Int](repeating: -1, count: a), target = [Double](repeating: 0, count: a), ignored = [Bool](repeating: false, count: a)
        let objects = labels.filter { !$0.crowd }
        for crowd in labels where crowd.crowd {
            for i in 0..<a where inside(anchors.points[i], crowd.box) { ignored[i] = true }
        }
        guard !objects.isEmpty else { return Assignment(gtIndex: gtIndex, targetScore: target, ignored: ignored) }
        // alignment metric and IoU for candidate pairs
        var align = [[Double]](repeating: [Double](repeating: 0, count: a), count: objects.count)
        var ious = align
        var chosen = [[Int]](repeating: [], count: objects.count)
        for (g, obj) in objects.enumerated() {
            var candidates: [(Int, Double)] = []
            for i in 0..<a where inside(anchors.points[i], obj.box) {
                let iou = max(boxes[i].iou(obj.box), 0)
                let s = Double(scores[i * classes + obj.classIndex])
                let t = Foundation.pow(s, alpha) * Foundation.pow(iou, beta)
                align[g][i] = t
                ious[g][i] = iou
                candidates.append((i, t))
            }
            // top-k by alignment; ties broken by anchor order (stable)
            chosen[g] = candidates.enumerated().sorted { $0.element.1 != $1.element.1 ? $0.element.1 > $1.element.1 : $0.offset < $1.offset }
                .prefix(topK).map(\.element.0)
        }
        // resolve anchors claimed by several objects: keep the highest IoU
        var owner = [Int](repeating: -1, count: a)
        for (g, list) in chosen.enumerated() {
            for i in list where owner[i] < 0 || ious[g][i] > ious[owner[i]][i] { owner[i] = g }
        }
        var maxAlign = [Double](repeating: 0, count: objects.count), maxIoU = maxAlign
        for i in 0..<a where owner[i] >= 0 {
            let g = owner[i]
            maxAlign[g] = max(maxAlign[g], align[g][i])
            maxIoU[g] = max(maxIoU[g], ious[g][i])
        }
        for i in 0..<a where owner[i] >= 0 {
            let g = owner[i]
            gtIndex[i] = g
            target[i] = align[g][i] * maxIoU[g] / (maxAlign[g] + 1e-9)
            ignored[i] = false
        }
        return Assignment(gtIndex: gtIndex, targetScore: target, ignored: ignored)
    }

    private func inside(_ p: (x: Double, y: Double), _ b: Box) -> Bool {
        let eps = 1e-9
        return p.x - b.x1 > eps && p.y - b.y1 > eps && b.x2 - p.x > eps && b.y2 - p.y > eps
    }
}

/// Generalised IoU of corresponding rows of two [P, 4] (x1, y1, x2, y2) box tensors, as a
/// [P, 1] tensor with gradients (inverted predicted boxes count as empty).
public func generalizedIoU(_ p: Tensor, _ g: Tensor) -> Tensor {
    require(p.rank == 2 && p.shape[1] == 4 && p.shape == g.shape, "generalizedIoU: \(p.shape) vs \(g.shape)")
    func col(_ t: Tensor, _ i: Int) -> Tensor { t.slice(dim: 1, start: i, end: i + 1) }
    let (px1, py1, px2, py2) = (col(p, 0), col(p, 1), col(p, 2), col(p, 3))
    let (gx1, gy1, gx2, gy2) = (col(g, 0), col(g, 1), col(g, 2), col(g, 3))
    let iw = (minimum(px2, gx2) - maximum(px1, gx1)).relu(), ih = (minimum(py2, gy2) - maximum(py1, gy1)).relu()
    let inter = iw * ih
    let areaP = (px2 - px1).relu() * (py2 - py1).relu(), areaG = (gx2 - gx1).relu() * (gy2 - gy1).relu()
    let union = areaP + areaG - inter + 1e-7
    let enclose = (maximum(px2, gx2) - minimum(px1, gx1)) * (maximum(py2, gy2) - minimum(py1, gy1)) + 1e-7
    return inter / union - (enclose - union) / enclose
}

/// YOLOv6's loss without DFL: varifocal classification loss + 2.5 x GIoU box loss, both
/// normalised by the sum of the soft targets.
public struct DetectionLoss: Sendable {
    public var assigner = TaskAlignedAssigner()
    public var classWeight = 1.0
    public var boxWeight = 2.5
    /// Varifocal loss: weight = alpha * p^gamma for negatives, the soft target q for positives.
    public var vflAlpha = 0.75
    public var vflGamma = 2.0

    public init() {}

    public struct Parts: Sendable {
        public var total: Float, classification: Float, box: Float
        public var positives: Int
    }

    /// The assigner's answer for each image of the batch, from the (detached) outputs: class
    /// probabilities and decoded boxes, as the loss uses them.
    public func assignments(_ model: YOLOv6, classLogits: Tensor, distances: Tensor, labels: [[ObjectLabel]]) -> [TaskAlignedAssigner.Assignment] {
        let probs = probabilities(classLogits)
        return assignments(model, probabilities: probs, distances: distances, labels: labels)
    }

    /// Per image, sigmoid of the class logits [A * C] (detached).
    private func probabilities(_ classLogits: Tensor) -> [[Float]] {
        let (batch, n) = (classLogits.shape[0], classLogits.shape[1] * classLogits.shape[2])
        return (0..<batch).map { b in
            let logits = classLogits.data + b * n
            return (0..<n).map { 1 / (1 + Foundation.exp(-logits[$0])) }
        }
    }

    private func assignments(_ model: YOLOv6, probabilities probs: [[Float]], distances: Tensor, labels: [[ObjectLabel]]) -> [TaskAlignedAssigner.Assignment] {
        require(labels.count == probs.count, "loss: \(labels.count) label lists for a batch of \(probs.count)")
        let (a, c) = (model.anchors.count, model.config.numClasses)
        return probs.indices.map { b in
            let boxes = (0..<a).map { model.decode(distances, image: b, anchor: $0) }
            return assigner.assign(scores: probs[b], classes: c, boxes: boxes, anchors: model.anchors, labels: labels[b])
        }
    }

    /// The loss over a batch and its parts (for logging).
    public func callAsFunction(_ model: YOLOv6, classLogits: Tensor, distances: Tensor, labels: [[ObjectLabel]]) -> (Tensor, Parts) {
        let (batch, a, c) = (classLogits.shape[0], classLogits.shape[1], classLogits.shape[2])
        OpProfiler.mark("loss: before")
        let probs = probabilities(classLogits)
        let assigned = assignments(model, probabilities: probs, distances: distances, labels: labels)
        OpProfiler.mark("loss: assigner")
        let targets = Tensor(zeros: [batch, a, c]), weights = Tensor(zeros: [batch, a, c])
        var posRows: [Int] = [], gtBoxes: [Float] = [], anchorTerms: [Float] = [], strideTerms: [Float] = [], posWeights: [Float] = []
        var scoreSum = 0.0
        withNoGrad {
            for b in 0..<batch {
                let imageProbs = probs[b]
                let objects = labels[b].filter { !$0.crowd }
                let r = assigned[b]
                for i in 0..<a {
                    let base = (b * a + i) * c
                    for k in 0..<c {
                        let p = Double(imageProbs[i * c + k])
                        var w = r.ignored[i] ? 0 : vflAlpha * Foundation.pow(p, vflGamma) // negatives
                        if r.gtIndex[i] >= 0 && objects[r.gtIndex[i]].classIndex == k {
                            targets.data[base + k] = Float(r.targetScore[i])
                            w = r.targetScore[i]
                        }
                        weights.data[base + k] = Float(w)
                    }
                    if r.gtIndex[i] >= 0 {
                        let box = objects[r.gtIndex[i]].box, p = model.anchors.points[i], s = Float(model.anchors.strides[i])
                        posRows.append(b * a + i)
                        gtBoxes += [Float(box.x1), Float(box.y1), Float(box.x2), Float(box.y2)]
                        anchorTerms += [Float(p.x), Float(p.y), Float(p.x), Float(p.y)]
                        strideTerms += [-s, -s, s, s]
                        posWeights.append(Float(r.targetScore[i]))
                        scoreSum += r.targetScore[i]
                    }
                }
            }
        }
        OpProfiler.mark("loss: targets and weights")
        let norm = Float(max(scoreSum, 1))
        let bce = binaryCrossEntropyWithLogits(classLogits, targets: targets, reduction: .none)
        let clsLoss = (bce * weights).sum().scaled(by: 1 / norm)
        var boxLoss = Tensor.scalar(0)
        if !posRows.isEmpty {
            let p = posRows.count
            let d = distances.gatherRows(posRows)
            let pred = d * Tensor(strideTerms, shape: [p, 4]) + Tensor(anchorTerms, shape: [p, 4])
            let giou = generalizedIoU(pred, Tensor(gtBoxes, shape: [p, 4]))
            boxLoss = ((giou.scaled(by: -1, plus: 1)) * Tensor(posWeights, shape: [p, 1])).sum().scaled(by: 1 / norm)
        }
        let total = clsLoss.scaled(by: Float(classWeight)) + boxLoss.scaled(by: Float(boxWeight))
        return (total, Parts(total: total.item(), classification: clsLoss.item(), box: boxLoss.item(), positives: posRows.count))
    }
}
