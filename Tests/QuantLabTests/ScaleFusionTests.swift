import Foundation
import Testing
@testable import QuantLabCore
@testable import QuantLabEngine
@testable import QuantLabModels
@testable import QuantLabQuant
@testable import QuantLabReport

// exp05's pieces (issue #14): the groups the scale-unification pass derives from a graph, on
// hand-built graphs and on the detector; implicit PTQ's joint calibration of a group.

@Suite("Scale fusion: groups from the graph, joint calibration")
struct ScaleFusionTests {
    /// A conv "0" whose output x is read by conv "1", by a max pool feeding conv "2", and by a
    /// residual add with conv "3"'s output, feeding conv "4".
    private func residualNet(_ rng: inout SeededGenerator) -> (Sequential, (Tensor) -> [Tensor]) {
        let c = (0..<5).map { i in Conv2d(i == 0 ? 3 : 4, 4, kernel: i == 3 ? 3 : 1, padding: i == 3 ? 1 : 0, rng: &rng) }
        let model = Sequential(c)
        model.eval()
        return (model, { x in
            let a = c[0](x).relu()
            let pooled = maxPool2d(a, kernel: 3, stride: 1, padding: 1)
            return [c[1](a), c[2](pooled), c[4](a + c[3](a))]
        })
    }

    /// The residual net with its quantizers calibrated by `method` on one input, which it returns.
    private func calibratedResidualNet(seed: UInt64, method: CalibrationMethod) throws -> (Sequential, (Tensor) -> [Tensor], QuantizationSimulator, Tensor) {
        var rng = SeededGenerator(seed: seed)
        let (model, forward) = residualNet(&rng)
        let sim = try QuantizationSimulator(model)
        let x = Tensor.uniform([2, 3, 8, 8], low: -1, high: 1, rng: &rng)
        sim.calibrate(on: [x]) { _ = forward($0) }
        try sim.applyCalibration(method)
        return (model, forward, sim, x)
    }

    @Test("a shared tensor and a max pool join their readers' quantizers; a residual add does not (it does not commute with quantization)")
    func residualAdd() throws {
        let (model, forward, sim, x) = try calibratedResidualNet(seed: 41, method: .max)
        defer { sim.remove() }
        let groups = scaleGroups(try Graph.trace(model, example: x, forward))
        // a is read by 1, (through the pool) 2, and 3; the add's output is read by 4 alone
        #expect(groups == [["1.input", "2.input", "3.input"]], "\(groups)")
    }

