import CKernels
import Foundation
import QuantLabCore
import QuantLabData
import QuantLabModels

// Calibration: choosing the clipping value amax of an activation quantizer from the values
// it sees on a few batches. Three collectors, as in pytorch-quantization and PaddleSlim:
//   max               running max |x|
//   histogram of |x|  2048 bins of fixed width; amax by entropy (TensorRT's KL method), by
//                     MSE, or at a percentile
//   moving average    PaddleSlim's moving_average_abs_max (rate 0.9)

/// How an activation quantizer's amax is chosen.
public enum CalibrationMethod: Hashable, Sendable, CustomStringConvertible, Codable {
    case max
    /// TensorRT's entropy calibration: the amax whose 128-level quantized histogram has the
    /// smallest KL divergence from the clipped reference histogram.
    case entropy
    /// The amax minimising the histogram-weighted squared error of quantizing bin centres.
    case mse
    /// The amax below which `percent` % of the |x| values lie (99.9, 99.99, 99.999 ...).
    case percentile(Double)
    /// PaddleSlim's moving_average_abs_max with the given rate (0.9).
    case movingAverage(rate: Double)

    public var description: String {
        switch self {
        case .max: return "max"
        case .entropy: return "entropy"
        case .mse: return "mse"
        case .percentile(let p): return "percentile-\(String(format: "%g", p))"
        case .movingAverage(let r): return r == 0.9 ? "moving-average" : "moving-average-\(String(format: "%g", r))"
        }
    }

    /// Parses the names `description` prints ("max", "entropy", "mse", "percentile-99.99",
    /// "moving-average", "moving-average-0.95").
    public init(parsing text: String) throws {
        switch text {
        case "max": self = .max
        case "entropy": self = .entropy
        case "mse": self = .mse
        case "moving-average": self = .movingAverage(rate: 0.9)
        default:
            if text.hasPrefix("percentile-"), let p = Double(text.dropFirst("percentile-".count)), p > 0, p <= 100 {
                self = .percentile(p)
            } else if text.hasPrefix("moving-average-"), let r = Double(text.dropFirst("moving-average-".count)), r >= 0, r < 1 {
                self = .movingAverage(rate: r)
            } else {
                throw QuantizationError("unknown calibration method '\(text)' (expected max, entropy, mse, percentile-<p> with 0 < p <= 100, moving-average[-<rate>])")
            }
        }
    }

    /// A comma-separated list ("max,entropy,percentile-99.99"); a bad entry is an error naming it.
    public static func parseList(_ text: String) throws -> [CalibrationMethod] {
        let methods = try text.split(separator: ",").map { try CalibrationMethod(parsing: $0.trimmingCharacters(in: .whitespaces)) }
        guard !methods.isEmpty else { throw QuantizationError("no calibration method in '\(text)'") }
        return methods
    }

    /// Whether the method reads the |x| histogram.
    public var usesHistogram: Bool {
        switch self {
        case .entropy, .mse, .percentile: return true
        default: return false
        }
    }

    /// The four calibrators of the article's comparison (pytorch-quantization's set).
    public static let standard: [CalibrationMethod] = [.max, .entropy, .percentile(99.99), .mse]
}

/// An error about quantization input (flags, names, files) with a message naming the problem.
public struct QuantizationError: Error, CustomStringConvertible {
    public let description: String
    public init(_ message: String) { description = message }
}

/// Running max |x| and the signed min/max (the asymmetric mode needs the range).
public struct MaxCollector: Sendable {
    public private(set) var amax: Float = 0
    public private(set) var min: Float = .infinity
    public private(set) var max: Float = -.infinity
    public private(set) var batches = 0

    public init() {}

    /// Adds a batch; returns the batch's own max |x| (what the moving average needs).
    @discardableResult
    public mutating func collect(_ x: Tensor) -> Float {
        var lo = Float.infinity, hi = -Float.infinity
        ql_minmax(x.data, Int64(x.count), &lo, &hi)
        min = Swift.min(min, lo)
        max = Swift.max(max, hi)
        let batchAbsMax = x.count == 0 ? 0 : Swift.max(abs(lo), abs(hi))
        amax = Swift.max(amax, batchAbsMax)
        batches += 1
        return batchAbsMax
    }
}

