import Foundation
import QuantLabCore
import QuantLabData

// A YOLOv6 (v1/v2 "S/N" family) detector built from Rep blocks, with the module names of
// meituan/YOLOv6 so that per-layer tables read like the article's:
//   backbone.stem, backbone.ERBlock_2 ... ERBlock_5 (EfficientRep)
//   neck.reduce_layer0/1, neck.upsample0/1.upsample_transpose, neck.Rep_p4/p3/n3/n4,
//   neck.downsample2/1 (Rep-PAN)
//   detect.stems/cls_convs/reg_convs/cls_preds/reg_preds.{0,1,2} (efficient decoupled head)
// Anchor-free at strides 8/16/32: every grid cell centre is an anchor point that predicts
// class logits and distances (left, top, right, bottom) to the box edges, in stride units.

/// Modules registered as "0", "1", ... without a forward of their own.
public final class ModuleList: Module {
    public let items: [Module]

    public init(_ items: [Module]) {
        self.items = items
        super.init()
        for (i, m) in items.enumerated() { registerModule(String(i), m) }
    }
}

/// Conv + BN + activation (YOLOv6's SimConv with ReLU, Conv with SiLU; ResNet's and
/// RT-DETR's projections with none).
public final class ConvBNAct: Module, Layer {
    public enum Activation: String, Codable, Sendable { case relu, silu, none }
    public private(set) var conv: Conv2d
    /// nil once folded into `conv` (the deploy form).
    public private(set) var bn: BatchNorm2d?
    public let activation: Activation
    public var silu: Bool { activation == .silu }

    public init(_ cin: Int, _ cout: Int, kernel: Int, stride: Int = 1, activation: Activation, rng: inout SeededGenerator) {
        conv = Conv2d(cin, cout, kernel: kernel, stride: stride, padding: kernel / 2, bias: false, rng: &rng)
        bn = BatchNorm2d(cout)
        self.activation = activation
        super.init()
        registerModule("conv", conv)
        registerModule("bn", bn!)
    }

    public convenience init(_ cin: Int, _ cout: Int, kernel: Int, stride: Int = 1, silu: Bool = false, rng: inout SeededGenerator) {
        self.init(cin, cout, kernel: kernel, stride: stride, activation: silu ? .silu : .relu, rng: &rng)
    }

    public func callAsFunction(_ x: Tensor) -> Tensor {
        let y = bn.map { $0(conv(x)) } ?? conv(x)
        switch activation {
        case .relu: return y.relu()
        case .silu: return y.silu()
        case .none: return y
        }
    }

    /// Deploy form: BN folded into a conv with bias, `bn` removed; `conv` keeps its name, so
    /// `neck.reduce_layer1.conv` is the same layer before and after (YOLOv6's fuse_conv_and_bn).
    public func foldBatchNorm() {
        guard let bn else { return }
        let folded = QuantLabModels.foldBatchNorm(weight: conv.weight, bias: conv.bias, bn)
        let fused = Conv2d(weight: folded.weight, bias: folded.bias, options: conv.options)
        fused.train(isTraining)
        unregisterModule("conv")
        unregisterModule("bn")
        registerModule("conv", fused)
        conv = fused
        self.bn = nil
    }
}

/// YOLOv6's RepBlock: `conv1` (cin -> cout) then n - 1 blocks (cout -> cout) in `block`.
public final class RepStage: Module, Layer {
    public let conv1: any RepBlock
    public let block: Sequential?

    public init(_ kind: BlockKind, _ cin: Int, _ cout: Int, n: Int, scaleInit: Float = 1, rng: inout SeededGenerator) {
        require(n >= 1, "RepStage needs n >= 1")
        conv1 = makeRepBlock(kind, cin, cout, scaleInit: scaleInit, rng: &rng)
        block = n > 1 ? Sequential((1..<n).map { _ in makeRepBlock(kind, cout, cout, scaleInit: scaleInit, rng: &rng) }) : nil
        super.init()
        registerModule("conv1", conv1)
        if let block { registerModule("block", block) }
    }

    public func callAsFunction(_ x: Tensor) -> Tensor {
        let y = conv1(x)
        return block.map { $0(y) } ?? y
    }
}

/// Simplified SPPF: 1x1 reduce, three chained 5x5 max pools, concat, 1x1.
public final class SimSPPF: Module, Layer {
    public let cv1: ConvBNAct, cv2: ConvBNAct