    @Test("the detector: the pass finds the article's case and every group of YOLOv6's hand-written list that exists in our placement, and names the ones the list misses")
    func detectorGroups() throws {
        var rng = SeededGenerator(seed: 44)
        let (model, sim) = try calibratedDeployedDetector(seed: 43, rng: &rng)
        defer { sim.remove() }
        let graph = try Graph.trace(model, batch: 1)
        let groups = scaleGroups(graph)
        // the article's case: reduce_layer1's output read by upsample1 and, through the concat, Rep_n3.conv1
        let article = try #require(groups.first { Set(Paper.A7.readers).isSubset(of: $0) }, "\(groups)")
        // (reduce_layer1 is conv + ReLU: the quantizer reads the ReLU's output)
        let producer = try #require(graph.nodes.first { $0.name == Paper.A7.producer })
        let relu = try #require((graph.consumers[producer.output] ?? []).first.map { graph.nodes[$0] })
        #expect(relu.op.name == "Relu")
        #expect((graph.consumers[relu.output] ?? []).contains { graph.nodes[$0].name == Paper.A7.readers[0] }, "upsample1's quantizer reads reduce_layer1's output directly")
        #expect(article.count == 2)
        let compared = YOLOv6FusionList.compare(with: groups)
        #expect(compared.map(\.status) == ["no group needed"] + Array(repeating: "found", count: 7), "\(compared.map(\.status))")
        #expect(YOLOv6FusionList.unlisted(groups) == [["neck.downsample1.conv.input", "detect.stems.1.conv.input"],
                                                      ["neck.downsample2.conv.input", "detect.stems.0.conv.input"]].sorted { $0[0] < $1[0] },
                "\(YOLOv6FusionList.unlisted(groups))")
        // every member of every group is a quantizer of the graph
        let names = Set(graph.nodes.map(\.name))
        #expect(groups.allSatisfy { $0.allSatisfy(names.contains) })
    }

    @Test("unification on a graph alone (an imported ONNX file has no simulator): each group's QDQ nodes get the group max; the original graph is untouched; an unknown member is an error")
    func graphUnification() throws {
        let (model, forward, sim, x) = try calibratedResidualNet(seed: 42, method: .max)
        defer { sim.remove() }
        let a = try sim.layer("1").input.amax![0]
        try sim.layer("2").input.amax = [a * 1.25]
        let graph = try Graph.trace(model, example: x, forward)
        let (unified, changes) = try graph.unifyingScales(scaleGroups(graph))
        #expect(changes.count == 1 && changes[0].after == a * 1.25 && changes[0].before == [a, a * 1.25, a])
        let amax = { (g: Graph, name: String) in g.nodes.first { $0.name == name }.flatMap(g.activationQuantizerAmax) }
        #expect(["1.input", "2.input", "3.input"].allSatisfy { amax(unified, $0) == a * 1.25 })
        #expect(amax(graph, "1.input") == a, "the input graph is not changed")
        #expect(try Int8Plan(unified).reformatCount < Int8Plan(graph).reformatCount)
        expectError(EngineError.self, mentioning: "nope.input") { _ = try graph.unifyingScales([["1.input", "nope.input"]]) }
    }

    @Test("histograms merge exactly when their bins align, and a merged histogram counts everything; joint max is the largest max")
    func mergedHistograms() throws {
        var rng = SeededGenerator(seed: 45)
        let x1 = Tensor.uniform([1000], low: -2, high: 2, rng: &rng)
        let x2 = Tensor(Tensor.randn([1000], rng: &rng).values.map { min(max($0, -3), 3) }, shape: [1000])
        x1.data[0] = 3; x2.data[0] = -3 // one max |x| for both: the same bin width
        var h1 = AbsHistogram(bins: 64), h2 = AbsHistogram(bins: 64), both = AbsHistogram(bins: 64)
        h1.collect(x1); h2.collect(x2); both.collect(x1); both.collect(x2)
        let merged = try #require(AbsHistogram.merging([h1, h2]))
        #expect(merged.binWidth == both.binWidth && merged.total == both.total)
        #expect(merged.counts == both.counts)
        // different widths: the wider one's bins, nothing lost
        var narrow = AbsHistogram(bins: 64)
        narrow.collect(Tensor.uniform([500], low: -0.5, high: 0.5, rng: &rng))
        let mixed = try #require(AbsHistogram.merging([h1, narrow]))
        #expect(mixed.binWidth == h1.binWidth && mixed.total == h1.total + narrow.total)
        #expect(AbsHistogram.merging([AbsHistogram(bins: 8)]) == nil)
        var s1 = ActivationStatistics(histogram: true), s2 = ActivationStatistics(histogram: true)
        s1.collect(x1); s2.collect(Tensor(x2.values.map { $0 * 0.5 }, shape: x2.shape))
        #expect(try ActivationStatistics.jointAmax([s1, s2], .max) == 3)
        let joint = try ActivationStatistics.jointAmax([s1, s2], .entropy)
        #expect(joint > 0 && joint <= 3)
        expectError(QuantizationError.self, mentioning: "moving average") { _ = try ActivationStatistics.jointAmax([s1, s2], .movingAverage(rate: 0.9)) }
        expectError(QuantizationError.self, mentioning: "no calibration data") { _ = try ActivationStatistics.jointAmax([s1, ActivationStatistics(histogram: true)], .max) }
    }

    @Test("joint calibration gives every quantizer of a group one amax from their merged statistics; the plan then writes each tensor once in int8")
    func jointCalibration() throws {
        let (model, forward, sim, x) = try calibratedResidualNet(seed: 47, method: .entropy)
        defer { sim.remove() }
        try sim.layer("3").input.amax = [try sim.layer("1").input.amax![0] * 1.5] // as if trained apart
        let graph = try Graph.trace(model, example: x, forward)
        let groups = scaleGroups(graph)
        // the image; a at two scales; the add's output for conv 4
        #expect(try Int8Plan(graph).reformats["quantize"] == 4)
        let changes = try calibrateJointly(sim, groups: groups, method: .entropy)
        #expect(changes.count == 1 && changes[0].before.count == 3)
        let amaxes = try groups[0].map { try sim.layer(String($0.dropLast(".input".count))).input.amax! }
        #expect(Set(amaxes).count == 1 && amaxes[0] == [changes[0].after])
        let after = try Int8Plan(try Graph.trace(model, example: x, forward))
        // a once for all its int8 readers; the float add still needs a in f32 (TensorRT would fuse
        // the add into conv 3's epilogue, rule 4, which our engine does not yet do), so conv 0
        // writes f32 and one Quantize makes the group's codes
        #expect(after.reformats["quantize"] == 3, "\(after.explain())")
    }
}