/// PaddleSlim's moving_average_abs_max: per batch, state = r*state + 1,
/// accum = r*accum + max|x|, amax = accum / state (a bias-corrected moving average).
public struct MovingAverageAbsMax: Sendable {
    public let rate: Double
    public private(set) var state = 0.0
    public private(set) var accum = 0.0

    public init(rate: Double = 0.9) { self.rate = rate }

    public mutating func update(batchAbsMax m: Float) {
        state = rate * state + 1
        accum = rate * accum + Double(m)
    }

    public var amax: Float? { state > 0 ? Float(accum / state) : nil }
}

/// Histogram of |x| with fixed-width bins (pytorch-quantization's HistogramCalibrator):
/// the first batch sets the width, max|x| / bins; a later batch with a larger max appends
/// bins of the same width, so earlier counts keep their bins. If the bin count would pass
/// `maxBins`, neighbouring bins are merged (the width doubles) — a guard against one huge
/// outlier asking for millions of bins.
public struct AbsHistogram: Sendable {
    public let initialBins: Int
    public let maxBins: Int
    public private(set) var counts: [Int64] = []
    public private(set) var binWidth: Float = 0

    public init(bins: Int = 2048, maxBins: Int = 2048 * 8) {
        require(bins >= 2 && maxBins >= bins, "AbsHistogram: need 2 <= bins <= maxBins")
        initialBins = bins
        self.maxBins = maxBins
    }

    /// A histogram with given counts (tests, and histograms read back from a file).
    public init(counts: [Int64], binWidth: Float) {
        require(binWidth > 0 && counts.count >= 2 && counts.allSatisfy { $0 >= 0 }, "AbsHistogram: need >= 2 bins, non-negative counts and a positive width")
        initialBins = counts.count
        maxBins = Swift.max(counts.count, 2048 * 32)
        self.counts = counts
        self.binWidth = binWidth
    }

    public var isEmpty: Bool { counts.isEmpty }
    public var total: Int64 { counts.reduce(0, +) }
    /// Left edge of bin i (edge `counts.count` is the right end).
    public func edge(_ i: Int) -> Float { Float(i) * binWidth }
    public func centre(_ i: Int) -> Float { (Float(i) + 0.5) * binWidth }

    public mutating func collect(_ x: Tensor) {
        let m = ql_absmax(x.data, Int64(x.count))
        collect(x.data, count: x.count, absMax: m)
    }

    mutating func collect(_ p: UnsafePointer<Float>, count n: Int, absMax m: Float) {
        if counts.isEmpty {
            guard m > 0 else { return } // all zeros: nothing to place yet (pytorch-quantization counts them in bin 0 of a [0, 0] range)
            binWidth = m / Float(initialBins)
            counts = [Int64](repeating: 0, count: initialBins)
        }
        var needed = Int((m / binWidth).rounded(.up))
        while needed > maxBins {
            mergePairs()
            needed = Int((m / binWidth).rounded(.up))
        }
        if needed > counts.count { counts += [Int64](repeating: 0, count: needed - counts.count) }
        let bins = counts.count
        counts.withUnsafeMutableBufferPointer { c in
            ql_histogram_abs_f32(c.baseAddress!, Int32(bins), p, Int64(n), Float(bins) * binWidth)
        }
    }

    /// One histogram of everything `histograms` counted: the widest member's bin width, each
    /// member's bins added at their centres (a bin of a narrower member lands in the one wide bin
    /// that holds its centre). nil when all are empty.
    public static func merging(_ histograms: [AbsHistogram]) -> AbsHistogram? {
        let filled = histograms.filter { !$0.isEmpty }
        guard let width = filled.map(\.binWidth).max(), let top = filled.map({ $0.edge($0.counts.count) }).max() else { return nil }
        var counts = [Int64](repeating: 0, count: Swift.max(2, Int((top / width).rounded(.up))))
        for h in filled {
            for (i, c) in h.counts.enumerated() where c > 0 { counts[Swift.min(Int(h.centre(i) / width), counts.count - 1)] += c }
        }
        return AbsHistogram(counts: counts, binWidth: width)
    }

