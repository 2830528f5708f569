import Foundation
import QuantLabCore
import QuantLabEngine

/// Our plan against onnxruntime, layer by layer, on the same graph and input: where the
/// difference between two whole-model latencies comes from. Each conv or matrix product is
/// matched by name (an ONNX export names its nodes after the graph's, and the peer's timings
/// come keyed by those names, a fused activation counted with its conv: `OnnxRuntimePeer.Result
/// .layerSeconds`); everything else is compared as one sum per side.
///
/// Both sides are profiled runs: a clock read per step on ours, onnxruntime's profiler on
/// its side, which costs it a few microseconds per node. So the small layers' ratios lean
/// against onnxruntime; the report prints both profiled sums beside the unprofiled latencies
/// to show how much.
public struct LayerComparison {
    public struct Row: Equatable {
        public var name: String
        /// Median seconds per run.
        public var ours: Double, peer: Double
        /// Our kernel's route (Winograd, conv2d, direct, ...), if the step chose one.
        public var route: String?
        /// Seconds ours takes more than the peer (negative: ours is faster).
        public var loss: Double { ours - peer }
    }

    /// Convs and matrix products in both, in the plan's order.
    public var rows: [Row]
    /// Our other steps' medians summed, and how many; the peer's other nodes summed, and of
    /// that its own layout changes, which have no counterpart in our plan.
    public var oursOther: Double, oursOtherCount: Int
    public var peerOther: Double, peerReorders: Double
    /// Our products without a timing on the peer's side (by name); the peer's unmatched
    /// nodes cannot be told apart from its other nodes by name, so they count in `peerOther`.
    public var oursOnly: [String]

    /// The key scripts/ort_run.py files onnxruntime's own layout changes under (NCHWc reorders,
    /// the transposes around its NHWC integer kernels).
    public static let peerReorderKey = "(onnxruntime layout changes)"

    /// `plan` must have profiled runs (`profile` on, then run); `peer` is
    /// `OnnxRuntimePeer.Result.layerSeconds` of the same graph exported.
    public init(plan: Int8Plan, peer: [String: Double]) {
        let medians = plan.stepMedians
        var ours: [(name: String, seconds: Double, route: String?)] = []
        var other = 0.0, otherCount = 0
        for i in plan.steps.indices {
            let layer = plan.stepLayer(i)
            if layer.isProduct {
                ours.append((layer.name, medians[i], layer.route))
            } else {
                other += medians[i]
                otherCount += 1
            }
        }
        let ourNames = Set(ours.map(\.name))
        rows = ours.compactMap { o in peer[o.name].map { Row(name: o.name, ours: o.seconds, peer: $0, route: o.route) } }
        oursOnly = ours.map(\.name).filter { peer[$0] == nil }
        (oursOther, oursOtherCount) = (other, otherCount)
        let peerRest = peer.filter { !ourNames.contains($0.key) }
        peerReorders = peerRest[Self.peerReorderKey] ?? 0
        peerOther = peerRest.values.reduce(0, +)
    }

    /// Sums over the matched products.
    public var oursProducts: Double { rows.reduce(0) { $0 + $1.ours } }
    public var peerProducts: Double { rows.reduce(0) { $0 + $1.peer } }

    /// The report: totals, then the `top` layers where ours loses most and wins most.
    /// `unprofiled`: both sides' unprofiled median latencies (seconds), when known.
    public func report(peerName: String, top: Int = 8, unprofiled: (ours: Double, peer: Double)? = nil) -> String {
        func us(_ s: Double) -> String { String(format: "%.1f", 1e6 * s) }
        func ms(_ s: Double) -> String { String(format: "%.2f", 1e3 * s) }
        func speed(_ ours: Double, _ peer: Double) -> String { ours > 0 ? String(format: "%.2fx", peer / ours) : "-" }
        var lines = ["against \(peerName), layer by layer (median time per run of profiled runs; ours / \(peerName) as a speed ratio, above 1: ours faster):"]
        lines.append("  convs and matrix products in both: \(rows.count); ours \(ms(oursProducts)) ms, \(peerName) \(ms(peerProducts)) ms: \(speed(oursProducts, peerProducts))"
            + (oursOnly.isEmpty ? "" : "; not found in \(peerName)'s timings: \(oursOnly.count) (\(oursOnly.prefix(3).joined(separator: ", "))\(oursOnly.count > 3 ? ", ..." : ""))"))
        lines.append("  the rest: ours \(ms(oursOther)) ms (\(oursOtherCount) steps), \(peerName) \(ms(peerOther)) ms"
            + (peerReorders > 0 ? " (of which its own layout changes \(ms(peerReorders)) ms)" : ""))
        var totals = "  profiled sums: ours \(ms(oursProducts + oursOther)) ms, \(peerName) \(ms(peerProducts + peerOther)) ms"
        if let u = unprofiled { totals += "; unprofiled latencies: ours \(ms(u.ours)) ms, \(peerName) \(ms(u.peer)) ms (the difference is each profiler's own cost and the runs' spread)" }
        lines.append(totals)
        func line(_ r: Row) -> String {
            String(format: "    %+7.1f us  ours %7@ us, %@ %7@ us (%@)  %@%@", 1e6 * r.loss, us(r.ours), peerName, us(r.peer), speed(r.ours, r.peer), r.name,
                   r.route.map { " [\($0)]" } ?? "")
        }
        let losing = rows.filter { $0.loss > 0 }.sorted { $0.loss > $1.loss }
        let winning = rows.filter { $0.loss < 0 }.sorted { $0.loss < $1.loss }
        if !losing.isEmpty {
            lines.append(String(format: "  where ours loses (%d layers, %@ ms in all), most first:", losing.count, ms(losing.reduce(0) { $0 + $1.loss })))
            lines += losing.prefix(top).map(line)
        }
        if !winning.isEmpty {
            lines.append(String(format: "  where ours wins (%d layers, %@ ms in all), most first:", winning.count, ms(-winning.reduce(0) { $0 + $1.loss })))
            lines += winning.prefix(top).map(line)
        }
        return lines.joined(separator: "\n")
    }
}
