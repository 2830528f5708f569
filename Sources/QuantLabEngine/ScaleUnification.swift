import Foundation
import QuantLabCore
import QuantLabQuant

// Scale unification (the article's fix, claims A7-A8; issue #14): where one tensor is read by
// quantizers of different scales, an engine cannot write it once in int8 (TensorRT's rule 6),
// so it writes f32 and quantizes it once per scale — the Reformat kernels that made YOLOv6's
// QAT graph slower than PTQ. Giving those quantizers one amax, the largest, lets the producer
// write int8 once. YOLOv6 lists the groups by module name by hand (they break when modules are
// renamed); here they are derived from the graph: union-find over the quantizers that read one
// tensor, directly or through ops that commute with quantization (max pooling, channel
// concat), whose inputs must share their output's scale.

/// Groups of activation quantizers (QDQ node names, e.g. "neck.Rep_n3.conv1.rbr_reparam.input")
/// that must share one amax for every tensor they read to be written once in int8. Groups of
/// one are left out.
public func scaleGroups(_ graph: Graph) -> [[String]] {
    let consumers = graph.consumers
    func isActivationQuantizer(_ n: GraphNode) -> Bool { graph.activationQuantizerAmax(n) != nil }
    // the quantizers that read value v, directly or through commuting ops
    var memo: [Int: [Int]] = [:]
    func readers(_ v: Int) -> [Int] {
        if let r = memo[v] { return r }
        var r: [Int] = []
        for u in consumers[v] ?? [] {
            let n = graph.nodes[u]
            if isActivationQuantizer(n) { r.append(u) } else if graph.commutesWithQuantization(n) { r += readers(n.output) }
        }
        memo[v] = r
        return r
    }
    // union-find over node indices
    var parent = Array(graph.nodes.indices)
    func find(_ i: Int) -> Int {
        var i = i
        while parent[i] != i { parent[i] = parent[parent[i]]; i = parent[i] }
        return i
    }
    for v in graph.values.indices where graph.constants[v] == nil {
        let r = readers(v)
        for q in r.dropFirst() { parent[find(q)] = find(r[0]) }
    }
    var groups: [Int: [Int]] = [:]
    for (i, n) in graph.nodes.enumerated() where isActivationQuantizer(n) { groups[find(i), default: []].append(i) }
    return groups.values.filter { $0.count > 1 }.map { $0.map { graph.nodes[$0].name } }.sorted { $0[0] < $1[0] }
}

/// One group given one amax: its quantizers' names, their amaxes before, the amax after.
public typealias UnifiedGroup = (names: [String], before: [Float], after: Float)

extension Graph {
    /// The same graph with each group's quantizers (QDQ node names, from `scaleGroups`) at the
    /// group's largest amax: scale unification on a graph that has no simulator behind it (an
    /// imported ONNX file). Returns the graph and, per group, the amaxes before and after.
    public func unifyingScales(_ groups: [[String]]) throws -> (Graph, [UnifiedGroup]) {
        let index = Dictionary(uniqueKeysWithValues: nodes.enumerated().map { ($0.element.name, $0.offset) })
        let g = copy()
        var changes: [UnifiedGroup] = []
        for group in groups {
            let members = try group.map { name -> Int in
                guard let i = index[name], activationQuantizerAmax(nodes[i]) != nil else { throw EngineError("\(name) is not a per-tensor activation quantizer of the graph") }
                return i
            }
            let before = members.map { activationQuantizerAmax(nodes[$0])! }
            let top = before.max()!
            for i in members {
                guard case .quantizeDequantize(_, let axis, let bits) = nodes[i].op else { continue }
                g.nodes[i].op = .quantizeDequantize(amax: [top], axis: axis, bits: bits)
            }
            changes.append((group, before, top))
        }
        return (g, changes)
    }
}

/// Implicit PTQ's scales (TensorRT's calibration without Q/DQ nodes, Paddle's one QDQ per
/// tensor): one range per tensor, where a concat's inputs are slices of its output and so take
/// its range. Here: each group's quantizers get one amax, calibrated by `method` on everything
/// the group's quantizers saw in calibration together (their histograms merged), instead of
/// each quantizer's own amax. Needs the statistics of the calibration pass (not reset).
/// Returns, per group, the names and the amax before and after.
@discardableResult
public func calibrateJointly(_ sim: QuantizationSimulator, groups: [[String]], method: CalibrationMethod) throws -> [UnifiedGroup] {
    try groups.map { group in
        let layers = try inputQuantizedLayers(sim, group)
        let before = try perTensorAmax(layers)
        let joint = try ActivationStatistics.jointAmax(layers.map(\.input.statistics), method)
        for l in layers { l.input.amax = [joint] }
        return (group, before, joint)
    }
}

