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
/// own rounding, `ql_quantize_s8`), as u8 = code + 128 with the column-sum compensation of the
/// igemm kernels. acc is exact; y differs from the fake-quantized float product only by float
/// rounding.
public final class Int8Gemm {
    public let name: String
    public enum Kind: Sendable { case linear, matmul }
    public let kind: Kind
    let amaxA: Float
    /// matmul: the second operand's amax.
    let amaxB: Float?
    // linear: the packed weight, its column sums, per-column scale and bias
    let outFeatures: Int, inFeatures: Int
    let packed: [Int8]
    let columnSums: [Int32]
    let scale: [Float]
    let bias: [Float]?
    /// The quantized rows of A, kept between runs.
    private var rows: [UInt8] = []

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
        var sums = [Int32](repeating: 0, count: outF)
        guard ql_igemm_pack_b(&packed, &sums, b, Int32(outF), Int32(inF), Int32(outF)) == 0 else { throw EngineError("\(name): weight packing failed") }
        self.packed = packed
        columnSums = sums.map { -128 * $0 }
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
        columnSums = []
        scale = []
        bias = nil
    }

    public var kindName: String { kind == .linear ? "Int8Gemm" : "Int8MatMul" }

    /// u8 codes (code + 128) of `count` floats.
    private func quantizeRows(_ x: UnsafePointer<Float>, _ count: Int, amax: Float) {
        if rows.count < count { rows = [UInt8](repeating: 0, count: count) }
        rows.withUnsafeMutableBufferPointer { out in
            out.baseAddress!.withMemoryRebound(to: Int8.self, capacity: count) { s8 in
                ql_quantize_s8(s8, x, Int64(count), amax, 127)
                for i in 0..<count { s8[i] = Int8(bitPattern: UInt8(bitPattern: s8[i]) ^ 0x80) } // +128 as u8
            }
        }
    }

    /// x [..., in] -> [..., out].
    func run(linear x: Tensor) throws -> Tensor {
        guard x.shape.last == inFeatures else { throw EngineError("\(name): input \(x.shape) for \(inFeatures) features") }
        let m = x.count / max(inFeatures, 1)
        quantizeRows(x.data, x.count, amax: amaxA)
        let out = Tensor(zeros: Array(x.shape.dropLast()) + [outFeatures])
        let status = scale.withUnsafeBufferPointer { sc in
            columnSums.withUnsafeBufferPointer { off in
                (bias ?? []).withUnsafeBufferPointer { bi in
                    var ep = ql_requant_params(col_offset: off.baseAddress, scale: sc.baseAddress, bias: bias == nil ? nil : bi.baseAddress, relu: 0)
                    return ql_igemm_u8s8_f32(Int32(m), Int32(outFeatures), Int32(inFeatures), rows, Int32(inFeatures), packed, &ep, out.data, Int32(outFeatures))
                }
            }
        }
        guard status == 0 else { throw EngineError("\(name): INT8 GEMM failed") }
        return out
    }

    /// a [..., M, K] x b [..., K, N] (same batch dims) -> [..., M, N].
    func run(matmul a: Tensor, _ b: Tensor) throws -> Tensor {
        guard a.rank >= 2, b.rank == a.rank, Array(a.shape.dropLast(2)) == Array(b.shape.dropLast(2)), a.shape[a.rank - 1] == b.shape[b.rank - 2],
              let amaxB else { throw EngineError("\(name): \(a.shape) x \(b.shape) do not multiply") }
        let (m, k, n) = (a.shape[a.rank - 2], a.shape[a.rank - 1], b.shape[b.rank - 1])
        let batch = a.count / max(m * k, 1)
        quantizeRows(a.data, a.count, amax: amaxA)
        var bCodes = [Int8](repeating: 0, count: b.count)
        ql_quantize_s8(&bCodes, b.data, Int64(b.count), amaxB, 127)
        var packedB = [Int8](repeating: 0, count: ql_igemm_packed_size(Int32(k), Int32(n)))
        var sums = [Int32](repeating: 0, count: n)
        let scales = [Float](repeating: (amaxA / 127) * (amaxB / 127), count: n)
        let out = Tensor(zeros: Array(a.shape.dropLast()) + [n])
        for i in 0..<batch {
            let ok = bCodes.withUnsafeBufferPointer { src in
                ql_igemm_pack_b(&packedB, &sums, src.baseAddress! + i * k * n, Int32(n), Int32(k), Int32(n)) == 0
            }
            guard ok else { throw EngineError("\(name): packing operand b failed") }
            for j in 0..<n { sums[j] *= -128 }
            let status = rows.withUnsafeBufferPointer { r in
                scales.withUnsafeBufferPointer { sc in
                    sums.withUnsafeBufferPointer { off in
                        var ep = ql_requant_params(col_offset: off.baseAddress, scale: sc.baseAddress, bias: nil, relu: 0)
                        return ql_igemm_u8s8_f32(Int32(m), Int32(n), Int32(k), r.baseAddress! + i * m * k, Int32(k), packedB, &ep, out.data + i * m * n, Int32(n))
                    }
                }
            }
            guard status == 0 else { throw EngineError("\(name): INT8 GEMM failed") }
        }
        return out
    }
}
