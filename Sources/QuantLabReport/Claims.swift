// Claims as the experiments found them, and the index built from them.
//
// Every experiment ends by stating, for each claim of CLAIMS.md it tests, the paper's number,
// ours, and an outcome computed from the numbers (never typed): a `ClaimResult` in the
// `claims` array of its results JSON. exp08 and `make results` read those arrays back — and
// nothing else of the experiments' files — to write the claim-by-claim table of
// results/exp08.md and the results index in README.md, so the two cannot disagree with the
// files they summarise.
import Foundation
import QuantLabCore

/// How a claim fared in a run.
public enum Outcome: String, Codable, Sendable, CaseIterable {
    case reproduced
    /// Part of the claim holds (one of two effects, the direction but not the size, ...).
    case partly
    case notReproduced = "not-reproduced"
    /// The run cannot decide: models that have not learned (the QUICK path), no room for the
    /// effect, a gap within the noise.
    case inconclusive

    public var label: String {
        switch self {
        case .reproduced: "reproduced"
        case .partly: "partly reproduced"
        case .notReproduced: "not reproduced"
        case .inconclusive: "inconclusive"
        }
    }
}

/// A verdict: the outcome, and the sentence that gives its numbers.
public struct Verdict: Codable, Sendable, Equatable {
    public var outcome: Outcome
    public var text: String
    public init(_ outcome: Outcome, _ text: String) {
        self.outcome = outcome
        self.text = text
    }
}

/// One claim of CLAIMS.md as one experiment found it.
public struct ClaimResult: Codable, Sendable, Equatable {
    /// The claim's ID in CLAIMS.md ("A3").
    public var id: String
    /// The paper's numbers, as text built from `Paper` (never typed in an experiment).
    public var paper: String
    /// Ours, short: what a reader of the index needs to set beside `paper`.
    public var ours: String
    public var outcome: Outcome
    /// The experiment's verdict sentence (the long form, with its numbers and reasons).
    public var verdict: String

    public init(_ id: String, paper: String, ours: String, verdict: Verdict) {
        self.id = id
        self.paper = paper
        self.ours = ours
        self.outcome = verdict.outcome
        self.verdict = verdict.text
    }

    /// What the claim says, in one line (`Claims.statements`).
    public var statement: String { Claims.statements[id] ?? id }
}

/// The claims of CLAIMS.md, by ID, in one line each.
public enum Claims {
    public static let ids = (1...11).map { "A\($0)" } + (1...4).map { "B\($0)" }

    public static let statements: [String: String] = [
        "A1": "plain PTQ of a re-parameterised network collapses",
        "A2": "fusing the branches widens weights and activations",
        "A3": "RepOpt keeps FP32 accuracy and survives PTQ; RepVGG does not",
        "A4": "partial PTQ (most sensitive layers in FP32) recovers the loss; MSE stands in for the mAP method",
        "A5": "channel-wise distillation adds mAP to partial QAT",
        "A6": "the explicit Q/DQ graph is slower than implicit PTQ (Reformat kernels)",
        "A7": "cause: one tensor read by quantizers of different scales",
        "A8": "unifying those scales removes the Reformats, mAP kept",
        "A9": "once INT8 is fast, CPU preprocessing is the bottleneck",
        "A10": "preprocessing off the CPU (DALI) doubles throughput",
        "A11": "the methods stacked: PTQ -> RepOpt -> partial PTQ -> partial QAT + CWD",
        "B1": "RT-DETR: activations concentrated, weights near-normal",
        "B2": "ACT (QAT + soft-label distillation, conv and matmul) keeps mAP flat",
        "B3": "INT8 RT-DETR: 4x smaller, flat mAP, up to 44% faster",
        "B4": "RT-DETR's reader: plain resize, scale to [0, 1]",
    ]

    /// Claims sorted A1 < A2 < ... < A11 < B1 (by letter, then number).
    public static func order(_ a: String, _ b: String) -> Bool {
        func key(_ s: String) -> (String, Int) { (String(s.prefix(1)), Int(s.dropFirst()) ?? 0) }
        return key(a) < key(b)
    }
}

/// When a trained model is good enough for a quantization verdict to mean anything. One rule
/// for every experiment (exp00 calls a baseline below it "not yet meaningful", exp02 and exp02b
/// call any comparison on it inconclusive): on our synthetic data a detector below 0.05
/// mAP@[.5:.95] or a classifier below 50% top-1 (chance is 10%) has not learned the task, and
/// its PTQ drop measures noise in a near-random function, not the quantization of a trained one.
public enum LearnedFloor {
    public static let detectorMAP = 0.05
    public static let classifierTop1 = 0.5

    /// The floor for a metric named as the results files name it ("mAP" or "top-1").
    public static func floor(metric: String) -> Double { metric == "top-1" ? classifierTop1 : detectorMAP }
}

