import Foundation
import QuantLabCore

/// Box-detection evaluation with pycocotools' semantics (COCOeval, iouType "bbox"), so the 12
/// numbers agree with pycocotools to floating-point noise (`make crosscheck` verifies this).
///
/// For every (image, category, area range):
///  1. Ground truth is ignored when it is a crowd or its `area` lies outside the range;
///     detections are sorted by score (stable) and cut to the largest maxDets (100).
///  2. IoU is intersection / union, except against a crowd box: intersection / detection area.
///  3. Greedy matching per IoU threshold t in .50:.05:.95: each detection, best first, takes
///     the unmatched non-ignored gt with the highest IoU >= t (crowd gt can be matched many
///     times; a detection matched to an ignored gt is itself ignored). Unmatched detections
///     whose area is outside the range are ignored.
/// Then for every (category, area range, maxDets): detections of all images are merged by
/// score, cumulative TP/FP give recall and precision, precision is made monotone from the
/// right, and sampled at 101 recall points (0, .01, ..., 1; 0 where recall is not reached).
/// AP is the mean over thresholds, recall points and categories that have ground truth;
/// AR the mean of the final recall. A cell without ground truth is -1 and left out of means.
public struct COCOEvaluator {
    /// numpy.linspace(start, stop, num) bit for bit (i * step + start, last = stop): IoUs and
    /// recalls of integer boxes hit these thresholds exactly, so the last bit decides.
    static func linspace(_ start: Double, _ stop: Double, _ num: Int) -> [Double] {
        let step = (stop - start) / Double(num - 1)
        return (0..<num).map { $0 == num - 1 ? stop : Double($0) * step + start }
    }

    public static let iouThresholds = linspace(0.5, 0.95, 10)
    public static let recallThresholds = linspace(0, 1, 101)
    public static let maxDets = [1, 10, 100]
    /// all, small, medium, large (the `area` field, in pixels^2).
    public static let areaRanges: [(String, Double, Double)] = [
        ("all", 0, 1e10), ("small", 0, 32 * 32), ("medium", 32 * 32, 96 * 96), ("large", 96 * 96, 1e10),
    ]

    public struct Result: Sendable {
        /// AP, AP50, AP75, APs, APm, APl, AR1, AR10, AR100, ARs, ARm, ARl — pycocotools' `stats`.
        public var stats: [Double]
        /// AP@[.5:.95] per category id (-1 where the category has no ground truth).
        public var perCategoryAP: [Int: Double]

        public var mAP: Double { stats[0] }
        public var mAP50: Double { stats[1] }

        /// The 12 lines pycocotools' `summarize()` prints.
        public var summary: String {
            let rows: [(Bool, String, String, Int)] = [
                (true, "0.50:0.95", "all", 100), (true, "0.50", "all", 100), (true, "0.75", "all", 100),
                (true, "0.50:0.95", "small", 100), (true, "0.50:0.95", "medium", 100), (true, "0.50:0.95", "large", 100),
                (false, "0.50:0.95", "all", 1), (false, "0.50:0.95", "all", 10), (false, "0.50:0.95", "all", 100),
                (false, "0.50:0.95", "small", 100), (false, "0.50:0.95", "medium", 100), (false, "0.50:0.95", "large", 100),
            ]
            return zip(rows, stats).map { row, value in
                let (isAP, iou, area, maxDet) = row
                let title = (isAP ? "Average Precision" : "Average Recall").padding(toLength: 18, withPad: " ", startingAt: 0)
                let kind = isAP ? "(AP)" : "(AR)"
                let iouField = iou.padding(toLength: 9, withPad: " ", startingAt: 0)
                let areaField = String(repeating: " ", count: max(0, 6 - area.count)) + area
                let maxField = String(repeating: " ", count: max(0, 3 - String(maxDet).count)) + String(maxDet)
                return " \(title) \(kind) @[ IoU=\(iouField) | area=\(areaField) | maxDets=\(maxField) ] = \(String(format: "%0.3f", value))"
            }.joined(separator: "\n")
        }
    }

    private struct GT { let id: Int; let box: [Double]; let area: Double; let crowd: Bool }
    private struct DT { let id: Int; let box: [Double]; let area: Double; let score: Double }

    /// One (image, category, area range) after matching, as pycocotools' evalImgs entry.
    private struct ImageEval {
        var dtMatched: [[Bool]] // [threshold][detection]: matched to some gt
        var dtIgnore: [[Bool]]
        var dtScores: [Double]
        var gtIgnore: [Bool]
    }

    public init() {}

