import Foundation
import QuantLabCore
import QuantLabData

// RT-DETR-lite: Baidu's real-time DETR (Zhao et al., "DETRs Beat YOLOs on Real-time Object
// Detection", and PaddleDetection's rtdetr_r18vd), the same structure scaled to a 2-core CPU,
// with module names after the reference implementation:
//
//   backbone   ResNet-vd: a deep stem (three 3x3 convs) and max pooling (stride 4); four stages
//              of BasicBlocks; a stride-2 shortcut is average pooling then a 1x1 conv (the "d"
//              tweak). Feature maps at strides 8, 16, 32.
//   encoder    the hybrid encoder: 1x1 conv + BN projections to `hidden` channels; AIFI, one
//              post-norm transformer encoder layer (multi-head self-attention, GELU FFN) on the
//              stride-32 map with a fixed 2-D sin-cos position embedding; CCFM, top-down then
//              bottom-up fusion (1x1 lateral convs, nearest upsampling, 3x3 stride-2 downsampling
//              convs, CSPRep layers made of our RepVGG block).
//   decoder    IoU-aware query selection: every encoder token gets class scores and a box
//              (relative to its grid anchor); the `queries` tokens with the highest class score
//              become the decoder's content queries and reference boxes. `decoderLayers` layers
//              of self-attention, cross-attention over all tokens, ReLU FFN (post-norm), each
//              refining the boxes (in logit space) and predicting class logits.
//
// Simplifications, each because of the machine, none touching what quantization sees (conv and
// matmul, attention, LayerNorm, softmax are all there):
//   - cross-attention is plain multi-head attention over the flattened multi-scale tokens, not
//     multi-scale deformable attention (its bilinear sampling has no INT8 kernel in any engine
//     and is a custom op in ONNX). Keys carry position: the query-position MLP applied to each
//     token's anchor box, the same MLP that embeds the queries' reference boxes (as
//     Conditional-DETR-style decoders do), so queries and keys meet in one positional space;
//   - no denoising query groups (a training-speed device, not in the deploy graph);
//   - reference boxes are kept as logits: RT-DETR computes sigmoid(delta + inverse_sigmoid(ref)),
//     which is the same number without the log and the clamp in the graph;
//   - no valid-anchor mask (at these map sizes every anchor lies inside (0.01, 0.99));
//   - the decoder reads the encoder's maps directly (RT-DETR adds one more 1x1 conv + BN per
//     level there); CSPRep blocks use ReLU (our RepVGG block) where RT-DETR's use SiLU.

public struct RTDETRConfig: Codable, Equatable, Sendable {
    public var inputSize: Int
    public var numClasses: Int
    /// Stem output, then the four stages' outputs (strides 4, 8, 16, 32).
    public var backboneChannels: [Int]
    /// BasicBlocks per stage.
    public var backboneDepths: [Int]
    public var hidden: Int
    public var heads: Int
    /// Width of the AIFI and decoder feed-forward layers.
    public var feedForward: Int
    /// Rep blocks per CSPRep layer (RT-DETR: 3).
    public var cspBlocks: Int
    public var block: BlockKind
    public var decoderLayers: Int
    public var queries: Int

    public init(inputSize: Int, numClasses: Int, backboneChannels: [Int], backboneDepths: [Int], hidden: Int, heads: Int, feedForward: Int,
                cspBlocks: Int, block: BlockKind = .repvgg, decoderLayers: Int, queries: Int) {
        self.inputSize = inputSize
        self.numClasses = numClasses
        self.backboneChannels = backboneChannels
        self.backboneDepths = backboneDepths
        self.hidden = hidden
        self.heads = heads
        self.feedForward = feedForward
        self.cspBlocks = cspBlocks
        self.block = block
        self.decoderLayers = decoderLayers
        self.queries = queries
    }

