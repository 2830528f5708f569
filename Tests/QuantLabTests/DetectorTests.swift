import Foundation
import Testing
@testable import QuantLabCore
@testable import QuantLabData
@testable import QuantLabModels
@testable import QuantLabQuant
@testable import QuantLabReport

@Suite("YOLOv6-style detector: assigner, loss pieces, model, training and resume")
struct DetectorTests {
    @Test("gatherRows and generalizedIoU: gradients against finite differences")
    func lossPieceGradients() {
        var rng = SeededGenerator(seed: 1)
        let failures = gradientCheck("gather_rows", [tensor([5, 4], &rng)]) { $0[0].gatherRows([3, 0, 3, 1]) }
        #expect(failures.isEmpty, "\(failures.prefix(3))")
        // boxes with clear overlaps, away from the max/min kinks
        let p = try! Tensor(shape: [3, 4], values: [0, 0, 10, 10, 5.3, 2.1, 14.7, 9.2, -3, 1, 4.1, 6.3])
        let g = try! Tensor(shape: [3, 4], values: [2.2, 1.1, 12.4, 8.7, 3.1, 4.2, 11.6, 13.3, 0.5, -2.2, 8.9, 3.7])
        let f2 = gradientCheck("giou", [p, g], eps: 1e-2) { generalizedIoU($0[0], $0[1]) }
        #expect(f2.isEmpty, "\(f2.prefix(3))")
    }

    @Test("generalizedIoU equals Box.giou")
    func giouForward() {
        var rng = SeededGenerator(seed: 2)
        var pv: [Float] = [], gv: [Float] = [], expected: [Float] = []
        for _ in 0..<20 {
            let a = Box(cx: Double(rng.nextFloat()) * 50, cy: Double(rng.nextFloat()) * 50, w: 1 + Double(rng.nextFloat()) * 30, h: 1 + Double(rng.nextFloat()) * 30)
            let b = Box(cx: Double(rng.nextFloat()) * 50, cy: Double(rng.nextFloat()) * 50, w: 1 + Double(rng.nextFloat()) * 30, h: 1 + Double(rng.nextFloat()) * 30)
            pv += [a.x1, a.y1, a.x2, a.y2].map(Float.init)
            gv += [b.x1, b.y1, b.x2, b.y2].map(Float.init)
            expected.append(Float(a.giou(b)))
        }
        let got = generalizedIoU(try! Tensor(shape: [20, 4], values: pv), try! Tensor(shape: [20, 4], values: gv))
        #expect(firstMismatch(got.values, expected, atol: 1e-5, rtol: 1e-4) == nil)
    }

    @Test("TAL assigner on a hand-built grid: candidates inside the box, top-k, IoU-normalised targets, crowd ignore")
    func assigner() {
        let anchors = AnchorGrid(inputSize: 32, levels: [8]) // 4 x 4 points at 4, 12, 20, 28
        let gt = ObjectLabel(box: Box(x1: 2, y1: 2, x2: 22, y2: 22), classIndex: 1)
        let crowd = ObjectLabel(box: Box(x1: 17, y1: 17, x2: 32, y2: 32), classIndex: 0, crowd: true)
        // every anchor predicts a 20 x 20 box centred on itself; class-1 probability 0.5
        var boxes: [Box] = [], scores = [Float](repeating: 0.1, count: 16 * 2)
        for (i, p) in anchors.points.enumerated() {
            boxes.append(Box(x1: p.x - 10, y1: p.y - 10, x2: p.x + 10, y2: p.y + 10))
            scores[i * 2 + 1] = 0.5
        }
        var tal = TaskAlignedAssigner()
        tal.topK = 2
        let r = tal.assign(scores: scores, classes: 2, boxes: boxes, anchors: anchors, labels: [gt, crowd])
        // candidates: the 3 x 3 points at 4, 12, 20. IoU of their boxes with the gt: centre (12, 12)
        // anchor 5 = 1; edge anchors 1, 4, 6, 9 = 240/560 = 3/7; corners = 144/656.
        // top-2 by 0.5 * IoU^6: anchor 5, then the first edge anchor (ties keep anchor order): 1
        #expect(r.gtIndex.enumerated().filter { $0.element >= 0 }.map(\.offset) == [1, 5])
        // soft targets: alignment / max alignment * max IoU (= 1)
        #expect(abs(r.targetScore[5] - 1) < 1e-8) // the 1e-9 guard in the denominator
        #expect(abs(r.targetScore[1] - Foundation.pow(3.0 / 7, 6)) < 1e-8)
        #expect(r.targetScore[0] == 0 && r.gtIndex[0] == -1)
        // anchors inside the crowd box are ignored: points (20,20), (28,20), (20,28), (28,28)
        #expect(r.ignored.enumerated().filter(\.element).map(\.offset) == [10, 11, 14, 15])
    }

