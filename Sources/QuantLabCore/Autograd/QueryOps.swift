import CKernels
import Foundation

// Ops of DETR-style detectors (RT-DETR): the top-k query selection and the fixed 2-D sin-cos
// position embedding. Attention itself is made of existing ops (linear, reshape, permute,
// matmul, softmax), so its backward is theirs.

/// The indices of the k tokens with the highest score, per batch entry: scores [B, T, C],
/// ranked by the largest of each token's C scores, descending; ties go to the lower index
/// (ONNX TopK with sorted = 1). k must not exceed T.
public func topKTokens(_ scores: Tensor, k: Int) -> [[Int]] {
    require(scores.rank == 3 && k >= 1 && k <= scores.shape[1], "topKTokens: scores \(scores.shape), k \(k)")
    let (b, t, c) = (scores.shape[0], scores.shape[1], scores.shape[2])
    return (0..<b).map { n in
        let best = (0..<t).map { i -> Float in
            let row = scores.data + (n * t + i) * c
            var m = row[0]
            for j in 1..<max(c, 1) where row[j] > m { m = row[j] }
            return m
        }
        return Array((0..<t).sorted { best[$0] != best[$1] ? best[$0] > best[$1] : $0 < $1 }.prefix(k))
    }
}

/// RT-DETR's query selection: the rows of x [B, T, D] at `topKTokens(scores, k)`, [B, k, D].
/// Gradient flows into x (scatter-add); the selection itself is not differentiable, as in
/// torch.topk + gather. Traced as one GatherTopK op.
public func gatherTopK(scores: Tensor, _ x: Tensor, k: Int) -> Tensor {
    require(x.rank == 3 && scores.rank == 3 && Array(x.shape.prefix(2)) == Array(scores.shape.prefix(2)),
            "gatherTopK: scores \(scores.shape), x \(x.shape)")
    let (b, t, d) = (x.shape[0], x.shape[1], x.shape[2])
    let picked = topKTokens(scores, k: k)
    let out = Tensor(zeros: [b, k, d])
    for n in 0..<b {
        for (i, r) in picked[n].enumerated() { (out.data + (n * k + i) * d).update(from: x.data + (n * t + r) * d, count: d) }
    }
    traceOp(.gatherTopK(k: k), [scores, x], out)
    return record(out, "gather_topk", [x]) { g in
        let gx = x.gradBuffer()
        for n in 0..<b {
            for (i, r) in picked[n].enumerated() { ql_axpy(gx.data + (n * t + r) * d, 1, g.data + (n * k + i) * d, Int64(d)) }
        }
    }
}

/// The fixed 2-D sin-cos embedding of a width x height grid, [H * W, dim], rows in raster
/// order (row-major over h, then w), as RT-DETR's AIFI builds it: with d = dim / 4 and
/// omega_i = 1 / temperature^(i / d), row (h, w) is
///   [sin(w omega), cos(w omega), sin(h omega), cos(h omega)]   (each d wide).
/// dim must be a multiple of 4.
public func sinCosPositionEmbedding2D(width: Int, height: Int, dim: Int, temperature: Float = 10000) -> Tensor {
    require(dim % 4 == 0 && dim > 0 && width > 0 && height > 0, "sinCosPositionEmbedding2D: \(width)x\(height), dim \(dim) (a multiple of 4)")
    let d = dim / 4
    let omega = (0..<d).map { 1 / Foundation.pow(Double(temperature), Double($0) / Double(d)) }
    let out = Tensor(zeros: [height * width, dim])
    for h in 0..<height {
        for w in 0..<width {
            let row = out.data + (h * width + w) * dim
            for i in 0..<d {
                let (aw, ah) = (Double(w) * omega[i], Double(h) * omega[i])
                row[i] = Float(Foundation.sin(aw))
                row[d + i] = Float(Foundation.cos(aw))
                row[2 * d + i] = Float(Foundation.sin(ah))
                row[3 * d + i] = Float(Foundation.cos(ah))
            }
        }
    }
    return out
}