    /// rtdetr_r18vd (hidden 256, 8 heads, FFN 1024, 3 decoder layers, 300 queries, ResNet18-vd
    /// widths 64-512) scaled down: hidden 64, 4 heads, FFN 256, 2 layers, 50 queries, backbone
    /// widths / 4, one block per stage and per CSPRep layer, 160 px.
    public static func lite(numClasses: Int, inputSize: Int = 160) -> RTDETRConfig {
        RTDETRConfig(inputSize: inputSize, numClasses: numClasses, backboneChannels: [16, 16, 32, 64, 128], backboneDepths: [1, 1, 1, 1],
                     hidden: 64, heads: 4, feedForward: 256, cspBlocks: 1, decoderLayers: 2, queries: 50)
    }

    /// QUICK: the same structure, narrower, for 96 px tiny data.
    public static func tiny(numClasses: Int, inputSize: Int = 96) -> RTDETRConfig {
        RTDETRConfig(inputSize: inputSize, numClasses: numClasses, backboneChannels: [8, 8, 16, 32, 64], backboneDepths: [1, 1, 1, 1],
                     hidden: 32, heads: 4, feedForward: 64, cspBlocks: 1, decoderLayers: 2, queries: 30)
    }

    /// A configuration that cannot build a model is an error naming the field.
    public func validate() throws {
        func check(_ ok: Bool, _ what: String) throws { if !ok { throw ModelFileError("RT-DETR config: \(what)") } }
        try check(inputSize >= 32 && inputSize % 32 == 0 && inputSize <= 2048, "inputSize \(inputSize) must be a multiple of 32 in 32...2048")
        try check((1...10_000).contains(numClasses), "numClasses \(numClasses) must be in 1...10000")
        try check(backboneChannels.count == 5 && backboneChannels.allSatisfy { (1...4096).contains($0) }, "backboneChannels \(backboneChannels) must be 5 widths in 1...4096")
        try check(backboneDepths.count == 4 && backboneDepths.allSatisfy { (1...64).contains($0) }, "backboneDepths \(backboneDepths) must be 4 counts in 1...64")
        try check(heads >= 1 && hidden % heads == 0 && hidden % 4 == 0 && hidden <= 4096, "hidden \(hidden) must be a multiple of 4 and of heads \(heads)")
        try check((1...16384).contains(feedForward), "feedForward \(feedForward) must be in 1...16384")
        try check((1...16).contains(cspBlocks), "cspBlocks \(cspBlocks) must be in 1...16")
        try check(block != .repoptSearch, "block must be a deployable Rep block")
        try check((1...12).contains(decoderLayers), "decoderLayers \(decoderLayers) must be in 1...12")
        let tokens = [8, 16, 32].map { (inputSize / $0) * (inputSize / $0) }.reduce(0, +)
        try check(queries >= 1 && queries <= tokens, "queries \(queries) must be in 1...\(tokens) (the encoder's tokens)")
    }

    /// Encoder tokens over the three levels.
    public var tokenCount: Int { [8, 16, 32].map { (inputSize / $0) * (inputSize / $0) }.reduce(0, +) }
}

// MARK: - Backbone (ResNet-vd)

/// ResNet's BasicBlock, vd form: branch2a 3x3 (stride) + ReLU, branch2b 3x3; the shortcut is
/// the identity, or a 1x1 conv + BN, preceded by 2x2 average pooling when the block downsamples.
public final class BasicBlockVD: Module, Layer {
    public let branch2a: ConvBNAct, branch2b: ConvBNAct
    public let short: ConvBNAct?
    let poolShortcut: Bool

    public init(_ cin: Int, _ cout: Int, stride: Int, rng: inout SeededGenerator) {
        branch2a = ConvBNAct(cin, cout, kernel: 3, stride: stride, activation: .relu, rng: &rng)
        branch2b = ConvBNAct(cout, cout, kernel: 3, activation: .none, rng: &rng)
        short = (stride != 1 || cin != cout) ? ConvBNAct(cin, cout, kernel: 1, activation: .none, rng: &rng) : nil
        poolShortcut = stride != 1
        super.init()
        registerModule("branch2a", branch2a)
        registerModule("branch2b", branch2b)
        if let short { registerModule("short", short) }
    }

    public func callAsFunction(_ x: Tensor) -> Tensor {
        let residual = short.map { $0(poolShortcut ? avgPool2d(x, kernel: 2, stride: 2) : x) } ?? x
        return (branch2b(branch2a(x)) + residual).relu()
    }
}

