import Foundation
import Testing
@testable import QuantLabReport

@Suite("Claims index: results JSON -> exp08's claim table and README's index")
struct ClaimsIndexTests {
    /// A results folder with one file per (name, contents); nil contents: no file.
    private func folder(_ files: [String: String]) throws -> URL {
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent("ql-index-\(UUID().uuidString)")
        try FileManager.default.createDirectory(at: dir, withIntermediateDirectories: true)
        for (name, text) in files { try Data(text.utf8).write(to: dir.appendingPathComponent("\(name).json")) }
        return dir
    }

    private let experiments = [ExperimentEntry("exp00", "baselines"), ExperimentEntry("exp02", "PTQ"), ExperimentEntry("exp03", "sensitivity"),
                               ExperimentEntry("exp04", "QAT"), ExperimentEntry("exp05", "fusion"), ExperimentEntry("exp06", "serving")]

    private func claim(_ id: String, _ outcome: Outcome, ours: String = "ours") throws -> String {
        String(decoding: try resultsJSON(ClaimResult(id, paper: "paper \(id)", ours: ours, verdict: Verdict(outcome, "because \(id)"))), as: UTF8.self)
    }

    @Test("a found, a missing, a malformed, a pre-claims and a foreign-ID file each get their status, and a row or a problem naming the command")
    func statuses() throws {
        let dir = try folder([
            "exp00": #"{"claims": [\#(try claim("A3", .reproduced, ours: "0.202 | 0.217"))], "provenance": {"git": "abc", "date": "d", "wall_seconds": 1}, "other": 1}"#,
            // exp02: missing
            "exp03": #"{"claims": [{"id": "A4", "paper": 1}]}"#,
            "exp04": "{ not json",
            "exp05": #"{"verdict": "old style"}"#,
            "exp06": #"{"claims": [\#(try claim("Z9", .partly))]}"#,
        ])
        defer { try? FileManager.default.removeItem(at: dir) }
        let index = loadResultsIndex(directory: dir, experiments: experiments)
        #expect(index.map(\.experiment.name) == experiments.map(\.name))
        guard case .found(let claims, let provenance) = index[0].status else { Issue.record("exp00 not found: \(index[0].status)"); return }
        #expect(claims.map(\.id) == ["A3"] && claims[0].outcome == .reproduced && provenance?.git == "abc")
        #expect(index[1].status == .missing && index[1].problem == "no results yet: run `make exp02`")
        guard case .malformed(let why3) = index[2].status else { Issue.record("exp03: \(index[2].status)"); return }
        #expect(why3.contains("claims[0]"), "the decoding error should name where: \(why3)")
        guard case .malformed(let why4) = index[3].status else { Issue.record("exp04: \(index[3].status)"); return }
        #expect(why4.contains("not valid JSON"))
        #expect(index[4].status == .noClaims && index[4].problem!.contains("predates claim records: rerun `make exp05`"))
        guard case .malformed(let why6) = index[5].status else { Issue.record("exp06: \(index[5].status)"); return }
        #expect(why6.contains("'Z9'"))
        #expect(index[3].problem!.contains("rerun `make exp04`"))

        // exp08's table: every claim A1..B4 once at least, in order; a pipe in a value escaped;
        // the problems listed under it
        let table = claimTable(index, extra: [(ExperimentEntry("exp08", "summary"), ClaimResult("A11", paper: "p", ours: "o", verdict: Verdict(.partly, "v")))])
        let rows = table.split(separator: "\n").filter { $0.hasPrefix("| A") || $0.hasPrefix("| B") }
        #expect(rows.map { String($0.dropFirst(2).prefix { $0 != " " }) } == Claims.ids)
        #expect(rows[2].contains("0.202 \\| 0.217") && rows[2].contains("**reproduced**") && rows[2].contains("[exp00](exp00.md)"))
        #expect(rows[10].contains("**partly reproduced**") && rows[10].contains("[exp08](exp08.md)"))
        #expect(rows[0].contains("not measured"), "A1 has no result here")
        for name in ["exp02", "exp03", "exp04", "exp05", "exp06"] { #expect(table.contains("- \(name): "), "\(name)'s problem is not listed") }

        // README's index: one line per experiment
        let readme = experimentIndexTable(index)
        let lines = readme.split(separator: "\n").filter { $0.hasPrefix("| [exp") }
        #expect(lines.count == experiments.count)
        #expect(lines[0].contains("A3: **reproduced**") && lines[0].contains("`make exp00`"))
        #expect(lines[1].contains("no results yet: run `make exp02`"))
    }

    @Test("claims of several experiments: one row each in the claim table, sorted A1 < A2 < A10 < A11 < B1")
    func ordering() throws {
        #expect(["B1", "A11", "A2", "A10", "A1"].sorted(by: Claims.order) == ["A1", "A2", "A10", "A11", "B1"])
        let dir = try folder(["exp00": #"{"claims": [\#(try claim("B1", .inconclusive)), \#(try claim("A10", .notReproduced))]}"#,
                              "exp02": #"{"claims": [\#(try claim("A10", .reproduced)), \#(try claim("A2", .partly))]}"#])
        defer { try? FileManager.default.removeItem(at: dir) }
        let index = loadResultsIndex(directory: dir, experiments: Array(experiments.prefix(2)))
        let ids = claimTable(index).split(separator: "\n").compactMap { line -> String? in
            let id = line.dropFirst(2).prefix { $0 != " " }
            return Claims.statements[String(id)] != nil ? String(id) : nil
        }
        // A10 twice (exp00's row first), every other ID once
        #expect(ids.filter { $0 == "A10" }.count == 2)
        #expect(zip(ids, ids.dropFirst()).allSatisfy { !Claims.order($1, $0) }, "not in claim order: \(ids)")
        let lines = experimentIndexTable(index).split(separator: "\n").filter { $0.hasPrefix("| [exp") }
        #expect(lines[0].contains("B1: **inconclusive**<br>A10: **not reproduced**"))
    }

    @Test("every claim ID has a statement and a row in CLAIMS.md")
    func statementsMatchClaims() throws {
        let rows = try PaperNumbersTests.claimRows()
        #expect(Set(Claims.ids) == Set(rows.keys))
        #expect(Set(Claims.statements.keys) == Set(Claims.ids))
    }

    @Test("the README's marked section is replaced; a missing, repeated or reversed marker is an error")
    func markedSection() throws {
        let (b, e) = ("<!-- begin -->", "<!-- end -->")
        let text = "# T\n\(b)\nold\nlines\n\(e)\ntail\n"
        #expect(try replacingMarkedSection(of: text, begin: b, end: e, with: "new\n") == "# T\n\(b)\nnew\n\(e)\ntail\n")
        #expect(try replacingMarkedSection(of: "\(b)\n\(e)", begin: b, end: e, with: "x") == "\(b)\nx\n\(e)")
        expectError(ReportError.self, mentioning: "found 0 and 1") { _ = try replacingMarkedSection(of: "x\n\(e)\n", begin: b, end: e, with: "y") }
        expectError(ReportError.self, mentioning: "found 2 and 1") { _ = try replacingMarkedSection(of: "\(b)\n\(b)\n\(e)\n", begin: b, end: e, with: "y") }
        expectError(ReportError.self, mentioning: "followed by") { _ = try replacingMarkedSection(of: "\(e)\n\(b)\n", begin: b, end: e, with: "y") }
    }

    @Test("Pareto front: hand-built points, ties and non-finite values")
    func pareto() {
        // (cost, value): A(1, 1) B(2, 3) C(2, 2) dominated by B, D(3, 3) dominated by B, E(4, 5), F(nan, 9)
        let cost = [1, 2, 2, 3, 4, .nan], value = [1, 3, 2, 3, 5, 9.0]
        #expect(Statistics.paretoFront(cost: cost, value: value) == [0, 1, 4])
        // two identical points are both on the front (neither strictly better)
        #expect(Statistics.paretoFront(cost: [1, 1], value: [2, 2]) == [0, 1])
        #expect(Statistics.paretoFront(cost: [], value: []) == [])
    }

    @Test("lower median: the measured element with the middle key, the lower middle one for an even count")
    func lowerMedian() {
        #expect(Statistics.lowerMedian([5.0, 1, 3]) { $0 } == 3)
        #expect(Statistics.lowerMedian([4.0, 1, 3, 2]) { $0 } == 2)
        let runs = [(round: 0, rate: 9.0), (round: 1, rate: 7.0), (round: 2, rate: 8.0)]
        #expect(Statistics.lowerMedian(runs, by: \.rate)?.round == 2)
        #expect(Statistics.lowerMedian([Double]()) { $0 } == nil)
    }
}
