import Foundation
import QuantLabCore
import QuantLabData
import QuantLabModels

/// One plan's speed from `timeInterleaved`.
public struct PlanSpeed: Sendable, Equatable {
    /// Median seconds of one run.
    public var medianSeconds: Double
    /// Images per second from the median.
    public var imagesPerSecond: Double
    /// How far the medians of the first and second half of the runs differ, relative to the
    /// median: the timing noise of this run (a ratio of two speeds closer to 1 is noise).
    public var drift: Double
}

/// Times plans against each other: after `warmup` runs each, every plan runs once per round,
/// in turn, for `runs` rounds, so a change in the machine's state (another process, frequency)
/// hits every plan alike. All plans take the same input.
public func timeInterleaved(_ plans: [Int8Plan], input: Tensor, runs: Int, warmup: Int = 3) throws -> [PlanSpeed] {
    precondition(runs >= 1, "timeInterleaved: runs must be at least 1")
    for p in plans { for _ in 0..<warmup { _ = try p.run([input]) } }
    var times = [[Double]](repeating: [], count: plans.count)
    for _ in 0..<runs {
        for (i, p) in plans.enumerated() {
            let clock = Stopwatch()
            _ = try p.run([input])
            times[i].append(clock.seconds)
        }
    }
    func median(_ v: ArraySlice<Double>) -> Double { let s = v.sorted(); return s[s.count / 2] }
    let batch = Double(input.shape.first ?? 1)
    return times.map { t in
        let m = median(t[...]), half = t.count / 2
        let drift = half >= 1 ? abs(median(t[..<half]) - median(t[half...])) / m : .nan
        return PlanSpeed(medianSeconds: m, imagesPerSecond: batch / m, drift: drift)
    }
}

/// Median wall time of `runs` calls of `body` (at least one), after 3 warm-up calls (page
/// faults, packing buffers, thread start, a GPU's module load).
func medianWallTime(runs: Int, _ body: () throws -> Void) rethrows -> Double {
    for _ in 0..<3 { try body() }
    var times: [Double] = []
    for _ in 0..<max(runs, 1) {
        let clock = Stopwatch()
        try body()
        times.append(clock.seconds)
    }
    return times.sorted()[times.count / 2]
}

/// Val mAP of a detector's INT8 (or FP32) plan; the plan's batch sets the evaluation batch
/// (the last batch is padded). `model` supplies the decoding of the outputs.
public func evaluateDetector(_ plan: Int8Plan, model: YOLOv6, on val: DetectionDataset, batchSize: Int = 32, progressLabel: String? = nil) throws -> Double {
    try evaluateDetector(model, on: val, batchSize: batchSize, progressLabel: progressLabel) { images in
        let out = try plan.runBatch(images)
        return (out[0], out[1])
    }.0.mAP
}

/// A choice between two ways of computing the same step, made per input shape by timing, as
/// TensorRT's builder times its tactics: the first run at a shape runs both three times each,
/// interleaved, and the faster is kept for that shape (`first`, the default route, on a tie).
/// Used by the INT8 convs (direct kernel or im2col + GEMM) and the float convs (the model's
/// conv or Winograd).
struct TimedChoice {
    /// Per input shape: whether `first` was kept.
    private var firstKept: [[Int]: Bool] = [:]
    /// The best of three times (seconds) of each at the shape timed last; nil before a timing,
    /// or where `first` declined.
    private(set) var times: (first: Double, second: Double)?

    /// Whether `first` was kept at this shape; nil if the shape was not timed yet.
    func kept(at shape: [Int]) -> Bool? { firstKept[shape] }

    /// Times both at `shape` and returns whether `first` is kept. `first` returns false when
    /// it declines the input: then `second` runs once and is kept for the shape. Whichever ran
    /// last left its result; the caller knows which one it wants.
    mutating func time(at shape: [Int], first: () throws -> Bool, second: () throws -> Void) rethrows -> Bool {
        var best = (first: Double.infinity, second: Double.infinity)
        for _ in 0..<3 {
            var clock = Stopwatch()
            guard try first() else {
                firstKept[shape] = false
                try second()
                return false
            }
            let firstSeconds = clock.lap()
            try second()
            best = (min(best.first, firstSeconds), min(best.second, clock.lap()))
        }
        times = best
        firstKept[shape] = best.first <= best.second
        return best.first <= best.second
    }

    /// Forgets every timing (a new route setting).
    mutating func reset() { self = TimedChoice() }
}