/// The layers whose input quantizers are the group's members ("<layer>.input").
private func inputQuantizedLayers(_ sim: QuantizationSimulator, _ group: [String]) throws -> [QuantizedLayer] {
    try group.map { name in
        guard name.hasSuffix(".input") else { throw EngineError("quantizer \(name) is not a layer's input quantizer") }
        return try sim.layer(String(name.dropLast(".input".count)))
    }
}

private func perTensorAmax(_ layers: [QuantizedLayer]) throws -> [Float] {
    try layers.map { l in
        guard let a = l.input.amax, a.count == 1 else { throw EngineError("\(l.name): the input quantizer is not calibrated per tensor") }
        return a[0]
    }
}

/// Sets every quantizer of each group to the group's largest amax (largest, so that no member
/// clips more than it did). Returns, per group, the names and the amax before and after.
@discardableResult
public func unifyScales(_ sim: QuantizationSimulator, groups: [[String]]) throws -> [UnifiedGroup] {
    try groups.map { group in
        let layers = try inputQuantizedLayers(sim, group)
        let before = try perTensorAmax(layers)
        let top = before.max()!
        for l in layers { l.input.amax = [top] }
        return (group, before, top)
    }
}

/// YOLOv6's hand-written `op_concat_fusion_list` (tools/qat/qat_export.py, applied with
/// `--graph-opt`), each group with its members in our module names: YOLOv6's RepOpt blocks
/// call their deploy conv `.conv` where ours is `.rbr_reparam`, and YOLOv6 also quantizes the
/// SPPF max-pool input (`m`) and the upsampled features before their concat
/// (`upsample_feat*_quant`), which our placement (quantizers at conv inputs only) has no
/// quantizer for. exp05 and the tests check which of these groups the graph-derived pass finds.
public enum YOLOv6FusionList {
    public struct Group: Sendable {
        public let yolov6: [String]
        /// The members that exist in our placement, as QDQ node names.
        public let ours: [String]
    }

    public static let groups: [Group] = [
        Group(yolov6: ["backbone.ERBlock_5.2.m", "backbone.ERBlock_5.2.cv2.conv"],
              ours: ["backbone.ERBlock_5.2.cv2.conv.input"]),
        Group(yolov6: ["backbone.ERBlock_5.0.conv", "neck.Rep_p4.conv1.conv", "neck.upsample_feat0_quant"],
              ours: ["backbone.ERBlock_5.0.rbr_reparam.input", "neck.Rep_p4.conv1.rbr_reparam.input"]),
        Group(yolov6: ["backbone.ERBlock_4.0.conv", "neck.Rep_p3.conv1.conv", "neck.upsample_feat1_quant"],
              ours: ["backbone.ERBlock_4.0.rbr_reparam.input", "neck.Rep_p3.conv1.rbr_reparam.input"]),
        Group(yolov6: ["neck.upsample1.upsample_transpose", "neck.Rep_n3.conv1.conv"],
              ours: ["neck.upsample1.upsample_transpose.input", "neck.Rep_n3.conv1.rbr_reparam.input"]),
        Group(yolov6: ["neck.upsample0.upsample_transpose", "neck.Rep_n4.conv1.conv"],
              ours: ["neck.upsample0.upsample_transpose.input", "neck.Rep_n4.conv1.rbr_reparam.input"]),
        Group(yolov6: ["detect.reg_convs.0.conv", "detect.cls_convs.0.conv"], ours: ["detect.cls_convs.0.conv.input", "detect.reg_convs.0.conv.input"]),
        Group(yolov6: ["detect.reg_convs.1.conv", "detect.cls_convs.1.conv"], ours: ["detect.cls_convs.1.conv.input", "detect.reg_convs.1.conv.input"]),
        Group(yolov6: ["detect.reg_convs.2.conv", "detect.cls_convs.2.conv"], ours: ["detect.cls_convs.2.conv.input", "detect.reg_convs.2.conv.input"]),
    ]

    /// How each listed group relates to the groups found in a graph: "found" (a found group
    /// holds all its members), "no group needed" (one member in our placement), "missed".
    public static func compare(with found: [[String]]) -> [(group: Group, status: String)] {
        groups.map { g in
            if g.ours.count < 2 { return (g, "no group needed") }
            return (g, found.contains { Set(g.ours).isSubset(of: $0) } ? "found" : "missed")
        }
    }

    /// The found groups that no listed group covers: what the hand-written list would miss.
    public static func unlisted(_ found: [[String]]) -> [[String]] {
        found.filter { f in !groups.contains { g in g.ours.count > 1 && Set(g.ours).isSubset(of: f) } }
    }
}