    /// amax by a histogram method (entropy, MSE, percentile); 0 for an empty histogram (every
    /// value was 0). The other methods do not read a histogram.
    public func amax(_ method: CalibrationMethod, bits: Int = 8) -> Float {
        guard !isEmpty else { return 0 }
        switch method {
        case .entropy: return entropyAmax(bits: bits) ?? 0
        case .mse: return mseAmax(bits: bits) ?? 0
        case .percentile(let p): return percentileAmax(p) ?? 0
        case .max, .movingAverage: preconditionFailure("\(method) is not a histogram method")
        }
    }

    private mutating func mergePairs() {
        var merged = [Int64](repeating: 0, count: (counts.count + 1) / 2)
        for (i, c) in counts.enumerated() { merged[i / 2] += c }
        counts = merged
        binWidth *= 2
    }

    // MARK: amax from the histogram

    /// The left edge of the bin where the cumulative share first reaches `percent` %.
    public func percentileAmax(_ percent: Double) -> Float? {
        guard !counts.isEmpty else { return nil }
        let total = Double(self.total), target = percent / 100
        var cumulative = 0.0
        for (i, c) in counts.enumerated() {
            cumulative += Double(c) / total
            if cumulative >= target { return edge(i) }
        }
        return edge(counts.count - 1)
    }

    /// The bin centre c_i (i >= startBin) minimising sum_k n_k (fq(c_k; c_i) - c_k)^2, with
    /// fq(c; a) = s * clamp(round(c / s), -qmax, qmax), s = a / qmax, in Float as the
    /// quantizer computes it.
    ///
    /// `mseAmaxReference` sums that bin by bin for every candidate: O(bins x non-empty bins),
    /// seconds on a model whose histograms grew to 16k bins. Here each candidate costs
    /// O(levels): the bins that round to one level q form a run (round(c / s) rises with c), found
    /// with the quantizer's own Float arithmetic, and the run's error is
    ///   sum n (qs - c)^2 = N (qs)^2 - qs w A1 + (w^2 / 4) A2,  c = (2k + 1) w / 2,
    /// with N, A1 = sum n (2k + 1) and A2 = sum n (2k + 1)^2 exact integer prefix sums (128-bit). That
    /// differs from the reference's sum by the Float rounding of its terms and the cancellation
    /// here, both bounded (`MSECandidates.bound`); every candidate whose error could be the
    /// least under those bounds is summed again bin by bin, and the choice among them is the
    /// reference's (the first smallest): the same amax, bit for bit (tests: QuantizationTests
    /// "mse ... reference").
    public func mseAmax(bits: Int = 8, startBin: Int = 128, stride: Int = 1) -> Float? {
        guard let k = MSECandidates(self, bits: bits, startBin: startBin, stride: stride) else { return counts.isEmpty ? nil : centre(counts.count - 1) }
        let candidates = Array(Swift.stride(from: startBin, to: counts.count, by: stride))
        let fast = candidates.map { k.prefixError($0) }
        let slack = fast.map { k.bound($0) }
        let least = fast.indices.min { fast[$0].error < fast[$1].error }!
        let ceiling = fast[least].error + slack[least] // the least one itself is always within it
        return centre(k.firstLeast(candidates.indices.filter { fast[$0].error - slack[$0] <= ceiling }.map { candidates[$0] }))
    }

    /// The same choice, every candidate's error summed bin by bin (the specification `mseAmax`
    /// is tested against).
    public func mseAmaxReference(bits: Int = 8, startBin: Int = 128, stride: Int = 1) -> Float? {
        guard let k = MSECandidates(self, bits: bits, startBin: startBin, stride: stride) else { return counts.isEmpty ? nil : centre(counts.count - 1) }
        return centre(k.firstLeast(Array(Swift.stride(from: startBin, to: counts.count, by: stride))))
    }