public final class ResNetVD: Module {
    public let stem: Sequential
    public let stages: [Sequential]

    public init(channels c: [Int], depths: [Int], rng: inout SeededGenerator) {
        let half = max(c[0] / 2, 1)
        stem = Sequential([ConvBNAct(3, half, kernel: 3, stride: 2, activation: .relu, rng: &rng),
                           ConvBNAct(half, half, kernel: 3, activation: .relu, rng: &rng),
                           ConvBNAct(half, c[0], kernel: 3, activation: .relu, rng: &rng)])
        var stages: [Sequential] = []
        for s in 0..<4 {
            var blocks: [any Layer] = []
            for b in 0..<depths[s] {
                blocks.append(BasicBlockVD(b == 0 ? c[s] : c[s + 1], c[s + 1], stride: b == 0 && s > 0 ? 2 : 1, rng: &rng))
            }
            stages.append(Sequential(blocks))
        }
        self.stages = stages
        super.init()
        registerModule("conv1", stem)
        registerModule("res_layers", ModuleList(stages))
    }

    /// Feature maps at strides 8, 16, 32.
    public func callAsFunction(_ x: Tensor) -> [Tensor] {
        var y = maxPool2d(stem(x), kernel: 3, stride: 2, padding: 1)
        var outs: [Tensor] = []
        for (i, s) in stages.enumerated() {
            y = s(y)
            if i > 0 { outs.append(y) }
        }
        return outs
    }
}

// MARK: - Attention

/// Multi-head attention (PyTorch's nn.MultiheadAttention with separate q, k, v projections):
///   softmax(Q K^T / sqrt(d_head)) V per head, then the output projection.
/// The two products of activations pass tap points (q_tap, k_tap on Q.K^T; attn_tap, v_tap on
/// A.V) where a quantization simulator that quantizes `matmul` puts its quantizers.
public final class MultiHeadAttention: Module {
    public let heads: Int, dim: Int
    public let qProj: Linear, kProj: Linear, vProj: Linear, outProj: Linear
    public let qTap = TapPoint(role: .matmulOperand), kTap = TapPoint(role: .matmulOperand)
    public let attnTap = TapPoint(role: .matmulOperand), vTap = TapPoint(role: .matmulOperand)

    public init(dim: Int, heads: Int, rng: inout SeededGenerator) {
        require(dim % heads == 0, "MultiHeadAttention: dim \(dim) not divisible by \(heads) heads")
        self.dim = dim
        self.heads = heads
        qProj = Linear(dim, dim, rng: &rng)
        kProj = Linear(dim, dim, rng: &rng)
        vProj = Linear(dim, dim, rng: &rng)
        outProj = Linear(dim, dim, rng: &rng)
        super.init()
        registerModule("q_proj", qProj)
        registerModule("k_proj", kProj)
        registerModule("v_proj", vProj)
        registerModule("out_proj", outProj)
        registerModule("q_tap", qTap)
        registerModule("k_tap", kTap)
        registerModule("attn_tap", attnTap)
        registerModule("v_tap", vTap)
    }

    /// query [B, Nq, D], key and value [B, Nk, D] -> [B, Nq, D].
    public func callAsFunction(query: Tensor, key: Tensor, value: Tensor) -> Tensor {
        require(query.rank == 3 && key.rank == 3 && key.shape == value.shape && query.shape[2] == dim && key.shape[2] == dim
                && query.shape[0] == key.shape[0], "attention: query \(query.shape), key \(key.shape), value \(value.shape), dim \(dim)")
        let (b, nq, nk, dh) = (query.shape[0], query.shape[1], key.shape[1], dim / heads)
        let q = qProj(query).reshaped([b, nq, heads, dh]).permuted([0, 2, 1, 3]).scaled(by: 1 / Float(dh).squareRoot())
        let kT = kProj(key).reshaped([b, nk, heads, dh]).permuted([0, 2, 3, 1])
        let v = vProj(value).reshaped([b, nk, heads, dh]).permuted([0, 2, 1, 3])
        let attention = matmul(qTap(q), kTap(kT)).softmax()                 // [B, H, Nq, Nk]
        let out = matmul(attnTap(attention), vTap(v))                       // [B, H, Nq, dh]
        return outProj(out.permuted([0, 2, 1, 3]).reshaped([b, nq, dim]))
    }
}

