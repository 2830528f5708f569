import Foundation

/// The minimum-cost assignment of `rows` to distinct columns (rows <= columns), solved exactly
/// by the Hungarian method with potentials (Kuhn-Munkres, shortest augmenting paths;
/// O(rows^2 * columns)). What scipy's linear_sum_assignment gives DETR's matcher.
///
/// `cost[r][c]` must be finite. Returns, for each row, its column.
public func minimumCostAssignment(_ cost: [[Double]]) -> [Int] {
    let n = cost.count
    guard n > 0 else { return [] }
    let m = cost[0].count
    precondition(cost.allSatisfy { $0.count == m } && n <= m, "assignment: \(n) rows need at least as many columns (\(m)), all rows of one length")
    precondition(cost.allSatisfy { $0.allSatisfy(\.isFinite) }, "assignment: every cost must be finite")
    // 1-based: u row potentials, v column potentials, owner[c] the row holding column c (0 = free)
    var u = [Double](repeating: 0, count: n + 1), v = [Double](repeating: 0, count: m + 1)
    var owner = [Int](repeating: 0, count: m + 1), way = [Int](repeating: 0, count: m + 1)
    for row in 1...n {
        owner[0] = row
        var c0 = 0
        var minSlack = [Double](repeating: .infinity, count: m + 1)
        var used = [Bool](repeating: false, count: m + 1)
        repeat { // grow the alternating tree until it reaches a free column
            used[c0] = true
            let r0 = owner[c0]
            var delta = Double.infinity, c1 = 0
            for c in 1...m where !used[c] {
                let reduced = cost[r0 - 1][c - 1] - u[r0] - v[c]
                if reduced < minSlack[c] { minSlack[c] = reduced; way[c] = c0 }
                if minSlack[c] < delta { delta = minSlack[c]; c1 = c }
            }
            for c in 0...m {
                if used[c] { u[owner[c]] += delta; v[c] -= delta } else { minSlack[c] -= delta }
            }
            c0 = c1
        } while owner[c0] != 0
        repeat { // flip the path
            let c1 = way[c0]
            owner[c0] = owner[c1]
            c0 = c1
        } while c0 != 0
    }
    var assignment = [Int](repeating: -1, count: n)
    for c in 1...m where owner[c] != 0 { assignment[owner[c] - 1] = c - 1 }
    return assignment
}