    public init(_ cin: Int, _ cout: Int, rng: inout SeededGenerator) {
        cv1 = ConvBNAct(cin, cin / 2, kernel: 1, rng: &rng)
        cv2 = ConvBNAct(cin / 2 * 4, cout, kernel: 1, rng: &rng)
        super.init()
        registerModule("cv1", cv1)
        registerModule("cv2", cv2)
    }

    public func callAsFunction(_ x: Tensor) -> Tensor {
        let a = cv1(x)
        let b = maxPool2d(a, kernel: 5, stride: 1, padding: 2)
        let c = maxPool2d(b, kernel: 5, stride: 1, padding: 2)
        let d = maxPool2d(c, kernel: 5, stride: 1, padding: 2)
        return cv2(concat([a, b, c, d], dim: 1))
    }
}

/// 2x upsampling by a transposed conv (kernel 2, stride 2), YOLOv6's `Transpose`.
public final class Upsample: Module, Layer {
    public let upsampleTranspose: ConvTranspose2d

    public init(_ channels: Int, rng: inout SeededGenerator) {
        upsampleTranspose = ConvTranspose2d(channels, channels, kernel: 2, stride: 2, rng: &rng)
        super.init()
        registerModule("upsample_transpose", upsampleTranspose)
    }

    public func callAsFunction(_ x: Tensor) -> Tensor { upsampleTranspose(x) }
}

/// Architecture hyper-parameters. Channels and repeats are YOLOv6's, times the multipliers.
public struct YOLOv6Config: Codable, Equatable, Sendable {
    public var block: BlockKind
    public var numClasses: Int
    public var inputSize: Int
    public var widthMultiple: Double
    public var depthMultiple: Double
    public var backboneChannels = [64, 128, 256, 512, 1024]
    public var backboneRepeats = [1, 6, 12, 18, 6]
    public var neckChannels = [256, 128, 128, 256, 256, 512]
    public var neckRepeats = [12, 12, 12, 12]

    public init(block: BlockKind, numClasses: Int, inputSize: Int, widthMultiple: Double, depthMultiple: Double) {
        self.block = block
        self.numClasses = numClasses
        self.inputSize = inputSize
        self.widthMultiple = widthMultiple
        self.depthMultiple = depthMultiple
    }

    /// YOLOv6-N proportions (width 0.25, depth 0.33): the size that trains on 2 CPU cores.
    public static func nano(block: BlockKind, numClasses: Int, inputSize: Int = 160) -> YOLOv6Config {
        YOLOv6Config(block: block, numClasses: numClasses, inputSize: inputSize, widthMultiple: 0.25, depthMultiple: 0.33)
    }

    /// A much smaller variant for QUICK=1 runs and tests.
    public static func tiny(block: BlockKind, numClasses: Int, inputSize: Int = 96) -> YOLOv6Config {
        YOLOv6Config(block: block, numClasses: numClasses, inputSize: inputSize, widthMultiple: 0.125, depthMultiple: 0.1)
    }

    /// Checks every field against the range a model this code can build and run needs, before
    /// anything is allocated (a model file's metadata is input, not a promise). Throws a
    /// message naming the field, its value and the allowed range.
    public func validate() throws {
        try checkField((1...10_000).contains(numClasses), "numClasses", numClasses, "1...10000")
        try checkField((32...2048).contains(inputSize) && inputSize % 32 == 0, "inputSize", inputSize, "a multiple of 32 in 32...2048")
        try checkField(widthMultiple.isFinite && widthMultiple > 0 && widthMultiple <= 4, "widthMultiple", widthMultiple, "in (0, 4]")
        try checkField(depthMultiple.isFinite && depthMultiple > 0 && depthMultiple <= 4, "depthMultiple", depthMultiple, "in (0, 4]")
        for (field, values, count) in [("backboneChannels", backboneChannels, 5), ("neckChannels", neckChannels, 6)] {
            try checkField(values.count == count && values.allSatisfy { (1...4096).contains($0) }, field, values, "\(count) values in 1...4096")
        }
        for (field, values, count) in [("backboneRepeats", backboneRepeats, 5), ("neckRepeats", neckRepeats, 4)] {
            try checkField(values.count == count && values.allSatisfy { (1...64).contains($0) }, field, values, "\(count) values in 1...64")
        }
        // the widths and depths the multipliers give, and roughly what they weigh (3x3 convs)
        let widths = (backboneChannels + neckChannels).map(width), depths = (backboneRepeats + neckRepeats).map(depth)
        try checkField(widths.allSatisfy { $0 <= 4096 }, "widthMultiple", widthMultiple, "one that keeps every layer at most 4096 channels wide")
        var weights = 0.0
        for i in 1..<5 {
            let c = Double(width(backboneChannels[i])), n = Double(depth(backboneRepeats[i]))
            weights += 9 * c * c * (n + 1)
        }
        try checkField(weights <= 2e8 && depths.allSatisfy { $0 <= 64 }, "widthMultiple / depthMultiple", "\(widthMultiple) / \(depthMultiple)",
                  "a model of at most ~200 M backbone weights (this one: \(Int(weights / 1e6)) M)")
    }

