import Foundation
import QuantLabCore
import QuantLabData
import QuantLabModels
import QuantLabQuant

/// Where a result came from: code version, machine, toolchain, seeds, configuration, time.
/// Every results file ends with one, so a number can be traced to the run that produced it.
public struct Provenance: Codable, Sendable {
    public var gitDescribe: String
    public var date: String
    public var swiftVersion: String
    public var cpu: String
    public var kernels: String
    public var threads: Int
    public var seeds: [String: UInt64]
    public var config: [String: String]
    public var wallSeconds: Double

    /// Collects everything but the wall time, seeds and config, which the experiment fills in.
    public static func current() -> Provenance {
        func run(_ args: [String]) -> String {
            let p = Process()
            p.executableURL = URL(fileURLWithPath: "/usr/bin/env")
            p.arguments = args
            let pipe = Pipe()
            p.standardOutput = pipe
            p.standardError = FileHandle.nullDevice
            guard (try? p.run()) != nil else { return "unknown" }
            let data = pipe.fileHandleForReading.readDataToEndOfFile()
            p.waitUntilExit()
            let s = String(decoding: data, as: UTF8.self).trimmingCharacters(in: .whitespacesAndNewlines)
            return p.terminationStatus == 0 && !s.isEmpty ? s : "unknown"
        }
        let cpuInfo = (try? String(contentsOfFile: "/proc/cpuinfo", encoding: .utf8)) ?? ""
        let model = cpuInfo.split(separator: "\n").first { $0.hasPrefix("model name") }.map { String($0.split(separator: ":").last ?? "").trimmingCharacters(in: .whitespaces) } ?? "unknown"
        let formatter = ISO8601DateFormatter()
        // "-dirty" when tracked files other than results/ differ from the commit: the results
        // an earlier experiment of the same session just wrote do not make the code dirty.
        var describe = run(["git", "describe", "--always", "--tags"])
        let changed = run(["git", "status", "--porcelain", "--untracked-files=no", "--", ".", ":(exclude)results"])
        if describe != "unknown" && changed != "unknown" { describe += "-dirty" }
        return Provenance(gitDescribe: describe, date: formatter.string(from: Date()),
                          swiftVersion: run(["swift", "--version"]).split(separator: "\n").first.map(String.init) ?? "unknown",
                          cpu: "\(model), \(ProcessInfo.processInfo.activeProcessorCount) cores",
                          kernels: Kernels.isa.description, threads: Kernels.threads,
                          seeds: [:], config: [:], wallSeconds: 0)
    }

    public var markdown: String {
        var lines = ["## Provenance", "", "| | |", "|---|---|",
                     "| code | `\(gitDescribe)` |", "| date | \(date) |", "| toolchain | \(swiftVersion) |",
                     "| machine | \(cpu); \(kernels) kernels, \(threads) threads |",
                     "| wall time | \(String(format: "%.0f", wallSeconds)) s |"]
        for (k, v) in seeds.sorted(by: { $0.key < $1.key }) { lines.append("| seed `\(k)` | \(v) |") }
        for (k, v) in config.sorted(by: { $0.key < $1.key }) { lines.append("| `\(k)` | \(v) |") }
        return lines.joined(separator: "\n")
    }
}

/// A Markdown table from a header and rows.
public func markdownTable(_ header: [String], _ rows: [[String]]) -> String {
    var out = "| " + header.joined(separator: " | ") + " |\n|" + header.map { _ in "---" }.joined(separator: "|") + "|\n"
    for r in rows { out += "| " + r.joined(separator: " | ") + " |\n" }
    return out
}

/// Writes `results/<name>.md` and `<name>.json` (or `results/quick/` for smoke runs),
/// atomically, and returns the Markdown path.
@discardableResult
public func writeResults(name: String, quick: Bool, markdown: String, json: [String: Any], root: URL = URL(fileURLWithPath: "results")) throws -> URL {
    let dir = quick ? root.appendingPathComponent("quick") : root
    let md = dir.appendingPathComponent("\(name).md")
    try AtomicFile.write(Data(markdown.utf8), to: md)
    try AtomicFile.write(JSONSerialization.data(withJSONObject: json, options: [.prettyPrinted, .sortedKeys]), to: dir.appendingPathComponent("\(name).json"))
    return md
}
