import Dispatch

/// Wall time on the monotonic clock since the stopwatch was made or last lapped: the timer of
/// the benchmarks, the engine's per-step profile, plan timing and the serving stages. (Runs
/// measured in minutes, a training's, use `Date`, which a report prints as a time of day.)
public struct Stopwatch {
    private var start: UInt64

    @inline(__always) public init() { start = DispatchTime.now().uptimeNanoseconds }

    /// Seconds since it was made or last lapped.
    @inline(__always) public var seconds: Double { Double(DispatchTime.now().uptimeNanoseconds - start) / 1e9 }

    /// The seconds since it was made or last lapped, and starts again from now: consecutive
    /// stages timed with one clock read between them.
    @inline(__always) public mutating func lap() -> Double {
        let now = DispatchTime.now().uptimeNanoseconds
        defer { start = now }
        return Double(now - start) / 1e9
    }
}