    func width(_ c: Int) -> Int { max(8, Int((Double(c) * widthMultiple / 8).rounded(.up)) * 8) }
    /// The channel counts and repeats the multipliers give (what the layers are built with).
    public var backboneWidths: [Int] { backboneChannels.map(width) }
    public var backboneDepths: [Int] { backboneRepeats.map(depth) }
    public var neckWidths: [Int] { neckChannels.map(width) }
    public var neckDepths: [Int] { neckRepeats.map(depth) }
    func depth(_ n: Int) -> Int { n > 1 ? max(1, Int((Double(n) * depthMultiple).rounded())) : n }
    public static let strides = [8, 16, 32]
}

public final class EfficientRep: Module {
    public let stem: any RepBlock
    public let erBlocks: [Sequential]

    public init(_ cfg: YOLOv6Config, rng: inout SeededGenerator) {
        let ch = cfg.backboneChannels.map(cfg.width), n = cfg.backboneRepeats.map(cfg.depth)
        stem = makeRepBlock(cfg.block, 3, ch[0], stride: 2, rng: &rng)
        var blocks: [Sequential] = []
        for i in 1...4 {
            var layers: [any Layer] = [makeRepBlock(cfg.block, ch[i - 1], ch[i], stride: 2, rng: &rng),
                                       RepStage(cfg.block, ch[i], ch[i], n: n[i], rng: &rng)]
            if i == 4 { layers.append(SimSPPF(ch[4], ch[4], rng: &rng)) }
            blocks.append(Sequential(layers))
        }
        erBlocks = blocks
        super.init()
        registerModule("stem", stem)
        for (i, b) in blocks.enumerated() { registerModule("ERBlock_\(i + 2)", b) }
    }

    /// Feature maps at strides 8, 16, 32.
    public func callAsFunction(_ x: Tensor) -> [Tensor] {
        let x1 = erBlocks[0](stem(x))
        let c3 = erBlocks[1](x1), c4 = erBlocks[2](c3), c5 = erBlocks[3](c4)
        return [c3, c4, c5]
    }
}

public final class RepPANNeck: Module {
    public let reduceLayer0: ConvBNAct, upsample0: Upsample, repP4: RepStage
    public let reduceLayer1: ConvBNAct, upsample1: Upsample, repP3: RepStage
    public let downsample2: ConvBNAct, repN3: RepStage, downsample1: ConvBNAct, repN4: RepStage
    /// The four concat outputs, as tap points: quantizing one there gives the concat's inputs
    /// one shared scale, as an INT8 engine needs (the "quantize concat inputs" option).
    public let concatP4 = TapPoint(), concatP3 = TapPoint(), concatN3 = TapPoint(), concatN4 = TapPoint()
    public let outChannels: [Int]

    public init(_ cfg: YOLOv6Config, rng: inout SeededGenerator) {
        let bc = cfg.backboneChannels.map(cfg.width), nc = cfg.neckChannels.map(cfg.width), n = cfg.neckRepeats.map(cfg.depth)
        reduceLayer0 = ConvBNAct(bc[4], nc[0], kernel: 1, rng: &rng)
        upsample0 = Upsample(nc[0], rng: &rng)
        repP4 = RepStage(cfg.block, bc[3] + nc[0], nc[0], n: n[0], rng: &rng)
        reduceLayer1 = ConvBNAct(nc[0], nc[1], kernel: 1, rng: &rng)
        upsample1 = Upsample(nc[1], rng: &rng)
        repP3 = RepStage(cfg.block, bc[2] + nc[1], nc[1], n: n[1], rng: &rng)
        downsample2 = ConvBNAct(nc[1], nc[2], kernel: 3, stride: 2, rng: &rng)
        repN3 = RepStage(cfg.block, nc[1] + nc[2], nc[3], n: n[2], rng: &rng)
        downsample1 = ConvBNAct(nc[3], nc[4], kernel: 3, stride: 2, rng: &rng)
        repN4 = RepStage(cfg.block, nc[0] + nc[4], nc[5], n: n[3], rng: &rng)
        outChannels = [nc[1], nc[3], nc[5]]
        super.init()
        registerModule("reduce_layer0", reduceLayer0)
        registerModule("upsample0", upsample0)
        registerModule("Rep_p4", repP4)
        registerModule("reduce_layer1", reduceLayer1)
        registerModule("upsample1", upsample1)
        registerModule("Rep_p3", repP3)
        registerModule("downsample2", downsample2)
        registerModule("Rep_n3", repN3)
        registerModule("downsample1", downsample1)
        registerModule("Rep_n4", repN4)
        registerModule("concat_p4", concatP4)
        registerModule("concat_p3", concatP3)
        registerModule("concat_n3", concatN3)
        registerModule("concat_n4", concatN4)
    }

