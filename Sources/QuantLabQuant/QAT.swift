import Foundation
import QuantLabCore

// Quantization-aware training's pieces (issue #13, exp04): YOLOv6's channel-wise distillation
// loss and its decay, and PaddleSlim's learned step size (LSQ). Sources: QAT.md in the design
// notes; YOLOv6 `yolov6/models/losses/loss_distill_ns.py`, PaddleSlim
// `paddleslim/quant/quanters/lsq_func.py` (read, not copied).

/// YOLOv6's `distill_loss_cw`: for each pair of feature maps [N, C, H, W] (the three Rep-PAN
/// outputs of student and teacher), per image and channel p = softmax over the H*W positions
/// of feature / T, and
///   L = sum over scales of T^2 / (N * C) * sum_{n, c} KL(p_teacher || p_student).
/// No gradient reaches the teacher.
public func channelWiseDistillationLoss(student: [Tensor], teacher: [Tensor], temperature: Float = 1) -> Tensor {
    require(student.count == teacher.count && !student.isEmpty, "CWD: \(student.count) student and \(teacher.count) teacher feature maps")
    require(temperature > 0, "CWD: temperature must be positive, got \(temperature)")
    var total: Tensor?
    for (s, t) in zip(student, teacher) {
        require(s.shape == t.shape && s.rank == 4, "CWD: student \(s.shape) vs teacher \(t.shape); both [N, C, H, W]")
        let (n, c, hw) = (s.shape[0], s.shape[1], s.shape[2] * s.shape[3])
        let logStudent = (s.reshaped([n * c, hw]) * (1 / temperature)).logSoftmax()
        let teacherP = withNoGrad { (t.detached().reshaped([n * c, hw]) * (1 / temperature)).softmax() }
        let term = klDivergence(logInput: logStudent, target: teacherP, reduction: .sum) * (temperature * temperature / Float(n * c))
        total = total.map { $0 + term } ?? term
    }
    return total!
}

/// YOLOv6's decay of the distillation terms over training: d(e) = 1 - 0.99 (1 - cos(pi e / E)) / 2,
/// from 1 at the first epoch to 0.01 at the last.
public func distillationDecay(epoch: Int, epochs: Int) -> Float {
    require(epochs > 0 && epoch >= 0, "distillationDecay: epoch \(epoch) of \(epochs)")
    return Float(1 - 0.99 * (1 - cos(Double.pi * Double(epoch) / Double(epochs))) / 2)
}

/// Learned step size quantization (LSQ, Esser et al. 2020, as PaddleSlim's `lsq_func`):
///   v = x / a,  q = clip(round(v), Qn, Qp),  out = q * a
/// with a = `step` (one value, or one per index along `axis`). Gradients (straight through the
/// rounding):
///   d out / dx = 1 where Qn <= v <= Qp, else 0
///   d out / da = (Qn or Qp where clipped, round(v) - v inside) * gradScale
/// gradScale is LSQ's 1 / sqrt(numel * Qp) (numel of the whole tensor, as PaddleSlim) unless given.
public func lsqFakeQuantize(_ x: Tensor, step: Tensor, qn: Int, qp: Int, axis: Int? = nil, gradScale: Float? = nil) -> Tensor {
    require(qn < 0 && qp > 0, "LSQ: need Qn < 0 < Qp, got \(qn), \(qp)")
    let channels = axis.map { x.shape[$0] } ?? 1
    if let axis { require(axis >= 0 && axis < x.rank, "LSQ: axis \(axis) out of range for shape \(x.shape)") }
    require(step.count == channels, "LSQ: \(step.count) steps for \(channels) channel(s) of shape \(x.shape)")
    for i in 0..<step.count { require(step.data[i] > 0, "LSQ: step \(i) is \(step.data[i]); steps must be positive") }
    let inner = axis.map { x.shape[($0 + 1)...].reduce(1, *) } ?? x.count
    let (lo, hi) = (Float(qn), Float(qp))
    let scale = gradScale ?? 1 / Float(Double(x.count * qp).squareRoot())
    let out = Tensor(zeros: x.shape)
    let n = x.count
    for i in 0..<n {
        let a = step.data[(i / inner) % channels]
        let v = x.data[i] / a
        out.data[i] = min(max(v.rounded(.toNearestOrEven), lo), hi) * a
    }
    traceOp(.unsupported("LSQ fake quantization (export with the learned steps as amax = step * Qp)"), [x, step], out)
    return record(out, "lsq_fake_quant", [x, step]) { g in
        let gx = x.requiresGrad ? x.gradBuffer() : nil, gs = step.requiresGrad ? step.gradBuffer() : nil
        var stepGrad = [Double](repeating: 0, count: channels)
        for i in 0..<n {
            let c = (i / inner) % channels
            let v = x.data[i] / step.data[c]
            let d: Float
            if v < lo { d = lo } else if v > hi { d = hi } else {
                d = v.rounded(.toNearestOrEven) - v
                gx?.data[i] += g.data[i]
            }
            stepGrad[c] += Double(g.data[i] * d)
        }
        if let gs { for c in 0..<channels { gs.data[c] += Float(stepGrad[c]) * scale } }
    }
}