    /// TensorRT's entropy calibration as pytorch-quantization implements it. For every
    /// candidate i >= startBin bins:
    ///   P = counts[0..<i] with everything beyond added to the last bin (clipping);
    ///   Q = P's first i bins merged into 2^(bits-1) groups, each group's total spread evenly
    ///       over its non-empty bins (empty bins stay empty);
    ///   KL(P || Q) on the normalised histograms.
    /// amax = left edge of bin i for the last i with the smallest divergence. As in the
    /// reference, bin 0 is first replaced by bin 1 (after ReLU bin 0 holds all the zeros,
    /// which would otherwise dominate the divergence).
    ///
    /// `entropyAmaxReference` evaluates that sum bin by bin for every candidate: O(bins^2),
    /// seconds for a histogram that grew to 16k bins, and most of a model's calibration time.
    /// Here each candidate costs O(levels) instead. Within one group q is constant, so
    ///   sum_j (p_j / T) log(p_j / q_j) = (1/T) (sum_j b_j log b_j - sum_g S_g log q_g),
    /// with the first sum a prefix sum over bins (bins[j] log bins[j]) and S_g, the group's
    /// mass and its count of non-empty bins differences of prefix sums (of integers: exact).
    /// Those sums round differently from the bin-by-bin ones, so two candidates whose
    /// divergences differ by less than the rounding could come out in the other order. So
    /// every candidate within a bound on that rounding of the smallest one is evaluated
    /// again bin by bin, and the choice among those is the reference's: the same amax, bit
    /// for bit, as `entropyAmaxReference` (tests: QuantizationTests "entropy ... reference").
    public func entropyAmax(bits: Int = 8, startBin: Int = 128, stride: Int = 1) -> Float? {
        guard let k = EntropyCandidates(counts: counts, bits: bits, startBin: startBin, stride: stride) else { return counts.isEmpty ? nil : edge(counts.count) }
        let candidates = Array(Swift.stride(from: startBin, through: k.n, by: stride))
        var fast = [Double](repeating: .infinity, count: candidates.count)
        var scale = 0.0
        for (c, i) in candidates.enumerated() {
            let (d, magnitude) = k.prefixDivergence(i)
            fast[c] = d
            if d.isFinite { scale = Swift.max(scale, magnitude) }
        }
        guard let least = fast.min(), least.isFinite else { return edge(candidates.last!) } // every one infinite: the last (as `<=` picks)
        // rounding: each prefix sum carries at most (terms) x eps of its terms' magnitude, the
        // 2^(bits-1) group terms a few eps each, the reference the same again; 16x to spare
        let bound = 16 * Double(k.n + 4 * k.levels) * Double.ulpOfOne * scale
        return edge(k.lastLeast(candidates.indices.filter { fast[$0] <= least + 2 * bound }.map { candidates[$0] }))
    }

    /// The same choice, every candidate's divergence summed bin by bin (the specification
    /// `entropyAmax` is tested against).
    public func entropyAmaxReference(bits: Int = 8, startBin: Int = 128, stride: Int = 1) -> Float? {
        guard let k = EntropyCandidates(counts: counts, bits: bits, startBin: startBin, stride: stride) else { return counts.isEmpty ? nil : edge(counts.count) }
        return edge(k.lastLeast(Array(Swift.stride(from: startBin, through: k.n, by: stride))))
    }
}

/// An exact sum of non-negative integers below 2^128, in two words (the standard library's
/// Int128 needs macOS 15, and its conversion to Double takes a generic path that made the
/// candidate loop 14x slower).
struct WideSum {
    var high: UInt64 = 0, low: UInt64 = 0

    init() {}
    init(high: UInt64, low: UInt64) { self.high = high; self.low = low }
    /// a * b, exactly.
    init(_ a: UInt64, times b: UInt64) { (high, low) = a.multipliedFullWidth(by: b) }