    /// Evaluates detections against ground truth. Throws if a detection names an image or
    /// category that the ground truth does not have (pycocotools asserts the same).
    public func evaluate(groundTruth gt: COCODataset, detections: [COCOResult]) throws -> Result {
        let imageIds = gt.images.map(\.id).sorted()
        let catIds = gt.categoryIds
        let knownImages = Set(imageIds), knownCats = Set(catIds)
        for (i, d) in detections.enumerated() {
            guard knownImages.contains(d.image_id) else { throw COCOFormatError("detections[\(i)]: image_id \(d.image_id) is not in the ground truth") }
            guard knownCats.contains(d.category_id) else { throw COCOFormatError("detections[\(i)]: unknown category_id \(d.category_id)") }
        }
        struct Key: Hashable { let image: Int; let cat: Int }
        var gts: [Key: [GT]] = [:], dts: [Key: [DT]] = [:]
        for a in gt.annotations {
            gts[Key(image: a.image_id, cat: a.category_id), default: []].append(GT(id: a.id, box: a.bbox, area: a.area, crowd: a.iscrowd == 1))
        }
        for (i, d) in detections.enumerated() { // loadRes: ids from 1, area = w * h
            dts[Key(image: d.image_id, cat: d.category_id), default: []]
                .append(DT(id: i + 1, box: d.bbox, area: d.bbox[2] * d.bbox[3], score: d.score))
        }
        let maxDet = Self.maxDets.last!
        let (T, R, K, A, M) = (Self.iouThresholds.count, Self.recallThresholds.count, catIds.count, Self.areaRanges.count, Self.maxDets.count)
        // precision[t][r][k][a][m], recall[t][k][a][m], initialised to -1 as pycocotools
        var precision = [Double](repeating: -1, count: T * R * K * A * M)
        var recall = [Double](repeating: -1, count: T * K * A * M)
        func pIndex(_ t: Int, _ r: Int, _ k: Int, _ a: Int, _ m: Int) -> Int { (((t * R + r) * K + k) * A + a) * M + m }
        func rIndex(_ t: Int, _ k: Int, _ a: Int, _ m: Int) -> Int { ((t * K + k) * A + a) * M + m }

        for (k, cat) in catIds.enumerated() {
            for (a, range) in Self.areaRanges.enumerated() {
                var evals: [ImageEval] = []
                for image in imageIds {
                    let key = Key(image: image, cat: cat)
                    if let e = evaluateImage(gt: gts[key] ?? [], dt: dts[key] ?? [], range: (range.1, range.2), maxDet: maxDet) {
                        evals.append(e)
                    }
                }
                if evals.isEmpty { continue }
                let npig = evals.reduce(0) { $0 + $1.gtIgnore.filter { !$0 }.count }
                if npig == 0 { continue }
                for (m, md) in Self.maxDets.enumerated() {
                    // merge the first md detections of every image, stable-sorted by score
                    var scores: [Double] = [], matched: [[Bool]] = Array(repeating: [], count: T), ignored = matched
                    for e in evals {
                        let n = min(md, e.dtScores.count)
                        scores += e.dtScores[0..<n]
                        for t in 0..<T { matched[t] += e.dtMatched[t][0..<n]; ignored[t] += e.dtIgnore[t][0..<n] }
                    }
                    let order = scores.indices.sorted { scores[$0] != scores[$1] ? scores[$0] > scores[$1] : $0 < $1 }
                    for t in 0..<T {
                        var tp = 0.0, fp = 0.0
                        var rc: [Double] = [], pr: [Double] = []
                        for i in order where !ignored[t][i] {
                            if matched[t][i] { tp += 1 } else { fp += 1 }
                            rc.append(tp / Double(npig))
                            pr.append(tp / (tp + fp + Double.ulpOfOne))
                        }
                        recall[rIndex(t, k, a, m)] = rc.last ?? 0
                        if pr.count > 1 { for i in stride(from: pr.count - 1, to: 0, by: -1) where pr[i] > pr[i - 1] { pr[i - 1] = pr[i] } }
                        for (r, threshold) in Self.recallThresholds.enumerated() {
                            // searchsorted(rc, threshold, side="left"): first index with rc >= threshold
                            var lo = 0, hi = rc.count
                            while lo < hi { let mid = (lo + hi) / 2; if rc[mid] < threshold { lo = mid + 1 } else { hi = mid } }
                            precision[pIndex(t, r, k, a, m)] = lo < pr.count ? pr[lo] : 0
                        }
                    }
                }
            }
        }

        func meanValid(_ values: [Double]) -> Double {
            let v = values.filter { $0 > -1 }
            return v.isEmpty ? -1 : v.reduce(0, +) / Double(v.count)
        }
        func ap(iou: Double? = nil, area: Int = 0, maxDet m: Int = 2, category k: Int? = nil) -> Double {
            var vals: [Double] = []
            for t in 0..<T where iou == nil || abs(Self.iouThresholds[t] - iou!) < 1e-9 {
                for r in 0..<R { for kk in 0..<K where k == nil || kk == k! { vals.append(precision[pIndex(t, r, kk, area, m)]) } }
            }
            return meanValid(vals)
        }
        func ar(area: Int = 0, maxDet m: Int) -> Double {
            var vals: [Double] = []
            for t in 0..<T { for k in 0..<K { vals.append(recall[rIndex(t, k, area, m)]) } }
            return meanValid(vals)
        }
        let stats = [ap(), ap(iou: 0.5), ap(iou: 0.75), ap(area: 1), ap(area: 2), ap(area: 3),
                     ar(maxDet: 0), ar(maxDet: 1), ar(maxDet: 2), ar(area: 1, maxDet: 2), ar(area: 2, maxDet: 2), ar(area: 3, maxDet: 2)]
        var perCategory: [Int: Double] = [:]
        for (k, cat) in catIds.enumerated() { perCategory[cat] = ap(category: k) }
        return Result(stats: stats, perCategoryAP: perCategory)
    }