    /// [c3, c4, c5] -> [p3, p4, p5] at strides 8, 16, 32 (YOLOv6's forward, step for step).
    public func callAsFunction(_ features: [Tensor]) -> [Tensor] {
        let (x2, x1, x0) = (features[0], features[1], features[2])
        let fpnOut0 = reduceLayer0(x0)
        let fOut0 = repP4(concatP4(concat([upsample0(fpnOut0), x1], dim: 1)))
        let fpnOut1 = reduceLayer1(fOut0)
        let panOut2 = repP3(concatP3(concat([upsample1(fpnOut1), x2], dim: 1)))
        let panOut1 = repN3(concatN3(concat([downsample2(panOut2), fpnOut1], dim: 1)))
        let panOut0 = repN4(concatN4(concat([downsample1(panOut1), fpnOut0], dim: 1)))
        return [panOut2, panOut1, panOut0]
    }
}

/// YOLOv6's efficient decoupled head: per level a 1x1 stem, then separate 3x3 conv towers and
/// 1x1 predictors for classes and for box distances (no DFL: 4 distances per anchor).
public final class EffiDeHead: Module {
    public let stems: ModuleList, clsConvs: ModuleList, regConvs: ModuleList, clsPreds: ModuleList, regPreds: ModuleList
    public let numClasses: Int

    public init(channels: [Int], numClasses: Int, rng: inout SeededGenerator) {
        self.numClasses = numClasses
        stems = ModuleList(channels.map { ConvBNAct($0, $0, kernel: 1, silu: true, rng: &rng) })
        clsConvs = ModuleList(channels.map { ConvBNAct($0, $0, kernel: 3, silu: true, rng: &rng) })
        regConvs = ModuleList(channels.map { ConvBNAct($0, $0, kernel: 3, silu: true, rng: &rng) })
        let cls = channels.map { Conv2d($0, numClasses, kernel: 1, rng: &rng) }
        let reg = channels.map { Conv2d($0, 4, kernel: 1, rng: &rng) }
        // YOLOv6's initialisation: class prior 0.01, zero weights; distances start at 1 stride
        let prior = -Foundation.log((1 - 0.01) / 0.01)
        for c in cls { c.weight.fill(0); c.bias!.fill(Float(prior)) }
        for r in reg { r.weight.fill(0); r.bias!.fill(1) }
        clsPreds = ModuleList(cls)
        regPreds = ModuleList(reg)
        super.init()
        registerModule("stems", stems)
        registerModule("cls_convs", clsConvs)
        registerModule("reg_convs", regConvs)
        registerModule("cls_preds", clsPreds)
        registerModule("reg_preds", regPreds)
    }

    /// Class logits [B, A, C] and distances [B, A, 4] over all anchors, level by level, each
    /// level in row-major grid order.
    public func callAsFunction(_ features: [Tensor]) -> (classLogits: Tensor, distances: Tensor) {
        var cls: [Tensor] = [], reg: [Tensor] = []
        for (i, f) in features.enumerated() {
            let x = (stems.items[i] as! ConvBNAct)(f)
            let c = (clsPreds.items[i] as! Conv2d)((clsConvs.items[i] as! ConvBNAct)(x))
            let r = (regPreds.items[i] as! Conv2d)((regConvs.items[i] as! ConvBNAct)(x))
            let (b, h, w) = (f.shape[0], f.shape[2], f.shape[3])
            cls.append(c.reshaped([b, numClasses, h * w]).permuted([0, 2, 1]))
            reg.append(r.reshaped([b, 4, h * w]).permuted([0, 2, 1]))
        }
        return (concat(cls, dim: 1), concat(reg, dim: 1))
    }
}