/// Linear layers with ReLU between them (RT-DETR's MLP heads).
public final class MLP: Module, Layer {
    public let layers: [Linear]

    public init(_ sizes: [Int], rng: inout SeededGenerator) {
        layers = zip(sizes, sizes.dropFirst()).map { Linear($0, $1, rng: &rng) }
        super.init()
        registerModule("layers", ModuleList(layers))
    }

    public func callAsFunction(_ x: Tensor) -> Tensor {
        var y = x
        for (i, l) in layers.enumerated() { y = l(y); if i < layers.count - 1 { y = y.relu() } }
        return y
    }
}

/// AIFI's encoder layer: post-norm self-attention with the position embedding added to
/// queries and keys, then a GELU feed-forward layer.
public final class TransformerEncoderLayer: Module {
    public let selfAttn: MultiHeadAttention
    public let linear1: Linear, linear2: Linear, norm1: LayerNorm, norm2: LayerNorm

    public init(dim: Int, heads: Int, feedForward: Int, rng: inout SeededGenerator) {
        selfAttn = MultiHeadAttention(dim: dim, heads: heads, rng: &rng)
        linear1 = Linear(dim, feedForward, rng: &rng)
        linear2 = Linear(feedForward, dim, rng: &rng)
        norm1 = LayerNorm(dim)
        norm2 = LayerNorm(dim)
        super.init()
        registerModule("self_attn", selfAttn)
        registerModule("linear1", linear1)
        registerModule("linear2", linear2)
        registerModule("norm1", norm1)
        registerModule("norm2", norm2)
    }

    /// src [B, T, D], pos [1, T, D].
    public func callAsFunction(_ src: Tensor, pos: Tensor) -> Tensor {
        let qk = src + pos
        let x = norm1(src + selfAttn(query: qk, key: qk, value: src))
        return norm2(x + linear2(linear1(x).gelu()))
    }
}

/// A decoder layer: self-attention among the queries, cross-attention to the encoder tokens,
/// ReLU FFN; post-norm, position added to queries (and, by the caller, to the keys).
public final class TransformerDecoderLayer: Module {
    public let selfAttn: MultiHeadAttention, crossAttn: MultiHeadAttention
    public let linear1: Linear, linear2: Linear, norm1: LayerNorm, norm2: LayerNorm, norm3: LayerNorm

    public init(dim: Int, heads: Int, feedForward: Int, rng: inout SeededGenerator) {
        selfAttn = MultiHeadAttention(dim: dim, heads: heads, rng: &rng)
        crossAttn = MultiHeadAttention(dim: dim, heads: heads, rng: &rng)
        linear1 = Linear(dim, feedForward, rng: &rng)
        linear2 = Linear(feedForward, dim, rng: &rng)
        norm1 = LayerNorm(dim)
        norm2 = LayerNorm(dim)
        norm3 = LayerNorm(dim)
        super.init()
        registerModule("self_attn", selfAttn)
        registerModule("cross_attn", crossAttn)
        registerModule("linear1", linear1)
        registerModule("linear2", linear2)
        registerModule("norm1", norm1)
        registerModule("norm2", norm2)
        registerModule("norm3", norm3)
    }

    /// target [B, K, D], queryPos [B, K, D], memory [B, T, D], keys = memory + key position.
    public func callAsFunction(_ target: Tensor, queryPos: Tensor, memory: Tensor, keys: Tensor) -> Tensor {
        let q = target + queryPos
        var x = norm1(target + selfAttn(query: q, key: q, value: target))
        x = norm2(x + crossAttn(query: x + queryPos, key: keys, value: memory))
        return norm3(x + linear2(linear1(x).relu()))
    }
}

// MARK: - Hybrid encoder

/// CSPRep layer: two 1x1 convs (SiLU); one goes through `blocks` Rep blocks; the sum.
public final class CSPRepLayer: Module, Layer {
    public let conv1: ConvBNAct, conv2: ConvBNAct
    public let bottlenecks: Sequential

