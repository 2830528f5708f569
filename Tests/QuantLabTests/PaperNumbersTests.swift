import Foundation
import Testing
@testable import QuantLabReport

@Suite("The papers' numbers")
struct PaperNumbersTests {
    /// CLAIMS.md's table row of each claim, by ID.
    static func claimRows() throws -> [String: String] {
        let url = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent()
            .appendingPathComponent("CLAIMS.md")
        let text = try String(contentsOf: url, encoding: .utf8)
        var rows: [String: String] = [:]
        for line in text.split(separator: "\n") where line.hasPrefix("| ") {
            let id = line.dropFirst(2).prefix { $0 != " " }
            if id.count == 2 || id.count == 3, id.first == "A" || id.first == "B", id.dropFirst().allSatisfy(\.isNumber) { rows[String(id)] = String(line) }
        }
        return rows
    }

    @Test("every number in PaperNumbers.swift is in its claim's row of CLAIMS.md, with its source")
    func numbersMatchClaims() throws {
        let rows = try Self.claimRows()
        #expect(rows.count == 15, "CLAIMS.md should have claims A1-A11 and B1-B4, found \(rows.keys.sorted())")
        for n in Paper.all {
            guard let row = rows[n.claim] else { Issue.record("no row for claim \(n.claim) in CLAIMS.md"); continue }
            #expect(row.contains(n.text), "\(n.claim): \(n.text) (\(n.what)) is not in CLAIMS.md's row")
            #expect(row.contains(n.source.rawValue), "\(n.claim): source '\(n.source.rawValue)' of \(n.text) is not named in CLAIMS.md's row")
        }
    }

    @Test("derived numbers: relative drops and the recovered share, hand-computed")
    func derived() {
        #expect(abs(Paper.relativeDrop(Paper.A3.yolov6sFP32, Paper.A3.repvggPTQ) - 7.4 / 42.4) < 1e-12)
        #expect(abs(Paper.recovered(fp32: Paper.A4.fp32, full: Paper.A4.fullPTQ, partial: Paper.A4.partialPTQ) - 1.1 / 1.5) < 1e-12)
        #expect(Paper.A3.repvggPTQ.with(Paper.A3.repvggPTQReadme) == "35.0 (article; YOLOv6 README 35.6)")
    }
}
