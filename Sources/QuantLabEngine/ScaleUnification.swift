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

/// Sets every quantizer of each group to the group's largest amax (largest, so that no member
/// clips more than it did). Returns, per group, the names and the amax before and after.
@discardableResult
public func unifyScales(_ sim: QuantizationSimulator, groups: [[String]]) throws -> [(names: [String], before: [Float], after: Float)] {
    var changes: [(names: [String], before: [Float], after: Float)] = []
    for group in groups {
        let layers = try group.map { name -> QuantizedLayer in
            guard name.hasSuffix(".input") else { throw EngineError("quantizer \(name) is not a layer's input quantizer") }
            return try sim.layer(String(name.dropLast(".input".count)))
        }
        let before = try layers.map { l -> Float in
            guard let a = l.input.amax, a.count == 1 else { throw EngineError("\(l.name): the input quantizer is not calibrated per tensor") }
            return a[0]
        }
        let top = before.max()!
        for l in layers { l.input.amax = [top] }
        changes.append((group, before, top))
    }
    return changes
}