    @Test("two objects claiming one anchor: the one its prediction overlaps most wins")
    func assignerConflict() {
        let anchors = AnchorGrid(inputSize: 32, levels: [8])
        let a = ObjectLabel(box: Box(x1: 0, y1: 0, x2: 24, y2: 24), classIndex: 0)
        let b = ObjectLabel(box: Box(x1: 8, y1: 8, x2: 16, y2: 16), classIndex: 0)
        let boxes = anchors.points.map { Box(x1: $0.x - 4, y1: $0.y - 4, x2: $0.x + 4, y2: $0.y + 4) }
        let r = TaskAlignedAssigner().assign(scores: [Float](repeating: 0.5, count: 16), classes: 1, boxes: boxes, anchors: anchors, labels: [a, b])
        #expect(r.gtIndex[5] == 1) // point (12, 12): its box equals b exactly
    }

    @Test("detector outputs, YOLOv6 module names, anchors")
    func detectorShapes() {
        var rng = SeededGenerator(seed: 3)
        let model = YOLOv6(.tiny(block: .repvgg, numClasses: 3, inputSize: 64), rng: &rng)
        let (cls, dist) = withNoGrad { model(Tensor.randn([2, 3, 64, 64], rng: &rng)) }
        let anchors = 8 * 8 + 4 * 4 + 2 * 2
        #expect(cls.shape == [2, anchors, 3] && dist.shape == [2, anchors, 4] && model.anchors.count == anchors)
        let nano = YOLOv6(.nano(block: .repvgg, numClasses: 10), rng: &rng)
        let names = Set(nano.namedParameters().map(\.0))
        for n in ["neck.reduce_layer1.conv.weight", "neck.upsample1.upsample_transpose.weight", "neck.Rep_n3.conv1.rbr_dense.conv.weight",
                  "neck.Rep_p4.block.0.rbr_1x1.conv.weight", "backbone.ERBlock_5.2.cv2.conv.weight", "detect.cls_preds.2.bias"] {
            #expect(names.contains(n), "\(n)")
        }
    }

    @Test("the whole detector fuses to 3x3 convs with unchanged outputs", arguments: [BlockKind.repvgg, .qarepvgg, .repopt])
    func detectorFuse(kind: BlockKind) {
        var rng = SeededGenerator(seed: 4)
        let model = YOLOv6(.tiny(block: kind, numClasses: 2, inputSize: 64), rng: &rng)
        let x = Tensor.randn([1, 3, 64, 64], rng: &rng)
        model.train() // a few batches give BN non-trivial statistics
        for _ in 0..<3 { _ = withNoGrad { model(Tensor.randn([2, 3, 64, 64], rng: &rng)) } }
        model.eval()
        let before = withNoGrad { model(x) }
        model.fuseRepBlocks()
        #expect(model.repBlocks().allSatisfy { $0.1.isDeployed })
        let after = withNoGrad { model(x) }
        #expect(firstMismatch(after.classLogits.values, before.classLogits.values, atol: 1e-4, rtol: 1e-3) == nil)
        #expect(firstMismatch(after.distances.values, before.distances.values, atol: 1e-4, rtol: 1e-3) == nil)
        // the full deploy form also folds every conv + BN; the names of the convs stay
        model.convertToDeployForm()
        #expect(!model.namedModules().contains { $0.1 is BatchNorm2d }, "a BatchNorm2d survived the deploy conversion")
        #expect(model.namedModules().contains { $0.0 == "neck.reduce_layer1.conv" && $0.1 is Conv2d })
        let deployed = withNoGrad { model(x) }
        #expect(firstMismatch(deployed.classLogits.values, before.classLogits.values, atol: 1e-4, rtol: 1e-3) == nil)
        #expect(firstMismatch(deployed.distances.values, before.distances.values, atol: 1e-4, rtol: 1e-3) == nil)
    }

    private static func tinyData(_ tag: String) throws -> (URL, DetectionDataset) {
        let root = FileManager.default.temporaryDirectory.appendingPathComponent("ql-det-\(tag)-\(UUID().uuidString)")
        let cfg = SyntheticShapes.Config(name: "d", imageSize: 64, trainImages: 8, valImages: 4, seed: 1, maxObjects: 3,
                                         minObjectSize: 10, maxObjectSize: 30, singleObject: false, noiseStd: 2...4, jpegQuality: 90...95)
        try SyntheticShapes(cfg).write(root: root, threads: 2)
        return (root, try DetectionDataset(root: root.appendingPathComponent("d"), split: "train2017"))
    }

