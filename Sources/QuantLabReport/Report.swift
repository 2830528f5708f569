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
        /// A command's trimmed standard output; nil when it cannot run or exits non-zero.
        func output(_ args: [String]) -> String? {
            let p = Process()
            p.executableURL = URL(fileURLWithPath: "/usr/bin/env")
            p.arguments = args
            let pipe = Pipe()
            p.standardOutput = pipe
            p.standardError = FileHandle.nullDevice
            guard (try? p.run()) != nil else { return nil }
            let data = pipe.fileHandleForReading.readDataToEndOfFile()
            p.waitUntilExit()
            return p.terminationStatus == 0 ? String(decoding: data, as: UTF8.self).trimmingCharacters(in: .whitespacesAndNewlines) : nil
        }
        func run(_ args: [String]) -> String { output(args).flatMap { $0.isEmpty ? nil : $0 } ?? "unknown" }
        let formatter = ISO8601DateFormatter()
        // "-dirty" when tracked files other than results/ differ from the commit: the results
        // an earlier experiment of the same session just wrote do not make the code dirty.
        var describe = run(["git", "describe", "--always", "--tags"])
        let changedFiles = output(["git", "status", "--porcelain", "--untracked-files=no", "--", ".", ":(exclude)results"])
        if describe != "unknown", let changedFiles, !changedFiles.isEmpty { describe += "-dirty" }
        return Provenance(gitDescribe: describe, date: formatter.string(from: Date()),
                          swiftVersion: run(["swift", "--version"]).split(separator: "\n").first.map(String.init) ?? "unknown",
                          cpu: "\(Kernels.cpuName), \(ProcessInfo.processInfo.activeProcessorCount) cores",
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

/// The provenance fields a results JSON records.
public struct ProvenanceSummary: Codable, Equatable, Sendable {
    public var git: String
    public var date: String
    public var wallSeconds: Double

    enum CodingKeys: String, CodingKey {
        case git, date
        case wallSeconds = "wall_seconds"
    }
}

extension Provenance {
    public var summary: ProvenanceSummary { ProvenanceSummary(git: gitDescribe, date: date, wallSeconds: wallSeconds) }
}

/// Where an experiment writes: `results/`, or `results/quick/` for smoke runs (so they never
/// overwrite real results).
public func resultsDirectory(quick: Bool, root: URL = URL(fileURLWithPath: "results")) -> URL {
    quick ? root.appendingPathComponent("quick") : root
}

/// The JSON of a results file: sorted keys, pretty, NaN and infinities as strings.
public func resultsJSON<R: Encodable>(_ results: R) throws -> Data {
    let encoder = JSONEncoder()
    encoder.outputFormatting = [.prettyPrinted, .sortedKeys]
    encoder.nonConformingFloatEncodingStrategy = .convertToString(positiveInfinity: "inf", negativeInfinity: "-inf", nan: "nan")
    return try encoder.encode(results)
}

/// Writes `results/<name>.md` and `<name>.json` (or `results/quick/` for smoke runs), each
/// atomically, and returns the Markdown path. The JSON is the experiment's `Codable` results.
@discardableResult
public func writeResults<R: Encodable>(name: String, quick: Bool, markdown: String, results: R, root: URL = URL(fileURLWithPath: "results")) throws -> URL {
    try writeResultFiles(name: name, quick: quick, markdown: markdown, json: resultsJSON(results), root: root)
}

/// Writes `results/<name>.md` and `<name>.json` from an untyped dictionary (exp00, exp01;
/// new experiments use the `Codable` form above).
@discardableResult
public func writeResults(name: String, quick: Bool, markdown: String, json: [String: Any], root: URL = URL(fileURLWithPath: "results")) throws -> URL {
    try writeResultFiles(name: name, quick: quick, markdown: markdown,
                         json: JSONSerialization.data(withJSONObject: json, options: [.prettyPrinted, .sortedKeys]), root: root)
}

/// An `Encodable` value as the untyped object `JSONSerialization` writes (for the results of
/// exp00 and exp01, which build their JSON as a dictionary).
public func jsonObject<T: Encodable>(_ value: T) throws -> Any {
    try JSONSerialization.jsonObject(with: resultsJSON(value))
}

/// The JSON, then the Markdown that presents it, each written atomically.
private func writeResultFiles(name: String, quick: Bool, markdown: String, json: Data, root: URL) throws -> URL {
    let dir = resultsDirectory(quick: quick, root: root)
    let md = dir.appendingPathComponent("\(name).md")
    try AtomicFile.write(json, to: dir.appendingPathComponent("\(name).json"))
    try AtomicFile.write(Data(markdown.utf8), to: md)
    return md
}