    static func + (a: WideSum, b: WideSum) -> WideSum {
        let (low, carry) = a.low.addingReportingOverflow(b.low)
        return WideSum(high: a.high &+ b.high &+ (carry ? 1 : 0), low: low)
    }
    /// a - b for a >= b (prefix sums: a later one minus an earlier one).
    static func - (a: WideSum, b: WideSum) -> WideSum {
        let (low, borrow) = a.low.subtractingReportingOverflow(b.low)
        return WideSum(high: a.high &- b.high &- (borrow ? 1 : 0), low: low)
    }
    /// As a Double, within 2 roundings.
    var value: Double { Double(high) * 0x1p64 + Double(low) }
}

/// What the MSE calibrator's candidates share: the histogram, its non-empty bins, and exact
/// integer prefix sums of n, n (2k + 1) and n (2k + 1)^2 over the bins k.
struct MSECandidates {
    let histogram: AbsHistogram
    let qmax: Float
    let nonEmpty: [Int]
    let lastNonEmpty: Int
    let count: [Int64]     // count[k] = sum n[..<k]
    let first: [WideSum]   // first[k] = sum n_j (2j + 1) over j < k
    let second: [WideSum]  // second[k] = sum n_j (2j + 1)^2 over j < k
    let squares: Double    // sum n c^2 over all bins

    /// nil when there is no candidate (fewer bins than startBin + 1).
    init?(_ h: AbsHistogram, bits: Int, startBin: Int, stride: Int) {
        require((2...16).contains(bits) && startBin >= 0 && stride >= 1,
                "MSE calibration: bits must be in 2...16, startBin at least 0 and stride at least 1 (got \(bits), \(startBin), \(stride))")
        guard h.counts.count > startBin else { return nil }
        histogram = h
        qmax = Float((1 << (bits - 1)) - 1)
        let n = h.counts.count
        var count = [Int64](repeating: 0, count: n + 1), first = [WideSum](repeating: WideSum(), count: n + 1), second = first
        for k in 0..<n {
            let c = UInt64(h.counts[k]), odd = UInt64(2 * k + 1)
            count[k + 1] = count[k] + h.counts[k]
            first[k + 1] = first[k] + WideSum(c, times: odd)
            second[k + 1] = second[k] + WideSum(c, times: odd * odd)
        }
        nonEmpty = h.counts.indices.filter { h.counts[$0] > 0 }
        lastNonEmpty = nonEmpty.last ?? -1
        self.count = count
        self.first = first
        self.second = second
        let w = Double(h.binWidth)
        squares = w * w / 4 * second[n].value
    }

    /// The level bin k rounds to at step s, as the quantizer computes it (c >= 0).
    @inline(__always) func level(_ k: Int, _ s: Float) -> Float {
        Swift.min((histogram.centre(k) / s).rounded(.toNearestOrEven), qmax)
    }

    /// The error of candidate i from the prefix sums, and the magnitude of the terms it adds
    /// (for the bound on its cancellation).
    func prefixError(_ i: Int) -> (error: Double, magnitude: Double) {
        let s = histogram.centre(i) / qmax, w = Double(histogram.binWidth)
        let end = lastNonEmpty + 1
        var error = 0.0, magnitude = 0.0, lo = 0
        for q in 0...Int(qmax) where lo < end {
            let hi = runEnd(level: q, from: lo, step: s)
            defer { lo = hi }
            guard hi > lo, count[hi] > count[lo] else { continue }
            let qs = Double(Float(q) * s) // the Float product the quantizer forms
            let a = Double(count[hi] - count[lo]) * qs * qs, b = qs * w * (first[hi] - first[lo]).value
            let c = w * w / 4 * (second[hi] - second[lo]).value
            error += a - b + c
            magnitude += a + b + c
        }
        return (error, magnitude)
    }

