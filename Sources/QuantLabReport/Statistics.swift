import Foundation
import QuantLabCore
import QuantLabData
import QuantLabModels
import QuantLabQuant

// Small statistics used by the results pages: mean and spread over seeds, rank correlations
// between layer rankings.

public enum Statistics {
    /// Indices of the points no other point dominates, for a cost to minimise and a value to
    /// maximise: point j dominates i when cost_j <= cost_i and value_j >= value_i, one strictly.
    /// Points with a non-finite coordinate are never on the front.
    public static func paretoFront(cost: [Double], value: [Double]) -> [Int] {
        precondition(cost.count == value.count, "paretoFront: \(cost.count) costs, \(value.count) values")
        let ok = cost.indices.filter { cost[$0].isFinite && value[$0].isFinite }
        return ok.filter { i in
            !ok.contains { j in cost[j] <= cost[i] && value[j] >= value[i] && (cost[j] < cost[i] || value[j] > value[i]) }
        }
    }

    public static func mean(_ v: [Double]) -> Double { v.isEmpty ? .nan : v.reduce(0, +) / Double(v.count) }

    /// The element with the median key, the lower of the two middle ones for an even count (an
    /// element that was measured, never an average of two): exp06 shows that run of each
    /// configuration, and exp08 reads the same one. nil for no elements.
    public static func lowerMedian<T>(_ xs: [T], by key: (T) -> Double) -> T? {
        xs.isEmpty ? nil : xs.sorted { key($0) < key($1) }[(xs.count - 1) / 2]
    }

    /// Sample standard deviation (n - 1); 0 for fewer than two values.
    public static func standardDeviation(_ v: [Double]) -> Double {
        guard v.count > 1 else { return 0 }
        let m = mean(v)
        return (v.reduce(0) { $0 + ($1 - m) * ($1 - m) } / Double(v.count - 1)).squareRoot()
    }

    /// Ranks 1...n, ties sharing the average of their ranks.
    public static func ranks(_ v: [Double]) -> [Double] {
        let order = v.indices.sorted { v[$0] < v[$1] }
        var r = [Double](repeating: 0, count: v.count)
        var i = 0
        while i < order.count {
            var j = i
            while j + 1 < order.count && v[order[j + 1]] == v[order[i]] { j += 1 }
            let average = Double(i + j) / 2 + 1
            for k in i...j { r[order[k]] = average }
            i = j + 1
        }
        return r
    }

    public static func pearson(_ a: [Double], _ b: [Double]) -> Double {
        require(a.count == b.count, "pearson: \(a.count) vs \(b.count) values")
        let (ma, mb) = (mean(a), mean(b))
        var sab = 0.0, saa = 0.0, sbb = 0.0
        for (x, y) in zip(a, b) { sab += (x - ma) * (y - mb); saa += (x - ma) * (x - ma); sbb += (y - mb) * (y - mb) }
        return saa > 0 && sbb > 0 ? sab / (saa * sbb).squareRoot() : .nan
    }

    /// Spearman's rank correlation: Pearson's correlation of the (tie-averaged) ranks.
    public static func spearman(_ a: [Double], _ b: [Double]) -> Double { pearson(ranks(a), ranks(b)) }

    /// Kendall's tau-b: (concordant - discordant) / sqrt((n0 - ties_a) (n0 - ties_b)).
    public static func kendallTau(_ a: [Double], _ b: [Double]) -> Double {
        require(a.count == b.count, "kendallTau: \(a.count) vs \(b.count) values")
        var concordant = 0.0, discordant = 0.0, tiesA = 0.0, tiesB = 0.0
        for i in 0..<a.count {
            for j in (i + 1)..<Swift.max(a.count, i + 1) {
                let (da, db) = (a[i] - a[j], b[i] - b[j])
                if da == 0 && db == 0 { continue }
                if da == 0 { tiesA += 1; continue }
                if db == 0 { tiesB += 1; continue }
                if (da > 0) == (db > 0) { concordant += 1 } else { discordant += 1 }
            }
        }
        let denominator = ((concordant + discordant + tiesA) * (concordant + discordant + tiesB)).squareRoot()
        return denominator > 0 ? (concordant - discordant) / denominator : .nan
    }
}
