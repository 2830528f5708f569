import CKernels
import Foundation

/// Progress of a long pass: a bar with rate and ETA redrawn in place on a terminal, a line
/// every `interval` seconds otherwise (logs, CI). Thread-safe; writes to stderr so that
/// stdout stays clean for results.
public final class Progress: @unchecked Sendable {
    public let total: Int, label: String, unit: String
    private let start = Date()
    private var last = Date.distantPast
    private let interval: TimeInterval
    private let isTerminal = isatty(2) != 0
    private let lock = NSLock()
    private var done = 0
    private var extra = ""
    private var finished = false

    public init(total: Int, label: String, unit: String = "it", interval: TimeInterval? = nil) {
        self.total = max(total, 1)
        self.label = label
        self.unit = unit
        self.interval = interval ?? (isatty(2) != 0 ? 0.1 : 10)
    }

    /// Sets the count (and an optional suffix such as "loss 0.123") and redraws if due.
    public func update(_ count: Int, _ suffix: String = "") {
        lock.lock()
        defer { lock.unlock() }
        done = count
        extra = suffix
        if !finished && Date().timeIntervalSince(last) >= interval { draw(final: false) }
    }

    public func finish() {
        lock.lock()
        defer { lock.unlock() }
        if finished { return }
        finished = true
        draw(final: true)
    }

    private func draw(final: Bool) {
        last = Date()
        let elapsed = last.timeIntervalSince(start)
        let rate = Double(done) / max(elapsed, 1e-9)
        let eta = rate > 0 ? Double(total - done) / rate : 0
        let frac = min(1, Double(done) / Double(total))
        var line = String(format: "%@ %3.0f%% %d/%d  %.1f %@/s  elapsed %@  eta %@", label, 100 * frac, done, total, rate, unit,
                          Self.clock(elapsed), Self.clock(eta))
        if !extra.isEmpty { line += "  " + extra }
        if isTerminal {
            let width = 24, filled = Int(frac * Double(width))
            let bar = String(repeating: "█", count: filled) + String(repeating: "·", count: width - filled)
            FileHandle.standardError.write(Data("\r\u{1B}[K\(bar) \(line)\(final ? "\n" : "")".utf8))
        } else {
            FileHandle.standardError.write(Data((line + "\n").utf8))
        }
    }

    static func clock(_ s: Double) -> String {
        let t = Int(s.rounded())
        return t >= 3600 ? String(format: "%d:%02d:%02d", t / 3600, t / 60 % 60, t % 60) : String(format: "%d:%02d", t / 60, t % 60)
    }
}

/// Line-buffered stdout, so progress and results reach a log file as they happen.
public func lineBufferStandardOutput() { ql_line_buffer_stdout() }