    @Test("the loss falls when the detector fits one batch")
    func overfitsOneBatch() throws {
        let (root, ds) = try Self.tinyData("fit")
        defer { try? FileManager.default.removeItem(at: root) }
        var rng = SeededGenerator(seed: 5)
        let model = YOLOv6(.tiny(block: .repvgg, numClasses: ds.classCount, inputSize: 64), rng: &rng)
        let loader = DetectionLoader(dataset: ds, batchSize: 8, transform: DetectionTransform(size: 64), shuffle: false, seed: 0)
        let batch = try loader.batch(0, epoch: 0, order: loader.order(epoch: 0))
        let opt = SGD(model.parameterGroups(weightDecay: 0), learningRate: 0.02, momentum: 0.9, nesterov: true)
        let loss = DetectionLoss()
        var first: Float = 0, last: Float = 0
        for step in 0..<40 {
            let (c, d) = model(batch.images)
            let (total, parts) = loss(model, classLogits: c, distances: d, labels: batch.labels)
            opt.zeroGrad()
            total.backward()
            opt.step()
            if step == 0 { first = parts.total }
            last = parts.total
        }
        #expect(last < 0.6 * first, "loss \(first) -> \(last)")
    }

    @Test("an interrupted run resumed from its checkpoint ends bit-identical to an uninterrupted one")
    func exactResume() throws {
        let (root, ds) = try Self.tinyData("resume")
        defer { try? FileManager.default.removeItem(at: root) }
        var cfg = DetectorTrainingConfig()
        cfg.epochs = 3
        cfg.batchSize = 4
        cfg.checkpointEverySteps = 1000
        cfg.warmupEpochs = 1
        func fresh(_ seed: UInt64) -> YOLOv6 { tinyDetector(seed: seed, classes: ds.classCount) }
        let straight = DetectorTrainer(model: fresh(7), train: ds, val: nil, config: cfg, checkpointDir: nil, log: { _ in })
        try straight.run()
        let dir = root.appendingPathComponent("ckpt")
        let first = DetectorTrainer(model: fresh(7), train: ds, val: nil, config: cfg, checkpointDir: dir, log: { _ in })
        try first.run(stopAfter: 3) // stops mid-epoch 2; the checkpoint is from the end of epoch 1 (step 2)
        let resumed = DetectorTrainer(model: fresh(99), train: ds, val: nil, config: cfg, checkpointDir: dir, log: { _ in })
        try resumed.run()
        #expect(resumed.step == straight.step)
        let a = straight.model.stateDict(), b = resumed.model.stateDict()
        #expect(a.map(\.0) == b.map(\.0))
        #expect(zip(a, b).allSatisfy { $0.1.values == $1.1.values }, "weights differ after resume")
        let ea = try straight.emaModel().stateDict(), eb = try resumed.emaModel().stateDict()
        #expect(zip(ea, eb).allSatisfy { $0.1.values == $1.1.values }, "EMA differs after resume")
    }
}

@Suite("RepVGG-style classifier")
struct ClassifierTests {
    @Test("the classifier learns the toy task with every block kind", arguments: [BlockKind.repvgg, .qarepvgg, .repopt])
    func learnsToyTask(kind: BlockKind) {
        var rng = SeededGenerator(seed: 21)
        let model = RepClassifier(.tiny(block: kind, numClasses: 4, inputSize: 32), rng: &rng)
        let opt = SGD(model.parameterGroups(weightDecay: 1e-4), learningRate: 0.05, momentum: 0.9, nesterov: true)
        func rgb(_ x: Tensor) -> Tensor { concat([x, x, x], dim: 1) }
        model.train()
        for _ in 0..<150 {
            let (x, y) = ToyShapes.batch(32, size: 32, rng: &rng)
            let loss = crossEntropy(logits: model(rgb(x)), targets: y)
            opt.zeroGrad()
            loss.backward()
            opt.step()
        }
        model.eval()
        let (x, y) = ToyShapes.batch(256, size: 32, rng: &rng)
        let logits = withNoGrad { model(rgb(x)) }
        var correct = 0
        for i in 0..<256 {
            let row = Array(logits.values[(i * 4)..<(i * 4 + 4)])
            if row.indices.max(by: { row[$0] < row[$1] }) == y[i] { correct += 1 }
        }
        #expect(correct > 200, "\(kind): \(correct)/256 correct")
    }
}