    /// pycocotools' evaluateImg for one image, category and area range; nil when there is
    /// neither ground truth nor a detection.
    private func evaluateImage(gt: [GT], dt: [DT], range: (Double, Double), maxDet: Int) -> ImageEval? {
        if gt.isEmpty && dt.isEmpty { return nil }
        let ignoreFlags = gt.map { $0.crowd || $0.area < range.0 || $0.area > range.1 }
        // non-ignored ground truth first (stable)
        let gtOrder = gt.indices.sorted { (ignoreFlags[$0] ? 1 : 0, $0) < (ignoreFlags[$1] ? 1 : 0, $1) }
        let g = gtOrder.map { gt[$0] }, gIgnore = gtOrder.map { ignoreFlags[$0] }
        let dtOrder = dt.indices.sorted { dt[$0].score != dt[$1].score ? dt[$0].score > dt[$1].score : $0 < $1 }
        let d = dtOrder.prefix(maxDet).map { dt[$0] }
        let T = Self.iouThresholds.count
        var gtMatched = Array(repeating: [Bool](repeating: false, count: g.count), count: T)
        var dtMatched = Array(repeating: [Bool](repeating: false, count: d.count), count: T)
        var dtIgnore = dtMatched
        let ious = d.map { det in g.map { Self.iou(det.box, $0.box, crowd: $0.crowd) } }
        for (t, threshold) in Self.iouThresholds.enumerated() {
            for (di, _) in d.enumerated() {
                var best = min(threshold, 1 - 1e-10), m = -1
                for gi in 0..<g.count {
                    if gtMatched[t][gi] && !g[gi].crowd { continue }
                    // once matched to a regular gt, stop at the first ignored one
                    if m > -1 && !gIgnore[m] && gIgnore[gi] { break }
                    if ious[di][gi] < best { continue }
                    best = ious[di][gi]
                    m = gi
                }
                if m == -1 { continue }
                dtIgnore[t][di] = gIgnore[m]
                // pycocotools records gt/dt ids here and tests them for non-zero: an id of 0
                // therefore counts as "unmatched" there; we mirror that quirk exactly.
                dtMatched[t][di] = g[m].id != 0
                gtMatched[t][m] = d[di].id != 0
            }
        }
        for t in 0..<T {
            for (di, det) in d.enumerated() where !dtMatched[t][di] && (det.area < range.0 || det.area > range.1) {
                dtIgnore[t][di] = true
            }
        }
        return ImageEval(dtMatched: dtMatched, dtIgnore: dtIgnore, dtScores: d.map(\.score), gtIgnore: gIgnore)
    }

    /// IoU of [x, y, w, h] boxes as pycocotools' bbIou: against a crowd box the union is the
    /// detection's own area.
    static func iou(_ d: [Double], _ g: [Double], crowd: Bool) -> Double {
        let w = min(d[0] + d[2], g[0] + g[2]) - max(d[0], g[0])
        let h = min(d[1] + d[3], g[1] + g[3]) - max(d[1], g[1])
        guard w > 0, h > 0 else { return 0 }
        let inter = w * h
        let union = crowd ? d[2] * d[3] : d[2] * d[3] + g[2] * g[3] - inter
        return union > 0 ? inter / union : 0
    }
}