/// A relative change as the reports print it: signed, with a true minus for a loss and a plus
/// for a gain ("−4.0%", "+0.5%"), so a drop reads the same in every table and sentence.
public func signedPercent(_ relativeChange: Double, digits: Int = 1) -> String {
    let text = String(format: "%.\(digits)f%%", 100 * abs(relativeChange))
    if text == String(format: "%.\(digits)f%%", 0.0) { return text }
    return (relativeChange < 0 ? "−" : "+") + text
}

// MARK: - The index

/// One numbered experiment, as the index lists it.
public struct ExperimentEntry: Sendable, Equatable {
    /// "exp02": the results file's name and the make target.
    public var name: String
    public var title: String
    public init(_ name: String, _ title: String) {
        self.name = name
        self.title = title
    }
    public var makeCommand: String { "make \(name)" }

    /// The numbered experiments whose results the summary reads, in order (exp08 is the summary).
    public static let measured: [ExperimentEntry] = [
        ExperimentEntry("exp00", "FP32 baselines: RepVGG, QARepVGG, RepOpt"),
        ExperimentEntry("exp01", "fused weight and activation distributions"),
        ExperimentEntry("exp02", "RepVGG vs QARepVGG vs RepOpt under INT8 PTQ (the main job)"),
        ExperimentEntry("exp02b", "when does RepVGG lose more than RepOpt under PTQ? width, length, decay, granularity"),
        ExperimentEntry("exp03", "per-layer sensitivity and partial PTQ"),
        ExperimentEntry("exp04", "partial QAT with channel-wise distillation (and LSQ)"),
        ExperimentEntry("exp05", "Q/DQ scale fusion on the INT8 engine"),
        ExperimentEntry("exp06", "serving throughput and the preprocessing bottleneck"),
        ExperimentEntry("exp07", "RT-DETR-lite with ACT-style QAT"),
    ]
    public static let summary = ExperimentEntry("exp08", "the methods stacked; latency-aware partial quantization")
}

/// What the index found in one experiment's results file.
public enum IndexStatus: Sendable, Equatable {
    case found(claims: [ClaimResult], provenance: ProvenanceSummary?)
    /// No results file: the experiment has not been run here.
    case missing
    /// A file that is not JSON, or whose `claims` do not decode: the reason.
    case malformed(String)
    /// Valid JSON without a `claims` array: written by a version before claim records.
    case noClaims
}

public struct IndexEntry: Sendable, Equatable {
    public var experiment: ExperimentEntry
    public var status: IndexStatus
    public init(experiment: ExperimentEntry, status: IndexStatus) {
        self.experiment = experiment
        self.status = status
    }
    /// The Markdown file beside the JSON, relative to the directory read.
    public var markdownFile: String { "\(experiment.name).md" }
}

/// The part of every results file the index reads.
private struct ClaimsFile: Decodable {
    var claims: [ClaimResult]?
    var provenance: ProvenanceSummary?
}

/// Reads `<directory>/<name>.json` of every experiment; never throws: a missing or broken
/// file is an entry that says so (and names the command that writes it).
public func loadResultsIndex(directory: URL, experiments: [ExperimentEntry]) -> [IndexEntry] {
    experiments.map { e in
        let url = directory.appendingPathComponent("\(e.name).json")
        guard FileManager.default.fileExists(atPath: url.path) else { return IndexEntry(experiment: e, status: .missing) }
        do {
            let data = try Data(contentsOf: url)
            let file = try JSONDecoder().decode(ClaimsFile.self, from: data)
            guard let claims = file.claims else { return IndexEntry(experiment: e, status: .noClaims) }
            if let unknown = claims.first(where: { Claims.statements[$0.id] == nil }) {
                return IndexEntry(experiment: e, status: .malformed("claim ID '\(unknown.id)' is not in CLAIMS.md"))
            }
            return IndexEntry(experiment: e, status: .found(claims: claims, provenance: file.provenance))
        } catch let error as DecodingError {
            return IndexEntry(experiment: e, status: .malformed(describe(error)))
        } catch {
            return IndexEntry(experiment: e, status: .malformed(error.localizedDescription))
        }
    }
}

/// A decoding error as one line: what went wrong and where.
private func describe(_ error: DecodingError) -> String {
    func path(_ c: [CodingKey]) -> String {
        c.isEmpty ? "the top level" : c.enumerated().map { i, k in k.intValue.map { "[\($0)]" } ?? (i == 0 ? k.stringValue : ".\(k.stringValue)") }.joined()
    }
    switch error {
    case .dataCorrupted(let c): return "not valid JSON (\(c.debugDescription)) at \(path(c.codingPath))"
    case .keyNotFound(let k, let c): return "field '\(k.stringValue)' missing at \(path(c.codingPath))"
    case .typeMismatch(_, let c), .valueNotFound(_, let c): return "\(c.debugDescription) at \(path(c.codingPath))"
    @unknown default: return "\(error)"
    }
}