/// Anchor points (grid-cell centres, pixels) and their strides, for a square input.
public struct AnchorGrid: Sendable {
    public let points: [(x: Double, y: Double)]
    public let strides: [Double]
    public let levelSizes: [Int]

    public init(inputSize: Int, levels: [Int] = YOLOv6Config.strides) {
        var pts: [(Double, Double)] = [], st: [Double] = [], sizes: [Int] = []
        for s in levels {
            let n = inputSize / s
            sizes.append(n * n)
            for y in 0..<n { for x in 0..<n { pts.append(((Double(x) + 0.5) * Double(s), (Double(y) + 0.5) * Double(s))); st.append(Double(s)) } }
        }
        points = pts.map { (x: $0.0, y: $0.1) }
        strides = st
        levelSizes = sizes
    }

    public var count: Int { points.count }
}

public final class YOLOv6: Module {
    public let config: YOLOv6Config
    public let backbone: EfficientRep, neck: RepPANNeck, detect: EffiDeHead
    public let anchors: AnchorGrid

    public init(_ config: YOLOv6Config, rng: inout SeededGenerator) {
        require(config.inputSize % 32 == 0, "input size \(config.inputSize) must be a multiple of 32")
        self.config = config
        backbone = EfficientRep(config, rng: &rng)
        neck = RepPANNeck(config, rng: &rng)
        detect = EffiDeHead(channels: neck.outChannels, numClasses: config.numClasses, rng: &rng)
        anchors = AnchorGrid(inputSize: config.inputSize)
        super.init()
        registerModule("backbone", backbone)
        registerModule("neck", neck)
        registerModule("detect", detect)
    }

    /// Raw outputs for images [B, 3, S, S]: class logits [B, A, C], distances [B, A, 4].
    public func callAsFunction(_ images: Tensor) -> (classLogits: Tensor, distances: Tensor) {
        require(images.rank == 4 && images.shape[1] == 3 && images.shape[2] == config.inputSize && images.shape[3] == config.inputSize,
                     "YOLOv6 expects [B, 3, \(config.inputSize), \(config.inputSize)], got \(images.shape)")
        return detect(neck(backbone(images)))
    }

    /// Boxes (input pixels) from distances: anchor -/+ distance * stride.
    public func decode(_ distances: Tensor, image b: Int, anchor a: Int) -> Box {
        let d = distances.data + (b * anchors.count + a) * 4, p = anchors.points[a], s = anchors.strides[a]
        return Box(x1: p.x - Double(d[0]) * s, y1: p.y - Double(d[1]) * s, x2: p.x + Double(d[2]) * s, y2: p.y + Double(d[3]) * s)
    }

    /// Detections per image after sigmoid, score threshold, top-k and class-aware NMS, in
    /// network-input pixels.
    public func detections(classLogits: Tensor, distances: Tensor, scoreThreshold: Double = 0.001, iouThreshold: Double = 0.65,
                           maxDetections: Int = 100, preNMSTopK: Int = 1000) -> [[Detection]] {
        let (batch, a, c) = (classLogits.shape[0], classLogits.shape[1], classLogits.shape[2])
        var out: [[Detection]] = []
        for b in 0..<batch {
            var candidates: [Detection] = []
            let logits = classLogits.data + b * a * c
            for i in 0..<a {
                for k in 0..<c {
                    let score = 1 / (1 + Foundation.exp(-Double(logits[i * c + k])))
                    if score >= scoreThreshold { candidates.append(Detection(box: decode(distances, image: b, anchor: i), classIndex: k, score: score)) }
                }
            }
            if candidates.count > preNMSTopK { candidates = Array(candidates.sorted { $0.score > $1.score }.prefix(preNMSTopK)) }
            out.append(nonMaximumSuppression(candidates, iouThreshold: iouThreshold, scoreThreshold: scoreThreshold, maxDetections: maxDetections))
        }
        return out
    }
}

extension Module {
    /// The deploy form that PTQ calibrates and an INT8 engine runs: every Rep block fused to
    /// one 3x3 conv with bias, every conv + BN folded into one conv. Call in eval mode; the
    /// function computed is unchanged (up to float rounding).
    public func convertToDeployForm() {
        fuseRepBlocks()
        for (_, m) in namedModules() { (m as? ConvBNAct)?.foldBatchNorm() }
    }
}
