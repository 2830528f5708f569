import CKernels
import Foundation
import QuantLabCore

/// The matrix products of a transformer on the integer GEMM (TensorRT's rule 3 for Gemm and
/// MatMul, f32 output because no quantizer follows them in our placement):
///
///   DQ(x), DQ(w) -> Gemm (linear) -> [bias]   y[r, o] = acc * s_x s_w[o] + b[o],
///       acc[r, o] = sum_i code_x[r, i] code_w[o, i], the weight packed once;
///   DQ(a), DQ(b) -> MatMul                    y[m, n] = acc * s_a s_b per batch entry,
///       both operands activations (attention's Q.K^T and A.V), b packed at every run.
///
/// The node takes the floats its quantizers read and quantizes them itself (the quantizers'
/// own rounding, `ql_quantize_s8`, clamped to +-127) and multiplies the signed codes
/// (`ql_igemm_s8s8_f32`: on AVX2 |a| * (b with a's sign), u8 x s8 again, at the rate of the
/// ReLU convs' kernel; before, code + 128 with a column-sum offset went through the kernel that
/// sign-extends to 16 bits, at half that rate). acc is exact; y differs from the fake-quantized
/// float product only by float rounding.
public final class Int8Gemm {
    public let name: String
    public enum Kind: Sendable { case linear, matmul }
    public let kind: Kind
    let amaxA: Float
    /// matmul: the second operand's amax.
    let amaxB: Float?
    // linear: the packed weight, per-column scale and bias
    let outFeatures: Int, inFeatures: Int
    let packed: [Int8]
    /// linear: the weight's codes before packing, [in][out] (the GPU packs its own layout),
    /// read back from the packing rather than kept twice.
    var weightCodes: [Int8] { unpackedB(packed, depth: inFeatures, columns: outFeatures) }
    let scale: [Float]
    let bias: [Float]?
    /// The quantized rows of A (signed codes), kept between runs.
    private var rows: [Int8] = []

    /// Gemm: weight [out, in] quantized per output channel with `weightAmax`.
    init(linear name: String, weight: Tensor, bias: Tensor?, inputAmax: Float, weightAmax: [Float]) throws {
        guard weight.rank == 2, weightAmax.count == weight.shape[0] else { throw EngineError("\(name): weight \(weight.shape) with \(weightAmax.count) scales") }
        self.name = name
        kind = .linear
        amaxA = inputAmax
        amaxB = nil
        let (outF, inF) = (weight.shape[0], weight.shape[1])
        (outFeatures, inFeatures) = (outF, inF)
        var codes = [Int8](repeating: 0, count: weight.count)
        codes.withUnsafeMutableBufferPointer { out in
            for o in 0..<outF { ql_quantize_s8(out.baseAddress! + o * inF, weight.data + o * inF, Int64(inF), weightAmax[o], 127) }
        }
        var b = [Int8](repeating: 0, count: weight.count) // B[i][o] = W[o][i]
        for o in 0..<outF { for i in 0..<inF { b[i * outF + o] = codes[o * inF + i] } }
        var packed = [Int8](repeating: 0, count: ql_igemm_packed_size(Int32(inF), Int32(outF)))
        guard ql_igemm_pack_b(&packed, nil, b, Int32(outF), Int32(inF), Int32(outF)) == 0 else { throw EngineError("\(name): weight packing failed") }
        self.packed = packed
        scale = weightAmax.map { (inputAmax / 127) * ($0 / 127) }
        self.bias = bias.map(\.values)
    }

    /// MatMul of two activations quantized per tensor.
    init(matmul name: String, amaxA: Float, amaxB: Float) {
        self.name = name
        kind = .matmul
        self.amaxA = amaxA
        self.amaxB = amaxB
        (outFeatures, inFeatures) = (0, 0)
        packed = []
        scale = []
        bias = nil
    }

    public var kindName: String { kind == .linear ? "Int8Gemm" : "Int8MatMul" }

    /// The codes of `count` floats.
    private func quantizeRows(_ x: UnsafePointer<Float>, _ count: Int, amax: Float) {
        if rows.count < count { rows = [Int8](repeating: 0, count: count) }
        rows.withUnsafeMutableBufferPointer { ql_quantize_s8($0.baseAddress!, x, Int64(count), amax, 127) }
    }