extension IndexEntry {
    /// Why there is no row, and what to run: nil when claims were found.
    public var problem: String? {
        switch status {
        case .found: nil
        case .missing: "no results yet: run `\(experiment.makeCommand)`"
        case .malformed(let why): "results file unreadable (\(why)): rerun `\(experiment.makeCommand)`"
        case .noClaims: "results file predates claim records: rerun `\(experiment.makeCommand)`"
        }
    }

    public var claims: [ClaimResult] {
        if case .found(let claims, _) = status { return claims }
        return []
    }
}

/// A table cell: pipes escaped, line breaks flattened.
func cell(_ s: String) -> String {
    s.replacingOccurrences(of: "|", with: "\\|").replacingOccurrences(of: "\n", with: " ")
}

/// Every claim one row, A1 to B4: the statement, the paper's number, ours, the outcome, and a
/// link to the file with the full verdict. A claim tested by two experiments has two rows; a
/// claim no experiment reported has a row saying which experiment to run.
public func claimTable(_ entries: [IndexEntry], linkPrefix: String = "", extra: [(entry: ExperimentEntry, claim: ClaimResult)] = []) -> String {
    var rows: [(id: String, cells: [String])] = []
    for e in entries {
        let link = "[\(e.experiment.name)](\(linkPrefix)\(e.markdownFile))"
        for c in e.claims { rows.append((c.id, [c.id, cell(c.statement), cell(c.paper), cell(c.ours), "**\(c.outcome.label)**", link])) }
    }
    for (e, c) in extra {
        rows.append((c.id, [c.id, cell(c.statement), cell(c.paper), cell(c.ours), "**\(c.outcome.label)**", "[\(e.name)](\(linkPrefix)\(e.name).md)"]))
    }
    let covered = Set(rows.map(\.id))
    for id in Claims.ids where !covered.contains(id) {
        rows.append((id, [id, cell(Claims.statements[id] ?? ""), "", "", "not measured", ""]))
    }
    let sorted = rows.enumerated().sorted { a, b in
        a.element.id == b.element.id ? a.offset < b.offset : Claims.order(a.element.id, b.element.id)
    }.map(\.element.cells)
    var table = markdownTable(["claim", "statement", "paper", "ours", "outcome", "details"], sorted)
    let problems = entries.compactMap { e in e.problem.map { "- \(e.experiment.name): \($0)" } }
    if !problems.isEmpty { table += "\n" + problems.joined(separator: "\n") + "\n" }
    return table
}

/// One line per experiment (README's index): its claims, the paper's numbers, ours, outcomes.
/// An experiment with several claims shows them in one cell each, separated by line breaks.
public func experimentIndexTable(_ entries: [IndexEntry], linkPrefix: String = "results/") -> String {
    let rows: [[String]] = entries.map { e in
        let link = "[\(e.experiment.name)](\(linkPrefix)\(e.markdownFile))"
        guard e.problem == nil else { return [link, "`\(e.experiment.makeCommand)`", cell(e.experiment.title), "", "", cell(e.problem!)] }
        let cs = e.claims
        func join(_ f: (ClaimResult) -> String) -> String { cs.map { "\($0.id): " + cell(f($0)) }.joined(separator: "<br>") }
        return [link, "`\(e.experiment.makeCommand)`", cell(e.experiment.title), join(\.paper), join(\.ours), join { "**\($0.outcome.label)**" }]
    }
    return markdownTable(["exp", "make", "what", "paper", "ours", "outcome"], rows)
}

/// The marked section of a text (begin marker line, generated lines, end marker line) with new
/// content. Errors when either marker is missing, repeated or out of order, so a damaged
/// README is reported instead of rewritten.
public func replacingMarkedSection(of text: String, begin: String, end: String, with content: String) throws -> String {
    let lines = text.components(separatedBy: "\n")
    let b = lines.indices.filter { lines[$0].trimmingCharacters(in: .whitespaces) == begin }
    let e = lines.indices.filter { lines[$0].trimmingCharacters(in: .whitespaces) == end }
    guard b.count == 1, e.count == 1, b[0] < e[0] else {
        throw ReportError("expected exactly one '\(begin)' line followed by one '\(end)' line; found \(b.count) and \(e.count)")
    }
    let body = content.hasSuffix("\n") ? String(content.dropLast()) : content
    return (lines[...b[0]] + [body] + lines[e[0]...]).joined(separator: "\n")
}

/// A report that cannot be built or written as asked; the message names the file or field.
public struct ReportError: Error, CustomStringConvertible, Equatable {
    public var description: String
    public init(_ description: String) { self.description = description }
}