    /// The end of the run of bins (from `lo`, its start) that round to level q at step s: the
    /// first bin of a higher level. c / s passes q + 1/2 at bin t = (q + 1/2) s / w - 1/2
    /// exactly; the quantizer's c / s is within 2 Float roundings (the centre, the quotient:
    /// relative 2^-23) of the exact ratio, so a bin at least 1e-5 (|t| + 1) from t lies on
    /// the side the exact ratio says, and only a bin nearer than that is decided by the
    /// quantizer's own arithmetic (`level`).
    func runEnd(level q: Int, from lo: Int, step s: Float) -> Int {
        let bins = histogram.counts.count
        guard q < Int(qmax) else { return bins } // the top level holds every clipped bin
        let t = (Double(q) + 0.5) * Double(s) / Double(histogram.binWidth) - 0.5
        guard t < Double(bins) else { return bins }
        var hi = Swift.max(lo, Int(t.rounded(.up)))
        let margin = 1e-5 * (Swift.abs(t) + 1)
        if Double(hi) - t < margin || t - Double(hi - 1) < margin {
            let next = Float(q + 1)
            while hi > lo && level(hi - 1, s) >= next { hi -= 1 }
            while hi < bins && level(hi, s) < next { hi += 1 }
        }
        return hi
    }

    /// A bound on |prefixError - referenceError| for one candidate:
    ///   here, each run's two conversions, three products and its cancellation, then the sum
    ///     over the runs: (levels + 10) eps x the magnitude;
    ///   the reference, against the exact sum of n (fl(qs) - c)^2 (E): its centres and its
    ///     difference are Float (relative u = 2^-24 each), so |d_ref - d| <= u (c + |d|) (1 + 2u)
    ///     and, with Cauchy-Schwarz, sum n |d_ref^2 - d^2| <= 2.01 u (sqrt(C2 E) + E) +
    ///     2.02 u^2 (C2 + E), C2 = sum n c^2; its Double sum adds (non-empty bins + 3) eps E.
    /// E is at most the prefix error plus its own bound. Twice that, to spare.
    func bound(_ fast: (error: Double, magnitude: Double)) -> Double {
        let eps = Double.ulpOfOne, u = Double(Float.ulpOfOne) / 2
        let own = Double(Int(qmax) + 11) * eps * fast.magnitude
        let e = Swift.max(0, fast.error) + own
        let reference = 2.01 * u * ((squares * e).squareRoot() + e) + 2.02 * u * u * (squares + e) + Double(nonEmpty.count + 3) * eps * e
        return 2 * (own + reference)
    }

    /// Of `bins` (in increasing order, at least one), the first with the least `referenceError`:
    /// the reference's choice.
    func firstLeast(_ bins: [Int]) -> Int {
        var best = (error: Double.infinity, bin: bins[0])
        for i in bins {
            let e = referenceError(i)
            if e < best.error { best = (e, i) }
        }
        return best.bin
    }

    /// The error of candidate i bin by bin over the non-empty bins, in Float as the quantizer
    /// computes it, summed in Double.
    func referenceError(_ i: Int) -> Double {
        let s = histogram.centre(i) / qmax
        var error = 0.0
        for k in nonEmpty {
            let c = histogram.centre(k)
            var q = (c / s).rounded(.toNearestOrEven)
            q = Swift.min(Swift.max(q, -qmax), qmax)
            let d = Double(q * s - c)
            error += Double(histogram.counts[k]) * d * d
        }
        return error
    }
}

/// What the entropy calibrator's candidates share: the bins (bin 0 replaced by bin 1), their
/// suffix sums, and prefix sums for the O(levels) divergence.
private struct EntropyCandidates {
    let bins: [Double]
    let n: Int, levels: Int
    let suffix: [Double]      // suffix[i] = sum bins[i...]
    let nonEmpty: [Int]       // nonEmpty[i] = count of non-zero bins[..<i]
    let binEntropy: [Double]  // binEntropy[i] = sum over bins[..<i] > 0 of b log b
    let total: Double