    public init(_ cin: Int, _ cout: Int, blocks: Int, kind: BlockKind, rng: inout SeededGenerator) {
        conv1 = ConvBNAct(cin, cout, kernel: 1, activation: .silu, rng: &rng)
        conv2 = ConvBNAct(cin, cout, kernel: 1, activation: .silu, rng: &rng)
        bottlenecks = Sequential((0..<blocks).map { _ in makeRepBlock(kind, cout, cout, rng: &rng) })
        super.init()
        registerModule("conv1", conv1)
        registerModule("conv2", conv2)
        registerModule("bottlenecks", bottlenecks)
    }

    public func callAsFunction(_ x: Tensor) -> Tensor { bottlenecks(conv1(x)) + conv2(x) }
}

public final class HybridEncoder: Module {
    public let inputProj: [ConvBNAct]
    public let encoder: TransformerEncoderLayer
    public let lateralConvs: [ConvBNAct], fpnBlocks: [CSPRepLayer]
    public let downsampleConvs: [ConvBNAct], panBlocks: [CSPRepLayer]
    public let concatTaps: [TapPoint]
    let positionEmbedding: Tensor

    public init(_ c: RTDETRConfig, rng: inout SeededGenerator) {
        let h = c.hidden
        inputProj = c.backboneChannels.suffix(3).map { ConvBNAct($0, h, kernel: 1, activation: .none, rng: &rng) }
        encoder = TransformerEncoderLayer(dim: h, heads: c.heads, feedForward: c.feedForward, rng: &rng)
        lateralConvs = (0..<2).map { _ in ConvBNAct(h, h, kernel: 1, activation: .silu, rng: &rng) }
        fpnBlocks = (0..<2).map { _ in CSPRepLayer(2 * h, h, blocks: c.cspBlocks, kind: c.block, rng: &rng) }
        downsampleConvs = (0..<2).map { _ in ConvBNAct(h, h, kernel: 3, stride: 2, activation: .silu, rng: &rng) }
        panBlocks = (0..<2).map { _ in CSPRepLayer(2 * h, h, blocks: c.cspBlocks, kind: c.block, rng: &rng) }
        concatTaps = (0..<4).map { _ in TapPoint() }
        let s5 = c.inputSize / 32
        positionEmbedding = sinCosPositionEmbedding2D(width: s5, height: s5, dim: h).reshaped([1, s5 * s5, h])
        super.init()
        registerModule("input_proj", ModuleList(inputProj))
        registerModule("encoder", encoder)
        registerModule("lateral_convs", ModuleList(lateralConvs))
        registerModule("fpn_blocks", ModuleList(fpnBlocks))
        registerModule("downsample_convs", ModuleList(downsampleConvs))
        registerModule("pan_blocks", ModuleList(panBlocks))
        registerModule("concat_taps", ModuleList(concatTaps))
    }

    /// Backbone maps (strides 8, 16, 32) -> fused maps of `hidden` channels at the same strides.
    public func callAsFunction(_ feats: [Tensor]) -> [Tensor] {
        var proj = zip(inputProj, feats).map { $0.0($0.1) }
        let s5 = proj[2], (b, d, hh, ww) = (s5.shape[0], s5.shape[1], s5.shape[2], s5.shape[3])
        let tokens = s5.reshaped([b, d, hh * ww]).permuted([0, 2, 1])
        proj[2] = encoder(tokens, pos: positionEmbedding).permuted([0, 2, 1]).reshaped([b, d, hh, ww])
        // top-down (CCFM's FPN half)
        var inner = [proj[2]]
        for (step, level) in [1, 0].enumerated() {
            let high = lateralConvs[step](inner[0])
            inner[0] = high
            inner.insert(fpnBlocks[step](concatTaps[step](concat([upsampleNearest(high, scale: 2), proj[level]], dim: 1))), at: 0)
        }
        // bottom-up (its PAN half)
        var outs = [inner[0]]
        for step in 0..<2 {
            let down = downsampleConvs[step](outs[step])
            outs.append(panBlocks[step](concatTaps[2 + step](concat([down, inner[step + 1]], dim: 1))))
        }
        return outs
    }
}