    /// y [m, n] = the epilogue of a [m, k] codes x packed [k, n]. Both operands' codes come from
    /// `ql_quantize_s8` with a bound of 127, so no -128 reaches the signed kernel.
    private func product(m: Int, n: Int, k: Int, a: UnsafePointer<Int8>, packed: UnsafeRawPointer, scale: UnsafePointer<Float>,
                         bias: UnsafePointer<Float>?, out: UnsafeMutablePointer<Float>) throws {
        var ep = ql_requant_params(col_offset: nil, scale: scale, bias: bias, relu: 0)
        let status = ql_igemm_s8s8_f32(Int32(m), Int32(n), Int32(k), a, Int32(k), packed, &ep, out, Int32(n))
        guard status == 0 else { throw EngineError("\(name): INT8 GEMM failed (status \(status))") }
    }

    /// x [..., in] -> [..., out].
    func run(linear x: Tensor) throws -> Tensor {
        guard x.shape.last == inFeatures else { throw EngineError("\(name): input \(x.shape) for \(inFeatures) features") }
        let m = x.count / max(inFeatures, 1)
        quantizeRows(x.data, x.count, amax: amaxA)
        let out = Tensor(uninitialized: Array(x.shape.dropLast()) + [outFeatures]) // the epilogue writes every element
        try scale.withUnsafeBufferPointer { sc in
            try (bias ?? []).withUnsafeBufferPointer { bi in
                try rows.withUnsafeBufferPointer { r in
                    try packed.withUnsafeBytes { p in
                        try product(m: m, n: outFeatures, k: inFeatures, a: r.baseAddress!, packed: p.baseAddress!,
                                    scale: sc.baseAddress!, bias: bias == nil ? nil : bi.baseAddress, out: out.data)
                    }
                }
            }
        }
        return out
    }

    /// b's codes and one batch entry's packed b, kept between runs.
    private var bCodes: [Int8] = [], packedB: [Int8] = []

    /// a [..., M, K] x b [..., K, N] (same batch dims) -> [..., M, N].
    func run(matmul a: Tensor, _ b: Tensor) throws -> Tensor {
        guard a.rank >= 2, b.rank == a.rank, Array(a.shape.dropLast(2)) == Array(b.shape.dropLast(2)), a.shape[a.rank - 1] == b.shape[b.rank - 2],
              let amaxB else { throw EngineError("\(name): \(a.shape) x \(b.shape) do not multiply") }
        let (m, k, n) = (a.shape[a.rank - 2], a.shape[a.rank - 1], b.shape[b.rank - 1])
        let batch = a.count / max(m * k, 1)
        quantizeRows(a.data, a.count, amax: amaxA)
        if bCodes.count < b.count { bCodes = [Int8](repeating: 0, count: b.count) }
        bCodes.withUnsafeMutableBufferPointer { ql_quantize_s8($0.baseAddress!, b.data, Int64(b.count), amaxB, 127) }
        let packedCount = ql_igemm_packed_size(Int32(k), Int32(n))
        if packedB.count < packedCount { packedB = [Int8](repeating: 0, count: packedCount) }
        let scales = [Float](repeating: (amaxA / 127) * (amaxB / 127), count: n)
        let out = Tensor(uninitialized: Array(a.shape.dropLast()) + [n]) // the epilogue writes every element
        for i in 0..<batch {
            let ok = bCodes.withUnsafeBufferPointer { src in
                packedB.withUnsafeMutableBytes { ql_igemm_pack_b($0.baseAddress!, nil, src.baseAddress! + i * k * n, Int32(n), Int32(k), Int32(n)) == 0 }
            }
            guard ok else { throw EngineError("\(name): packing operand b failed") }
            try rows.withUnsafeBufferPointer { r in
                try scales.withUnsafeBufferPointer { sc in
                    try packedB.withUnsafeBytes { p in
                        try product(m: m, n: n, k: k, a: r.baseAddress! + i * m * k, packed: p.baseAddress!,
                                    scale: sc.baseAddress!, bias: nil, out: out.data + i * m * n)
                    }
                }
            }
        }
        return out
    }
}

/// The B operand [depth][columns] that `ql_igemm_pack_b` packed, read back from its documented
/// layout (igemm.c: byte c * 4 + r of k-group q in panel p is B[4q + r, 32p + c]); for the GPU,
/// which packs its own layout, so the host keeps one copy of the weights.
func unpackedB(_ packed: [Int8], depth: Int, columns: Int) -> [Int8] {
    let groups = (depth + 3) / 4
    var b = [Int8](repeating: 0, count: depth * columns)
    for n in 0..<columns {
        let (panel, c) = (n / 32, n % 32)
        for k in 0..<depth { b[k * columns + n] = packed[(panel * groups + k / 4) * 128 + c * 4 + k % 4] }
    }
    return b
}