    /// nil when there is no candidate (no bins, or fewer than startBin).
    init?(counts: [Int64], bits: Int, startBin: Int, stride: Int) {
        require((2...16).contains(bits) && startBin >= 1 && stride >= 1,
                "entropy calibration: bits must be in 2...16, startBin and stride at least 1 (got \(bits), \(startBin), \(stride))")
        guard !counts.isEmpty else { return nil }
        var bins = counts.map(Double.init)
        if bins.count > 1 { bins[0] = bins[1] }
        n = bins.count
        guard n >= startBin else { return nil }
        levels = 1 << (bits - 1)
        var suffix = [Double](repeating: 0, count: n + 1)
        for i in Swift.stride(from: n - 1, through: 0, by: -1) { suffix[i] = suffix[i + 1] + bins[i] }
        var nonEmpty = [Int](repeating: 0, count: n + 1)
        var binEntropy = [Double](repeating: 0, count: n + 1)
        for j in 0..<n {
            let b = bins[j]
            nonEmpty[j + 1] = nonEmpty[j] + (b != 0 ? 1 : 0)
            binEntropy[j + 1] = binEntropy[j] + (b > 0 ? b * Foundation.log(b) : 0)
        }
        self.bins = bins
        self.suffix = suffix
        self.nonEmpty = nonEmpty
        self.binEntropy = binEntropy
        total = suffix[0]
    }

    /// First bin of group g for i bins: the least j with g * step <= j, step = i / levels
    /// (numpy's digitize over linspace(0, i, levels + 1)); j is an integer, so that is the
    /// ceiling of the product as the reference computes it.
    @inline(__always) func groupStart(_ g: Int, step: Double) -> Int { Int((Double(g) * step).rounded(.up)) }

    /// KL(P || Q) for i bins from the prefix sums, and the magnitude of the terms it adds
    /// (for the rounding bound).
    func prefixDivergence(_ i: Int) -> (divergence: Double, magnitude: Double) {
        let unclipped = total - suffix[i]
        guard unclipped > 0 else { return (.infinity, 0) }
        let last = i - 1, lastBin = bins[last], p = lastBin + suffix[i]
        if p > 0 && lastBin == 0 { return (.infinity, 0) } // clipped mass on a bin Q leaves empty
        let step = Double(i) / Double(levels)
        var groupTerms = 0.0, groupMagnitude = 0.0, lastQ = 0.0
        var lo = 0
        for g in 0..<levels {
            let hi = g + 1 < levels ? Swift.min(groupStart(g + 1, step: step), i) : i
            defer { lo = hi }
            let members = nonEmpty[hi] - nonEmpty[lo]
            guard members > 0 else { continue }
            let mass = suffix[lo] - suffix[hi], q = mass / Double(members) // sums of integers: exact
            // the last bin's own term is added below, with its clipped mass
            let counted = hi == i ? mass - lastBin : mass
            if hi == i { lastQ = q }
            let t = counted * Foundation.log(q)
            groupTerms += t
            groupMagnitude += Swift.abs(t)
        }
        let lastTerm = p > 0 ? p * Foundation.log(p / lastQ) : 0
        let head = Foundation.log(unclipped / total)
        let d = head + (binEntropy[last] - groupTerms + lastTerm) / total
        return (d, Swift.abs(head) + (Swift.abs(binEntropy[last]) + groupMagnitude + Swift.abs(lastTerm)) / total)
    }

    /// Of `bins` (in increasing order), the last with the least `referenceDivergence`: the
    /// reference's choice (n when every one is infinite).
    func lastLeast(_ bins: [Int]) -> Int {
        var bestDivergence = Double.infinity, bestBin = n
        for i in bins {
            let d = referenceDivergence(i)
            if d <= bestDivergence { bestDivergence = d; bestBin = i }
        }
        return bestBin
    }