// MARK: - The detector

/// What one prediction set holds: class logits [B, K, C] and boxes [B, K, 4] (cx, cy, w, h,
/// normalised to the input).
public struct RTDETRPrediction {
    public var logits: Tensor
    public var boxes: Tensor
}

public final class RTDETR: Module {
    public let config: RTDETRConfig
    public let backbone: ResNetVD
    public let encoder: HybridEncoder
    public let encOutput: Linear, encNorm: LayerNorm
    public let encScoreHead: Linear, encBboxHead: MLP
    public let queryPosHead: MLP
    public let decoderLayers: [TransformerDecoderLayer]
    public let scoreHeads: [Linear], bboxHeads: [MLP]
    /// Grid anchors of all tokens as logits, [1, T, 4].
    let anchorLogits: Tensor
    /// The same anchors as boxes (sigmoid of the logits), [1, T, 4].
    let anchorBoxes: Tensor

    public init(_ config: RTDETRConfig, rng: inout SeededGenerator) {
        self.config = config
        let (h, c) = (config.hidden, config.numClasses)
        backbone = ResNetVD(channels: config.backboneChannels, depths: config.backboneDepths, rng: &rng)
        encoder = HybridEncoder(config, rng: &rng)
        encOutput = Linear(h, h, rng: &rng)
        encNorm = LayerNorm(h)
        encScoreHead = Linear(h, c, rng: &rng)
        encBboxHead = MLP([h, h, h, 4], rng: &rng)
        queryPosHead = MLP([4, 2 * h, h], rng: &rng)
        decoderLayers = (0..<config.decoderLayers).map { _ in TransformerDecoderLayer(dim: h, heads: config.heads, feedForward: config.feedForward, rng: &rng) }
        scoreHeads = (0..<config.decoderLayers).map { _ in Linear(h, c, rng: &rng) }
        bboxHeads = (0..<config.decoderLayers).map { _ in MLP([h, h, h, 4], rng: &rng) }
        (anchorLogits, anchorBoxes) = Self.anchors(inputSize: config.inputSize)
        super.init()
        // RT-DETR's initialisation of the class heads: bias -log((1 - 0.01) / 0.01), so every
        // score starts near 0.01 (focal-loss prior); last box layers at zero.
        let prior = -Foundation.log(Float(0.99) / 0.01)
        for head in [encScoreHead] + scoreHeads { head.bias?.fill(prior) }
        for mlp in [encBboxHead] + bboxHeads { mlp.layers.last?.weight.fill(0); mlp.layers.last?.bias?.fill(0) }
        registerModule("backbone", backbone)
        registerModule("encoder", encoder)
        registerModule("enc_output", encOutput)
        registerModule("enc_output_norm", encNorm)
        registerModule("enc_score_head", encScoreHead)
        registerModule("enc_bbox_head", encBboxHead)
        registerModule("query_pos_head", queryPosHead)
        registerModule("decoder_layers", ModuleList(decoderLayers))
        registerModule("dec_score_head", ModuleList(scoreHeads))
        registerModule("dec_bbox_head", ModuleList(bboxHeads))
    }

    /// One anchor per token of the three levels (raster order, stride 8 first): centre of its
    /// grid cell, width and height 0.05 * 2^level; as logits (inverse sigmoid) and as boxes.
    static func anchors(inputSize: Int) -> (Tensor, Tensor) {
        var logits: [Float] = [], boxes: [Float] = []
        for (level, stride) in [8, 16, 32].enumerated() {
            let n = inputSize / stride
            for y in 0..<n {
                for x in 0..<n {
                    let wh = 0.05 * Double(1 << level)
                    for v in [(Double(x) + 0.5) / Double(n), (Double(y) + 0.5) / Double(n), wh, wh] {
                        boxes.append(Float(v))
                        logits.append(Float(Foundation.log(v / (1 - v))))
                    }
                }
            }
        }
        let t = boxes.count / 4
        return (Tensor(logits, shape: [1, t, 4]), Tensor(boxes, shape: [1, t, 4]))
    }

    /// Every prediction set: the encoder's top-K (for its auxiliary loss) and one per decoder
    /// layer, last = the model's output. images [B, 3, S, S] in [0, 1].
    public func predictions(_ images: Tensor) -> (encoder: RTDETRPrediction, decoder: [RTDETRPrediction]) {
        let c = config
        require(images.rank == 4 && images.shape[1] == 3 && images.shape[2] == c.inputSize && images.shape[3] == c.inputSize,
                "RT-DETR: input \(images.shape), expected [B, 3, \(c.inputSize), \(c.inputSize)]")
        let maps = encoder(backbone(images))
        let b = images.shape[0], h = c.hidden
        let memory = concat(maps.map { m in m.reshaped([b, h, m.shape[2] * m.shape[3]]).permuted([0, 2, 1]) }, dim: 1) // [B, T, D]
        // query selection
        let outputMemory = encNorm(encOutput(memory))
        let encLogits = encScoreHead(outputMemory)                       // [B, T, C]
        let encBoxLogits = encBboxHead(outputMemory) + anchorLogits      // [B, T, 4]
        let picked = gatherTopK(scores: encLogits, concat([outputMemory, encBoxLogits, encLogits], dim: 2), k: c.queries)
        let target0 = picked.slice(dim: 2, start: 0, end: h)
        let ref0 = picked.slice(dim: 2, start: h, end: h + 4)
        let encoderSet = RTDETRPrediction(logits: picked.slice(dim: 2, start: h + 4, end: h + 4 + c.numClasses), boxes: ref0.sigmoid())
        // decoder: content queries and reference boxes enter without gradient (RT-DETR detaches both)
        var target = isTraining ? target0.detached() : target0
        var refLogits = isTraining ? ref0.detached() : ref0
        let keys = memory + queryPosHead(anchorBoxes)
        var sets: [RTDETRPrediction] = []
        for (i, layer) in decoderLayers.enumerated() {
            target = layer(target, queryPos: queryPosHead(refLogits.sigmoid()), memory: memory, keys: keys)
            let boxLogits = bboxHeads[i](target) + refLogits
            sets.append(RTDETRPrediction(logits: scoreHeads[i](target), boxes: boxLogits.sigmoid()))
            refLogits = isTraining ? boxLogits.detached() : boxLogits
        }
        return (encoderSet, sets)
    }

    /// The model's output: the last decoder layer's logits [B, K, C] and boxes [B, K, 4].
    public func callAsFunction(_ images: Tensor) -> (logits: Tensor, boxes: Tensor) {
        let last = predictions(images).decoder.last!
        return (last.logits, last.boxes)
    }

    /// RT-DETR's post-processing: sigmoid scores of every (query, class) pair, the best
    /// `maxDetections` of them; boxes in input pixels (x1, y1, x2, y2). No NMS.
    public func detections(logits: Tensor, boxes: Tensor, maxDetections: Int = 100) -> [[Detection]] {
        let (b, k, c) = (logits.shape[0], logits.shape[1], logits.shape[2])
        let size = Double(config.inputSize)
        return (0..<b).map { n in
            var scored: [(Float, Int)] = []
            scored.reserveCapacity(k * c)
            for i in 0..<(k * c) { scored.append((logits.data[n * k * c + i], i)) }
            let best = scored.sorted { $0.0 != $1.0 ? $0.0 > $1.0 : $0.1 < $1.1 }.prefix(maxDetections)
            return best.map { logit, i in
                let q = i / c, row = boxes.data + (n * k + q) * 4
                let box = Box(cx: Double(row[0]) * size, cy: Double(row[1]) * size, w: Double(row[2]) * size, h: Double(row[3]) * size)
                return Detection(box: box, classIndex: i % c, score: 1 / (1 + Foundation.exp(-Double(logit))))
            }
        }
    }

    /// The deploy-form parameter count (what an engine stores).
    public var deployParameterCount: Int {
        var rng = SeededGenerator(seed: 0)
        let m = RTDETR(config, rng: &rng)
        m.eval()
        m.convertToDeployForm()
        return m.parameterCount
    }
}