    /// KL(P || Q) for i bins, bin by bin in increasing order (each normalised to sum 1, as
    /// scipy.stats.entropy: P = bins[0..<i] with the clipped mass added to its last bin sums
    /// to `total`; Q sums to the unclipped mass sum(bins[0..<i]) = total - suffix[i]; so
    /// KL = sum (p/P) log(p/q) + log(Q/P)).
    func referenceDivergence(_ i: Int) -> Double {
        let step = Double(i) / Double(levels)
        var groupSum = [Double](repeating: 0, count: levels), groupNonEmpty = [Int](repeating: 0, count: levels)
        var group = [Int](repeating: 0, count: i)
        for j in 0..<i {
            var g = Swift.min(Int(Double(j) / step), levels - 1)
            while g + 1 < levels && Double(g + 1) * step <= Double(j) { g += 1 }
            while g > 0 && Double(g) * step > Double(j) { g -= 1 }
            group[j] = g
            if bins[j] != 0 { groupSum[g] += bins[j]; groupNonEmpty[g] += 1 }
        }
        let unclipped = total - suffix[i]
        var divergence = unclipped > 0 ? Foundation.log(unclipped / total) : .infinity
        for j in 0..<i where divergence.isFinite {
            let p = j == i - 1 ? bins[j] + suffix[i] : bins[j]
            guard p > 0 else { continue }
            let q = bins[j] != 0 ? groupSum[group[j]] / Double(groupNonEmpty[group[j]]) : 0
            if q == 0 { divergence = .infinity; break }
            divergence += (p / total) * Foundation.log(p / q)
        }
        return divergence
    }
}

/// Everything one activation quantizer collects during calibration: the max, the |x|
/// histogram (when a histogram method may be asked for) and the moving average.
public struct ActivationStatistics: Sendable {
    public var max = MaxCollector()
    public var histogram: AbsHistogram?
    public var movingAverage: MovingAverageAbsMax

    public init(histogram: Bool, bins: Int = 2048, movingAverageRate: Double = 0.9) {
        self.histogram = histogram ? AbsHistogram(bins: bins) : nil
        movingAverage = MovingAverageAbsMax(rate: movingAverageRate)
    }

    public var isEmpty: Bool { max.batches == 0 }

    public mutating func collect(_ x: Tensor) {
        let batchAbsMax = max.collect(x)
        histogram?.collect(x.data, count: x.count, absMax: batchAbsMax)
        movingAverage.update(batchAbsMax: batchAbsMax)
    }

    /// One amax for several quantizers' statistics together, as if one quantizer had seen all
    /// their inputs: the largest max for `.max`, the method on the merged histogram for the
    /// histogram methods. The moving average (a per-batch running state) does not combine.
    public static func jointAmax(_ members: [ActivationStatistics], _ method: CalibrationMethod, bits: Int = 8) throws -> Float {
        guard !members.isEmpty, !members.contains(where: \.isEmpty) else { throw QuantizationError("no calibration data was collected") }
        switch method {
        case .max: return members.map(\.max.amax).max()!
        case .movingAverage: throw QuantizationError("the moving average cannot be calibrated jointly over several quantizers")
        case .entropy, .mse, .percentile:
            let histograms = try members.map { m -> AbsHistogram in
                guard let h = m.histogram else { throw QuantizationError("\(method) needs a histogram; calibrate with histograms enabled") }
                return h
            }
            return AbsHistogram.merging(histograms)?.amax(method, bits: bits) ?? 0 // nil: every value was 0
        }
    }

    /// amax under `method`, or an error naming what is missing.
    public func amax(_ method: CalibrationMethod, bits: Int = 8) throws -> Float {
        guard !isEmpty else { throw QuantizationError("no calibration data was collected") }
        switch method {
        case .max: return max.amax
        case .movingAverage(let rate):
            guard rate == movingAverage.rate, let a = movingAverage.amax else {
                throw QuantizationError("moving average collected with rate \(movingAverage.rate), asked for \(rate)")
            }
            return a
        case .entropy, .mse, .percentile:
            guard let h = histogram else { throw QuantizationError("\(method) needs a histogram; calibrate with histograms enabled") }
            return h.amax(method, bits: bits)
        }
    }
}
